"""``saeuron <stage>``: one thin function per stage of the data path, no logic of its own.

    prompts --collect--> activation shards --train--> SAE checkpoint --select--> concept file
            --generate--> images with and without the edit

Run ``saeuron <stage> --help`` for each stage's options.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _dtype(name):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def _device(name):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_pipeline(model: str, device=None, dtype=None):
    """A diffusers pipeline from a local folder (or a hub id where a network exists)."""
    from diffusers import DiffusionPipeline

    kw = {"torch_dtype": dtype} if dtype is not None else {}
    if Path(model).exists() and not (Path(model) / "model_index.json").is_file():
        raise SystemExit(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(model, **kw)
    for attr in ("safety_checker",):
        if getattr(pipe, attr, None) is not None:
            setattr(pipe, attr, None)
    return pipe.to(_device(device))


def read_prompts(path: str):
    """Prompts from a .txt (one per line) or .json file (a list, or {concept: [prompts]})."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"prompt file {path} not found")
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            return data
        if isinstance(data, list) and all(isinstance(v, str) for v in data):
            return data
        raise SystemExit(f"{path}: expected a JSON list of prompts or an object {{concept: [prompts]}}")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def _per_concept(values):
    """``--multiplier -1`` or ``--multiplier Cartoon=-5 Dog=-1`` -> float or dict."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return float(values[0])
    out = {}
    for v in values:
        if "=" not in v:
            raise SystemExit(f"per-concept values look like NAME=VALUE, got {v!r}")
        k, x = v.rsplit("=", 1)
        out[k] = float(x)
    return out


# --------------------------------------------------------------------------- stages

def cmd_hookpoints(a):
    from .hookpoints import list_hookpoints

    for name, ch in list_hookpoints(load_pipeline(a.model, "cpu")).items():
        print(f"{name}\t{ch}")


def cmd_collect(a):
    from .collect import collect

    pipe = load_pipeline(a.model, a.device, _dtype(a.dtype))
    store = collect(pipe, read_prompts(a.prompts), a.out, a.hookpoints, batch_size=a.batch_size,
                    num_inference_steps=a.steps, guidance_scale=a.guidance, every=a.every, halves=a.halves,
                    tokens_per_map=a.tokens_per_map, seed=a.seed, height=a.height, width=a.width)
    print(f"activations in {store.root}: " + ", ".join(f"{h}: {store.num_rows(h)} rows" for h in store.hookpoints))


def cmd_train(a):
    from .store import ActivationStore
    from .train import TrainConfig, train

    cfg = TrainConfig(k=a.k, expansion_factor=a.expansion, num_latents=a.num_latents, batch_size=a.batch_size,
                      lr=a.lr, batch_topk=not a.topk, max_tokens=a.max_tokens, epochs=a.epochs, amp_dtype=a.amp,
                      save_every=a.save_every, seed=a.seed, dead_tokens_threshold=a.dead_tokens)
    store = ActivationStore(a.store)
    for hp in a.hookpoints or store.hookpoints:
        train(store, a.out, hp, cfg, device=_device(a.device))
        print(f"SAE for {hp} in {Path(a.out) / hp}")


def cmd_select(a):
    from .concepts import build_concept_file
    from .store import ActivationStore

    concepts = read_prompts(a.concepts) if a.concepts else None
    table = build_concept_file(ActivationStore(a.store), a.checkpoint, hookpoints=a.hookpoints, concepts=concepts,
                               multiplier=a.multiplier, percentile=a.percentile, top_n=a.top_n,
                               device=_device(a.device))
    print(f"concept file for {len(table.names)} concepts in {a.checkpoint}: {', '.join(table.names)}")


def cmd_generate(a):
    from .generate import generate

    pipe = load_pipeline(a.model, a.device, _dtype(a.dtype))
    prompts = [a.prompt] if a.prompt else read_prompts(a.prompts)
    if isinstance(prompts, dict):
        prompts = [p for ps in prompts.values() for p in ps]
    res = generate(pipe, prompts, a.out, concepts=a.concept, checkpoint=a.checkpoint, seeds=a.seeds,
                   num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.height, width=a.width,
                   multiplier=_per_concept(a.multiplier), percentile=_per_concept(a.percentile), halves=a.halves)
    print(f"grid: {res['grid']}")


def cmd_backend(a):
    from . import ops

    print(json.dumps(ops.status(), indent=2))


def cmd_demo(a):
    from .demo import run_demo

    run_demo(a.out, quick=a.quick)


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saeuron", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)

    def model_args(s, dtype=True):
        s.add_argument("--model", required=True, help="diffusers pipeline folder (or hub id where a network exists)")
        s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        if dtype:
            s.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as saved)")

    def sampling_args(s, steps=50, guidance=9.0):
        s.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
        s.add_argument("--guidance", type=float, default=guidance, help=f"CFG scale (default {guidance})")
        s.add_argument("--height", type=int, default=None)
        s.add_argument("--width", type=int, default=None)

    s = sub.add_parser("hookpoints", help="list the UNet's Transformer2DModel blocks and their channels")
    s.add_argument("--model", required=True)
    s.set_defaults(fn=cmd_hookpoints)

    s = sub.add_parser("collect", help="run the pipeline over prompts and store hookpoint activations")
    model_args(s)
    s.add_argument("--prompts", required=True, help=".txt (one per line) or .json (list or {concept: [prompts]})")
    s.add_argument("--out", required=True, help="store folder (rerun to resume)")
    s.add_argument("--hookpoints", nargs="+", required=True, help="e.g. up_blocks.1.attentions.1")
    sampling_args(s)
    s.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    s.add_argument("--every", type=int, default=1, help="keep every n-th denoising step")
    s.add_argument("--halves", default="cond", choices=["cond", "uncond", "both"], help="CFG halves to keep")
    s.add_argument("--tokens-per-map", type=int, default=None, help="random subset of tokens per map (default all)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_collect)

    s = sub.add_parser("train", help="train a TopK SAE per hookpoint on a store")
    s.add_argument("--store", required=True)
    s.add_argument("--out", required=True, help="checkpoint folder (one subfolder per hookpoint); resumes")
    s.add_argument("--hookpoints", nargs="*", default=None, help="default: all in the store")
    s.add_argument("--k", type=int, default=32)
    s.add_argument("--expansion", type=int, default=16)
    s.add_argument("--num-latents", type=int, default=0, help="overrides --expansion when > 0")
    s.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    s.add_argument("--lr", type=float, default=4e-4)
    s.add_argument("--topk", action="store_true", help="per-token TopK instead of BatchTopK")
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="autocast dtype (fp32 master weights)")
    s.add_argument("--save-every", type=int, default=1000)
    s.add_argument("--dead-tokens", type=int, default=10_000_000, help="tokens without firing before a latent is dead")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("select", help="per-concept statistics and feature selection -> concept file")
    s.add_argument("--store", required=True, help="store collected with concept-labelled prompts")
    s.add_argument("--checkpoint", required=True, help="folder with the SAEs; the concept file is written here")
    s.add_argument("--concepts", default=None, help="JSON {concept: [prompts]} (default: the store's labels)")
    s.add_argument("--hookpoints", nargs="*", default=None)
    s.add_argument("--multiplier", type=float, default=-1.0, help="default per-concept multiplier (gamma < 0)")
    s.add_argument("--percentile", type=float, default=99.99, help="default selection percentile")
    s.add_argument("--top-n", type=int, default=None, help="select the top n features per timestep instead")
    s.add_argument("--device", default=None)
    s.set_defaults(fn=cmd_select)

    s = sub.add_parser("generate", help="images with and without the edit, plus a side-by-side grid PNG")
    model_args(s)
    s.add_argument("--checkpoint", required=True, help="folder with SAEs and the concept file")
    s.add_argument("--concept", nargs="+", required=True, help="concept(s) to unlearn")
    s.add_argument("--prompt", default=None)
    s.add_argument("--prompts", default=None, help="prompt file instead of --prompt")
    s.add_argument("--seeds", type=int, nargs="+", default=[188, 288, 588, 688, 888])
    s.add_argument("--out", required=True)
    sampling_args(s, steps=50, guidance=7.5)
    s.add_argument("--multiplier", nargs="*", default=None, help="-1 or NAME=-5 ... (default: concept file)")
    s.add_argument("--percentile", nargs="*", default=None, help="99.99 or NAME=99.999 ...")
    s.add_argument("--halves", default="both", choices=["both", "cond", "uncond"])
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("backend", help="show which kernel backend each op uses here")
    s.set_defaults(fn=cmd_backend)

    s = sub.add_parser("demo", help="the built-in default, end to end (no downloads)")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--quick", action="store_true", help="smallest settings (used by the tests)")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "generate" and not (args.prompt or args.prompts):
        raise SystemExit("generate needs --prompt or --prompts")
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
