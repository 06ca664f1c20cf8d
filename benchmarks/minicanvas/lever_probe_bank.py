"""Probe (issue 22): replace a flagged image's conditional maps by an anchor prompt's recorded maps.

``mode="probe_uncond"`` copies the unconditional map into a flagged image; the model then draws its default shape for
that noise, sometimes the target itself and often a lumpy in-between shape (UA about 85, a quarter of the removed
images damaged, seed 1). A uniform shift towards another object's mean (``lever_probe_anchor.py``) does nothing: the
object is carried by the map's spatial pattern. Here the flagged image's conditional map at each hooked block is
replaced by a real conditional map of another object: the activation store's map of an anchor prompt at the nearest
recorded timestep (the collect stage's rows, the same ones the SAEs and statistics are built from; one map per
timestep and block). The anchor is the unstyled prompt of the object whose mean code at the first block is least
like the target's (cosine), first caption form. Detectors: the library's. Monkeypatches ``EditHook._replace``.

    python benchmarks/minicanvas/lever_probe_bank.py MODEL CKPT STORE OUT SEEDS TARGETS

Writes OUT/ (``evaluate_unlearning``) and a line in OUT/../bank_summary.jsonl.
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
from saeuron.store import ActivationStore

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
HOOKS = ["up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
CFG = {"bank": {}}


def anchor_of(table, target, hp):
    objs = [o for o in data.OBJECTS if o in table.names and o != target]
    m = torch.nn.functional.normalize(table.mu[hp].mean(1), dim=1)
    t = m[table.index(target)]
    return min(objs, key=lambda o: float(m[table.index(o)] @ t))


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
    part = x[lo:hi]
    if self.state.flag is None:
        self._flag_probe(part, lo, hi)
    flag = self.state.flag
    t = int(self.state.last_index.reshape(-1)[0])
    m = CFG["bank"][(self.hookpoint, self.concepts[0])][t].to(x.dtype)
    new = torch.where(flag.view(-1, 1, 1, 1), m.unsqueeze(0).expand_as(part), part)
    y = x if x.is_contiguous() else x.contiguous()
    y[lo:hi] = new
    return y


def main(argv):
    if len(argv) != 6:
        raise SystemExit(__doc__)
    model, ckpt, store_dir, out, seeds, targets = argv
    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    table = ConceptTable.load(ckpt)
    store = ActivationStore(store_dir)
    for tgt in targets.split(","):
        a = anchor_of(table, tgt, HOOKS[0])
        for hp in HOOKS:
            CFG["bank"][(hp, tgt)] = bank(store, table, data.caption(a, None, 0), hp)
        print(f"anchor of {tgt}: {data.caption(a, None, 0)!r}", flush=True)
    patching.EditHook._replace = _replace
    t0 = time.time()
    res = evaluate_unlearning(pipe, defaults.load_classifiers("cpu"), ckpt, domain="object",
                              seeds=[int(s) for s in seeds.split(",")], targets=targets.split(","), out_dir=out,
                              progress=False, hookpoints=HOOKS, mode="probe_uncond", gate=0.5)
    keys = ("ua", "ira", "cra", "damage_target", "damage_kept", "ua_undamaged")
    row = {"lever": "bank", "seeds": seeds, "targets": targets, "seconds": round(time.time() - t0, 1),
           **{k: res["mean"].get(k) for k in keys},
           "per_target": {t: {k: r.get(k) for k in keys} for t, r in res["per_target"].items()},
           "command": "python benchmarks/minicanvas/lever_probe_bank.py " + " ".join(argv)}
    with open(Path(out).parent / "bank_summary.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("command",)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
