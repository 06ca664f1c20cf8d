"""What the issue-22 probes of the flagged image's replacement source share (``lever_probe_*.py``): load the pipeline,
evaluate a monkeypatched edit on MiniCanvas objects and append its summary line (with the command) to a JSONL file."""
import json
import time
from pathlib import Path

from saeuron.evaluate.unlearn_eval import evaluate_unlearning
from saeuron.minicanvas import defaults
from saeuron.pipelines import load_pipeline

KEYS = ("ua", "ira", "cra", "damage_target", "damage_kept", "ua_undamaged")


def quiet_pipeline(model):
    """The pipeline on the CPU, without per-call progress bars."""
    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate_and_record(pipe, ckpt, out_dir, summary, seeds: str, targets: str, command: str, row=None,
                        **eval_kwargs) -> dict:
    """``evaluate_unlearning`` on objects (comma-separated ``seeds`` and ``targets``) into ``out_dir``; appends
    ``{**row, seeds, targets, seconds, metrics, per_target, command}`` to ``summary`` and prints it."""
    t0 = time.time()
    res = evaluate_unlearning(pipe, defaults.load_classifiers("cpu"), ckpt, domain="object",
                              seeds=[int(s) for s in seeds.split(",")], targets=targets.split(","), out_dir=out_dir,
                              progress=False, **eval_kwargs)
    out = {**(row or {}), "seeds": seeds, "targets": targets, "seconds": round(time.time() - t0, 1),
           **{k: res["mean"].get(k) for k in KEYS},
           "per_target": {t: {k: r.get(k) for k in KEYS} for t, r in res["per_target"].items()}, "command": command}
    Path(summary).parent.mkdir(parents=True, exist_ok=True)
    with open(summary, "a") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "command"}), flush=True)
    return out


def replace_flagged(hook, x, lo, hi, fill):
    """An ``EditHook._replace`` body for a detector mode: flag the images at the first hooked block of the call
    (``hook.flag_by_detectors``), then give each flagged image of rows ``[lo, hi)`` the map ``fill(cond, uncond,
    t_index)`` returns for it (``cond``/``uncond``: the conditional rows and the matching unconditional ones)."""
    import torch

    part = x[lo:hi]
    if hook.state.flag is None:
        hook.flag_by_detectors(part, lo, hi)
    flag = hook.state.flag
    t = int(hook.state.last_index.reshape(-1)[0])
    new = torch.where(flag.view(-1, *([1] * (part.dim() - 1))), fill(part, x[lo - (hi - lo):lo], t), part)
    y = x if x.is_contiguous() else x.contiguous()
    y[lo:hi] = new
    return y
