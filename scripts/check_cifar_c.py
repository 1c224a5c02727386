"""Compare ame's corruptions with the reference generator, computed with the reference's libraries.

    python scripts/check_cifar_c.py [--root /path/to/cifar10-jpeg] [--n 500] [--out table.md]

The reference is ``ImageNet-C/create_c/make_cifar_c.py`` (hendrycks/robustness): each corruption
is re-run here image by image as it is written there, with the libraries it calls (skimage,
scipy, cv2, PIL, and Wand/ImageMagick for the motion blur inside motion_blur and snow; Wand needs
ImageMagick's MagickWand library, e.g. Debian's libmagickwand-6.q16-6). Random corruptions are
compared draw for draw: ame's own draws (angles, pixel shifts, plasma maps, frost crops, snow and
liquid layers, affine jitter and displacement fields) are handed to the reference's operation in
place of its ``np.random`` calls. The noise corruptions, whose operation is the draw, are
compared by statistics (mean and standard deviation of the change, fraction of changed values)
over the same images.

Per corruption × severity: the percentage of uint8 values more than 2 levels from the reference
(the acceptance bound is 0.5 %) and the largest difference, on the first ``--n`` CIFAR-10 test
images (taken in class order, the same count from each class).
"""
from __future__ import annotations

import argparse
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.simplefilter("ignore")


def load_images(root: Path, n: int) -> np.ndarray:
    from PIL import Image

    classes = sorted(p for p in (root / "test").iterdir() if p.is_dir())
    per = -(-n // len(classes))
    files = [f for c in classes for f in sorted(c.glob("*.jpg"))[:per]][:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


# ───────── the reference, one image (H, W, 3) uint8 at a time, draws handed in ─────────

def ref_gaussian(x, sigma):
    from skimage.filters import gaussian
    return gaussian(x, sigma=sigma, channel_axis=-1)


def r_gaussian_blur(img, s, d):
    c = [.4, .6, 0.7, .8, 1][s - 1]
    return np.clip(ref_gaussian(np.array(img) / 255., c), 0, 1) * 255


def r_glass_blur(img, s, d):
    c = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s - 1]
    x = np.uint8(ref_gaussian(np.array(img) / 255., c[0]) * 255)
    h_, w_ = x.shape[:2]
    for i in range(c[2]):
        for a, h in enumerate(range(h_ - c[1], c[1], -1)):
            for b, w in enumerate(range(w_ - c[1], c[1], -1)):
                dx, dy = d["shifts"][i, a, b]
                hp, wp = h + dy, w + dx
                x[h, w], x[hp, wp] = x[hp, wp], x[h, w]
    return np.clip(ref_gaussian(x / 255., c[0]), 0, 1) * 255


def r_defocus_blur(img, s, d):
    import cv2
    c = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    x = np.array(img) / 255.
    L = np.arange(-8, 8 + 1)
    X, Y = np.meshgrid(L, L)
    disk = np.array((X ** 2 + Y ** 2) <= c[0] ** 2, dtype=np.float32)
    disk /= np.sum(disk)
    kernel = cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=c[1])
    return np.clip(np.array([cv2.filter2D(x[:, :, k], -1, kernel) for k in range(3)]).transpose(1, 2, 0), 0, 1) * 255


def wand_motion_blur(png: bytes, radius, sigma, angle) -> np.ndarray:
    import ctypes

    import cv2
    from wand.api import library
    from wand.image import Image as WandImage
    library.MagickMotionBlurImage.argtypes = (ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double)
    with WandImage(blob=png) as im:
        library.MagickMotionBlurImage(im.wand, radius, sigma, angle)
        return cv2.imdecode(np.frombuffer(im.make_blob(), np.uint8), cv2.IMREAD_UNCHANGED)


def r_motion_blur(img, s, d):
    from PIL import Image
    c = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    x = wand_motion_blur(buf.getvalue(), c[0], c[1], float(d["angle"]))
    if x.ndim == 3:
        return np.clip(x[..., [2, 1, 0]], 0, 255)
    return np.clip(np.array([x, x, x]).transpose((1, 2, 0)), 0, 255)


def clipped_zoom(img, z):
    from scipy.ndimage import zoom as scizoom
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    img = scizoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
    t = (img.shape[0] - h) // 2
    return img[t:t + h, t:t + h]


def r_zoom_blur(img, s, d):
    c = [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
         np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)][s - 1]
    x = (np.array(img) / 255.).astype(np.float32)
    out = np.zeros_like(x)
    for z in c:
        out += clipped_zoom(x, z)
    return np.clip((x + out) / (len(c) + 1), 0, 1) * 255


def r_snow(img, s, d):
    import cv2
    from PIL import Image
    c = [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s - 1]
    x = np.array(img, dtype=np.float32) / 255.
    layer = d["layer"]  # in place of np.random.normal(size=(32, 32), loc=c[0], scale=c[1])
    layer = clipped_zoom(layer[..., np.newaxis], c[2])
    layer[layer < c[3]] = 0
    layer = Image.fromarray((np.clip(layer.squeeze(), 0, 1) * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    layer.save(buf, format="PNG")
    layer = wand_motion_blur(buf.getvalue(), c[4], c[5], float(d["angle"])) / 255.
    layer = layer[..., np.newaxis]
    x = c[6] * x + (1 - c[6]) * np.maximum(x, cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(32, 32, 1) * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


def r_frost(img, s, d):
    import cv2

    from ame.eval.corruptions import _frost_dir
    c = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    name = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg"][d["which"]]
    fr = cv2.resize(cv2.imread(str(_frost_dir() / name)), (0, 0), fx=0.2, fy=0.2)
    x0, y0 = d["start"]
    fr = fr[x0:x0 + 32, y0:y0 + 32][..., [2, 1, 0]]
    return np.clip(c[0] * np.array(img) + c[1] * fr, 0, 255)


def r_fog(img, s, d):
    c = [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    x = np.array(img) / 255.
    m = x.max()
    x += c[0] * d["plasma"][:32, :32][..., np.newaxis]
    return np.clip(x * m / (m + c[0]), 0, 1) * 255


def r_brightness(img, s, d):
    import skimage as sk
    c = [.05, .1, .15, .2, .3][s - 1]
    x = sk.color.rgb2hsv(np.array(img) / 255.)
    x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
    return np.clip(sk.color.hsv2rgb(x), 0, 1) * 255


def r_saturate(img, s, d):
    import skimage as sk
    c = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][s - 1]
    x = sk.color.rgb2hsv(np.array(img) / 255.)
    x[:, :, 1] = np.clip(x[:, :, 1] * c[0] + c[1], 0, 1)
    return np.clip(sk.color.hsv2rgb(x), 0, 1) * 255


def r_contrast(img, s, d):
    c = [.75, .5, .4, .3, 0.15][s - 1]
    x = np.array(img) / 255.
    m = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - m) * c + m, 0, 1) * 255


def r_jpeg_compression(img, s, d):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=[80, 65, 58, 50, 40][s - 1])
    return np.asarray(Image.open(buf))


def r_pixelate(img, s, d):
    from PIL import Image
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    x = Image.fromarray(img).resize((int(32 * c), int(32 * c)), Image.BOX)
    return np.asarray(x.resize((32, 32), Image.BOX))


def r_elastic_transform(img, s, d):
    import cv2
    from scipy.ndimage import map_coordinates
    S = 32
    c = [(S * 0, S * 0, S * 0.08), (S * 0.05, S * 0.2, S * 0.07), (S * 0.08, S * 0.06, S * 0.06),
         (S * 0.1, S * 0.04, S * 0.05), (S * 0.1, S * 0.03, S * 0.03)][s - 1]
    image = np.array(img, dtype=np.float32) / 255.
    shape = image.shape
    shape_size = shape[:2]
    center_square = np.float32(shape_size) // 2
    square_size = min(shape_size) // 3
    pts1 = np.float32([center_square + square_size, [center_square[0] + square_size, center_square[1] - square_size],
                       center_square - square_size])
    pts2 = pts1 + d["jitter"].astype(np.float32)
    M = cv2.getAffineTransform(pts1, pts2)
    image = cv2.warpAffine(image, M, shape_size[::-1], borderMode=cv2.BORDER_REFLECT_101)
    from skimage.filters import gaussian
    dx = (gaussian(d["fields"][0], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dy = (gaussian(d["fields"][1], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dx, dy = dx[..., np.newaxis], dy[..., np.newaxis]
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    ind = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
    return np.clip(map_coordinates(image, ind, order=1, mode="reflect").reshape(shape), 0, 1) * 255


def r_spatter(img, s, d):
    import cv2
    from skimage.filters import gaussian
    c = [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
         (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)][s - 1]
    x = np.array(img, dtype=np.float32) / 255.
    liquid = gaussian(d["liquid"], sigma=c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:
        liquid = (liquid * 255).astype(np.uint8)
        dist = 255 - cv2.Canny(liquid, 50, 150)
        dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
        dist = cv2.equalizeHist(dist)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = cv2.filter2D(dist, cv2.CV_8U, ker)
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        m = cv2.cvtColor(liquid * dist, cv2.COLOR_GRAY2BGRA)
        m /= np.max(m, axis=(0, 1))
        m *= c[4]
        color = np.concatenate((175 / 255. * np.ones_like(m[..., :1]), 238 / 255. * np.ones_like(m[..., :1]),
                                238 / 255. * np.ones_like(m[..., :1])), axis=2)
        color = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA)
        x = cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
        return cv2.cvtColor(np.clip(x + m * color, 0, 1), cv2.COLOR_BGRA2BGR) * 255
    m = np.where(liquid > c[3], 1, 0)
    m = gaussian(m.astype(np.float32), sigma=c[4])
    m[m < 0.8] = 0
    color = np.concatenate((63 / 255. * np.ones_like(x[..., :1]), 42 / 255. * np.ones_like(x[..., :1]),
                            20 / 255. * np.ones_like(x[..., :1])), axis=2)
    color *= m[..., np.newaxis]
    x *= (1 - m[..., np.newaxis])
    return np.clip(x + color, 0, 1) * 255


def r_noise(name, img, s, rng):
    import skimage as sk
    x = np.array(img) / 255.
    if name == "gaussian_noise":
        return np.clip(x + rng.normal(size=x.shape, scale=[0.04, 0.06, .08, .09, .10][s - 1]), 0, 1) * 255
    if name == "shot_noise":
        c = [500, 250, 100, 75, 50][s - 1]
        return np.clip(rng.poisson(x * c) / c, 0, 1) * 255
    if name == "impulse_noise":
        return np.clip(sk.util.random_noise(x, mode="s&p", amount=[.01, .02, .03, .05, .07][s - 1], rng=rng), 0, 1) * 255
    c = [.06, .1, .12, .16, .2][s - 1]
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1) * 255


# ───────── ame's draws for one batch, the same ones its corruption uses ─────────

def ame_draws(name: str, s: int, x: torch.Tensor, seed: int = 0):
    """(ame's corrupted images, one dict of draws per image) with ame's generator and order."""
    import ame.eval.corruptions as C
    g = torch.Generator().manual_seed(seed)
    xb = x.double() / 255
    b, _, h, w = x.shape
    if name == "glass_blur":
        sig, delta, iters = C._GLASS[s - 1]
        sh = C._randint(g, -delta, delta, (b, iters, h - 2, w - 2, 2))
        return C.glass_blur_with(xb, s, sh), [{"shifts": sh[i].numpy()} for i in range(b)]
    if name == "motion_blur":
        a = C._uniform(g, (b,), -45, 45)
        return C.motion_blur_with(xb, s, a), [{"angle": float(v)} for v in a]
    if name == "snow":
        c = C._SNOW[s - 1]
        layer = c[0] + c[1] * torch.randn((b, 1, h, w), generator=g, dtype=torch.float64)
        a = C._uniform(g, (b,), -135, -45)
        return C.snow_with(xb, s, layer, a), [{"layer": layer[i, 0].numpy(), "angle": float(a[i])} for i in range(b)]
    if name == "frost":
        which = C._randint(g, 0, 5, (b,))
        tex = C.frost_textures(0.2)
        starts = torch.stack([C._randint(g, 0, tex[i].shape[1] - h, (1,))[0] for i in which.tolist()]), \
            torch.stack([C._randint(g, 0, tex[i].shape[2] - w, (1,))[0] for i in which.tolist()])
        starts = torch.stack(starts, 1)
        return C.frost_with(xb, s, which, starts), [{"which": int(which[i]), "start": starts[i].tolist()}
                                                     for i in range(b)]
    if name == "fog":
        p = C.plasma_fractal(b, 32, C._FOG[s - 1][1], g)
        return C.fog_with(xb, s, p), [{"plasma": p[i].numpy()} for i in range(b)]
    if name == "elastic_transform":
        c = C._elastic_params(s, h)
        j, f = C._uniform(g, (b, 3, 2), -c[2], c[2]), C._uniform(g, (b, 2, h, w), -1, 1)
        return C.elastic_with(xb, s, j, f), [{"jitter": j[i].numpy(), "fields": f[i].numpy()} for i in range(b)]
    if name == "spatter":
        c = C._SPATTER[s - 1]
        liq = c[0] + c[1] * torch.randn((b, h, w), generator=g, dtype=torch.float64)
        return C.spatter_with(xb, s, liq), [{"liquid": liq[i].numpy()} for i in range(b)]
    return C.CORRUPTIONS[name](xb, s, g), [{} for _ in range(b)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.environ.get("AME_DATA_ROOT", "/work/data/cifar10-jpeg"))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()

    from ame.eval.corruptions import CORRUPTIONS, to_uint8
    imgs = load_images(Path(args.root), args.n)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    noise = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"}
    lines = [f"{len(imgs)} CIFAR-10 test images from {args.root}",
             "| corruption | s1 | s2 | s3 | s4 | s5 |", "|---|---|---|---|---|---|"]
    worst = 0.0
    for name in args.only or CORRUPTIONS:
        cells = []
        for s in range(1, 6):
            if name in noise:  # statistics of the change, ame vs the reference with numpy's generator
                from ame.eval.corruptions import corrupt
                ours = corrupt(x, name, s, seed=0).numpy().transpose(0, 2, 3, 1).astype(np.float64)
                rng = np.random.default_rng(0)
                ref = np.stack([np.uint8(r_noise(name, im, s, rng)) for im in imgs]).astype(np.float64)
                do, dr = ours - imgs, ref - imgs
                cells.append(f"Δ mean {do.mean():+.2f}/{dr.mean():+.2f}, sd {do.std():.2f}/{dr.std():.2f}, "
                             f"changed {100 * (do != 0).mean():.1f}/{100 * (dr != 0).mean():.1f} %")
                continue
            y, draws = ame_draws(name, s, x)
            ours = to_uint8(y).numpy().transpose(0, 2, 3, 1).astype(np.int64)
            fn = globals()[f"r_{name}"]
            ref = np.stack([np.uint8(fn(im, s, d)) for im, d in zip(imgs, draws)]).astype(np.int64)
            diff = np.abs(ours - ref)
            frac = 100 * float((diff > 2).mean())
            worst = max(worst, frac)
            cells.append(f"{frac:.2f} % (max {diff.max()})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines.append(f"largest share of values more than 2 levels off (deterministic given the draws): {worst:.2f} %")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
