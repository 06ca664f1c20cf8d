"""The stages of the data path: ``hookpoints``, ``collect``, ``train``, ``select``, ``generate``, plus
``backend`` and ``demo``; one thin function per command, each importing its stage only when it runs."""
from __future__ import annotations

import json
from pathlib import Path

from ..pipelines import load_pipeline
from .common import (DETECTOR_LATENTS, add_edit_args, eval_checkpoint, patch_kwargs, read_prompts, torch_device,
                     torch_dtype)


def cmd_hookpoints(a):
    """``saeuron hookpoints``: print the denoiser's hookpoints (a UNet's Transformer2DModel blocks, a DiT's
    transformer blocks) and their channels."""
    from ..hookpoints import list_hookpoints

    for name, ch in list_hookpoints(load_pipeline(a.model, "cpu")).items():
        print(f"{name}\t{ch}")


def cmd_collect(a):
    """``saeuron collect``: run the pipeline over prompts and store hookpoint activations (under torchrun: the
    prompt batches are split over the ranks, which write one store together)."""
    from ..collection import collect
    from ..distributed import distributed_from_env

    with distributed_from_env() as (rank, world):
        pipe = load_pipeline(a.model, a.device, torch_dtype(a.dtype))
        store = collect(pipe, read_prompts(a.prompts), a.out, a.hookpoints, batch_size=a.batch_size,
                        num_inference_steps=a.steps, guidance_scale=a.guidance, every=a.every, halves=a.halves,
                        tokens_per_map=a.tokens_per_map, seed=a.seed, height=a.height, width=a.width)
        if rank == 0:
            print(f"activations in {store.root}" + (f" (collected by {world} ranks)" if world > 1 else "") + ": "
                  + ", ".join(f"{h}: {store.num_rows(h)} rows" for h in store.hookpoints))


def cmd_train(a):
    """``saeuron train``: a TopK SAE per hookpoint of a store (under torchrun: DDP over the ranks)."""
    from ..store import ActivationStore
    from ..trainer import TrainConfig, train

    cfg = TrainConfig(k=a.k, expansion_factor=a.expansion, num_latents=a.num_latents, batch_size=a.batch_size,
                      lr=a.lr, batch_topk=not a.topk, max_tokens=a.max_tokens, epochs=a.epochs, amp_dtype=a.amp,
                      save_every=a.save_every, seed=a.seed, dead_tokens_threshold=a.dead_tokens,
                      concept_supervision=a.concept_supervision, latents_per_concept=a.latents_per_concept)
    cfg.validate()  # a bad setting fails here, before the store is opened
    concepts = read_prompts(a.concepts) if a.concepts else None
    if concepts is not None and not isinstance(concepts, dict):
        raise SystemExit(f"--concepts {a.concepts} must hold a JSON object {{concept: [prompts]}}")
    import torch

    from ..distributed import distributed_from_env

    store = ActivationStore(a.store)
    with distributed_from_env("nccl" if torch.cuda.is_available() else "gloo") as (rank, world):  # torchrun: DDP
        for hp in a.hookpoints or store.hookpoints:
            train(store, a.out, hp, cfg, device=torch_device(a.device), concepts=concepts)
            if rank == 0:
                print(f"SAE for {hp} in {Path(a.out) / hp}" + (f" (trained by {world} ranks)" if world > 1 else ""))


def cmd_select(a):
    """``saeuron select``: per-concept statistics and feature selection into a concept file."""
    from ..selection import build_concept_file
    from ..store import ActivationStore

    concepts = read_prompts(a.concepts) if a.concepts else None
    table = build_concept_file(ActivationStore(a.store), a.checkpoint, hookpoints=a.hookpoints, concepts=concepts,
                               multiplier=a.multiplier, percentile=a.percentile, top_n=a.top_n,
                               device=torch_device(a.device), reserved=a.reserved)
    print(f"concept file for {len(table.names)} concepts in {a.checkpoint}: {', '.join(table.names)}")


def cmd_detectors(a):
    """``saeuron detectors``: fit each concept's image-level detector (mode probe_uncond) into a checkpoint."""
    from ..detectors import fit_detectors
    from ..store import ActivationStore

    concepts = read_prompts(a.concepts) if a.concepts else None
    det = fit_detectors(ActivationStore(a.store), a.checkpoint, hookpoints=a.hookpoints, concepts=concepts,
                        steps=a.steps, latents=a.latents)
    worst = {h: min(acc.values()) for h, acc in det.metadata["train_accuracy_min_over_timesteps"].items()}
    print(f"detectors for {len(det.names)} concepts at {', '.join(det.hookpoints)} in {a.checkpoint}, reading "
          f"{det.metadata['fit']['features']}; lowest training accuracy over concepts and timesteps: "
          + ", ".join(f"{h} {v:.3f}" for h, v in worst.items())
          + "".join(f" (every latent: {h} {v:.3f})" for h, v in det.metadata.get("all_latents_train_accuracy_min",
                                                                                  {}).items()))


def cmd_generate(a):
    """``saeuron generate``: images with and without the edit, and a grid."""
    from ..generate import generate

    pipe = load_pipeline(a.model, a.device, torch_dtype(a.dtype))
    prompts = [a.prompt] if a.prompt else read_prompts(a.prompts)
    if isinstance(prompts, dict):
        prompts = [p for ps in prompts.values() for p in ps]
    res = generate(pipe, prompts, a.out, concepts=a.concept, checkpoint=eval_checkpoint(a.checkpoint, a.model),
                   seeds=a.seeds,
                   num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.height, width=a.width,
                   halves=a.halves, **patch_kwargs(a))
    print(f"grid: {res['grid']}")


def cmd_backend(a):
    """``saeuron backend``: the kernel backend of each op, as JSON."""
    from .. import ops

    print(json.dumps(ops.status(), indent=2))


def cmd_demo(a):
    """``saeuron demo``: the built-in default, end to end."""
    from ..demo import run_demo

    run_demo(a.out, quick=a.quick)


def add_stage_parsers(sub):
    """The data-path commands, in the order ``saeuron --help`` lists them."""
    def model_args(s, dtype=True):
        s.add_argument("--model", default="minicanvas",
                       help="pipeline folder, 'minicanvas' (the shipped model; the default), or a hub id")
        s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        if dtype:
            s.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as saved)")

    def sampling_args(s):
        s.add_argument("--steps", type=int, default=None,
                       help="denoising steps (default: the pipeline's own: MiniCanvas 25, Stable Diffusion 50)")
        s.add_argument("--guidance", type=float, default=None,
                       help="CFG scale (default: the pipeline's own: MiniCanvas 1.5, Stable Diffusion 7.5)")
        s.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
        s.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")

    s = sub.add_parser("hookpoints", help="list the denoiser's hookpoints (UNet: Transformer2DModel blocks; DiT: transformer "
                       "blocks) and their channels")
    s.add_argument("--model", default="minicanvas",
                   help="pipeline folder, 'minicanvas' (the shipped model; the default) or a hub id")
    s.set_defaults(fn=cmd_hookpoints)

    s = sub.add_parser("collect", help="run the pipeline over prompts and store hookpoint activations")
    model_args(s)
    s.add_argument("--prompts", required=True, help=".txt (one per line) or .json (list or {concept: [prompts]})")
    s.add_argument("--out", required=True,
                   help="store folder (rerun to resume; under torchrun the ranks split the batches and share it)")
    s.add_argument("--hookpoints", nargs="+", required=True, help="e.g. up_blocks.1.attentions.1 (UNet) or transformer_blocks.3 (DiT)")
    sampling_args(s)
    s.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    s.add_argument("--every", type=int, default=1, help="keep every n-th denoising step")
    s.add_argument("--halves", default="cond", choices=["cond", "uncond", "both"], help="CFG halves to keep")
    s.add_argument("--tokens-per-map", type=int, default=None, help="random subset of tokens per map (default all)")
    s.add_argument("--seed", type=int, default=0, help='random seed (default %(default)s)')
    s.set_defaults(fn=cmd_collect)

    s = sub.add_parser("train", help="train a TopK SAE per hookpoint on a store")
    s.add_argument("--store", required=True, help='activation store folder (made by saeuron collect)')
    s.add_argument("--out", required=True, help="checkpoint folder (one subfolder per hookpoint); resumes")
    s.add_argument("--hookpoints", nargs="*", default=None, help="default: all in the store")
    s.add_argument("--k", type=int, default=32, help="latents kept per token, TopK's k (default %(default)s)")
    s.add_argument("--expansion", type=int, default=16,
                   help='number of latents = expansion x input width (default %(default)s)')
    s.add_argument("--num-latents", type=int, default=0, help="overrides --expansion when > 0")
    s.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    s.add_argument("--lr", type=float, default=4e-4, help='learning rate (default %(default)s)')
    s.add_argument("--topk", action="store_true", help="per-token TopK instead of BatchTopK")
    s.add_argument("--max-tokens", type=int, default=None,
                   help='stop after this many training tokens (default: every token of every epoch)')
    s.add_argument("--epochs", type=int, default=1, help='passes over the store (default %(default)s)')
    s.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast dtype (fp32 master weights)")
    s.add_argument("--save-every", type=int, default=1000,
                   help='save a resumable checkpoint every n steps (default %(default)s)')
    s.add_argument("--dead-tokens", type=int, default=10_000_000, help="tokens without firing before a latent is dead")
    s.add_argument("--seed", type=int, default=0, help='random seed (default %(default)s)')
    s.add_argument("--concept-supervision", type=float, default=0.0, metavar="WEIGHT",
                   help="weight of the concept-supervised term (SAEmnesia-style; under evaluation, issue 22): reserve "
                        "latents for each concept of the store and train each to fire on its concept's tokens only; "
                        "the reservation goes into cfg.json (default 0: off, the unsupervised SAeUron trainer)")
    s.add_argument("--latents-per-concept", type=int, default=1, metavar="N",
                   help="latents reserved per concept with --concept-supervision (default %(default)s)")
    s.add_argument("--concepts", default=None,
                   help="JSON {concept: [prompts]} for --concept-supervision (default: the store's labels)")
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("select", help="per-concept statistics and feature selection -> concept file")
    s.add_argument("--store", required=True, help="store collected with concept-labelled prompts")
    s.add_argument("--checkpoint", required=True, help="folder with the SAEs; the concept file is written here")
    s.add_argument("--concepts", default=None, help="JSON {concept: [prompts]} (default: the store's labels)")
    s.add_argument("--hookpoints", nargs="*", default=None, help='hookpoints to use (default: every one with an SAE)')
    s.add_argument("--multiplier", type=float, default=-1.0, help="default per-concept multiplier (gamma < 0)")
    s.add_argument("--percentile", type=float, default=99.99, help="default selection percentile")
    s.add_argument("--top-n", type=int, default=None, help="select the top n features per timestep instead")
    s.add_argument("--reserved", action="store_true",
                   help="default rule of every concept a concept-supervised SAE reserves latents for (train "
                        "--concept-supervision): select exactly those latents (the percentile/top-n rule stays for "
                        "the other concepts and as the explicit alternative)")
    s.add_argument("--device", default=None, help='cpu or cuda (default: cuda if available)')
    s.set_defaults(fn=cmd_select)

    s = sub.add_parser("detectors", help="fit each concept's image-level detector on SAE codes (for --mode "
                       "probe_uncond) into a checkpoint")
    s.add_argument("--store", required=True, help="store collected with concept-labelled prompts (as for select)")
    s.add_argument("--checkpoint", required=True, help="folder with the SAEs; detectors.safetensors is written here")
    s.add_argument("--concepts", default=None, help="JSON {concept: [prompts]} (default: the store's labels)")
    s.add_argument("--hookpoints", nargs="*", default=None, help="hookpoints to fit at (default: every one with an SAE)")
    s.add_argument("--steps", type=int, default=300, help="optimiser steps per timestep (default 300)")
    s.add_argument("--latents", type=int, default=DETECTOR_LATENTS,
                   help="SAE latents each detector reads, their mean ReLU pre-activations (one GEMM over those rows "
                        "of the encoder per denoiser call); 0: every latent's mean top-k code, a full encode per call "
                        f"(default {DETECTOR_LATENTS})")
    s.set_defaults(fn=cmd_detectors)

    s = sub.add_parser("generate", help="images with and without the edit, plus a side-by-side grid PNG")
    model_args(s)
    s.add_argument("--checkpoint", default=None,
                   help="folder with SAEs and the concept file (default: the shipped one with --model minicanvas)")
    s.add_argument("--concept", nargs="+", required=True, help="concept(s) to unlearn")
    s.add_argument("--prompt", default=None, help='one prompt (or --prompts FILE)')
    s.add_argument("--prompts", default=None, help="prompt file instead of --prompt")
    s.add_argument("--seeds", type=int, nargs="+", default=[188, 288, 588, 688, 888],
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--out", required=True, help='output folder')
    sampling_args(s)
    add_edit_args(s, top_n=False)
    s.add_argument("--halves", default="both", choices=["both", "cond", "uncond"],
                   help='CFG halves the edit acts on: both, cond or uncond (default %(default)s)')
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("backend", help="show which kernel backend each op uses here")
    s.set_defaults(fn=cmd_backend)

    s = sub.add_parser("demo", help="the built-in default, end to end (no downloads)")
    s.add_argument("--out", default="demo_out", help='output folder')
    s.add_argument("--quick", action="store_true", help="smallest settings (used by the tests)")
    s.set_defaults(fn=cmd_demo)
