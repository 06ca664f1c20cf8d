"""Probe (issue 22): steer flagged images from the target to an anchor concept along the SAE's concept means.

``mode="probe_uncond"`` copies the unconditional map into a flagged image, and the model then draws what it draws
without an object word: a shape that depends on the noise and is sometimes the target itself (UA about 85 on seed
1, with round shapes the most common default), and often a lumpy in-between shape the damage measure flags. Here a
flagged image's conditional map is moved instead, at every hooked block, by the difference of the concept
statistics decoded through the SAE::

    x <- BASE + ALPHA * W_dec^T (mu[anchor, t] - mu[target, t])       (one vector per timestep, every token)

BASE = the conditional map (``cond``) or the unconditional one (``uncond``); the anchor is the object whose mean
code at the block (``mu`` averaged over timesteps) is least like the target's (cosine). The object word reaches the
8x8 blocks spread over every token (RESULTS.md, issue 22), so a shift of every token is the form in which the
model carries it. Detectors: the library's (CKPT must hold ``detectors.safetensors``). Monkeypatches
``EditHook._replace`` in this process.

    python benchmarks/minicanvas/lever_probe_anchor.py MODEL CKPT OUT SEEDS VARIANTS TARGETS

VARIANTS: comma-separated BASE:ALPHA (e.g. cond:2,uncond:2); SEEDS, TARGETS comma-separated. Writes OUT/<variant>/
(``evaluate_unlearning``) and a line per variant in OUT/summary.jsonl.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from saeuron import patching
from saeuron.concepts import ConceptTable
from saeuron.evaluate.unlearn_eval import evaluate_unlearning
from saeuron.minicanvas import data, defaults
from saeuron.pipelines import load_pipeline

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
CFG = {"base": "cond", "alpha": 1.0, "table": None, "shift": {}}
HOOKS = ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]


def anchor_of(table, target, hp):
    """The object whose timestep-mean code at ``hp`` has the lowest cosine with the target's."""
    objs = [o for o in data.OBJECTS if o in table.names and o != target]
    m = torch.nn.functional.normalize(table.mu[hp].mean(1), dim=1)
    t = m[table.index(target)]
    return min(objs, key=lambda o: float(m[table.index(o)] @ t))


def shift(self, target):
    """``[T, C]``: W_dec^T (mu[anchor, t] - mu[target, t]) at this hook's block."""
    key = (self.hookpoint, target)
    if key not in CFG["shift"]:
        tab = CFG["table"]
        a = anchor_of(tab, target, HOOKS[0])
        mu = tab.mu[self.hookpoint]
        CFG["shift"][key] = (mu[tab.index(a)] - mu[tab.index(target)]) @ self.sae.W_dec.detach().float()
        print(f"anchor of {target} at {self.hookpoint}: {a}", flush=True)
    return CFG["shift"][key]


def _replace(self, x, lo, hi, fi, ta, sc, rpg):
    part = x[lo:hi]
    if self.state.flag is None:
        self._flag_probe(part, lo, hi)
    flag = self.state.flag
    t = self.state.last_index.reshape(-1)[:1]
    d = shift(self, self.concepts[0])[t].to(x.dtype).reshape(1, -1, 1, 1)  # one vector over every token
    base = x[lo - (hi - lo):lo] if CFG["base"] == "uncond" else part
    new = torch.where(flag.view(-1, 1, 1, 1), base + CFG["alpha"] * d, part)
    y = x if x.is_contiguous() else x.contiguous()
    y[lo:hi] = new
    return y


def main(argv):
    if len(argv) != 6:
        raise SystemExit(__doc__)
    model, ckpt, out, seeds, variants, targets = argv
    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    CFG["table"] = ConceptTable.load(ckpt)
    patching.EditHook._replace = _replace
    clf = defaults.load_classifiers("cpu")
    for v in variants.split(","):
        base, alpha = v.split(":")
        CFG.update(base=base, alpha=float(alpha))
        t0 = time.time()
        res = evaluate_unlearning(pipe, clf, ckpt, domain="object", seeds=[int(s) for s in seeds.split(",")],
                                  targets=targets.split(","), out_dir=Path(out) / f"{base}_{alpha}", progress=False,
                                  hookpoints=HOOKS, mode="probe_uncond", gate=0.5)
        keys = ("ua", "ira", "cra", "damage_target", "damage_kept", "ua_undamaged")
        row = {"base": base, "alpha": float(alpha), "seeds": seeds, "targets": targets,
               "seconds": round(time.time() - t0, 1), **{k: res["mean"].get(k) for k in keys},
               "per_target": {t: {k: r.get(k) for k in keys} for t, r in res["per_target"].items()},
               "command": "python benchmarks/minicanvas/lever_probe_anchor.py " + " ".join(argv)}
        with open(Path(out) / "summary.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("command", "per_target")}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
