"""The evaluation commands: ``explain``, ``sweep``, ``minicanvas eval``, ``minicanvas compare`` and
``attack``; each imports its :mod:`saeuron.evaluate` module only when it runs."""
from __future__ import annotations

from pathlib import Path

from ..pipelines import load_pipeline
from .common import (add_edit_args, add_eval_model_args, add_grid_args, add_mode_args, eval_checkpoint, eval_classifiers, patch_kwargs,
                     prompt_list, style_values, torch_dtype)


def cmd_explain(a):
    """``saeuron explain``: a concept's features, where they fire and what editing each does."""
    from ..evaluate.explain import explain

    pipe = load_pipeline(a.model, a.device, torch_dtype(a.dtype))
    res = explain(pipe, eval_checkpoint(a.checkpoint, a.model), a.concept, a.out,
                  prompts=prompt_list(a.prompts), other_prompts=prompt_list(a.other_prompts), seeds=a.seeds,
                  hookpoint=a.hookpoint, top_features=a.top_features, top_images=a.top_images,
                  percentile=a.percentile, top_n=a.top_n, multiplier=a.multiplier, threshold=a.threshold,
                  num_inference_steps=a.steps,
                  guidance_scale=a.guidance, batch_size=a.batch_size)
    print(f"explanation: {res['png']} (and {res['html']})")


def cmd_sweep(a):
    """``saeuron sweep``: search each concept's edit settings and store the best as its defaults."""
    from ..evaluate.protocol import MULTIPLIERS, PERCENTILES, THRESHOLDS, TOP_NS
    from ..evaluate.sweep import sweep

    pipe = load_pipeline(a.model, a.device, torch_dtype(a.dtype))
    sweep(pipe, eval_classifiers(a.classifiers, a.device), eval_checkpoint(a.checkpoint, a.model),
          concepts=a.concepts, domain=a.domain, seeds=a.seeds, rule=a.rule, multipliers=a.multipliers or MULTIPLIERS,
          percentiles=a.percentiles or PERCENTILES, top_ns=a.top_ns or TOP_NS, hookpoints=a.hookpoints,
          thresholds=a.thresholds or THRESHOLDS,
          objects=a.objects, styles=style_values(a.styles), num_inference_steps=a.steps, guidance_scale=a.guidance,
          batch_size=a.batch_size, save_to=a.save_to, resume=not a.no_resume, damage=not a.no_damage, **patch_kwargs(a))


def cmd_minicanvas_eval(a):
    """``saeuron minicanvas eval``: the UnlearnCanvas protocol on a MiniCanvas pipeline (shipped defaults by default)."""
    from ..evaluate.unlearn_eval import evaluate_unlearning

    pipe = load_pipeline(a.model, a.device, torch_dtype(a.dtype))
    kw = patch_kwargs(a)
    res = evaluate_unlearning(pipe, eval_classifiers(a.classifiers, a.device), eval_checkpoint(a.checkpoint, a.model),
                              targets=a.targets, domain=a.domain, seeds=a.seeds, templates=a.templates,
                              objects=a.objects, styles=style_values(a.styles), num_inference_steps=a.steps,
                              guidance_scale=a.guidance, batch_size=a.batch_size, multi=a.multi, out_dir=a.out,
                              resume=not a.no_resume, **kw)
    print(f"results: {res['files']['json']}")


def add_explain_parser(sub):
    """``saeuron explain``: selected features, where they fire and what editing each does, as a PNG."""
    s = sub.add_parser("explain", help="PNG + HTML: a concept's features per timestep, activation maps, edit effects")
    add_eval_model_args(s)
    s.add_argument("--concept", required=True, help='the concept to explain (a name in the concept file)')
    s.add_argument("--out", required=True, help="folder for explain_<concept>.png and index.html")
    s.add_argument("--prompts", default=None, help="prompt file holding the concept (default: MiniCanvas captions)")
    s.add_argument("--other-prompts", default=None, help="prompt file without the concept")
    s.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--hookpoint", default=None, help="default: the concept's first own hookpoint with an SAE")
    s.add_argument("--top-features", type=int, default=8, help='features shown (default %(default)s)')
    s.add_argument("--top-images", type=int, default=4, help='images shown per feature (default %(default)s)')
    s.add_argument("--percentile", type=float, default=None, help="default: the concept file's")
    s.add_argument("--top-n", type=int, default=None,
                   help='select the top n features per timestep instead of by percentile')
    s.add_argument("--multiplier", type=float, default=None,
                   help="edit multiplier gamma < 0 (default: the concept file's)")
    s.add_argument("--threshold", type=float, default=None,
                   help="factor on the edit threshold tau (default: concept file)")
    s.set_defaults(fn=cmd_explain)
    return s


def add_sweep_parser(sub):
    """``saeuron sweep``: per-concept hookpoints x threshold x rule x multiplier search, stored as the defaults."""
    s = sub.add_parser("sweep", help="per-concept hookpoints x threshold x percentile/top_n x multiplier search "
                                     "maximising (UA+IRA)/2 over undamaged images (--mode: in that edit mode, stored "
                                     "with the winner); points already scored the same way are reused")
    add_eval_model_args(s)
    add_grid_args(s, (1, 2))
    s.add_argument("--concepts", nargs="+", default=None, help="default: every concept of the domain")
    s.add_argument("--rule", default="auto", choices=["auto", "percentile", "top_n"],
                   help='feature selection rule: percentile, top_n or auto (by dictionary size) (default %(default)s)')
    s.add_argument("--multipliers", type=float, nargs="+", default=None, help="default -1 -5 -10 ... -30")
    s.add_argument("--percentiles", type=float, nargs="+", default=None, help="default 99.99 99.995 99.999")
    s.add_argument("--top-ns", type=int, nargs="+", default=None, help="default 1 2 4 8")
    s.add_argument("--hookpoints", nargs="+", default=None,
                   help="where to try editing: each a hookpoint or a comma-joined set, e.g. up_blocks.0.attentions.0 "
                        "up_blocks.0.attentions.0,up_blocks.1.attentions.1 (default: one choice, all hookpoints)")
    s.add_argument("--thresholds", type=float, nargs="+", default=None,
                   help="factors on the edit threshold tau to try, e.g. 1 10 (default: 1, the method's)")
    s.add_argument("--save-to", default=None, help="folder for the updated concept file (default: --checkpoint)")
    s.add_argument("--no-damage", action="store_true",
                   help="score by plain (UA+IRA)/2; by default an image counts as unlearned (or kept) only if the "
                        "damage measure passes it, calibrated on the unedited model's images of the same prompts")
    add_mode_args(s)
    s.set_defaults(fn=cmd_sweep)
    return s


def add_minicanvas_eval_parser(subparsers):
    """``eval`` under ``saeuron minicanvas``: UA/IRA/CRA, Frechet distance, grids, resumable."""
    from ..evaluate.protocol import EVAL_SEEDS

    s = subparsers.add_parser("eval", help="UnlearnCanvas protocol: UA/IRA/CRA per target, grids, JSON + markdown")
    add_eval_model_args(s)
    add_grid_args(s, EVAL_SEEDS)
    s.add_argument("--targets", nargs="+", default=None, help="default: every concept of the domain")
    s.add_argument("--templates", type=int, nargs="+", default=[0], help="0 = training caption, 1 2 = paraphrases")
    s.add_argument("--multi", type=int, default=None, help="also unlearn the first 1..n targets at once")
    s.add_argument("--out", default="minicanvas_eval", help='output folder')
    add_edit_args(s)
    s.set_defaults(fn=cmd_minicanvas_eval)
    return s


def cmd_minicanvas_compare(a):
    """``saeuron minicanvas compare``: SAeUron, UCE and ESD on the same MiniCanvas protocol and attack, one table."""
    from ..evaluate.compare import compare_methods

    pipe = load_pipeline(a.model, a.device, torch_dtype(a.dtype))
    ckpt = eval_checkpoint(a.checkpoint, a.model) if "saeuron" in a.methods else a.checkpoint
    res = compare_methods(pipe, eval_classifiers(a.classifiers, a.device), ckpt, methods=a.methods,
                          style_targets=a.style_targets, object_targets=a.object_targets, seeds=a.seeds,
                          objects=a.objects, styles=style_values(a.styles), attack=not a.no_attack,
                          attack_iterations=a.attack_iterations, attack_prompts=a.attack_prompts,
                          attack_kwargs=None if a.attack_placement is None else {"placement": a.attack_placement},
                          esd_iterations=a.esd_iterations, esd_kwargs=None if a.esd_lr is None else {"lr": a.esd_lr},
                          num_inference_steps=a.steps, guidance_scale=a.guidance,
                          batch_size=a.batch_size, out_dir=a.out, resume=not a.no_resume, damage=not a.no_damage)
    print(f"comparison: {res['files']['json']} and {res['files']['markdown']}")


def add_minicanvas_compare_parser(subparsers):
    """``compare`` under ``saeuron minicanvas``: methods x (style/object UA/IRA/CRA, UA under attack, time, memory)."""
    from ..evaluate.protocol import METHODS

    s = subparsers.add_parser("compare", help="SAeUron vs UCE vs ESD: same targets, metrics, damage and attack; one "
                                              "table (and the attack control's movement, bar 5 points)")
    add_eval_model_args(s)
    s.add_argument("--classifiers", default=None, help="folder with object/ and style/ classifiers (default: shipped)")
    s.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help='methods to compare (default: all)')
    s.add_argument("--style-targets", "--styles-targets", nargs="*", default=None,
                   help="styles to unlearn, one at a time (default: all of the grid; none given: no style target)")
    s.add_argument("--object-targets", nargs="*", default=None, help="objects to unlearn (default: all of the grid)")
    s.add_argument("--seeds", type=int, nargs="+", default=[188],
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--objects", nargs="+", default=None, help="prompt objects (default: all)")
    s.add_argument("--styles", nargs="+", default=None, help="prompt styles, 'unstyled' included (default: all)")
    s.add_argument("--no-attack", action="store_true",
                   help="skip the UnlearnDiffAtk-style attack (run on every method and, as a control, on the unedited "
                        "model)")
    s.add_argument("--attack-iterations", type=int, default=40, help="Adam iterations of the attack (default: 40)")
    s.add_argument("--attack-placement", default=None, choices=["prefix", "suffix"],
                   help="where the 5 adversarial tokens go: after BOS (default, as published) or after the caption's "
                        "EOS, leaving the caption's positions as trained")
    s.add_argument("--attack-prompts", type=int, default=None,
                   help="attack the first n prompts per target (default: all)")
    s.add_argument("--esd-iterations", type=int, default=1000,
                   help="ESD fine-tuning iterations per target (default: 1000, as published)")
    s.add_argument("--esd-lr", type=float, default=None, help="ESD learning rate (default: 1e-5, as published)")
    s.add_argument("--out", default="minicanvas_compare",
                   help="output folder; finished runs are cached there and reused (default: minicanvas_compare)")
    s.add_argument("--no-resume", action="store_true", help="recompute everything instead of reusing cached runs")
    s.add_argument("--no-damage", action="store_true",
                   help="skip the damage measure (damaged share of target and kept images, UA undamaged; as "
                        "'minicanvas eval' reports it, per seed and mean)")
    s.set_defaults(fn=cmd_minicanvas_compare)
    return s


def cmd_attack(a):
    """Attack the patched pipeline; write adversarial PNGs, attack.json and the prefix (safetensors)."""
    from ..evaluate.attack import attack, generate_adversarial, image_size, load_images
    from ..images import save_png
    from ..patching import patched
    from ..utils import atomic_save_file, atomic_write_json

    pipe = load_pipeline(a.model, a.device, torch_dtype(a.dtype))
    images = load_images(a.target_images, image_size(pipe))
    out = Path(a.out)
    with patched(pipe, a.concept, eval_checkpoint(a.checkpoint, a.model), **patch_kwargs(a)):
        res = attack(pipe, a.prompt, images, num_prefix_tokens=a.prefix_tokens, iterations=a.iterations, lr=a.lr,
                     weight_decay=a.weight_decay, seed=a.seed, timesteps=a.timesteps, project=a.project,
                     init_exclude=a.init_exclude, placement=a.placement)
        ims = generate_adversarial(pipe, res, a.seeds, num_inference_steps=a.steps, guidance_scale=a.guidance)
    paths = [str(save_png(im, out / f"adversarial_seed{s}.png")) for s, im in zip(a.seeds, ims)]
    atomic_save_file({"prefix_embeddings": res.prefix_embeddings.contiguous(),
                      "adversarial_prompt_embeds": res.adversarial_prompt_embeds.float().cpu().contiguous()},
                     out / "adversarial_prompt.safetensors")
    atomic_write_json(dict(res.to_json(), concept=a.concept, images=paths, placement=a.placement,
                           init_exclude=a.init_exclude), out / "attack.json")
    print(f"final loss {res.loss_history[-1]:.4f}; {len(paths)} images and attack.json in {out}")


def add_attack_parser(sub):
    """``saeuron attack``: optimise a 5-token prefix against the unlearned pipeline, sample with it."""
    s = sub.add_parser("attack", help="UnlearnDiffAtk-style prefix attack on the unlearned pipeline: images + JSON")
    s.add_argument("--model", default="minicanvas",
                   help="pipeline folder (SD or MiniCanvas), or 'minicanvas' for the shipped one (the default)")
    s.add_argument("--checkpoint", default=None,
                   help="folder with SAEs and the concept file (default: the shipped one with --model minicanvas)")
    s.add_argument("--concept", nargs="+", required=True, help="concept(s) unlearned by the patch")
    s.add_argument("--prompt", required=True, help="the prompt the prefix is prepended to")
    s.add_argument("--target-images", required=True, help="folder or glob of images of the erased concept")
    s.add_argument("--out", required=True, help='output folder')
    s.add_argument("--prefix-tokens", type=int, default=5,
                   help='adversarial prompt tokens optimised (default %(default)s)')
    s.add_argument("--iterations", type=int, default=40, help='Adam iterations (default %(default)s)')
    s.add_argument("--lr", type=float, default=0.01, help='learning rate (default %(default)s)')
    s.add_argument("--weight-decay", type=float, default=0.1, help='Adam weight decay (default %(default)s)')
    s.add_argument("--timesteps", default="train", choices=["train", "inference"], help="pool t is drawn from")
    s.add_argument("--project", action="store_true", help="hard prompt: evaluate at the nearest vocabulary tokens")
    s.add_argument("--placement", default="prefix", choices=["prefix", "suffix"],
                   help="adversarial tokens after BOS (default, UnlearnDiffAtk) or after the prompt's EOS")
    s.add_argument("--init-exclude", nargs="*", default=[], metavar="WORD",
                   help="words the random prefix must not start from (e.g. the benchmark's concept words; "
                        "'minicanvas compare' excludes all MiniCanvas objects and styles)")
    s.add_argument("--seeds", type=int, nargs="+", default=[188, 288, 588, 688, 888],
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--steps", type=int, default=None,
                   help="denoising steps for the adversarial images (default: the pipeline's)")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    add_edit_args(s, top_n=False)
    s.add_argument("--seed", type=int, default=0, help='random seed (default %(default)s)')
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.add_argument("--dtype", default=None, help='fp32, fp16 or bf16 (default: as saved)')
    s.set_defaults(fn=cmd_attack)
    return s
