"""Common corruptions (after Hendrycks & Dietterich's CIFAR-10-C protocol), batched in torch.

Each function maps float images in [0, 1], shape (B, C, H, W), and a severity 1..5 to corrupted
images in [0, 1]; the severity parameters are CIFAR-10-C's. Noise draws come from a seeded
``torch.Generator``, so a corrupted test set is the same on every run: :func:`corrupt` builds it
once per run, as uint8, for every network to be evaluated on.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from ame.errors import require


def gaussian_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return x + c * torch.randn(x.shape, generator=g)


def shot_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [500, 250, 100, 75, 50][s - 1]
    return torch.poisson(x * c, generator=g) / c


def impulse_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]  # salt-and-pepper: a fraction c of values, half 0, half 1
    u = torch.rand(x.shape, generator=g)
    salt = torch.rand(x.shape, generator=g) < 0.5
    return torch.where(u < c, salt.to(x.dtype), x)


def speckle_noise(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.06, 0.1, 0.12, 0.16, 0.2][s - 1]
    return x + x * c * torch.randn(x.shape, generator=g)


def _conv_same(x: Tensor, kernel: Tensor) -> Tensor:
    """Depthwise 2-D convolution with reflected borders (cv2's BORDER_REFLECT_101)."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    require(ph < x.shape[-2] and pw < x.shape[-1], f"blur kernel {kh}×{kw} too large for {tuple(x.shape[-2:])} images")
    c = x.shape[1]
    xp = F.pad(x, (pw, pw, ph, ph), mode="reflect")
    return F.conv2d(xp, kernel.to(x.dtype).expand(c, 1, kh, kw), groups=c)


def _gaussian_kernel(sigma: float, radius: int) -> Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    return (k[:, None] * k[None, :]).float()


def gaussian_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    sigma = [0.4, 0.6, 0.7, 0.8, 1.0][s - 1]
    radius = min(int(4 * sigma + 0.5), (min(x.shape[-2:]) - 1) // 2)  # skimage truncates at 4σ
    return _conv_same(x, _gaussian_kernel(sigma, radius))


def _disk(radius: float, alias_blur: float) -> Tensor:
    t = torch.arange(-8, 9, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    k = F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1)), _gaussian_kernel(alias_blur, 1).double()[None, None])[0, 0]
    rows, cols = k.abs().sum(1) > 1e-12, k.abs().sum(0) > 1e-12  # trim to the kernel's support
    k = k[rows][:, cols]
    return (k / k.sum()).float()


def defocus_blur(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    return _conv_same(x, _disk(radius, alias))


def contrast(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * c + mean


def brightness(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    """HSV value + c, hue and saturation kept: RGB scales by min(V + c, 1) / V (V = max channel)."""
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    v = x.amax(dim=1, keepdim=True)
    scale = (v + c).clamp(max=1) / v.clamp_min(1e-12)
    return torch.where(v > 0, x * scale, torch.full_like(x, c))


def jpeg_compression(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg

    quality = [80, 65, 58, 50, 40][s - 1]
    u8 = list(to_uint8(x))
    out = decode_jpeg(encode_jpeg(u8, quality=quality))
    return torch.stack(out).float() / 255


def pixelate(x: Tensor, s: int, g: torch.Generator) -> Tensor:
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


CORRUPTIONS = {f.__name__: f for f in (gaussian_noise, shot_noise, impulse_noise, speckle_noise, gaussian_blur,
                                       defocus_blur, contrast, brightness, jpeg_compression, pixelate)}


def to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def corrupt(x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Corrupt uint8 images (B, C, H, W) with corruption ``name`` at ``severity``; returns uint8."""
    require(name in CORRUPTIONS, f"eval.corruptions: unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    require(severity in range(1, 6), f"eval.severities must be in 1..5, got {severity}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + list(CORRUPTIONS).index(name) * 10 + severity)
    return to_uint8(CORRUPTIONS[name](x.float() / 255, severity, g))


__all__ = ["CORRUPTIONS", "corrupt", "to_uint8"]
