"""Lever (issue 22): ``probe_anchor`` with the anchor's text in the *whole* UNet early in the run, for flagged images.

``mode="probe_anchor"`` re-runs only the hooked 8x8 blocks of a flagged image with the anchor prompt's text; the other
blocks keep the image's own text. On the lost v2 model that left 18.7 % of the removed images damaged (bar 10 %): the
new object inherits the target's footprint, and in the dark-ground styles the 16x16 blocks, which also carry the
object (causal tracing), keep the target's outline (RESULTS.md, issue 22). A diffusion model lays out shapes in the
first, noisiest steps and fills in texture and style in the later ones. So here a flagged image gets the anchor's
text in *every* cross-attention of the UNet while the timestep is above ``SWAP_T`` (its shape forms as the anchor's),
then only at the hooked blocks (its style forms from its own text). Two changes to the library's mode, both by
monkeypatching in this process only:

* **sticky flags**: an image flagged at some call stays flagged, with the same concept, for the rest of its
  sampling run (a run ends when the timestep goes up or the batch changes). Without it an image whose blocks already
  see the anchor's text would no longer be flagged;
* **early swap**: at a UNet call with ``t > SWAP_T``, the conditional rows of the sticky-flagged images get the
  anchor's text embeddings as ``encoder_hidden_states`` (the first call, t = 999, cannot: its flags are decided in the
  call; the hooked blocks' re-run covers it). ``SWAP_T`` = 1000: sticky flags only (the library mode otherwise).

    python benchmarks/minicanvas/lever_anchor_early.py MODEL CKPT OUT SEEDS TARGETS SWAP_TS [TEMPLATES]
    python benchmarks/minicanvas/lever_anchor_early.py saeuron/minicanvas/assets/model \\
        benchmarks/minicanvas/v2_eval/sweep_ckpt build/lever_anchor_early 1 circle,square,arrow 1000,700,400

One ``evaluate_unlearning`` run per SWAP_T into OUT/swap<T>/ at the two 8x8 blocks (gate 0.5, automatic anchor: the
library's defaults; HOOKS: other comma-separated blocks), and a line each in OUT/summary.jsonl (with the command).
Tuning seeds only.
"""
import os
import sys
from pathlib import Path

import torch
from probe_common import evaluate_and_record, quiet_pipeline

from saeuron import patching

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
HOOKS = os.environ.get("HOOKS", "up_blocks.0.attentions.0,up_blocks.0.attentions.1").split(",")
RUN = {"swap_t": 1000.0, "t_prev": None, "size": None, "flag": None, "which": None, "swapped": 0}


def sticky_flag_by_detectors(orig):
    def flag_by_detectors(self, part, lo, hi):
        orig(self, part, lo, hi)
        if RUN["flag"] is not None and RUN["flag"].shape == self.state.flag.shape:
            old = RUN["flag"]
            self.state.flag_concept = torch.where(old, RUN["which"], self.state.flag_concept)
            self.state.flag = old | self.state.flag
        RUN["flag"], RUN["which"] = self.state.flag.clone(), self.state.flag_concept.clone()
    return flag_by_detectors


def swapping_pre_forward(orig):
    def pre_forward(self, module, *args, **kwargs):
        args, kwargs = orig(self, module, *args, **kwargs)
        sample = args[0] if args else kwargs.get("sample")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        t = float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
        if RUN["t_prev"] is None or t > RUN["t_prev"] or RUN["size"] != sample.shape[0]:
            RUN["flag"] = RUN["which"] = None  # a new sampling run
        RUN["t_prev"], RUN["size"] = t, sample.shape[0]
        flag = RUN["flag"]
        if flag is None or t <= RUN["swap_t"] or not bool(flag.any()) or not self.state.cfg:
            return args, kwargs
        b = sample.shape[0]
        key = "encoder_hidden_states"
        emb = kwargs[key] if key in kwargs else args[2]
        emb = emb.clone()
        concepts = self.patch.flag_concepts
        for r in flag.nonzero().flatten().tolist():
            emb[b // 2 + r] = self.patch.anchor_embeds[concepts[int(RUN["which"][r])]][0].to(emb.device, emb.dtype)
            RUN["swapped"] += 1
        if key in kwargs:
            kwargs[key] = emb
        else:
            args = (*args[:2], emb, *args[3:])
        return args, kwargs
    return pre_forward


def main(argv):
    if len(argv) not in (6, 7):
        raise SystemExit(__doc__)
    model, ckpt, out, seeds, targets, swaps = argv[:6]
    templates = [int(v) for v in (argv[6] if len(argv) > 6 else "0").split(",")]
    patching.EditHook.flag_by_detectors = sticky_flag_by_detectors(patching.EditHook.flag_by_detectors)
    patching.TimestepHook.pre_forward = swapping_pre_forward(patching.TimestepHook.pre_forward)
    pipe = quiet_pipeline(model)
    for swap in swaps.split(","):
        RUN.update(swap_t=float(swap), t_prev=None, size=None, flag=None, which=None, swapped=0)
        evaluate_and_record(pipe, ckpt, Path(out) / f"swap{swap}", Path(out) / "summary.jsonl", seeds, targets,
                            "python benchmarks/minicanvas/lever_anchor_early.py " + " ".join(argv),
                            {"lever": "anchor_early", "swap_t": float(swap), "hooks": HOOKS, "templates": templates},
                            templates=templates, hookpoints=HOOKS, mode="probe_anchor", gate=0.5)
        print(f"swap_t {swap}: {RUN['swapped']} conditional rows got the anchor's text in the whole UNet", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
