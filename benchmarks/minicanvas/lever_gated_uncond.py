"""Probe (issue 22): detect per image at one block, replace the whole conditional map by the unconditional one.

Causal tracing (``probe_block_tracing.py``) shows that on the v2 model the prompt's *object* enters the image at the
8x8 up blocks (replacing up.0.1's whole conditional output by the unconditional one drops object accuracy to 14.5 %
and keeps style accuracy at 100 %), while token-level detection there is not local. So: the SAE decides *per image*
whether the target is asked for, and acts on the whole map. At the DETECT block, the share of the conditional
image's tokens on which the target's selected features fire (the method's firing rule) is measured; an image whose
share is at least RHO is flagged for this UNet call, and at every ACT block its conditional half is replaced by the
unconditional half (whole map). It monkeypatches ``EditHook.post_forward`` in this process (the library has no
such mode); the patch is applied at DETECT and ACT blocks with the given top-n and threshold.

    python benchmarks/minicanvas/lever_gated_uncond.py MODEL CKPT OUT SEED DETECT ACT TOP_N THRESHOLD RHO [GATE]

GATE ``share`` (default): the share of tokens where a selected feature fires, as above. GATE ``mean``: the image's
mean code of the selected features (zeros included, as the concept statistics are made), summed over them, divided
by the same sum of the target's own statistics ``mu[c,t]`` at this timestep; flagged when that ratio is >= RHO (a
per-image threshold in the statistics' own units; THRESHOLD is then unused).

Writes OUT/results.json (``evaluate_unlearning``: 10 objects x 110 training-form images of SEED, damage measure)
and appends a line to OUT/../gated_summary.jsonl with the command.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

from saeuron import patching, reference, replace
from saeuron.evaluate.unlearn_eval import evaluate_unlearning
from saeuron.minicanvas import defaults
from saeuron.pipelines import load_pipeline

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
CFG = {}


def post_forward(self, module, output):
    rows = self.state.rows
    if rows is None:
        return output
    x = output[0] if isinstance(output, tuple) else output.sample
    b = x.shape[0]
    if b % 2 or x.dim() != 4:
        raise ValueError("gated probe: needs a CFG batch of maps")
    h = b // 2
    if self.hookpoint == CFG["detect"]:
        fi, ta, sc = rows[(self.hookpoint, "scale")]
        W = self.sae.weights_for(x.device, x.dtype)
        if CFG["gate"] == "share":
            hit = replace.detect(x[h:], W, self.k, fi, ta, sc, x[0, 0].numel() * h)  # [h, H, W]
            self.state.flag = hit.float().mean((1, 2)) >= CFG["rho"]
        else:
            ids = fi[0]
            live = torch.isfinite(ta[0])
            ids_ = torch.where(live, ids, torch.zeros_like(ids))
            tok = reference.as_tokens(x[h:])
            pre = reference.preacts(tok, *W[:3])
            idm = ids_[None].expand(len(tok), -1)
            f = pre.gather(1, idm) * reference.topk_member(pre, idm, self.k) * live[None]
            per_img = f.view(h, -1, f.shape[1]).mean(1).sum(1)  # [h]
            t = int(self.state.last_index.reshape(-1)[0])
            table, ci = CFG["table"], CFG["table"].index(CFG["concept"][0])
            mu = table.mu[table.stored_hookpoint(self.hookpoint)][ci, t].float()
            ref = (mu[ids_] * live).sum()
            self.state.flag = per_img >= CFG["rho"] * ref
    flag = getattr(self.state, "flag", None)
    if self.hookpoint in CFG["act"] and flag is not None and bool(flag.any()):
        y = x.clone()
        y[h:][flag] = x[:h][flag]
        return (y,) + tuple(output[1:]) if isinstance(output, tuple) else type(output)(sample=y)
    return output


def main(argv):
    if len(argv) not in (9, 10):
        raise SystemExit(__doc__)
    model, ckpt, out, seed, det, act, top_n, thr, rho = argv[:9]
    gate = argv[9] if len(argv) > 9 else "share"
    from saeuron.concepts import ConceptTable
    CFG.update(detect=det, act=act.split(","), rho=float(rho), gate=gate, table=ConceptTable.load(ckpt), concept=[None])
    orig_patch = patching.patch

    def remember(pipe, concepts, *a, **kw):  # the probe's gate needs the target's statistics
        CFG["concept"][0] = concepts if isinstance(concepts, str) else list(concepts)[0]
        return orig_patch(pipe, concepts, *a, **kw)
    patching.patch = remember
    patching.EditHook.post_forward = post_forward
    hps = list(dict.fromkeys([det] + act.split(",")))
    pipe = load_pipeline(model, "cpu")
    t0 = time.time()
    res = evaluate_unlearning(pipe, defaults.load_classifiers("cpu"), ckpt, domain="object", seeds=[int(seed)],
                              out_dir=out, progress=False, hookpoints=hps, top_n=int(top_n), threshold=float(thr),
                              mode="replace_uncond")  # zero-scale tables: the detection rule
    m = res["mean"]
    keys = ("ua", "ira", "cra", "damage_target", "damage_kept", "ua_undamaged")
    row = {"mode": "gated_uncond", "detect": det, "act": act.split(","), "top_n": int(top_n), "threshold": float(thr),
           "rho": float(rho), "gate": gate, "seed": int(seed), "seconds": round(time.time() - t0, 1), **{k: m.get(k) for k in keys},
           "per_target": {t: {k: r.get(k) for k in keys} for t, r in res["per_target"].items()},
           "command": "python benchmarks/minicanvas/lever_gated_uncond.py " + " ".join(argv)}
    with open(Path(out).parent / "gated_summary.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "per_target"}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
