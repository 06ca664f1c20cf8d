"""Probe (issue 22): how well do image-level detectors on SAE codes flag the right images, offline?

Samples the unedited model once on SEEDS (training caption form and the paraphrase forms 1, 2; every object x style
prompt), records each conditional image's mean SAE code at HOOKPOINT at every denoising step, and scores detector
variants fitted on the build's activation store (``saeuron.detectors.prompt_codes``, the same data ``saeuron
detectors`` fits on): one-vs-rest logistic regressions per object with balanced classes (the library's first
form) and without balancing, a multinomial (softmax) one over the objects fitted here (the first probe's form), and
the library's (``saeuron.detectors.fit_softmax``: a softmax per exclusive group), each at several probability
gates. For each object as the target:

  recall   = share of (target image, step) pairs flagged
  fp_any   = share of the other images flagged at one step or more (an edit would touch them)

means over the 10 objects. Without an edit the trajectory is the unedited one, so this is the detector's accuracy on
the model's own activations, not the edit's outcome (``minicanvas eval --mode probe_uncond`` measures that).

    python benchmarks/minicanvas/probe_detector_variants.py BUILD_OUT WORK OUT.json SEEDS HOOKPOINT
"""
import json
import os
import sys
import time

import torch

from saeuron.detectors import Detectors, fit_softmax, image_codes, prompt_codes
from saeuron.minicanvas import data
from saeuron.minicanvas.build import collect_forms, concept_prompts
from saeuron.pipelines import load_pipeline
from saeuron.sae import SparseAutoencoder, resolve_hookpoint_dir
from saeuron.store import ActivationStore

torch.set_num_threads(int(os.environ.get("THREADS", "2")))


def sample_codes(pipe, sae, hp, seeds, templates, batch=55):
    """``(codes [S, N, M], objects [N], template [N])`` of the unedited model's conditional images."""
    jobs = [(o, s, t, seed) for t in templates for s in list(data.STYLES) + [None] for o in data.OBJECTS
            for seed in seeds]
    per_call = []

    def grab(m, a, o):
        x = o[0] if isinstance(o, tuple) else o.sample
        per_call.append(image_codes(sae, x[x.shape[0] // 2:]))
    h = pipe.unet.get_submodule(hp).register_forward_hook(grab)
    out = []
    try:
        for b0 in range(0, len(jobs), batch):
            chunk = jobs[b0:b0 + batch]
            per_call.clear()
            with torch.no_grad():
                pipe([data.caption(o, s, t) for o, s, t, _ in chunk],
                     generator=[torch.Generator().manual_seed(seed) for *_, seed in chunk], output_type="pt")
            out.append(torch.stack(per_call))  # [steps, b, M]
    finally:
        h.remove()
    return torch.cat(out, 1), torch.tensor([data.OBJECTS.index(o) for o, *_ in jobs]), \
        torch.tensor([t for _, _, t, _ in jobs])


def fit_softmax_here(codes, labels, steps=300, lr=0.01, wd=1e-3):
    """Multinomial logistic per timestep over the objects (the first probe's form)."""
    W, b, mu, sd = [], [], [], []
    for t in range(codes.shape[0]):
        X = codes[t]
        m, s = X.mean(0), X.std(0, unbiased=False) + 1e-3
        lin = torch.nn.Linear(X.shape[1], len(data.OBJECTS)).double()
        torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
        opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=wd)
        Xs = ((X - m) / s).double()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(Xs), labels).backward()
            opt.step()
        W.append(lin.weight.detach().float()), b.append(lin.bias.detach().float()), mu.append(m), sd.append(s)
    return torch.stack(W), torch.stack(b), torch.stack(mu), torch.stack(sd)


def fit_ovr(codes, targets, present, balanced, steps=300, lr=0.01, wd=1e-3):
    """One-vs-rest logistic regressions per timestep (positives weighted to balance the classes, or not)."""
    out = {k: [] for k in ("weight", "bias", "mean", "std")}
    y = targets.double()
    for t in range(codes.shape[0]):
        X, yt = codes[t][present[t]].double(), y[present[t]]
        mu, sd = X.mean(0), X.std(0, unbiased=False) + 1e-3
        Xs = (X - mu) / sd
        npos = yt.sum(0).clamp_min(1)
        w_pos = (yt.shape[0] - npos) / npos if balanced else None
        W = torch.zeros(X.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=lr, weight_decay=wd)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(Xs @ W + b, yt, pos_weight=w_pos).backward()
            opt.step()
        out["weight"].append(W.detach().t().float()), out["bias"].append(b.detach().float())
        out["mean"].append(mu.float()), out["std"].append(sd.float())
    return {k: torch.stack(v) for k, v in out.items()}


def main(argv):
    if len(argv) != 5:
        raise SystemExit(__doc__)
    build, work, out, seeds, hp = argv
    t0 = time.time()
    pipe = load_pipeline(f"{build}/model", "cpu")
    pipe.set_progress_bar_config(disable=True)
    sae = SparseAutoencoder.load(resolve_hookpoint_dir(f"{build}/checkpoint", hp))
    store = ActivationStore(f"{work}/activations")
    settings = json.load(open(f"{build}/BUILD.json"))["settings"]
    members = concept_prompts(settings["collect_repeats"], collect_forms(settings))
    ts, pc, present = prompt_codes(store, sae, hp, progress=False)
    targets = torch.zeros(len(store.prompts), len(data.OBJECTS), dtype=torch.bool)
    for c, o in enumerate(data.OBJECTS):
        for p in members[o]:
            targets[store.prompts.index(p), c] = True
    codes, objs, tmpl = sample_codes(pipe, sae, hp, [int(s) for s in seeds.split(",")], (0, 1, 2))
    assert codes.shape[0] == len(ts), (codes.shape, len(ts))
    variants = {}
    for name, balanced in (("ovr_balanced", True), ("ovr_plain", False)):
        fit = fit_ovr(pc, targets, present, balanced)
        z = (codes - fit["mean"][:, None]) / fit["std"][:, None]
        variants[name] = torch.sigmoid(torch.einsum("snm,scm->snc", z, fit["weight"]) + fit["bias"][:, None])
    lab = targets.float().argmax(1)
    W, b, mu, sd = fit_softmax_here(pc, lab)
    variants["softmax"] = torch.softmax(torch.einsum("snm,scm->snc", (codes - mu[:, None]) / sd[:, None], W)
                                        + b[:, None], -1)
    names = list(members)
    full = torch.zeros(len(store.prompts), len(names), dtype=torch.bool)
    for c, n in enumerate(names):
        for p in members[n]:
            full[store.prompts.index(p), c] = True
    fit = fit_softmax(pc, full, present)
    det = Detectors(names, ts, {hp: {k: fit[k] for k in ("weight", "bias", "mean", "std")}}, fit["groups"])
    variants["library"] = torch.stack([det.probability(hp, codes[s], torch.tensor([s]), list(data.OBJECTS))
                                       for s in range(codes.shape[0])])
    rows = []
    for name, prob in variants.items():
        for gate in (0.5, 0.7, 0.9):
            for forms, sel in (("training", tmpl == 0), ("paraphrase", tmpl > 0)):
                rec, fp = [], []
                for c in range(len(data.OBJECTS)):
                    flag = prob[:, sel, c] >= gate  # [S, n]
                    is_t = objs[sel] == c
                    rec.append(float(flag[:, is_t].float().mean()))
                    fp.append(float(flag[:, ~is_t].any(0).float().mean()))
                rows.append({"variant": name, "gate": gate, "forms": forms, "recall": sum(rec) / len(rec),
                             "fp_any": sum(fp) / len(fp),
                             "per_object": {o: {"recall": r, "fp_any": f} for o, r, f in zip(data.OBJECTS, rec, fp)}})
                print(f"{name:13s} gate {gate:.1f} {forms:10s} recall {rows[-1]['recall']:.3f} "
                      f"fp_any {rows[-1]['fp_any']:.4f}", flush=True)
    json.dump({"command": "python benchmarks/minicanvas/probe_detector_variants.py " + " ".join(argv),
               "hookpoint": hp, "seeds": seeds, "seconds": round(time.time() - t0, 1), "rows": rows},
              open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
