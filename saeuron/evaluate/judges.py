"""The judges of the UnlearnCanvas harness: the benchmark's style and object classifiers.

Classifier files are read safely (safetensors, or ``torch.load(..., weights_only=True)``; never pickle),
unwrapped from common checkpoint layouts, built into a headless body (timm ViT, or the MiniCanvas
SmallCNN stand-in) plus one linear head per domain, and run over image files.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

ARCHES = {"vit_large_patch16_224": 224, "minicanvas": 32}  # architecture -> classifier input size
HEADS = {"style": "style_head.", "object": "object_head."}  # head prefixes of a one-file, two-head classifier
WRAPPERS = ("model_state_dict", "state_dict", "model", "module", "net")


def read_state_dict(path) -> dict:
    """A tensor state dict from a .safetensors file or a .pth/.pt/.bin/.ckpt file loaded with ``weights_only``.

    Unwraps ``{"model_state_dict": ...}``, ``{"state_dict": ...}`` (and "model", "module", "net") and strips
    ``module.`` prefixes (DataParallel). Files that need pickle to load are refused with a clear error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} could not be read as safetensors ({e})") from None
    elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"add_safe_globals\(\[([^\]]*)\]\)", str(e))
            if found is None:
                raise ValueError(f"{path} could not be read with weights_only=True: it is corrupt or not a plain "
                                 "tensor checkpoint") from None
            raise ValueError(
                f"{path} cannot be loaded safely: it holds Python objects ({found.group(1)}) that only full pickle "
                "loading would create, and saeuron never unpickles (weights_only=True). In an environment you "
                "trust, re-save just its tensors, e.g. torch.save(model.state_dict(), 'classifier.pth') or with "
                "safetensors.") from None
        except (RuntimeError, EOFError) as e:
            raise ValueError(f"{path} is not a readable torch file ({e})") from None
    else:
        raise ValueError(f"unknown classifier file type {path.name!r}; valid: .safetensors, .pth, .pt, .bin, .ckpt")
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj, name="checkpoint") -> dict:
    """The ``{key: tensor}`` state dict inside common checkpoint wrappings, ``module.`` prefixes stripped."""
    def is_sd(x):
        return isinstance(x, dict) and bool(x) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in x.items())

    top = sorted(map(str, obj)) if isinstance(obj, dict) else None
    for _ in range(len(WRAPPERS) + 1):
        if is_sd(obj):
            break
        key = next((k for k in WRAPPERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if key is None:
            raise ValueError(f"no state dict found in {name}: expected a dict of tensors, or one under "
                             f"{', '.join(map(repr, WRAPPERS))}; its top-level "
                             + (f"keys are: {', '.join(top[:20])}" + (" ..." if len(top) > 20 else "")
                                if top is not None else f"object is a {type(obj).__name__}"))
        obj = obj[key]
    while all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


class _Body(torch.nn.Module):
    """The MiniCanvas SmallCNN without its head (state-dict keys ``body.*``)."""

    def __init__(self, width: int):
        super().__init__()
        from ..minicanvas.classifiers import SmallCNN

        self.body = SmallCNN(2, width).body
        self.num_features = 8 * width

    def forward(self, x):
        return self.body(x)


def _backbone(arch: str, state: dict, name: str) -> torch.nn.Module:
    """The headless classifier body of ``arch`` with ``state`` loaded strictly."""
    if arch == "minicanvas":
        if "body.0.weight" not in state:
            raise ValueError(f"{name} is not a MiniCanvas SmallCNN state dict (no 'body.0.weight'); keys start: "
                             f"{', '.join(list(state)[:8])}")
        model = _Body(int(state["body.0.weight"].shape[0]))
    else:
        try:
            import timm
        except ImportError:
            raise ImportError(f"--arch {arch} needs timm: pip install timm (no weights are downloaded; the "
                              "classifier file supplies them)") from None
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{name} does not fit the {arch} architecture: {str(e)[:1500]}") from None
    return model.eval()


def _head(state: dict, prefix: str, n: int, kind: str, name: str) -> torch.nn.Linear:
    """A linear head from ``state[prefix + weight/bias]``, checked to have ``n`` classes."""
    w, b = state.get(prefix + "weight"), state.get(prefix + "bias")
    if w is None or b is None or w.dim() != 2:
        raise ValueError(f"no {kind} head '{prefix}weight'/'{prefix}bias' in {name}; head-like keys: "
                         f"{', '.join(k for k in state if 'head' in k or 'fc' in k) or '(none)'}")
    if w.shape[0] != n:
        raise ValueError(f"the {kind} head in {name} has {w.shape[0]} classes but the run lists {n} {kind}s; class i "
                         f"must be entry i of the list: pass a label JSON with the classifier's classes in order")
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": b})
    return head.eval()


def load_judges(arch: str, n_styles: int, n_objects: int, *, classifier=None, style_classifier=None,
                object_classifier=None, device="cpu") -> dict:
    """``{"style": (backbone, head), "object": (backbone, head)}`` from classifier files (loaded safely).

    Either one file with a shared body and two heads (keys ``style_head.*`` and ``object_head.*``) as
    ``classifier``, or one file per domain (``style_classifier``, ``object_classifier``), each a plain
    classifier whose head is ``head.*`` (timm ViT or SmallCNN layout). ``arch``: one of ``ARCHES``.
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown classifier architecture {arch!r}; valid: {', '.join(ARCHES)}")
    n = {"style": n_styles, "object": n_objects}
    if classifier is not None and (style_classifier or object_classifier):
        raise ValueError("pass either one two-head classifier file or --style-classifier and --object-classifier")
    if classifier is not None:
        state = read_state_dict(classifier)
        heads = {k: _head(state, p, n[k], k, str(classifier)) for k, p in HEADS.items()}
        body = _backbone(arch, {k: v for k, v in state.items() if not k.startswith(tuple(HEADS.values()))},
                         str(classifier))
        out = {k: (body, h) for k, h in heads.items()}
    elif style_classifier is not None and object_classifier is not None:
        out = {}
        for kind, path in (("style", style_classifier), ("object", object_classifier)):
            state = read_state_dict(path)
            head = _head(state, "head.", n[kind], kind, str(path))
            out[kind] = (_backbone(arch, {k: v for k, v in state.items() if not k.startswith("head.")}, str(path)),
                         head)
    else:
        raise ValueError("no classifier: pass classifier= (one file, two heads) or both style_classifier= and "
                         "object_classifier=")
    for kind, (body, head) in out.items():
        dim = getattr(body, "num_features", head.in_features)
        if head.in_features != dim:
            raise ValueError(f"the {kind} head takes {head.in_features} features but the {arch} body gives {dim}")
    return {k: (b.to(device), h.to(device)) for k, (b, h) in out.items()}


def classifier_signature(arch, size, files: dict) -> dict:
    """What predictions depend on besides the images: architecture, input size, classifier files (size, mtime)."""
    sig = {"arch": arch, "image_size": size}
    for k, f in files.items():
        if f is not None:
            st = Path(f).stat()
            sig[k] = [str(Path(f).resolve()), st.st_size, st.st_mtime_ns]
    return sig


def load_images(paths, size: int) -> torch.Tensor:
    """PNGs -> float [B, 3, size, size] in [-1, 1] (bilinear resize, as the benchmark's classifier input)."""
    import numpy as np
    from PIL import Image

    arr = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def predict_files(judges: dict, paths, size: int, batch_size: int = 32, bar=None) -> dict:
    """``{"style": [ids], "object": [ids]}`` for image files; a body shared by both heads runs once per batch."""
    out = {k: [] for k in judges}
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        x, feats = load_images(chunk, size), {}
        for kind, (body, head) in judges.items():
            if id(body) not in feats:
                feats[id(body)] = body(x.to(next(head.parameters()).device))
            out[kind] += head(feats[id(body)]).argmax(-1).tolist()
        if bar is not None:
            bar.update(len(chunk))
    return out
