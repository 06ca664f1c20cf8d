"""Probe (issue 22): detect, then replace (the PER idea) against the method's scale edit, objects, tuning seed only.

Every object is unlearned alone at the same selection (hookpoints, top-n features per timestep, threshold factor on
tau) in each mode: ``scale`` (the method: selected features times MULTIPLIER where they fire), ``replace_uncond``
and ``replace_background`` (:mod:`saeuron.replace`: the same firing tokens replaced by the unconditional branch's
activation or by the mean of the image's other tokens; no multiplier). Each mode is a full
``evaluate_unlearning`` run (UA / IRA / CRA, the damage measure, grids) on the 110 training-form prompts of the
seed, judged by the shipped judges.

    python benchmarks/minicanvas/lever_replace_modes.py MODEL CKPT OUT SEED HOOKPOINTS TOP_N THRESHOLD MULTIPLIER MODES
    python benchmarks/minicanvas/lever_replace_modes.py build/minicanvas_v2/model build/minicanvas_v2/checkpoint \\
        build/lever_replace 1 up_blocks.0.attentions.0 8 1 -50 scale,replace_uncond,replace_background

HOOKPOINTS and MODES are comma-separated; a mode may carry the CFG halves it edits after a colon (``scale:cond``;
default both). Writes OUT/<mode>/results.json (resumable per object) and appends one
line per mode to OUT/summary.jsonl with the command. About 6 min per mode on 2 threads of this CPU.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from saeuron.evaluate.unlearn_eval import evaluate_unlearning
from saeuron.minicanvas import defaults
from saeuron.pipelines import load_pipeline

torch.set_num_threads(int(os.environ.get("THREADS", "2")))


def main(argv):
    if len(argv) != 9:
        raise SystemExit(__doc__)
    model, ckpt, out, seed, hps, top_n, thr, mult, modes = argv
    out = Path(out)
    pipe = load_pipeline(model, "cpu")
    judges = defaults.load_classifiers("cpu")
    for spec in modes.split(","):
        mode, _, halves = spec.partition(":")
        kw = dict(hookpoints=hps.split(","), top_n=int(top_n), threshold=float(thr), mode=mode, halves=halves or "both")
        if mode == "scale":
            kw["multiplier"] = float(mult)
        t0 = time.time()
        res = evaluate_unlearning(pipe, judges, ckpt, domain="object", seeds=[int(seed)], out_dir=out / spec.replace(":", "_"),
                                  progress=False, **kw)
        m = res["mean"]
        row = {"mode": mode, **{k: v for k, v in kw.items() if k != "mode"}, "seed": int(seed),
               "seconds": round(time.time() - t0, 1),
               **{k: m.get(k) for k in ("ua", "ira", "cra", "damage_target", "damage_kept", "ua_undamaged")},
               "per_target": {t: {k: r.get(k) for k in ("ua", "ira", "cra", "damage_target", "damage_kept",
                                                         "ua_undamaged")} for t, r in res["per_target"].items()},
               "command": "python benchmarks/minicanvas/lever_replace_modes.py " + " ".join(argv)}
        with open(out / "summary.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "per_target"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
