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
import os
import sys
from pathlib import Path

import torch
from probe_common import evaluate_and_record, quiet_pipeline, replace_flagged

from saeuron import patching

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
BETA = [0.0]


def _replace(self, x, lo, hi, fi, ta, sc, rpg):
    """probe_uncond with the push: flagged images' cond maps <- uncond + BETA (uncond - cond)."""
    return replace_flagged(self, x, lo, hi, lambda cond, unc, t: unc + BETA[0] * (unc - cond))


def main(argv):
    if len(argv) != 6:
        raise SystemExit(__doc__)
    model, ckpt, out, seeds, betas, targets = argv
    pipe = quiet_pipeline(model)
    patching.EditHook._replace = _replace
    for b in [float(v) for v in betas.split(",")]:
        BETA[0] = b
        evaluate_and_record(pipe, ckpt, Path(out) / f"beta{b:g}", Path(out) / "summary.jsonl", seeds, targets,
                            "python benchmarks/minicanvas/lever_probe_push.py " + " ".join(argv), {"beta": b},
                            hookpoints=["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"],
                            mode="probe_uncond", gate=0.5)

if __name__ == "__main__":
    main(sys.argv[1:])
