"""Probe (issue 22): steer flagged images from the target to an anchor concept along the SAE's concept means.

``mode="probe_uncond"`` copies the unconditional map into a flagged image, and the model then draws what it draws
without an object word: a shape that depends on the noise and is sometimes the target itself (UA about 85 on seed
1, with round shapes the most common default), and often a lumpy in-between shape the damage measure flags. Here a
flagged image's conditional map is moved instead, at every hooked block, by the difference of the concept
statistics decoded through the SAE::

    x <- BASE + ALPHA * W_dec^T (mu[anchor, t] - mu[target, t])       (one vector per timestep, every token)

BASE = the conditional map (``cond``) or the unconditional one (``uncond``); the anchor is
``saeuron.detectors.pick_anchor``'s: the object whose mean code at the block is least like the target's (cosine). The object word reaches the
8x8 blocks spread over every token (RESULTS.md, issue 22), so a shift of every token is the form in which the
model carries it. Detectors: the library's (CKPT must hold ``detectors.safetensors``). Monkeypatches
``EditHook._replace`` in this process.

    python benchmarks/minicanvas/lever_probe_anchor.py MODEL CKPT OUT SEEDS VARIANTS TARGETS

VARIANTS: comma-separated BASE:ALPHA (e.g. cond:2,uncond:2); SEEDS, TARGETS comma-separated. Writes OUT/<variant>/
(``evaluate_unlearning``) and a line per variant in OUT/summary.jsonl.
"""
import os
import sys
from pathlib import Path

import torch
from probe_common import evaluate_and_record, quiet_pipeline, replace_flagged

from saeuron import patching
from saeuron.concepts import ConceptTable
from saeuron.detectors import Detectors, pick_anchor

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
CFG = {"base": "cond", "alpha": 1.0, "table": None, "detectors": None, "shift": {}}
HOOKS = ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]


def shift(self, target):
    """``[T, C]``: W_dec^T (mu[anchor, t] - mu[target, t]) at this hook's block."""
    key = (self.hookpoint, target)
    if key not in CFG["shift"]:
        tab = CFG["table"]
        a = pick_anchor(CFG["detectors"], tab, target, HOOKS[0])
        mu = tab.mu[self.hookpoint]
        CFG["shift"][key] = (mu[tab.index(a)] - mu[tab.index(target)]) @ self.sae.W_dec.detach().float()
        print(f"anchor of {target} at {self.hookpoint}: {a}", flush=True)
    return CFG["shift"][key]


def _replace(self, x, lo, hi, fi, ta, sc, rpg):
    def fill(cond, unc, t):
        d = shift(self, self.concepts[0])[t].to(x.dtype).reshape(1, -1, 1, 1)  # one vector over every token
        return (unc if CFG["base"] == "uncond" else cond) + CFG["alpha"] * d
    return replace_flagged(self, x, lo, hi, fill)


def main(argv):
    if len(argv) != 6:
        raise SystemExit(__doc__)
    model, ckpt, out, seeds, variants, targets = argv
    pipe = quiet_pipeline(model)
    CFG["table"], CFG["detectors"] = ConceptTable.load(ckpt), Detectors.load(ckpt)
    patching.EditHook._replace = _replace
    for v in variants.split(","):
        base, alpha = v.split(":")
        CFG.update(base=base, alpha=float(alpha))
        evaluate_and_record(pipe, ckpt, Path(out) / f"{base}_{alpha}", Path(out) / "summary.jsonl", seeds, targets,
                            "python benchmarks/minicanvas/lever_probe_anchor.py " + " ".join(argv),
                            {"base": base, "alpha": float(alpha)}, hookpoints=HOOKS, mode="probe_uncond", gate=0.5)

if __name__ == "__main__":
    main(sys.argv[1:])
