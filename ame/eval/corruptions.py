"""The 19 common corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), batched in torch.

Each corruption follows the published generator (``make_cifar_c.py`` in hendrycks/robustness)
with its CIFAR severity parameters, re-derived from the operations it calls rather than copied:
skimage's ``gaussian`` (scipy's separable Gaussian, edge pixels replicated), cv2's ``filter2D``
and ``warpAffine`` (fixed-point coordinates, mirrored borders), scipy's ``zoom`` and
``map_coordinates`` (order 1), PIL's BOX resize and JPEG (PIL itself), ImageMagick's motion
blur (one-sided Gaussian taps along a line, edge pixels, 16-bit quanta), skimage's HSV. Random
draws come from a seeded ``torch.Generator`` with the reference's distributions, so a corrupted
set is the same on every run; the operation applied to the draws is the reference's
(``scripts/check_cifar_c.py`` compares them, draw for draw, with the reference's libraries).

A corruption maps float64 images on the [0, 1] scale, shape (B, C, H, W), to the reference's
output on the [0, 255] scale; :func:`corrupt` converts to uint8 as the reference does, by
truncation. Grey images (C = 1) go through the colour corruptions as R = G = B and come back as
PIL's luma. The parameters are CIFAR's (32 px); on other sizes the size-bound quantities
(elastic displacement, plasma map, frost texture scale) scale with the image.
"""
from __future__ import annotations

import functools
import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ame.errors import AMEError, require

STANDARD = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
            "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
            "jpeg_compression")
EXTRAS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
FAMILIES = {"noise": STANDARD[0:3], "blur": STANDARD[3:7], "weather": STANDARD[7:11], "digital": STANDARD[11:15]}
VERSION = "3"  # of the generated sets: part of every cache key, bumped when an output changes
# 3: each corruption's random stream keyed by its name (was: its position in CORRUPTIONS)


# ───────────────────────────── helpers: the reference's primitives ─────────────────────────────

def _out(x: Tensor) -> Tensor:
    """The reference's ``np.clip(x, 0, 1) * 255``."""
    return x.clamp(0, 1) * 255


def _index(n: int, lo: int, hi: int, mode: str, device=None) -> Tensor:
    """Indices of positions lo..hi-1 of an axis of length n under a border mode: ``edge``
    (scipy 'nearest'), ``symmetric`` (scipy 'reflect': dcba|abcd), ``reflect101`` (cv2's default,
    scipy 'mirror': dcb|abcd)."""
    i = torch.arange(lo, hi, device=device)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if n == 1:
        return torch.zeros_like(i)
    if mode == "symmetric":
        i = i % (2 * n)
        return torch.where(i < n, i, 2 * n - 1 - i)
    i = i.abs() % (2 * n - 2)  # reflect101
    return torch.where(i < n, i, 2 * n - 2 - i)


@functools.lru_cache(maxsize=64)
def _axis_matrix(n: int, taps: tuple[float, ...], mode: str) -> Tensor:
    """The (n × n) matrix of a 1-D correlation with odd-length ``taps`` under a border ``mode``
    (the border folded in, so any radius works on any length)."""
    r = len(taps) // 2
    src = _index(n, -r, n + r, mode)  # padded position p reads pixel src[p]
    a = torch.zeros(n, n, dtype=torch.float64)
    for t, k in enumerate(taps):
        a[torch.arange(n), src[t:t + n]] += k
    return a


def _correlate(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlate every (H, W) plane of ``x`` with the odd-sized 2-D ``kernel``, borders by ``mode``:
    the kernel split by SVD into separable rank-one terms u·vᵀ, each two small matrix products
    (the border folded into the matrices)."""
    u, sv, vt = torch.linalg.svd(kernel.double())
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for r in range(len(sv)):
        if sv[r] > 1e-12 * sv[0]:
            gh = _axis_matrix(h, tuple((u[:, r] * sv[r]).tolist()), mode).to(x.dtype)
            gw = _axis_matrix(w, tuple(vt[r].tolist()), mode).to(x.dtype)
            out += gh @ x @ gw.T
    return out


def _gaussian_taps(sigma: float, truncate: float) -> Tensor:
    """scipy's ``gaussian_filter1d`` weights: radius int(truncate·σ + 0.5), normalised."""
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 / sigma**2 * t**2)
    return k / k.sum()


def gaussian_filter(x: Tensor, sigma: float, mode: str = "edge", truncate: float = 4.0) -> Tensor:
    """skimage's ``gaussian`` over the last two axes (each channel alone); σ = 0 is the identity."""
    if sigma <= 1e-15:
        return x.clone()
    taps = tuple(_gaussian_taps(sigma, truncate).tolist())
    gh, gw = _axis_matrix(x.shape[-2], taps, mode).to(x.dtype), _axis_matrix(x.shape[-1], taps, mode).to(x.dtype)
    return gh @ x @ gw.T


def _zoom_matrix(n: int, z: float) -> Tensor:
    """One axis of the reference's ``clipped_zoom``: crop the centre ceil(n/z) pixels, zoom by z
    with scipy's order-1 spline (output round(ch·z); coordinate i·(ch−1)/(out−1)), trim the centre
    n. As an (n × n) matrix acting on that axis."""
    ch = int(math.ceil(n / z))
    top = (n - ch) // 2
    m = int(round(ch * z))
    pos = torch.arange(m, dtype=torch.float64) * ((ch - 1) / (m - 1) if m > 1 else 0.0)
    i0 = pos.floor().long().clamp(max=ch - 1)
    f = pos - i0
    a = torch.zeros(m, n, dtype=torch.float64)
    a[torch.arange(m), top + i0] += 1 - f
    hi = (i0 + 1).clamp(max=ch - 1)
    a[torch.arange(m), top + hi] += f
    trim = (m - n) // 2
    return a[trim:trim + n]


def _clipped_zoom(x: Tensor, z: float) -> Tensor:
    h, w = x.shape[-2:]
    return _zoom_matrix(h, z).to(x) @ x @ _zoom_matrix(w, z).to(x).T


@functools.lru_cache(maxsize=16)
def _zoom_blur_operator(h: int, w: int, s: int) -> Tensor:
    """zoom_blur as one sparse (HW × HW) matrix on flattened images: (I + Σ_z A_z ⊗ B_z)/(n + 1),
    A_z, B_z the clipped zooms of the two axes (each output pixel has a few dozen sources)."""
    zs = zoom_factors(s)
    rows, cols, vals = [torch.arange(h * w)], [torch.arange(h * w)], [torch.ones(h * w, dtype=torch.float64)]
    for z in zs:
        a, b = _zoom_matrix(h, float(z)).to_sparse(), _zoom_matrix(w, float(z)).to_sparse()
        (ai, aj), (bi, bj) = a.indices(), b.indices()
        rows.append((ai[:, None] * w + bi[None, :]).reshape(-1))
        cols.append((aj[:, None] * w + bj[None, :]).reshape(-1))
        vals.append((a.values()[:, None] * b.values()[None, :]).reshape(-1))
    with warnings.catch_warnings():  # torch's notes that sparse support is in beta
        warnings.simplefilter("ignore", UserWarning)
        m = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]),
                                    torch.cat(vals) / (len(zs) + 1), (h * w, h * w)).coalesce()
        return m.float().to_sparse_csr()


def rgb2hsv(x: Tensor) -> Tensor:
    """skimage's ``rgb2hsv`` on (B, 3, H, W); hue in [0, 1)."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    s = torch.where(delta == 0, torch.zeros_like(v), delta / torch.where(v == 0, torch.ones_like(v), v))
    d = torch.where(delta == 0, torch.ones_like(delta), delta)
    h = torch.where(r == v, (g - b) / d, torch.zeros_like(v))
    h = torch.where(g == v, 2 + (b - r) / d, h)
    h = torch.where(b == v, 4 + (r - g) / d, h)
    h = torch.where(delta == 0, torch.zeros_like(h), (h / 6) % 1)
    return torch.stack([h, s, v], 1)


def hsv2rgb(x: Tensor) -> Tensor:
    """skimage's ``hsv2rgb`` on (B, 3, H, W)."""
    h, s, v = x.unbind(1)
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.long() % 6
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, rgb in enumerate(table):
        out = torch.where((hi == k)[:, None], torch.stack(rgb, 1), out)
    return out


def _gray(x: Tensor) -> Tensor:
    """cv2's RGB2GRAY (ITU-R 601 luma), (B, 3, H, W) → (B, 1, H, W)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _uniform(g: torch.Generator, shape, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def _randint(g: torch.Generator, lo: int, hi: int, shape) -> Tensor:
    """Integers in [lo, hi), numpy's ``randint``."""
    return torch.randint(lo, hi, shape, generator=g)


# ───────────────────────────── noise ─────────────────────────────

def gaussian_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return _out(x + c * torch.randn(x.shape, generator=g, dtype=x.dtype))


def shot_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [500, 250, 100, 75, 50][s - 1]
    return _out(torch.poisson(x * c, generator=g) / c)


def impulse_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    """skimage's ``random_noise(mode='s&p', amount=c)``: a fraction c of values flipped, half to 1."""
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    flipped = torch.rand(x.shape, generator=g) <= c
    salted = torch.rand(x.shape, generator=g) <= 0.5
    return _out(torch.where(flipped, salted.to(x.dtype), x))


def speckle_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.06, 0.1, 0.12, 0.16, 0.2][s - 1]
    return _out(x + x * c * torch.randn(x.shape, generator=g, dtype=x.dtype))


# ───────────────────────────── blur ─────────────────────────────

def gaussian_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    return _out(gaussian_filter(x, [0.4, 0.6, 0.7, 0.8, 1.0][s - 1]))


def disk_kernel(radius: float, alias_blur: float) -> Tensor:
    """The reference's ``disk``: a normalised aliased disk on a 17 × 17 grid (radius ≤ 8), blurred
    by cv2's 3 × 3 ``GaussianBlur`` (σ = alias_blur, mirrored borders), trimmed to its support."""
    require(radius <= 8, "defocus_blur: disk radius above 8 is not a CIFAR parameter")
    t = torch.arange(-8, 9, dtype=torch.float64)
    d = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).to(torch.float32)
    d = (d / d.sum()).double()
    k = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * alias_blur**2))
    k = (k / k.sum()).float().double()  # cv2.getGaussianKernel, cast to the disk's float32
    d = _correlate(_correlate(d, k[:, None], "reflect101"), k[None, :], "reflect101").float().double()
    keep_r, keep_c = d.abs().sum(1) > 0, d.abs().sum(0) > 0
    return d[keep_r][:, keep_c]


def defocus_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    """cv2's ``filter2D`` (correlation, mirrored borders) of each channel with the disk."""
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    return _out(_correlate(x, disk_kernel(radius, alias), "reflect101"))


_GLASS = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)]


def glass_shuffle(x: Tensor, shifts: Tensor) -> Tensor:
    """The reference's "locally shuffle pixels" loop, for every image at once. For h = H−1 … 2,
    then w = W−1 … 2, it runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` with (h', w') = (h + dy,
    w + dx), dx, dy ∈ {−1, 0} (``shifts[b, it, i, j] = (dx, dy)`` for the i-th h and j-th w of the
    loop). On an RGB array both right-hand sides are views, so the second assignment writes back
    the value just copied: each step copies pixel (h', w') into (h, w) and swaps nothing. And as
    h' ≤ h, w' ≤ w while the loop walks h and w downwards, every pixel a step reads is one the loop
    has not written yet: one pass of the loop is exactly one gather from its input."""
    b, c, h, w = x.shape
    hs = torch.arange(h - 1, 1, -1)[:, None]
    ws = torch.arange(w - 1, 1, -1)[None, :]
    for it in range(shifts.shape[1]):
        d = shifts[:, it]  # (B, H−2, W−2, 2)
        src = ((hs + d[..., 1]) * w + ws + d[..., 0]).reshape(b, 1, -1).expand(b, c, -1)
        moved = x.reshape(b, c, h * w).gather(2, src).reshape(b, c, h - 2, w - 2)
        x = x.clone()
        x[:, :, 2:, 2:] = moved.flip(-2, -1)  # loop order is descending: row i is h = H−1−i
    return x


def glass_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    sigma, delta, iters = _GLASS[s - 1]
    b, _, h, w = x.shape
    shifts = _randint(g, -delta, delta, (b, iters, h - 2, w - 2, 2))
    return glass_blur_with(x, s, shifts)


def glass_blur_with(x: Tensor, s: int, shifts: Tensor) -> Tensor:
    sigma = _GLASS[s - 1][0]
    u8 = torch.floor(gaussian_filter(x, sigma) * 255)  # np.uint8 of the first blur: truncation
    return _out(gaussian_filter(glass_shuffle(u8, shifts) / 255, sigma))


def motion_kernel(radius: float, sigma: float, angles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageMagick's ``MotionBlurImage`` kernel: width 2⌈radius⌉+1 taps e^{−i²/2σ²}/Σ at pixel
    offsets (⌈i·cos a − ½⌉, ⌈i·sin a − ½⌉), i = 0 … width−1 (one-sided), for each angle a (degrees).
    Returns (weights (width,), dx (B, width), dy (B, width))."""
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i * i) / (2 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
    k /= k.sum()
    a = math.pi * np.asarray(angles, dtype=np.float64)[:, None] / 180
    px, py = width * np.sin(a), width * np.cos(a)
    hyp = np.hypot(px, py)
    return k, np.ceil(i * py / hyp - 0.5).astype(np.int64), np.ceil(i * px / hyp - 0.5).astype(np.int64)


def imagemagick_motion_blur(u8: Tensor, radius: float, sigma: float, angles: Tensor) -> Tensor:
    """ImageMagick's motion blur of uint8-valued images (B, C, H, W), one angle per image, read
    back as 8-bit: edge pixels beyond the border, sums rounded to 16-bit quanta, then to 8 bits."""
    b, c, h, w = u8.shape
    k, dx, dy = motion_kernel(radius, sigma, angles.numpy())
    rows = (torch.arange(h)[None, None, :] + torch.from_numpy(dy)[:, :, None]).clamp(0, h - 1) * w  # (B, taps, H)
    cols = (torch.arange(w)[None, None, :] + torch.from_numpy(dx)[:, :, None]).clamp(0, w - 1)  # (B, taps, W)
    flat = u8.float().reshape(b, c, h * w)
    acc = torch.zeros((b, c, h * w))
    for i in range(len(k)):
        src = (rows[:, i, :, None] + cols[:, i, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
        acc.add_(flat.gather(2, src), alpha=float(k[i]))
    q = torch.floor(acc.double() * 257 + 0.5).clamp(0, 65535)  # ClampToQuantum, Q16
    return torch.floor((q + 128) / 257).reshape(b, c, h, w).to(u8.dtype)  # ScaleQuantumToChar


def motion_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    return motion_blur_with(x, s, _uniform(g, (len(x),), -45, 45))


def motion_blur_with(x: Tensor, s: int, angles: Tensor) -> Tensor:
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    return imagemagick_motion_blur(torch.round(x * 255), radius, sigma, angles)  # the PNG holds uint8


def zoom_factors(s: int) -> np.ndarray:
    """The reference's ``np.arange(1, 1.06, 0.01)`` … ``np.arange(1, 1.26, 0.01)``, float steps included."""
    return np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][s - 1], 0.01)


def zoom_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    """The mean of the image and its clipped zooms by each factor (scipy order 1), in float32 as
    the reference zooms float32 images."""
    b, c, h, w = x.shape
    flat = x.float().reshape(b * c, h * w)
    out = (_zoom_blur_operator(h, w, s) @ flat.T).T
    return _out(out.reshape(b, c, h, w))


# ───────────────────────────── weather ─────────────────────────────

_SNOW = [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)]


def snow(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = _SNOW[s - 1]
    b, _, h, w = x.shape
    layer = c[0] + c[1] * torch.randn((b, 1, h, w), generator=g, dtype=torch.float64)
    return snow_with(x, s, layer, _uniform(g, (b,), -135, -45))


def snow_with(x: Tensor, s: int, layer: Tensor, angles: Tensor) -> Tensor:
    c = _SNOW[s - 1]
    x = x.float()
    layer = _clipped_zoom(layer, c[2])
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer)
    flakes = torch.floor(layer.clamp(0, 1) * 255)  # PIL 'L' image of the layer (astype(uint8))
    flakes = imagemagick_motion_blur(flakes, c[4], c[5], angles) / 255
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return _out(x.double() + flakes + flakes.flip(-2, -1))


def _frost_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("imagecorruptions")  # its data files only: the module is not imported
    if spec is None or not spec.submodule_search_locations:
        raise AMEError("frost needs the frost textures of the 'imagecorruptions' package; pip install imagecorruptions")
    return Path(list(spec.submodule_search_locations)[0]) / "frost"


@functools.lru_cache(maxsize=8)
def frost_textures(scale: float) -> tuple[Tensor, ...]:
    """The reference's frost1-5 (it draws ``randint(5)``: frost6 is never used), RGB, resized by
    ``scale`` as cv2.resize(fx=fy=scale) does (bilinear)."""
    import cv2

    out = []
    for name in ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"):
        im = cv2.imread(str(_frost_dir() / name))
        require(im is not None, f"frost: cannot read the texture {_frost_dir() / name}; reinstall imagecorruptions")
        if scale != 1:
            im = cv2.resize(im, (0, 0), fx=scale, fy=scale)
        out.append(torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1))).float())
    return tuple(out)


_FROST = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)]


def frost_scale(h: int, w: int) -> float:
    """0.2 at CIFAR's 32 px, proportionally more for larger images, at most 1 (ImageNet-C's)."""
    return min(1.0, 0.2 * max(h, w) / 32)


def frost(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    b, _, h, w = x.shape
    tex = frost_textures(frost_scale(h, w))
    small = min(min(t.shape[1] for t in tex) - h, min(t.shape[2] for t in tex) - w)
    require(small > 0, f"frost: {h}×{w} images are larger than the frost textures; leave frost out of eval.corruptions")
    return frost_with(x, s, *frost_draws(b, h, w, g))


def frost_draws(b: int, h: int, w: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per image: a texture, ``randint(5)`` (frost1-5), and a crop corner, uniform over the
    texture's (rows − h) × (columns − w) positions (``randint(0, rows − h)``, ...)."""
    tex = frost_textures(frost_scale(h, w))
    which = _randint(g, 0, 5, (b,))
    u = torch.rand((b, 2), generator=g, dtype=torch.float64)
    room = torch.tensor([[tex[i].shape[1] - h, tex[i].shape[2] - w] for i in which.tolist()])
    return which, (u * room).floor().long()


def frost_with(x: Tensor, s: int, which: Tensor, starts: Tensor) -> Tensor:
    """c0·x + c1·(a crop of texture ``which[b]`` at ``starts[b]``), on the uint8 scale."""
    c = _FROST[s - 1]
    b, _, h, w = x.shape
    tex = frost_textures(frost_scale(h, w))
    crops = torch.stack([tex[i][:, y0:y0 + h, x0:x0 + w] for i, (y0, x0) in zip(which.tolist(), starts.tolist())])
    return (c[0] * torch.round(x * 255) + c[1] * crops).clamp(0, 255)


def plasma_fractal(b: int, mapsize: int, decay: float, g: torch.Generator | None = None, draw=None) -> Tensor:
    """The reference's diamond-square height map (random, in [0, 1]) for ``b`` images at once.
    ``draw(shape)`` gives the U(−1, 1) draws (default: from ``g``), in the reference's order."""
    draw = draw or (lambda shape: _uniform(g, shape, -1, 1))
    require(mapsize & (mapsize - 1) == 0, "plasma_fractal: mapsize must be a power of two")
    m = torch.zeros((b, mapsize, mapsize), dtype=torch.float64)
    step, wibble = mapsize, 100.0

    def wibbled(a: Tensor) -> Tensor:
        return a / 4 + wibble * (wibble * draw(a.shape))

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        sq = corners + corners.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        m[:, half::step, half::step] = wibbled(sq)
        dr = m[:, half::step, half::step]
        ul = m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step //= 2
        wibble /= decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


_FOG = [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)]


def fog(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    h, w = x.shape[-2:]
    size = 1 << max(1, math.ceil(math.log2(max(h, w))))  # 32 for CIFAR
    return fog_with(x, s, plasma_fractal(len(x), size, _FOG[s - 1][1], g)[:, :h, :w])


def fog_with(x: Tensor, s: int, plasma: Tensor) -> Tensor:
    c = _FOG[s - 1][0]
    peak = x.amax((1, 2, 3), keepdim=True)
    x = x + c * plasma[:, None]
    return _out(x * peak / (peak + c))


def brightness(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    hsv = rgb2hsv(x)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return _out(hsv2rgb(hsv))


# ───────────────────────────── digital ─────────────────────────────

def contrast(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return _out((x - mean) * c + mean)


def saturate(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][s - 1]
    hsv = rgb2hsv(x)
    hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
    return _out(hsv2rgb(hsv))


def jpeg_compression(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    """PIL's JPEG encoder at the severity's quality (4:2:0 chroma), decoded by PIL."""
    import io

    from PIL import Image

    quality = [80, 65, 58, 50, 40][s - 1]
    u8 = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.empty_like(u8)
    for i, im in enumerate(u8):
        buf = io.BytesIO()
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(buf, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buf)).reshape(im.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()


def pixelate(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    """PIL's BOX resize down to int(c·size) and back, image by image (PIL itself: exact, and
    faster on small images than a batched port of its fixed-point filter)."""
    from PIL import Image

    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h, w = x.shape[-2:]
    u8 = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.empty_like(u8)
    for i, im in enumerate(u8):
        small = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).resize((int(w * c), int(h * c)), Image.BOX)
        out[i] = np.asarray(small.resize((w, h), Image.BOX)).reshape(im.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """cv2.getAffineTransform for a batch: the (B, 2, 3) matrices taking the three ``src`` points
    (3, 2) to ``dst`` (B, 3, 2)."""
    a = np.zeros((6, 6))
    a[0::2, 0:2], a[0::2, 2], a[1::2, 3:5], a[1::2, 5] = src, 1, src, 1
    return np.linalg.solve(a[None], dst.reshape(-1, 6, 1)).reshape(-1, 2, 3)


def _warp_affine(x: Tensor, m: np.ndarray) -> Tensor:
    """cv2.warpAffine (bilinear, BORDER_REFLECT_101) of images (B, C, H, W) by forward matrices
    (B, 2, 3): sources at m⁻¹·(x, y), in cv2's fixed point (each term rounded to 1/1024, the sum
    to 1/32-pixel steps), neighbours outside mirrored."""
    b, c, h, w = x.shape
    full = np.concatenate([m, np.broadcast_to([[[0.0, 0.0, 1.0]]], (len(m), 1, 3))], 1)
    inv = np.linalg.inv(full)[:, :2]
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)

    def fixed(row: np.ndarray) -> np.ndarray:  # saturate_cast<int>(v·1024) per term, + round_delta, >> 5
        v = np.rint(row[:, 0, None, None] * xs[None, None, :] * 1024).astype(np.int64)
        v = v + np.rint((row[:, 1, None, None] * ys[None, :, None] + row[:, 2, None, None]) * 1024).astype(np.int64)
        return (v + 16) >> 5

    X, Y = torch.from_numpy(fixed(inv[:, 0])), torch.from_numpy(fixed(inv[:, 1]))
    x0, y0 = X >> 5, Y >> 5
    fx, fy = (X & 31).float() / 32, (Y & 31).float() / 32
    idx = torch.stack([_reflect101(y0 + dy, h) * w + _reflect101(x0 + dx, w) for dy in (0, 1) for dx in (0, 1)], 1)
    wts = torch.stack([wy * wx for wy in (1 - fy, fy) for wx in (1 - fx, fx)], 1)
    return _bilinear(x, idx, wts)


def _bilinear(x: Tensor, idx: Tensor, wts: Tensor) -> Tensor:
    """Σ over 4 corners of weight × pixel: ``idx``, ``wts`` (B, 4, H, W) flat pixel indices and weights."""
    b, c, h, w = x.shape
    v = x.reshape(b, c, h * w).gather(2, idx.reshape(b, 1, 4 * h * w).expand(b, c, 4 * h * w))
    return (v.reshape(b, c, 4, h * w) * wts.to(x.dtype).reshape(b, 1, 4, h * w)).sum(2).reshape(b, c, h, w)


def _reflect101(i: Tensor, n: int) -> Tensor:
    """cv2's BORDER_REFLECT_101 index (dcb|abcd|cba), any distance out."""
    if n == 1:
        return torch.zeros_like(i)
    while True:
        i = i.abs()
        out = i >= n
        if not out.any():
            return i
        i = torch.where(out, 2 * n - 2 - i, i)


def _map_coordinates(x: Tensor, yy: Tensor, xx: Tensor) -> Tensor:
    """scipy's ``map_coordinates(order=1, mode='reflect')`` of images (B, C, H, W) at coordinates
    (B, H, W), the same for every channel: coordinates folded into [−½, n−½) (half-sample
    symmetric), then bilinear with edge neighbours repeated."""
    b, c, h, w = x.shape

    def fold(v: Tensor, n: int) -> Tensor:
        t = torch.remainder(v + 0.5, 2 * n)
        t = torch.where(t >= n, 2 * n - t, t)
        return t - 0.5

    yy, xx = fold(yy, h), fold(xx, w)
    y0, x0 = yy.floor(), xx.floor()
    fy, fx = yy - y0, xx - x0
    iy0, ix0 = y0.long(), x0.long()
    idx = torch.stack([(iy0 + dy).clamp(0, h - 1) * w + (ix0 + dx).clamp(0, w - 1) for dy in (0, 1) for dx in (0, 1)], 1)
    wts = torch.stack([wy * wx for wy in (1 - fy, fy) for wx in (1 - fx, fx)], 1)
    return _bilinear(x, idx, wts)


def _elastic_params(s: int, size: int) -> tuple[float, float, float]:
    return [(size * 0, size * 0, size * 0.08), (size * 0.05, size * 0.2, size * 0.07),
            (size * 0.08, size * 0.06, size * 0.06), (size * 0.1, size * 0.04, size * 0.05),
            (size * 0.1, size * 0.03, size * 0.03)][s - 1]


def elastic_transform(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    b, _, h, w = x.shape
    c = _elastic_params(s, h)
    return elastic_with(x, s, _uniform(g, (b, 3, 2), -c[2], c[2]), _uniform(g, (b, 2, h, w), -1, 1))


def elastic_with(x: Tensor, s: int, jitter: Tensor, fields: Tensor) -> Tensor:
    """A random affine (three points moved by ``jitter``), then a smooth random displacement
    (``fields`` smoothed by a σ = c1 Gaussian, truncated at 3σ, mirrored borders, times c0)."""
    b, ch, h, w = x.shape
    c = _elastic_params(s, h)
    centre, sq = np.float32([h, w]) // 2, min(h, w) // 3
    pts1 = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    pts2 = pts1[None] + jitter.numpy().astype(np.float32)
    warped = _warp_affine(x.float(), _affine_from_points(pts1.astype(np.float64), pts2.astype(np.float64)))
    d = (gaussian_filter(fields, c[1], mode="symmetric", truncate=3) * c[0]).float().double()
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return _out(_map_coordinates(warped, gy + d[:, 1], gx + d[:, 0]))


_SPATTER = [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)]


def spatter(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = _SPATTER[s - 1]
    b, _, h, w = x.shape
    return spatter_with(x, s, c[0] + c[1] * torch.randn((b, h, w), generator=g, dtype=torch.float64))


def spatter_with(x: Tensor, s: int, liquid: Tensor) -> Tensor:
    """Water (severities 1-3: the liquid's edges, cv2's Canny → distance → equalised emboss, in
    pale turquoise) or mud (4-5: the thresholded liquid, blurred, in brown) over the image."""
    c = _SPATTER[s - 1]
    x = x.float()
    liquid = gaussian_filter(liquid, c[2])
    liquid = torch.where(liquid < c[3], torch.zeros_like(liquid), liquid)
    if c[5] == 0:
        import cv2

        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        ms = []
        for lay in liquid.numpy():
            u8 = (np.floor(lay * 255).astype(np.int64) % 256).astype(np.uint8)  # astype(uint8) wraps
            dist = cv2.distanceTransform(255 - cv2.Canny(u8, 50, 150), cv2.DIST_L2, 5)
            _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
            dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, ker), (3, 3)).astype(np.float32)
            m = u8.astype(np.float32) * dist  # the reference multiplies its uint8 layer
            peak = m.max()
            ms.append(m / peak * c[4] if peak > 0 else np.zeros_like(m))
        m = torch.from_numpy(np.stack(ms))[:, None]
        colour = torch.tensor([175, 238, 238], dtype=torch.float32)[None, :, None, None] / 255
        return _out(x + m * colour)
    m = gaussian_filter((liquid > c[3]).float(), c[4])
    m = torch.where(m < 0.8, torch.zeros_like(m), m)[:, None]
    colour = torch.tensor([63, 42, 20], dtype=torch.float32)[None, :, None, None] / 255
    return _out(x * (1 - m) + colour * m)


# ───────────────────────────── the suite ─────────────────────────────

CORRUPTIONS = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, frost, fog,
    brightness, contrast, elastic_transform, pixelate, jpeg_compression, speckle_noise, gaussian_blur, spatter,
    saturate)}
_COLOUR = {"brightness", "saturate", "snow", "frost", "spatter"}  # grey images go through these as RGB
MIN_SIZE = 8


def to_uint8(x: Tensor) -> Tensor:
    """The reference's ``np.uint8`` of its [0, 255] output: truncation."""
    return x.clamp(0, 255).floor().to(torch.uint8)


_BATCH = 2048  # images per call: fixed, as the draws of a batch depend on its size


def stream_seed(seed: int, name: str, severity: int) -> int:
    """The seed of one corrupted set's random stream: keyed by the corruption's name (not its place
    in a list, so adding a corruption changes no other's draws), the severity and ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{name}|{severity}".encode()).digest()[:8], "little") >> 1


def corrupt(x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Corrupt uint8 images (B, C, H, W) with corruption ``name`` at ``severity``; returns uint8.
    Deterministic in (``seed``, ``name``, ``severity``) and the images."""
    require(name in CORRUPTIONS, f"eval.corruptions: unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    require(severity in range(1, 6), f"eval.severities must be in 1..5, got {severity}")
    require(x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] in (1, 3),
            f"corrupt: expected uint8 images (B, 1|3, H, W), got {x.dtype} {tuple(x.shape)}")
    require(min(x.shape[-2:]) >= MIN_SIZE,
            f"{name}: images of {tuple(x.shape[-2:])} px are below the {MIN_SIZE} px the corruptions need")
    g = torch.Generator().manual_seed(stream_seed(seed, name, severity))
    grey = x.shape[1] == 1 and name in _COLOUR
    out = []
    for i in range(0, len(x), _BATCH):  # bounded memory; the draws continue from one generator
        xb = x[i:i + _BATCH].float() / 255
        if grey:
            xb = xb.expand(-1, 3, -1, -1)
        y = CORRUPTIONS[name](xb, severity, g)
        if grey:  # PIL's 'L' of the RGB result
            y = (y.clamp(0, 255).floor() * torch.tensor([0.299, 0.587, 0.114], dtype=y.dtype)[:, None, None]).sum(
                1, keepdim=True) + 0.5
        out.append(to_uint8(y))
    return torch.cat(out) if out else x.clone()


__all__ = ["CORRUPTIONS", "STANDARD", "EXTRAS", "FAMILIES", "corrupt", "to_uint8"]
