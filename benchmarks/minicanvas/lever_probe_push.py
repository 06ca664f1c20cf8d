"""Probe (issue 22): the fitted-detector gate (``mode="probe_uncond"``) misses the round shapes (circle, hexagon):
the unconditional map it copies in draws the model's default shape, which is round. Here a flagged image's
conditional map is pushed past the unconditional one, away from the prompt, at the hooked blocks:

    cond <- uncond + BETA * (uncond - cond)          (BETA 0 = probe_uncond)

i.e. negative guidance at those blocks only, on flagged images only. It monkeypatches the flagged-image fill of
``EditHook._replace`` in this process; the detectors are the library's (CKPT must hold ``detectors.safetensors``).

    python benchmarks/minicanvas/lever_probe_push.py MODEL CKPT OUT SEEDS BETAS TARGETS

SEEDS, BETAS, TARGETS comma-separated (tuning seed: 1). Writes OUT/beta<B>/ (``evaluate_unlearning``) and a line per
beta in OUT/summary.jsonl.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from saeuron import patching
from saeuron.evaluate.unlearn_eval import evaluate_unlearning
from saeuron.minicanvas import defaults
from saeuron.pipelines import load_pipeline

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
BETA = [0.0]
_orig_where = torch.where


def _replace(self, x, lo, hi, fi, ta, sc, rpg):
    """probe_uncond with the push: flagged images' cond maps <- uncond + BETA (uncond - cond)."""
    part = x[lo:hi]
    if self.state.flag is None:
        self._flag_probe(part, lo, hi)
    flag = self.state.flag
    unc = x[lo - (hi - lo):lo]
    new = _orig_where(flag.view(-1, *([1] * (part.dim() - 1))), unc + BETA[0] * (unc - part), part)
    y = x if x.is_contiguous() else x.contiguous()
    y[lo:hi] = new
    return y


def main(argv):
    if len(argv) != 6:
        raise SystemExit(__doc__)
    model, ckpt, out, seeds, betas, targets = argv
    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    patching.EditHook._replace = _replace
    clf = defaults.load_classifiers("cpu")
    for b in [float(v) for v in betas.split(",")]:
        BETA[0] = b
        t0 = time.time()
        res = evaluate_unlearning(pipe, clf, ckpt, domain="object", seeds=[int(v) for v in seeds.split(",")],
                                  targets=targets.split(","), out_dir=Path(out) / f"beta{b:g}", progress=False,
                                  hookpoints=["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"],
                                  mode="probe_uncond", gate=0.5)
        keys = ("ua", "ira", "cra", "damage_target", "damage_kept", "ua_undamaged")
        row = {"beta": b, "seeds": seeds, "targets": targets, "seconds": round(time.time() - t0, 1),
               **{k: res["mean"].get(k) for k in keys},
               "per_target": {t: {k: r.get(k) for k in keys} for t, r in res["per_target"].items()},
               "command": "python benchmarks/minicanvas/lever_probe_push.py " + " ".join(argv)}
        with open(Path(out) / "summary.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
