"""Probe (issue 22): replace a flagged image's conditional maps by an anchor prompt's recorded maps.

``mode="probe_uncond"`` copies the unconditional map into a flagged image; the model then draws its default shape for
that noise, sometimes the target itself and often a lumpy in-between shape (UA about 85, a quarter of the removed
images damaged, seed 1). A uniform shift towards another object's mean (``lever_probe_anchor.py``) does nothing: the
object is carried by the map's spatial pattern. Here the flagged image's conditional map at each hooked block is
replaced by a real conditional map of another object: the activation store's map of an anchor prompt at the nearest
recorded timestep (the collect stage's rows, the same ones the SAEs and statistics are built from; one map per
timestep and block). The anchor is the unstyled prompt (first caption form) of ``saeuron.detectors.pick_anchor``'s
object: the one whose mean code at the first block is least like the target's (cosine). Detectors: the library's. Monkeypatches ``EditHook._replace``.

    python benchmarks/minicanvas/lever_probe_bank.py MODEL CKPT STORE OUT SEEDS TARGETS

Writes OUT/ (``evaluate_unlearning``) and a line in OUT/../bank_summary.jsonl.
"""
import os
import sys
from pathlib import Path

import torch
from probe_common import evaluate_and_record, quiet_pipeline, replace_flagged

from saeuron import patching
from saeuron.concepts import ConceptTable
from saeuron.detectors import Detectors, pick_anchor
from saeuron.minicanvas import data
from saeuron.store import ActivationStore

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
HOOKS = ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
CFG = {"bank": {}}


def bank(store, table, prompt, hp):
    """``[T, C, H, W]``: the store's conditional map of ``prompt`` at ``hp`` per table timestep (first repeat)."""
    pid = store.prompts.index(prompt)
    rows = {}
    for i in range(len(store.shard_paths(hp))):
        r = store.read_shard(hp, i)
        sel = r["prompt_id"] == pid
        for t in torch.unique(r["timestep"][sel]).tolist():
            if t not in rows:
                rows[t] = r["x"][sel & (r["timestep"] == t)].float()
    maps = []
    for t in table.timesteps.tolist():
        x = rows[min(rows, key=lambda u: abs(u - t))]
        side = int(round(x.shape[0] ** 0.5))
        maps.append(x.view(side, side, -1).permute(2, 0, 1))
    return torch.stack(maps)


def _replace(self, x, lo, hi, fi, ta, sc, rpg):
    m = CFG["bank"][(self.hookpoint, self.concepts[0])]
    return replace_flagged(self, x, lo, hi, lambda cond, unc, t: m[t].to(x.dtype).unsqueeze(0).expand_as(cond))


def main(argv):
    if len(argv) != 6:
        raise SystemExit(__doc__)
    model, ckpt, store_dir, out, seeds, targets = argv
    pipe = quiet_pipeline(model)
    table, det = ConceptTable.load(ckpt), Detectors.load(ckpt)
    store = ActivationStore(store_dir)
    for tgt in targets.split(","):
        a = pick_anchor(det, table, tgt, HOOKS[0])
        for hp in HOOKS:
            CFG["bank"][(hp, tgt)] = bank(store, table, data.caption(a, None, 0), hp)
        print(f"anchor of {tgt}: {data.caption(a, None, 0)!r}", flush=True)
    patching.EditHook._replace = _replace
    evaluate_and_record(pipe, ckpt, out, Path(out).parent / "bank_summary.jsonl", seeds, targets,
                        "python benchmarks/minicanvas/lever_probe_bank.py " + " ".join(argv), {"lever": "bank"},
                        hookpoints=HOOKS, mode="probe_uncond", gate=0.5)

if __name__ == "__main__":
    main(sys.argv[1:])
