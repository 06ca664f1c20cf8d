"""Probe (issue 22): the replacement source "the same position in a pass without the concept", done per block: a
flagged image's conditional map at each hooked block is the block's own output for that image's current input,
recomputed with an anchor prompt's text in place of the image's prompt.

``mode="probe_uncond"`` takes the unconditional map (the model's default shape for the noise, sometimes the target
itself; UA about 85 and a quarter of the removed images damaged on seed 1); the store's recorded map of an anchor
prompt (``lever_probe_bank.py``) removes every circle but clashes with the image's own layout (lumpy shapes, 64 %
damaged). Re-running the block on the image's own input with the anchor's text gives the map the model itself
would make there for the anchor object, in the image's layout. Cost: one more pass of each hooked block over the
flagged images only. The anchor is the unstyled prompt of the object whose mean code at the first block is least
like the target's (cosine); the style is not in these blocks (RESULTS.md, causal tracing). Detectors: the library's.
Monkeypatches ``EditHook.pre_forward`` / ``_replace`` in this process.

Environment: HOOKS (comma-separated hooked blocks, default the two 8x8 up blocks); STYLED=1: the anchor prompt also
names the image's style as the detectors' style group reads it at the first hooked block (most probable of the 10
styles or unstyled), e.g. "An image of arrow in stripes style.", so blocks that carry style (up.1.0) can be re-run
too.

    python benchmarks/minicanvas/lever_probe_rerun.py MODEL CKPT OUT SEEDS TARGETS [TEMPLATES]

Writes OUT/ (``evaluate_unlearning``) and a line in OUT/../rerun_summary.jsonl.
"""
import os
import sys
from pathlib import Path

import torch
from probe_common import evaluate_and_record, quiet_pipeline

from saeuron import patching
from saeuron.concepts import ConceptTable
from saeuron.detectors import Detectors, pick_anchor
from saeuron.minicanvas import data

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
HOOKS = os.environ.get("HOOKS", "up_blocks.0.attentions.0,up_blocks.0.attentions.1").split(",")
STYLED = os.environ.get("STYLED") == "1"
CFG = {"emb": {}, "pipe": None, "style": None}


def pre_forward(self, module, *args, **kwargs):
    self._inputs = (args, kwargs)
    return args, kwargs


def _replace(self, x, lo, hi, fi, ta, sc, rpg):
    part = x[lo:hi]
    if self.state.flag is None:
        self.flag_by_detectors(part, lo, hi)
    flag = self.state.flag
    if not bool(flag.any()):
        return x
    if STYLED and self.hookpoint == HOOKS[0]:  # the image's style as the style group's detector reads it (None: unstyled)
        t = self.state.last_index.reshape(-1)[:1]
        codes = self.detectors.image_features(self.hookpoint, self.sae, part.detach())
        p = torch.stack([self.detectors.probability(self.hookpoint, codes, t, [n])[:, 0] for n in data.STYLES], 1)
        CFG["style"] = [data.STYLES[int(i)] if float(v) >= 0.5 else None for v, i in zip(*p.max(1))]
    args, kwargs = self._inputs
    rows = torch.arange(lo, hi)[flag]
    hs = (args[0] if args else kwargs["hidden_states"])[rows]
    if STYLED:
        emb = torch.cat([CFG["emb"][(self.concepts[0], CFG["style"][int(r) - lo])] for r in rows]).to(hs.dtype)
    else:
        emb = CFG["emb"][self.concepts[0]].to(hs.dtype).expand(len(rows), -1, -1)
    kw = {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == x.shape[0] else v)
          for k, v in kwargs.items() if k not in ("hidden_states", "encoder_hidden_states", "return_dict")}
    with torch.no_grad():
        out = type(self._module).forward(self._module, hs, encoder_hidden_states=emb, return_dict=False, **kw)[0]
    y = x if x.is_contiguous() else x.contiguous()
    y[rows] = out.to(y.dtype)
    return y


def main(argv):
    if len(argv) not in (5, 6):
        raise SystemExit(__doc__)
    model, ckpt, out, seeds, targets = argv[:5]
    templates = [int(v) for v in (argv[5] if len(argv) > 5 else "0").split(",")]
    pipe = quiet_pipeline(model)
    table, det = ConceptTable.load(ckpt), Detectors.load(ckpt)
    for tgt in targets.split(","):
        obj = pick_anchor(det, table, tgt, "up_blocks.0.attentions.0")
        with torch.no_grad():
            CFG["emb"][tgt] = pipe.encode_prompt([data.caption(obj, None, 0)])
            for st in list(data.STYLES) + [None]:
                CFG["emb"][(tgt, st)] = pipe.encode_prompt([data.caption(obj, st, 0)])
        print(f"anchor of {tgt}: {data.caption(obj, None, 0)!r}", flush=True)
    orig_post = patching.EditHook.post_forward

    def post_forward(self, module, output):
        self._module = module
        return orig_post(self, module, output)
    patching.EditHook.pre_forward = pre_forward
    patching.EditHook.post_forward = post_forward
    patching.EditHook._replace = _replace
    evaluate_and_record(pipe, ckpt, out, Path(out).parent / "rerun_summary.jsonl", seeds, targets,
                        "python benchmarks/minicanvas/lever_probe_rerun.py " + " ".join(argv),
                        {"lever": "rerun", "hooks": HOOKS, "styled": STYLED, "templates": templates},
                        templates=templates, hookpoints=HOOKS, mode="probe_uncond", gate=0.5)

if __name__ == "__main__":
    main(sys.argv[1:])
