"""MiniCanvas rendering in pure torch: signed-distance shapes painted in a style, deterministic from a seed.

Every image is a function of ``(object, style, seed, size)`` only: the pose (rotation, scale, position), the
colour jitter and every noise field come from a counter-based integer hash of the seed, so an image is the
same alone or in any batch, on any machine. The objects and styles themselves are named in :mod:`.data`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .data import OBJECTS, Style, object_id, style_id, style_spec

ROTATION = math.radians(40)          # pose: rotation in [-40, 40] degrees
SCALE = (0.5, 0.8)                   # bounding radius as a fraction of the half image
MARGIN = 0.95                        # the bounding circle stays inside [-MARGIN, MARGIN]^2
_NPARAM = 16


# ---------------------------------------------------------------- counter-based randomness

_M32 = 0xFFFFFFFF


def _hash(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing hash on int64 tensors holding values in [0, 2**32)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def _uniform(seeds: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """[B, n] floats in [0, 1): a pure function of (seed, stream, position), independent of the batch."""
    key = _hash(_hash(seeds & _M32) ^ (seeds >> 32))
    key = _hash(key ^ ((stream * 0x9E3779B1 + 0x7F4A7C15) & _M32))
    idx = torch.arange(n, dtype=torch.int64, device=seeds.device)
    h = _hash(_hash((key[:, None] ^ idx) & _M32) ^ key[:, None])
    return (h >> 8).float() / float(1 << 24)


# ---------------------------------------------------------------- shapes (SDFs in local units)

def _poly(*pts):
    return torch.tensor(pts, dtype=torch.float32)


def _regular(n, r, phase=math.pi / 2):
    return _poly(*[(r * math.cos(phase + 2 * math.pi * i / n), r * math.sin(phase + 2 * math.pi * i / n))
                   for i in range(n)])


def _star(n=5, r_out=1.0, r_in=0.45):
    a = [math.pi / 2 + math.pi * i / n for i in range(2 * n)]
    return _poly(*[((r_out if i % 2 == 0 else r_in) * math.cos(t), (r_out if i % 2 == 0 else r_in) * math.sin(t))
                   for i, t in enumerate(a)])


def _polygon_sdf(x, y, verts):
    """Exact signed distance to a simple (possibly non-convex) polygon; negative inside."""
    d, sign = None, torch.ones_like(x)
    n = len(verts)
    for i in range(n):
        (xi, yi), (xj, yj) = verts[i].tolist(), verts[i - 1].tolist()
        ex, ey, wx, wy = xj - xi, yj - yi, x - xi, y - yi
        t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0, 1)
        bx, by = wx - ex * t, wy - ey * t
        dd = bx * bx + by * by
        d = dd if d is None else torch.minimum(d, dd)
        c1, c2, c3 = y >= yi, y < yj, ex * wy > ey * wx
        sign = torch.where((c1 & c2 & c3) | (~c1 & ~c2 & ~c3), -sign, sign)
    return sign * d.sqrt()


def _heart(x, y, k=1.4, cy=0.55):
    # the classic exact heart SDF (tip at the origin, lobes up), recentred and scaled to radius ~0.9
    x, y = x.abs() / k, y / k + cy
    upper = ((x - 0.25) ** 2 + (y - 0.75) ** 2).sqrt() - math.sqrt(2) / 4
    m = (x + y).clamp(min=0) * 0.5
    lower = torch.minimum(x ** 2 + (y - 1) ** 2, (x - m) ** 2 + (y - m) ** 2).sqrt() * torch.sign(x - y)
    return torch.where(x + y > 1, upper, lower) * k


_SQUARE = _regular(4, 0.92, math.pi / 4)
_TRIANGLE = _poly((0.0, 0.95), (-0.823, -0.475), (0.823, -0.475))
_STAR = _star()
_CROSS = _poly((-0.27, 0.85), (0.27, 0.85), (0.27, 0.27), (0.85, 0.27), (0.85, -0.27), (0.27, -0.27),
               (0.27, -0.85), (-0.27, -0.85), (-0.27, -0.27), (-0.85, -0.27), (-0.85, 0.27), (-0.27, 0.27))
_HEXAGON = _regular(6, 0.95, 0.0)
_ARROW = _poly((-0.92, -0.2), (0.12, -0.2), (0.12, -0.58), (0.95, 0.0), (0.12, 0.58), (0.12, 0.2), (-0.92, 0.2))


def _circle_len(x, y):
    return (x * x + y * y).sqrt()


SHAPES = {
    "circle": lambda x, y: _circle_len(x, y) - 0.82,
    "ring": lambda x, y: (_circle_len(x, y) - 0.66).abs() - 0.24,
    "square": lambda x, y: _polygon_sdf(x, y, _SQUARE),
    "triangle": lambda x, y: _polygon_sdf(x, y, _TRIANGLE),
    "star": lambda x, y: _polygon_sdf(x, y, _STAR),
    "cross": lambda x, y: _polygon_sdf(x, y, _CROSS),
    "heart": _heart,
    "crescent": lambda x, y: torch.maximum(_circle_len(x, y) - 0.9, -(_circle_len(x - 0.4, y - 0.12) - 0.72)),
    "hexagon": lambda x, y: _polygon_sdf(x, y, _HEXAGON),
    "arrow": lambda x, y: _polygon_sdf(x, y, _ARROW),
}
assert tuple(SHAPES) == OBJECTS


# ---------------------------------------------------------------- painting

def _fract(z):
    return z - torch.floor(z)                                  # torch.frac keeps the sign: wrong for z < 0


def _stripes(z, period, px):
    """Anti-aliased 50 % stripes of a coordinate field: 1 on the stripe, 0 between."""
    tri = (_fract(z / period) - 0.5).abs()                     # 0 on a stripe centre line (fract = 0.5), 0.5 between
    return (0.5 + (0.25 - tri) * period / px).clamp(0, 1)


def _hsv(h, s, v):
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    return v[:, None] - v[:, None] * s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def _gauss_blur(img, sigma_px):
    r = max(1, math.ceil(2.5 * sigma_px))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=img.dtype, device=img.device) ** 2 / (2 * sigma_px ** 2))
    k = (k / k.sum()).repeat(3, 1)
    img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), k[:, None, None, :], groups=3)
    return F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), k[:, None, :, None], groups=3)


def _paint(spec: Optional[Style], sdf, u, v, X, Y, P, seeds, size):
    """Colour one group of samples that share a style: [b, H, W] fields -> [b, 3, H, W] in [0, 1]."""
    b, H, W = sdf.shape
    px = 2.0 / size
    aa = lambda d: (0.5 - d / px).clamp(0, 1)                 # noqa: E731  coverage of a pixel by {d < 0}
    fill = aa(sdf)[:, None]
    if spec is None:                                          # unstyled: flat random hue on light grey
        fg = _hsv(P[:, 12], 0.45 + 0.5 * P[:, 13], 0.45 + 0.5 * P[:, 14])[:, :, None, None]
        bg = (0.86 + 0.12 * P[:, 15])[:, None, None, None].expand(b, 3, 1, 1)
        return torch.lerp(bg, fg, fill)

    bright = (1 + 0.12 * (P[:, 4] - 0.5))[:, None]
    shift = 0.06 * (P[:, 5:8] - 0.5)
    col = lambda c: (torch.tensor(c, dtype=sdf.dtype, device=sdf.device) / 255 * bright + shift  # noqa: E731
                     ).clamp(0, 1)[:, :, None, None]
    fg, fg2, bg, bg2 = col(spec.fg), col(spec.fg2), col(spec.bg), col(spec.bg2)
    ph1, ph2 = P[:, 8, None, None] * 10, P[:, 9, None, None] * 10
    ang = (math.pi / 4 + (P[:, 10] - 0.5) * math.radians(30))[:, None, None]

    if spec.texture == "stripes":
        t = _stripes(X * torch.cos(ang) + Y * torch.sin(ang) + ph1, 0.28, px)
    elif spec.texture == "checker":
        a, c = _stripes(X + ph1, 0.44, px), _stripes(Y + ph2, 0.44, px)
        t = a + c - 2 * a * c
    elif spec.texture == "dots":
        p = 0.36
        dx, dy = (_fract((X + ph1) / p) - 0.5) * p, (_fract((Y + ph2) / p) - 0.5) * p
        t = aa((dx * dx + dy * dy).sqrt() - 0.1)
    elif spec.texture == "gradient":
        g = 2 * math.pi * P[:, 11, None, None]
        t = ((u * torch.cos(g) + v * torch.sin(g)) * 0.55 + 0.5).clamp(0, 1)
    elif spec.texture == "flat":
        t = torch.zeros_like(sdf)
    else:
        raise ValueError(f"style {spec.name!r}: unknown texture {spec.texture!r} (valid: flat, stripes, checker, "
                         f"dots, gradient)")
    fgf = torch.lerp(fg, fg2, t[:, None])
    bgf = torch.lerp(bg, bg2, ((1 - Y) / 2).expand(b, 1, H, W))

    if spec.stroke == "fill":
        img = torch.lerp(bgf, fgf, fill)
    elif spec.stroke == "sketch":                             # wobbly double outline + hatching, paper grain
        wob = sdf + 0.015 * torch.sin(7 * u + ph1) * torch.cos(6 * v + ph2)
        line = torch.maximum(aa(wob.abs() - 0.035), 0.6 * aa((sdf + 0.03 * torch.sin(5 * v + ph2)).abs() - 0.025))
        hatch = _stripes(X - Y + ph1, 0.2, px) * aa(sdf)
        img = torch.lerp(bgf, fg2, 0.5 * hatch[:, None])
        img = torch.lerp(img, fgf, line[:, None])
        img = img + 0.06 * (_uniform(seeds, 1, H * W).view(b, 1, H, W) - 0.5)
    elif spec.stroke == "glow":                               # thin bright core with a coloured halo
        glow = 0.85 * torch.exp(-sdf.abs() / 0.12)
        img = torch.lerp(torch.lerp(bgf, fgf, glow[:, None]), fg2, aa(sdf.abs() - 0.03)[:, None])
    else:
        raise ValueError(f"style {spec.name!r}: unknown stroke {spec.stroke!r} (valid: fill, sketch, glow)")

    if spec.effect == "grain":
        n = _uniform(seeds, 2, H * W).view(b, 1, H, W) + _uniform(seeds, 3, H * W).view(b, 1, H, W)
        img = img + 0.32 * (n - 1)
    elif spec.effect == "blur":
        img = _gauss_blur(img, 1.1 * size / 32)
    elif spec.effect == "mosaic":                             # tiles of size/16 px, each with its own tint
        tile = max(1, size // 16)
        img = F.avg_pool2d(img, tile)
        h, w = img.shape[-2:]
        j = _uniform(seeds, 4, h * w * 2).view(b, 2, 1, h, w)
        img = img * (1 + 0.3 * (j[:, 0] - 0.5)) + 0.08 * (j[:, 1] - 0.5)
        img = img.repeat_interleave(tile, -2).repeat_interleave(tile, -1)
    elif spec.effect != "none":
        raise ValueError(f"style {spec.name!r}: unknown effect {spec.effect!r} (valid: none, grain, blur, mosaic)")
    return img.clamp(0, 1)


def as_ids(items, convert) -> torch.Tensor:
    """Object or style names/ids (a list or a tensor) as an int64 tensor of ids, via ``convert``."""
    if isinstance(items, torch.Tensor):
        items = items.tolist()
    return torch.tensor([convert(i) for i in items], dtype=torch.int64)


def check_size(size) -> None:
    """A clear error unless ``size`` is a multiple of 16 in 16..512."""
    if not (isinstance(size, int) and 16 <= size <= 512 and size % 16 == 0):
        raise ValueError(f"size must be a multiple of 16 in 16..512 (32 by default, 64 as an option), got {size!r}")


def pose(seeds) -> dict:
    """The random pose of each seed: rotation (radians), scale (bounding radius) and centre (x, y up)."""
    seeds = _seeds(seeds)
    P = _uniform(seeds, 0, _NPARAM)
    s = SCALE[0] + (SCALE[1] - SCALE[0]) * P[:, 1]
    return dict(rotation=(P[:, 0] - 0.5) * 2 * ROTATION, scale=s,
                x=(P[:, 2] - 0.5) * 2 * (MARGIN - s), y=(P[:, 3] - 0.5) * 2 * (MARGIN - s), params=P)


def _seeds(seeds) -> torch.Tensor:
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1).cpu()
    if (seeds < 0).any():
        raise ValueError(f"seeds must be non-negative integers, got min {int(seeds.min())}")
    return seeds


def render_batch(objects, styles, seeds, size: int = 32, return_mask: bool = False):
    """Render a batch: float32 [B, 3, size, size] in [0, 1] (and the object coverage [B, size, size])."""
    check_size(size)
    oid, sid, seeds = as_ids(objects, object_id), as_ids(styles, style_id), _seeds(seeds)
    if not (len(oid) == len(sid) == len(seeds)):
        raise ValueError(f"objects, styles and seeds must have equal lengths, got {len(oid)}, {len(sid)}, {len(seeds)}")
    B = len(seeds)
    if B == 0:
        return torch.zeros(0, 3, size, size)
    pz = pose(seeds)
    c = (torch.arange(size, dtype=torch.float32) + 0.5) * 2 / size - 1
    X, Y = c[None, None, :], -c[None, :, None]                # x right, y up
    dx, dy = X - pz["x"][:, None, None], Y - pz["y"][:, None, None]
    rot, s = pz["rotation"][:, None, None], pz["scale"][:, None, None]
    cs, sn = torch.cos(rot), torch.sin(rot)
    u, v = (cs * dx + sn * dy) / s, (-sn * dx + cs * dy) / s  # local (object) coordinates
    sdf = torch.empty(B, size, size)
    for k in oid.unique().tolist():
        m = oid == k
        sdf[m] = SHAPES[OBJECTS[k]](u[m], v[m]) * s[m]
    img = torch.empty(B, 3, size, size)
    for k in sid.unique().tolist():
        m = sid == k
        img[m] = _paint(style_spec(k), sdf[m], u[m], v[m], X, Y, pz["params"][m], seeds[m], size)
    if return_mask:
        return img, (0.5 - sdf * size / 2).clamp(0, 1)
    return img


def render(obj, style=None, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Render one image: float32 [3, size, size] in [0, 1], a pure function of its arguments."""
    return render_batch([obj], [style], [seed], size)[0]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 with the same layout (for saving or PIL)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)
