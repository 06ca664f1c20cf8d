"""What the command modules share: argument groups, conversions of option values, prompt files.

Nothing here imports torch at import time: building the parser stays instant."""
from __future__ import annotations

EDIT_MODES = ("scale", "replace_uncond", "replace_background", "gate_uncond", "probe_uncond", "probe_anchor")  # saeuron.replace.MODES, without importing torch
DETECTOR_LATENTS = 48  # saeuron.detectors.DEFAULT_LATENTS, without importing torch
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def torch_dtype(name):
    """``--dtype`` as a torch dtype (None stays None); an unknown name exits with the valid ones."""
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def torch_device(name):
    """``--device`` as a torch device (default: cuda if available, else cpu)."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def read_prompts(path: str):
    """Prompts from a .txt (one per line) or .json file (a list, or {concept: [prompts]})."""
    from ..collection import read_prompt_file

    try:
        return read_prompt_file(path)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None


def parse_per_concept(values, what: str):
    """``["-1"]`` -> -1.0 and ``["Cat=-5", "Dog=-1"]`` -> ``{"Cat": -5.0, "Dog": -1.0}`` (CLI values; None if empty).

    Each value must be a finite number; a clear ValueError names the bad item and the valid forms."""
    if not values:
        return None
    if isinstance(values, str):
        values = [values]

    def num(text, item):
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"--{what} {item!r}: {text!r} is not a finite number; give one number (--{what} -5) or "
                             f"NAME=NUMBER pairs (--{what} Cat=-5 Dog=-1)")
        return v

    if len(values) == 1 and "=" not in values[0]:
        return num(values[0], values[0])
    out = {}
    for item in values:
        if "=" not in item:
            raise ValueError(f"--{what}: with several values each must look like NAME=NUMBER, got {item!r}")
        name, text = item.rsplit("=", 1)
        if not name:
            raise ValueError(f"--{what} {item!r}: the concept name before '=' is empty")
        if name in out:
            raise ValueError(f"--{what}: concept {name!r} is given twice")
        out[name] = num(text, item)
    return out


def per_concept(values, what="multiplier"):
    """``--multiplier -1`` or ``--multiplier Cartoon=-5 Dog=-1`` -> float or dict."""
    try:
        return parse_per_concept(values, what)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def patch_kwargs(a) -> dict:
    """The edit options a command was given (``--multiplier``, ``--percentile``, ``--top-n``, ``--threshold``,
    ``--mode``, ``--gate``, ``--hookpoints``)."""
    got = (("multiplier", per_concept(getattr(a, "multiplier", None), "multiplier")),
           ("percentile", per_concept(getattr(a, "percentile", None), "percentile")),
           ("top_n", getattr(a, "top_n", None)),
           ("threshold", per_concept(getattr(a, "threshold", None), "threshold")),
           ("mode", getattr(a, "mode", None)),
           ("gate", getattr(a, "gate", None)),
           ("anchor", anchor_arg(getattr(a, "anchor", None))),
           ("hookpoints", getattr(a, "edit_hookpoints", None)))
    return {k: v for k, v in got if v is not None}


def anchor_arg(values):
    """``--anchor``: None, one prompt for every concept, or ``NAME=PROMPT`` pairs -> a dict."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    out = {}
    for v in values:
        name, sep, prompt = v.partition("=")
        if not sep or not name or not prompt:
            raise SystemExit(f"--anchor: expected one prompt or NAME=PROMPT pairs, got {v!r}")
        out[name] = prompt
    return out


def add_edit_args(s, top_n: bool = True):
    """``--multiplier``, ``--percentile``, ``--threshold``, ``--mode`` (and ``--top-n``); unset: the concept file's
    defaults (mode: each concept's default mode, the method's scale edit unless the file says)."""
    s.add_argument("--multiplier", nargs="*", default=None, help="-1 or NAME=-5 ... (default: concept file)")
    s.add_argument("--percentile", nargs="*", default=None, help="99.99 or NAME=99.999 ...")
    if top_n:
        s.add_argument("--top-n", type=int, default=None, help="select the top n features per timestep instead")
    s.add_argument("--threshold", nargs="*", default=None,
                   help="factor on the edit threshold tau: 1 (the method's) or NAME=10 ... (default: concept file)")
    s.add_argument("--hookpoints", dest="edit_hookpoints", nargs="+", default=None, metavar="HOOKPOINT",
                   help="edit every concept at these blocks (default: each concept's own, from the concept file)")
    add_mode_args(s)


def add_mode_args(s):
    """``--mode``, ``--gate``, ``--anchor``: the edit mode (unset: each concept's from the concept file)."""
    s.add_argument("--mode", default=None, choices=EDIT_MODES,
                   help="the edit mode of every concept (default: each concept's own from the concept file, which is "
                        "the method's scale edit unless a sweep run with --mode chose another); scale: the method's "
                        "edit; replace_uncond / replace_background: the selected "
                        "features only detect the concept's tokens, which are replaced by the unconditional "
                        "branch's or by the image's other tokens' mean; gate_uncond: an image flagged by --gate "
                        "gets its whole conditional map replaced by the unconditional one at the hooked blocks; "
                        "probe_uncond: the same, images flagged by the checkpoint's fitted detectors (`saeuron "
                        "detectors`); probe_anchor: flagged so, the hooked blocks recomputed with an anchor "
                        "prompt's text (--anchor)")
    s.add_argument("--gate", type=float, default=None,
                   help="with --mode gate_uncond: the share of an image's tokens on which a selected feature must "
                        "fire at the first hooked block to flag it, in (0, 1]; with --mode probe_uncond or probe_anchor: the "
                        "detector probability that flags an image, in (0, 1) (default 0.5)")
    s.add_argument("--anchor", nargs="*", default=None, metavar="PROMPT",
                   help="with --mode probe_anchor: the prompt whose text replaces a flagged image's at the hooked "
                        "blocks, for every concept or NAME=PROMPT each (default: per concept, the prompt of the "
                        "most different concept of its detector group)")


def add_eval_model_args(s):
    """The model, device and sampling options every evaluation command takes."""
    s.add_argument("--model", default="minicanvas", help="pipeline folder, or 'minicanvas' for the shipped model")
    s.add_argument("--checkpoint", default=None, help="SAEs + concept file (default: the shipped MiniCanvas one)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: as saved)")
    s.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    s.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the pipeline's)")
    s.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call")


def add_grid_args(s, seeds):
    """The classifiers, domain and prompt grid (seeds, objects, styles) of an evaluation, and ``--no-resume``."""
    s.add_argument("--classifiers", default=None, help="folder with object/ and style/ classifiers (default: shipped)")
    s.add_argument("--domain", default="style", choices=["style", "object"],
                   help='what is unlearned: style or object (default %(default)s)')
    s.add_argument("--seeds", type=int, nargs="+", default=list(seeds),
                   help='generator seeds: one image per prompt and seed (default %(default)s)')
    s.add_argument("--objects", nargs="+", default=None, help="prompt objects (default: all)")
    s.add_argument("--styles", nargs="+", default=None, help="prompt styles, 'unstyled' included (default: all)")
    s.add_argument("--no-resume", action="store_true", help="recompute everything instead of reusing cached results")


def eval_checkpoint(checkpoint, model):
    """``--checkpoint``, or the shipped MiniCanvas checkpoint when evaluating the shipped model."""
    if checkpoint is not None:
        return checkpoint
    if model not in (None, "minicanvas"):
        raise SystemExit("--checkpoint is required with a --model other than the shipped MiniCanvas one")
    from ..minicanvas import defaults

    return defaults.checkpoint_dir()


def eval_classifiers(path, device=None):
    """``{"object", "style"}`` MiniCanvas classifiers from ``path`` (default: the shipped ones)."""
    from ..minicanvas import defaults, load_classifiers

    device = torch_device(device)
    return defaults.load_classifiers(device) if path is None else load_classifiers(path, device)


def prompt_list(path):
    """A prompt file as a flat list (a {concept: [prompts]} file is flattened); None when no file is given."""
    if not path:
        return None
    prompts = read_prompts(path)
    return [p for ps in prompts.values() for p in ps] if isinstance(prompts, dict) else prompts


def style_values(values):
    """``--styles`` values with "unstyled"/"none" meaning the unstyled prompt."""
    return None if values is None else [None if v.lower() in ("unstyled", "none") else v for v in values]
