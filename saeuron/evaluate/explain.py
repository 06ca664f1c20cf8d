"""``explain``: what the features chosen for a concept are, where they fire, and what editing each one does.

One PNG (``out_dir/explain_<concept>.png``) with three panels, plus ``index.html``, one PNG per
feature and the numbers as JSON:

(a) the concept's selected features per timestep: rows = features (most often selected first),
    columns = the concept file's timesteps (noisiest first), colour = ``score_t(i, c)`` (method.md
    section 4), a blue frame = selected at that timestep;
(b) for each of the top features, the generated images (the concept's prompts and other prompts)
    on which it fires most, with its spatial activation map overlaid: the SAE code of that feature at
    each token of the hooked block (conditional half), averaged over the denoising steps, upsampled;
(c) how much editing each feature alone changes the concept's images: the mean absolute pixel
    difference (0..1 scale) between the original and the image generated with only that feature's edit
    (at this hookpoint), next to the edit of all selected features.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..concepts import check_sae_for_edit
from ..hookpoints import block_output, get_unet, image_stream, normalize_hookpoint, resolve_hookpoints
from ..images import load_font, save_png, text_size
from ..patching import SaeuronPatch, get_patch, patched
from ..utils import atomic_write, atomic_write_json, locks_folder
from .common import resolve_assets, sample_images, slug, to_pil

_CMAP = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=torch.float32) / 255


def colormap(v: torch.Tensor) -> torch.Tensor:
    """An inferno-like colour ramp: values in [0, 1] ``[...]`` -> RGB ``[..., 3]`` in [0, 1]."""
    x = v.clamp(0, 1) * (len(_CMAP) - 1)
    i = x.floor().long().clamp(max=len(_CMAP) - 2)
    w = (x - i)[..., None]
    return _CMAP[i] * (1 - w) + _CMAP[i + 1] * w


def overlay(image: torch.Tensor, amap: torch.Tensor, alpha: float = 0.85) -> torch.Tensor:
    """``image`` [3, H, W], greyed, with a [h, w] map in [0, 1] upsampled and blended on top where it is high."""
    m = F.interpolate(amap[None, None].float(), size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    a = alpha * m.clamp(0, 1)[None]
    grey = 0.25 + 0.6 * image.mean(0, keepdim=True).expand_as(image)
    return grey * (1 - a) + colormap(m).permute(2, 0, 1) * a


def default_prompts(concept: str, n: int = 4) -> tuple:
    """(concept prompts, other prompts) for a MiniCanvas object or style; a clear error for anything else."""
    from ..minicanvas import data

    if concept in data.STYLES:
        others = [s for s in data.STYLES if s != concept]
        return ([data.caption(o, concept) for o in data.OBJECTS[:n]],
                [data.caption(data.OBJECTS[i % len(data.OBJECTS)], s) for i, s in enumerate(others[:n])])
    if concept in data.OBJECTS:
        others = [o for o in data.OBJECTS if o != concept]
        return ([data.caption(concept, s) for s in data.STYLES[:n]],
                [data.caption(o, data.STYLES[i % len(data.STYLES)]) for i, o in enumerate(others[:n])])
    raise ValueError(f"concept {concept!r} is not a MiniCanvas object or style: pass prompts=[...] (prompts that "
                     "hold the concept) and optionally other_prompts=[...]")


def _capture(pipe, module, sae, feats: torch.Tensor, prompts, seeds, sampling, bar) -> tuple:
    """Generate (prompt, seed) pairs; return images and the mean-over-steps maps [N, F, h, w] of ``feats``."""
    state = {"sum": None, "calls": 0, "n": 0}

    stream = image_stream(module)

    def hook(mod, args, output):
        x = block_output(output, stream)
        n = state["n"]
        x = x[n:] if x.shape[0] == 2 * n else x  # CFG: [uncond, cond] -> the conditional half
        if x.dim() == 3:  # DiT image tokens [B, L, C] on a square patch grid -> a map
            B, L, C = x.shape
            H = W = math.isqrt(L)
            if H * W != L:
                raise ValueError(f"explain draws feature maps on a square patch grid; this block returned {L} image "
                                 "tokens per image (generate square images)")
            x = x.reshape(B, H, W, C).permute(0, 3, 1, 2)
        B, C, H, W = x.shape
        vals, idx = sae.encode(x.detach().permute(0, 2, 3, 1).reshape(-1, C).to(sae.device))
        dense = (vals.float()[:, :, None] * (idx[:, :, None] == feats[None, None, :].to(idx.device))).sum(1)
        maps = dense.reshape(B, H, W, -1).permute(0, 3, 1, 2).cpu()
        state["sum"] = maps if state["sum"] is None else state["sum"] + maps
        state["calls"] += 1

    images, maps = [], []
    handle = module.register_forward_hook(hook)
    try:
        bs = sampling["batch_size"]
        for i in range(0, len(prompts), bs):
            state.update(sum=None, calls=0, n=len(prompts[i:i + bs]))
            images.append(sample_images(pipe, prompts[i:i + bs], seeds[i:i + bs], bar=bar, **sampling))
            maps.append(state["sum"] / max(state["calls"], 1))
    finally:
        handle.remove()
    return torch.cat(images), torch.cat(maps)


# ---------------------------------------------------------------- drawing (PIL only)

def _text_image(lines, width: int, size: int = 13):
    from PIL import Image, ImageDraw

    font = load_font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lh = text_size(probe, "Ag", font)[1] + 4
    width = max([width] + [text_size(probe, line, font)[0] + 10 for line in lines])
    im = Image.new("RGB", (width, lh * len(lines) + 4), "white")
    d = ImageDraw.Draw(im)
    for j, line in enumerate(lines):
        d.text((4, 2 + j * lh), line, fill="black", font=font)
    return im


def _stack(images, pad: int = 8):
    from PIL import Image

    W = max(im.width for im in images)
    out = Image.new("RGB", (W, sum(im.height for im in images) + pad * (len(images) - 1)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + pad
    return out


def _heat_strip(scores: torch.Tensor, selected: torch.Tensor, feats: list, timesteps: torch.Tensor):
    """Rows = features, columns = timesteps; colour = positive score, white frame = selected."""
    from PIL import Image, ImageDraw

    T, font = len(timesteps), load_font(11)
    vals = scores[:, feats].clamp_min(0) if feats else scores[:, :0]
    vmax = float(vals.max()) if vals.numel() and float(vals.max()) > 0 else 1.0
    legend = f"timesteps (noisiest first); colour: score, 0..{vmax:.3g}; blue frame: selected"
    cw, ch, left, top = max(6, min(28, 640 // max(T, 1))), 16, 70, 20
    lw = text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), legend, font)[0]
    im = Image.new("RGB", (left + max(cw * T, lw) + 8, top + ch * max(len(feats), 1) + 22), "white")
    d = ImageDraw.Draw(im)
    step = max(1, -(-40 // cw))  # label every step-th timestep so labels do not overlap
    for t in range(0, T, step):
        d.text((left + t * cw, 4), f"{timesteps[t]:g}", fill="black", font=font)
    for r, f in enumerate(feats):
        y = top + r * ch
        d.text((4, y + 2), f"f{f}", fill="black", font=font)
        for t in range(T):
            rgb = tuple(int(255 * c) for c in colormap(vals[t, r] / vmax).tolist())
            d.rectangle([left + t * cw, y, left + (t + 1) * cw - 1, y + ch - 1], fill=rgb)
            if bool(selected[t, f]):
                d.rectangle([left + t * cw, y, left + (t + 1) * cw - 1, y + ch - 1], outline=(0, 200, 255), width=2)
    d.text((left, top + ch * max(len(feats), 1) + 4), legend, fill="black", font=font)
    return im


def _bars(labels: list, values: list, width: int = 520):
    """A horizontal bar chart of non-negative values with their labels and numbers."""
    from PIL import Image, ImageDraw

    bh, left, right = 18, 110, 80
    im = Image.new("RGB", (left + width + right, bh * len(labels) + 8), "white")
    d, font = ImageDraw.Draw(im), load_font(11)
    vmax = max([v for v in values if v is not None] + [1e-12])
    for r, (lab, v) in enumerate(zip(labels, values)):
        y = 4 + r * bh
        d.text((4, y + 2), lab, fill="black", font=font)
        w = int(width * (v or 0) / vmax)
        d.rectangle([left, y + 2, left + max(w, 1), y + bh - 3], fill=(188, 55, 84))
        d.text((left + w + 6, y + 2), f"{v:.4f}", fill="black", font=font)
    return im


# ---------------------------------------------------------------- the tool

@locks_folder("out_dir", "explaining into")
def explain(pipe, checkpoint=None, concept: Optional[str] = None, out_dir=".", *, saes=None, table=None, prompts=None,
            other_prompts=None, seeds=(0,), hookpoint: Optional[str] = None, top_features: int = 8,
            top_images: int = 4, percentile=None, top_n=None, multiplier=None, threshold=None,
            num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None, batch_size: int = 8,
            max_rows: int = 24, progress: bool = True) -> dict:
    """Write ``out_dir/explain_<concept>.png`` (+ ``index.html``, per-feature PNGs, JSON) explaining ``concept``'s features.

    ``prompts``/``other_prompts`` default to MiniCanvas captions with and without the concept.
    ``hookpoint`` defaults to the concept's first own hookpoint (concept file defaults) that has an SAE.
    ``percentile``/``top_n``/``multiplier``/``threshold`` override the concept file's defaults. Returns the
    paths and the numbers shown.
    """
    if concept is None:
        raise ValueError("explain needs concept=NAME")
    saes, table = resolve_assets(checkpoint, saes, table)
    table.index(concept)
    mine = [h for h in table.concept_hookpoints(concept) if h in saes]
    hp = normalize_hookpoint(hookpoint) if hookpoint else (mine or list(saes))[0]
    if hp not in saes:
        raise ValueError(f"no SAE and statistics for hookpoint {hookpoint!r}; available: {', '.join(saes)}")
    for name, v in (("top_features", top_features), ("top_images", top_images), ("batch_size", batch_size)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if prompts is None:
        prompts, auto_other = default_prompts(concept)
        other_prompts = auto_other if other_prompts is None else other_prompts
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    other_prompts = [] if other_prompts is None else ([other_prompts] if isinstance(other_prompts, str)
                                                      else list(other_prompts))
    seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not prompts or not seeds:
        raise ValueError("explain needs at least one prompt holding the concept and one seed")
    sae = saes[hp]
    check_sae_for_edit(table, hp, sae)  # before any image: another SAE than the concept file's is refused
    module = resolve_hookpoints(pipe, [hp])[hp]

    # (a) selection per timestep
    sel = table.select(hp, concept, percentile, top_n)
    scores = table.scores(hp, concept)
    T, M = scores.shape
    selected = torch.zeros(T, M, dtype=torch.bool)
    for t, idx in enumerate(sel):
        selected[t, idx] = True
    union = selected.any(0).nonzero().flatten().tolist()
    rank = sorted(union, key=lambda f: (-int(selected[:, f].sum()), -float(scores[selected[:, f], f].sum())))
    top = rank[:top_features]
    feats = torch.tensor(top, dtype=torch.int64)

    # (b) activation maps on the original images
    jobs = [(p, s, True) for p in prompts for s in seeds] + [(p, s, False) for p in other_prompts for s in seeds]
    sampling = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size)
    n_c = len(prompts) * len(seeds)
    total = len(jobs) + n_c * (len(top) + 1)
    bar = tqdm(total=total, unit="img", desc=f"explain {concept}", disable=not progress)
    prev = get_patch(pipe)
    if prev is not None:
        prev.remove()
    try:
        if top:
            images, maps = _capture(pipe, module, sae, feats, [j[0] for j in jobs], [j[1] for j in jobs], sampling, bar)
        else:
            images = sample_images(pipe, [j[0] for j in jobs], [j[1] for j in jobs], bar=bar, **sampling)
            maps = torch.zeros(len(jobs), 0, 1, 1)
        # (c) per-feature edit effect on the concept's images
        c_prompts, c_seeds, orig = [j[0] for j in jobs[:n_c]], [j[1] for j in jobs[:n_c]], images[:n_c]
        ts, fi, ta, sc = table.edit_tables(hp, [concept], multiplier, percentile, top_n, threshold)
        effects = []
        for f in top:
            keep = fi == f
            one = SaeuronPatch(get_unet(pipe), pipe, {hp: sae}, {hp: module}, ts,
                               {hp: (fi, torch.where(keep, ta, torch.inf), torch.where(keep, sc, torch.ones(())))},
                               [concept], "both", "correct").install()
            try:
                edited = sample_images(pipe, c_prompts, c_seeds, bar=bar, **sampling)
            finally:
                one.remove()
            effects.append(float((edited - orig).abs().mean()))
        with patched(pipe, concept, saes={hp: sae}, table=table, hookpoints=[hp], multiplier=multiplier,
                     percentile=percentile, top_n=top_n, threshold=threshold):
            effect_all = float((sample_images(pipe, c_prompts, c_seeds, bar=bar, **sampling) - orig).abs().mean())
    finally:
        bar.close()
        if prev is not None:
            prev.install()

    # draw
    out = Path(out_dir)
    name = slug(concept)
    rule = table.rule(concept, percentile, top_n)
    thr = table.threshold(concept, threshold)
    width = 700
    title = _text_image([f"explain: {concept} at {hp} ({rule[0]} {rule[1]:g}, edit where f > {thr:g} x tau): "
                         f"{len(union)} features selected over {T} timesteps; top {len(top)} shown"], width, 14)
    panels = [title, _text_image(["(a) selected features per timestep"], width), _heat_strip(
        scores, selected, rank[:max_rows], table.timesteps)]
    panels.append(_text_image(["(b) top-activating images per feature (C = concept prompt, O = other); "
                               "map = SAE code at each token, mean over steps"], width))
    info, feature_files = [], []
    for r, f in enumerate(top):
        strength = maps[:, r].mean((-2, -1))
        order = strength.argsort(descending=True)[:top_images].tolist()
        vmax = float(maps[:, r].max()) or 1.0
        thumbs = [to_pil(overlay(images[i], maps[i, r] / vmax), 96) for i in order]
        caps = [f"{'C' if jobs[i][2] else 'O'} {float(strength[i]):.3g}" for i in order]
        row = _feature_row(f"f{f}: {int(selected[:, f].sum())}/{T} steps, score max {float(scores[:, f].max()):.3g}, "
                           f"edit effect {effects[r]:.4f}", thumbs, caps)
        feature_files.append(str(save_png(row, out / f"explain_{name}_f{f}.png")))
        panels.append(row)
        info.append({"feature": f, "steps_selected": int(selected[:, f].sum()), "max_score": float(scores[:, f].max()),
                     "effect": effects[r], "top_images": [{"prompt": jobs[i][0], "seed": jobs[i][1],
                                                           "concept_prompt": jobs[i][2],
                                                           "activation": float(strength[i])} for i in order]})
    if not top:
        panels.append(_text_image(["(no feature is selected for this concept at this hookpoint)"], width))
    panels.append(_text_image(["(c) mean |pixel change| on the concept's images when editing each feature alone"], width))
    panels.append(_bars([f"f{f}" for f in top] + ["all selected"], effects + [effect_all]))
    png = save_png(_stack(panels), out / f"explain_{name}.png")
    result = {"concept": concept, "hookpoint": hp, "rule": list(rule), "threshold": thr, "num_selected": len(union),
              "timesteps": T,
              "features": info, "effect_all": effect_all, "png": str(png), "feature_pngs": feature_files,
              "json": str(out / f"explain_{name}.json"), "html": str(out / "index.html")}
    atomic_write_json(result, out / f"explain_{name}.json")
    _write_html(out)
    return result


def _feature_row(label: str, thumbs: list, caps: list):
    from PIL import Image, ImageDraw

    font = load_font(11)
    tw = max((t.width for t in thumbs), default=96)
    th = max((t.height for t in thumbs), default=96)
    im = Image.new("RGB", (max(8 + len(thumbs) * (tw + 6), 700), th + 38), "white")
    d = ImageDraw.Draw(im)
    d.text((4, 2), label, fill="black", font=font)
    for j, (t, c) in enumerate(zip(thumbs, caps)):
        im.paste(t, (4 + j * (tw + 6), 18))
        d.text((4 + j * (tw + 6), 20 + th), c, fill="black", font=font)
    return im


def _write_html(out: Path) -> Path:
    """``out/index.html`` embedding every explain PNG in ``out`` and its per-feature PNGs (relative links)."""
    import json

    e, parts = html.escape, ["<!doctype html><meta charset=utf-8><title>saeuron explain</title>"]
    for jf in sorted(out.glob("explain_*.json")):
        try:
            r = json.loads(jf.read_text())
        except (OSError, ValueError):
            continue
        parts.append(f"<h1>{e(str(r['concept']))} at {e(r['hookpoint'])}</h1><img src=\"{e(Path(r['png']).name)}\">")
        for f, p in zip(r["features"], r["feature_pngs"]):
            parts.append(f"<h3>feature {f['feature']}</h3><p>selected at {f['steps_selected']}/{r['timesteps']} "
                         f"timesteps; max score {f['max_score']:.4g}; edit effect {f['effect']:.4f}</p>"
                         f"<img src=\"{e(Path(p).name)}\">")
    return atomic_write(out / "index.html", lambda tmp: Path(tmp).write_text("\n".join(parts)))
