"""Probe (issue 22): the gated edit with a fitted detector: a linear probe on SAE codes decides which images hold
the target object.

``gate_uncond`` (``saeuron.replace``) flags an image when the target's top-n features fire on enough of its tokens;
that detector cannot tell near shapes apart (RESULTS.md). Here the gate is a multinomial logistic probe per
timestep over the image-mean SAE codes at DETECT (the per-prompt means the concept statistics are made of, so it
reads as weights on SAE features), fitted on the build's training-form prompts (2 repeats, generator seeds
1000+i, never the tuning or evaluation seeds). An image is flagged when the probe gives the target probability
>= P; a flagged image's conditional map is replaced by its unconditional one at every ACT block (as gate_uncond).
It monkeypatches ``EditHook.post_forward`` in this process.

    python benchmarks/minicanvas/lever_gate_probe.py MODEL CKPT OUT SEEDS DETECT ACT P

SEEDS: one or more generator seeds, comma-separated (tuning: 1; held out: 188,288,588,688,888). Environment
TEMPLATES (default 0): the caption forms evaluated, comma-separated (``evaluate_unlearning``'s templates; 1 and 2
are paraphrases the probe was not fitted on).

Caches the fitted probe in OUT/../gate_probe_<DETECT>.pt; writes OUT/results.json (``evaluate_unlearning``, 10
objects x 110 training-form images per seed, damage measure) and a line in OUT/../gate_probe_summary.jsonl.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from saeuron import patching, reference
from saeuron.concepts import ConceptTable
from saeuron.evaluate.unlearn_eval import evaluate_unlearning
from saeuron.minicanvas import data, defaults
from saeuron.pipelines import load_pipeline
from saeuron.sae import SparseAutoencoder, resolve_hookpoint_dir

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
CFG = {}


def image_codes(sae, x):
    """``[B, M]``: each image's mean top-k code over its tokens (zeros included)."""
    tok = reference.as_tokens(x.float())
    enc = sae.encode(tok)
    f = torch.zeros(tok.shape[0], sae.num_latents)
    f.scatter_(1, enc.indices, enc.values.float())
    return f.view(x.shape[0], -1, sae.num_latents).mean(1)


def fit_probe(pipe, sae, hp, table, repeats=2, batch=22):
    prompts = [(o, data.caption(o, s, 0)) for o in data.OBJECTS for s in list(data.STYLES) + [None]]
    T = len(table.timesteps)
    ts = table.timesteps
    feats, labels = [[] for _ in range(T)], []
    cur, steps = {}, []
    h1 = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: steps.append(float(a[1] if len(a) > 1 else kw["timestep"])), with_kwargs=True)

    def grab(m, a, o):
        x = o[0] if isinstance(o, tuple) else o.sample
        ti = int((ts - steps[-1]).abs().argmin())
        feats[ti].append(image_codes(sae, x[x.shape[0] // 2:]))
    h2 = pipe.unet.get_submodule(hp).register_forward_hook(grab)
    try:
        for r in range(repeats):
            for b0 in range(0, len(prompts), batch):
                chunk = prompts[b0:b0 + batch]
                gens = [torch.Generator().manual_seed(1000 + r * len(prompts) + b0 + i) for i in range(len(chunk))]
                with torch.no_grad():
                    pipe([c for _, c in chunk], generator=gens, output_type="pt", num_inference_steps=T)
                labels += [data.OBJECTS.index(o) for o, _ in chunk]
    finally:
        h1.remove()
        h2.remove()
    y = torch.tensor(labels)
    W, b, mean, std = [], [], [], []
    for ti in range(T):
        X = torch.cat(feats[ti])
        mu, sd = X.mean(0), X.std(0) + 1e-3
        Xs = (X - mu) / sd
        lin = torch.nn.Linear(X.shape[1], len(data.OBJECTS))
        opt = torch.optim.Adam(lin.parameters(), lr=0.01, weight_decay=1e-3)
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(lin(Xs), y)
            loss.backward()
            opt.step()
        acc = float((lin(Xs).argmax(1) == y).float().mean())
        print(f"probe t={float(ts[ti]):.0f}: train accuracy {acc:.3f}", flush=True)
        W.append(lin.weight.detach()); b.append(lin.bias.detach()); mean.append(mu); std.append(sd)
    return {"W": torch.stack(W), "b": torch.stack(b), "mean": torch.stack(mean), "std": torch.stack(std)}


def post_forward(self, module, output):
    rows = self.state.rows
    if rows is None:
        return output
    x = output[0] if isinstance(output, tuple) else output.sample
    b = x.shape[0]
    h = b // 2
    if self.hookpoint == CFG["detect"]:
        pr = CFG["probe"]
        t = int(self.state.last_index.reshape(-1)[0])
        z = (image_codes(self.sae, x[h:]) - pr["mean"][t]) / pr["std"][t]
        p = torch.softmax(z @ pr["W"][t].t() + pr["b"][t], -1)[:, data.OBJECTS.index(CFG["concept"][0])]
        self.state.flag = p >= CFG["p"]
    flag = getattr(self.state, "flag", None)
    if self.hookpoint in CFG["act"] and flag is not None and bool(flag.any()):
        y = x.clone()
        y[h:][flag] = x[:h][flag]
        return (y,) + tuple(output[1:]) if isinstance(output, tuple) else type(output)(sample=y)
    return output


def main(argv):
    if len(argv) != 7:
        raise SystemExit(__doc__)
    model, ckpt, out, seed, det, act, p = argv
    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    table = ConceptTable.load(ckpt)
    cache = Path(out).parent / f"gate_probe_{det}.pt"
    if cache.is_file():
        probe = torch.load(cache)
    else:
        sae = SparseAutoencoder.load(resolve_hookpoint_dir(Path(ckpt), det))
        probe = fit_probe(pipe, sae, det, table)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(probe, cache)
    CFG.update(detect=det, act=act.split(","), p=float(p), probe=probe, concept=[None])
    orig_patch = patching.patch

    def remember(pipe_, concepts, *a, **kw):
        CFG["concept"][0] = concepts if isinstance(concepts, str) else list(concepts)[0]
        return orig_patch(pipe_, concepts, *a, **kw)
    patching.patch = remember
    patching.EditHook.post_forward = post_forward
    t0 = time.time()
    res = evaluate_unlearning(pipe, defaults.load_classifiers("cpu"), ckpt, domain="object", seeds=[int(v) for v in seed.split(",")],
                              templates=[int(v) for v in os.environ.get("TEMPLATES", "0").split(",")],
                              out_dir=out, progress=False, hookpoints=list(dict.fromkeys([det] + act.split(","))),
                              top_n=2, threshold=3.0, mode="gate_uncond", gate=0.5)
    m = res["mean"]
    keys = ("ua", "ira", "cra", "damage_target", "damage_kept", "ua_undamaged")
    row = {"mode": "gate_probe", "detect": det, "act": act.split(","), "p": float(p), "seeds": [int(v) for v in seed.split(",")],
           "templates": os.environ.get("TEMPLATES", "0"),
           "seconds": round(time.time() - t0, 1), **{k: m.get(k) for k in keys},
           "per_target": {t: {k: r.get(k) for k in keys} for t, r in res["per_target"].items()},
           "command": "python benchmarks/minicanvas/lever_gate_probe.py " + " ".join(argv)}
    with open(Path(out).parent / "gate_probe_summary.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "per_target"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
