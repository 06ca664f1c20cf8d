"""Small PIL helpers: a labelled image grid and atomic PNG writes."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .utils import atomic_write


def load_font(size: int = 12):
    """PIL's default font at ``size`` pixels (a fixed-size bitmap font on Pillow < 10.1)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def text_size(draw, text: str, font) -> tuple:
    """``(width, height)`` in pixels of ``text`` drawn by ``draw`` in ``font``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw, text: str, font, width: int) -> list:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (long words stay whole)."""
    lines, line = [], ""
    for word in str(text).split():
        cand = f"{line} {word}".strip()
        if line and text_size(draw, cand, font)[0] > width:
            lines.append(line)
            line = word
        else:
            line = cand
    return lines + [line] if line else lines or [""]


def image_grid(rows: Sequence[Sequence], row_labels: Optional[Sequence[str]] = None,
               col_labels: Optional[Sequence[str]] = None, pad: int = 4, label_width: int = 160,
               font_size: int = 12, background="white", color="black"):
    """Paste ``rows[r][c]`` (PIL images) into one image, with wrapped row labels left and column labels on top."""
    from PIL import Image, ImageDraw

    rows = [list(r) for r in rows]
    if not rows or not all(rows):
        raise ValueError("image_grid needs at least one row and one image per row")
    n_cols = max(len(r) for r in rows)
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    if col_labels is not None and len(col_labels) != n_cols:
        raise ValueError(f"{len(col_labels)} column labels for {n_cols} columns")
    cell_w = max(im.width for r in rows for im in r)
    cell_h = max(im.height for r in rows for im in r)
    font = load_font(font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = text_size(draw, "Ag", font)[1] + 2
    left = label_width + pad if row_labels is not None else 0
    col_lines = [_wrap(draw, t, font, cell_w - pad) for t in col_labels] if col_labels is not None else []
    top = (max(len(ls) for ls in col_lines) * line_h + pad) if col_lines else 0
    W = left + n_cols * (cell_w + pad) + pad
    H = top + len(rows) * (cell_h + pad) + pad
    grid = Image.new("RGB", (W, H), background)
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(col_lines):
        for j, line in enumerate(lines):
            draw.text((left + pad + c * (cell_w + pad), pad + j * line_h), line, fill=color, font=font)
    for r, row in enumerate(rows):
        y = top + pad + r * (cell_h + pad)
        if row_labels is not None:
            for j, line in enumerate(_wrap(draw, row_labels[r], font, label_width)):
                if (j + 1) * line_h > cell_h:
                    break
                draw.text((pad, y + j * line_h), line, fill=color, font=font)
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (left + pad + c * (cell_w + pad), y))
    return grid


def add_caption(image, lines: Sequence[str], font_size: int = 13, pad: int = 6, background="white", color="black"):
    """``image`` with ``lines`` of text (wrapped to its width) written under it: a picture that explains itself."""
    from PIL import Image, ImageDraw

    font = load_font(font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [w for line in lines for w in _wrap(draw, line, font, image.width - 2 * pad)]
    line_h = text_size(draw, "Ag", font)[1] + 3
    out = Image.new("RGB", (image.width, image.height + len(wrapped) * line_h + 2 * pad), background)
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for j, line in enumerate(wrapped):
        draw.text((pad, image.height + pad + j * line_h), line, fill=color, font=font)
    return out


def save_png(image, path) -> Path:
    """Save a PIL image as PNG atomically (a killed run never leaves a truncated file)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
