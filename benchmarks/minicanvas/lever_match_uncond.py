"""Probe (issue 22): set each fired selected feature to its value in the unconditional branch ("match uncond").

The v2 replace probe (RESULTS.md) found that an object's selected 8x8 features fire on most tokens of the
conditional half when the prompt names the object (background included): they carry the prompt's object word, which
cross-attention spreads over the map, while in the unconditional half they fire only where the image already holds
the shape. Replacing whole tokens also throws away what else they carry (the style), and scaling by x-20..-50
overshoots into damage. This probe changes only the selected features, and only to an in-distribution value: on
every conditional token where a selected feature fires (the method's rule), ``f_i <- f_i(uncond, same position)``
(its top-k code there, 0 when it is not among the top k), written back with the reconstruction error kept:
``x_c += sum_i (f_i,u - f_i,c) W_dec[i]``. The CFG difference through these features becomes 0: the prompt's object
no longer steers this block. It monkeypatches ``EditHook._edit`` in this process (the library has no such mode).

    python benchmarks/minicanvas/lever_match_uncond.py MODEL CKPT OUT SEED HOOKPOINTS TOP_N THRESHOLD

Writes OUT/results.json (``evaluate_unlearning``: 10 objects x 110 training-form images of SEED, damage measure) and
appends a line to OUT/../match_uncond_summary.jsonl with the command.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from saeuron import patching, reference
from saeuron.evaluate.unlearn_eval import evaluate_unlearning
from saeuron.minicanvas import defaults
from saeuron.pipelines import load_pipeline

torch.set_num_threads(int(os.environ.get("THREADS", "2")))


def _match_uncond_edit(self, x, lo, hi, fi, ta, sc, rpg):
    b = x.shape[0]
    if b % 2 or lo != 0 or hi != b or fi.shape[0] != 1 or x.dim() != 4:
        raise ValueError("match-uncond probe: needs a CFG batch of maps, halves='both', one timestep per call")
    W_enc, b_enc, b_dec, W_dec = self.sae.weights_for(x.device, x.dtype)
    xu, xc = reference.as_tokens(x[: b // 2]), reference.as_tokens(x[b // 2:])
    ids = fi[0]
    valid = (ids >= 0) & (ids < W_enc.shape[0])
    ids_ = torch.where(valid, ids, torch.zeros_like(ids))[None].expand(len(xc), -1)
    pc, pu = reference.preacts(xc, W_enc, b_enc, b_dec), reference.preacts(xu, W_enc, b_enc, b_dec)
    fc = pc.gather(1, ids_) * reference.topk_member(pc, ids_, self.k)
    fu = pu.gather(1, ids_) * reference.topk_member(pu, ids_, self.k)
    fire = valid[None] & (fc > ta[0][None].float()) & (fc > 0)
    coef = torch.where(fire, fu - fc, torch.zeros_like(fc))
    delta = (coef.unsqueeze(-1) * W_dec.float()[ids_]).sum(1)
    new = reference.from_tokens((xc.float() + delta).to(x.dtype), x[b // 2:])
    y = x.clone()
    y[b // 2:] = new
    return y


def main(argv):
    if len(argv) != 7:
        raise SystemExit(__doc__)
    model, ckpt, out, seed, hps, top_n, thr = argv
    patching.EditHook._edit = _match_uncond_edit
    pipe = load_pipeline(model, "cpu")
    t0 = time.time()
    res = evaluate_unlearning(pipe, defaults.load_classifiers("cpu"), ckpt, domain="object", seeds=[int(seed)],
                              out_dir=out, progress=False, hookpoints=hps.split(","), top_n=int(top_n),
                              threshold=float(thr))
    m = res["mean"]
    keys = ("ua", "ira", "cra", "damage_target", "damage_kept", "ua_undamaged")
    row = {"mode": "match_uncond", "hookpoints": hps.split(","), "top_n": int(top_n), "threshold": float(thr),
           "seed": int(seed), "seconds": round(time.time() - t0, 1), **{k: m.get(k) for k in keys},
           "per_target": {t: {k: r.get(k) for k in keys} for t, r in res["per_target"].items()},
           "command": "python benchmarks/minicanvas/lever_match_uncond.py " + " ".join(argv)}
    with open(Path(out).parent / "match_uncond_summary.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "per_target"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
