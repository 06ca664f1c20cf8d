"""Images with and without the edit, from the same noise, plus a labelled side-by-side grid."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .images import image_grid, save_png
from .patching import get_patch, patch, unpatch
from .pipelines import resolve_sampling
from .utils import FolderLock


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "prompt"


def _sample(pipe, jobs, batch_size, bar, **kw) -> list:
    """PIL images for ``jobs`` [(prompt, seed)], one CPU generator per image so batching never changes the noise."""
    images = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk]
        out = pipe(prompt=[p for p, _ in chunk], generator=gens, output_type="pil", **kw)
        images += out.images
        bar.update(len(chunk))
    return images


def generate(pipe, prompts, out_dir, *, concepts, checkpoint=None, saes=None, table=None, seeds=(0,),
             num_inference_steps=None, guidance_scale=None, height=None, width=None,
             batch_size: int = 4, progress: bool = True, **patch_kwargs) -> dict:
    """Generate every (prompt, seed) without and with unlearning ``concepts``; write PNGs and a grid.

    Writes ``out_dir/original/*.png``, ``out_dir/unlearned/*.png`` (same names, same generator seed) and
    ``out_dir/grid.png`` (rows = prompts x seeds, columns original | unlearned). ``patch_kwargs`` go to
    :func:`saeuron.patching.patch` (multiplier, percentile, top_n, threshold, hookpoints, halves, error_term). Any patch
    already on the pipeline is restored afterwards. Returns ``{"original": [paths], "unlearned": [paths],
    "pairs": [(prompt, original, unlearned)], "grid": path}``. Steps and guidance left at None are the
    pipeline's own defaults.
    """
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not prompts or not seeds:
        raise ValueError("generate needs at least one prompt and one seed")
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    out = Path(out_dir)
    jobs = [(p, s) for p in prompts for s in seeds]
    names = [f"{i:03d}_{_slug(p)}_seed{s}.png" for i, (p, s) in enumerate(jobs)]
    kw = resolve_sampling(pipe, num_inference_steps, guidance_scale)
    kw.update({k: v for k, v in (("height", height), ("width", width)) if v is not None})

    prev = get_patch(pipe)
    handle = patch(pipe, concepts, checkpoint, saes=saes, table=table, **patch_kwargs)  # validate before sampling
    handle.remove()
    with FolderLock(out, "generating images into"):  # one writer per output folder, taken once inputs are valid
        bar = tqdm(total=2 * len(jobs), unit="img", desc="generate", disable=not progress)
        try:
            original = _sample(pipe, jobs, batch_size, bar, **kw)
            handle.install()
            unlearned = _sample(pipe, jobs, batch_size, bar, **kw)
        finally:
            bar.close()
            handle.remove()
            unpatch(pipe)
            if prev is not None:
                prev.install()
        res = {"original": [], "unlearned": [], "pairs": []}
        for name, (p, _), a, b in zip(names, jobs, original, unlearned):
            pa, pb = save_png(a, out / "original" / name), save_png(b, out / "unlearned" / name)
            res["original"].append(str(pa))
            res["unlearned"].append(str(pb))
            res["pairs"].append((p, str(pa), str(pb)))
        grid = image_grid([[a, b] for a, b in zip(original, unlearned)],
                          row_labels=[f"{p} (seed {s})" for p, s in jobs],
                          col_labels=["original", "unlearned: " + ", ".join(concepts)])
        res["grid"] = str(save_png(grid, out / "grid.png"))
    return res
