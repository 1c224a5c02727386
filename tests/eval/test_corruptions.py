"""The 19 corruptions against the published generator's formulas (hendrycks/robustness,
make_cifar_c.py), each re-computed here with the library the reference calls (skimage, scipy,
cv2, PIL) or, for ImageMagick's motion blur, a literal per-pixel port of its C loop; random
corruptions by their draws' parameters and the noise statistics. ``scripts/check_cifar_c.py``
runs the same comparison on real CIFAR-10 images (and against Wand itself)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import ame.eval.corruptions as C
from ame.eval.corruptions import CORRUPTIONS, EXTRAS, FAMILIES, STANDARD, corrupt
from ame.errors import AMEError
from scripts.check_cifar_c import clipped_zoom as _clipped_zoom  # the reference's clipped_zoom (one port)

skimage = pytest.importorskip("skimage")
cv2 = pytest.importorskip("cv2")


def _smooth(n: int, size: int = 32, seed: int = 0, channels: int = 3) -> np.ndarray:
    """uint8 (n, size, size, channels) images smoother than noise, as natural images are."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def imgs():
    return _smooth(4)


def ours(name: str, imgs: np.ndarray, s: int, seed: int = 0) -> np.ndarray:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    return corrupt(x, name, s, seed).permute(0, 2, 3, 1).numpy().astype(int)


def via(fn, imgs: np.ndarray, s: int, *draws) -> np.ndarray:
    """A ``*_with`` operation on the images with explicit draws, as uint8 (N, H, W, C)."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    return C.to_uint8(fn(x, s, *draws)).permute(0, 2, 3, 1).numpy().astype(int)


def close(a: np.ndarray, b: np.ndarray, levels: int = 2, share: float = 0.0) -> None:
    """At most ``share`` of the uint8 values more than ``levels`` apart."""
    off = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)) > levels
    assert off.mean() <= share, f"{off.mean():.4f} of values more than {levels} levels off"


def ref_gaussian(x, sigma, **kw):
    return skimage.filters.gaussian(x, sigma=sigma, channel_axis=-1 if x.ndim == 3 else None, **kw)


# ───────── deterministic corruptions: the reference computed with its own libraries ─────────

@pytest.mark.parametrize("s", range(1, 6))
def test_gaussian_blur_is_skimage_gaussian_with_edge_pixels_repeated(imgs, s):
    ref = [np.uint8(np.clip(ref_gaussian(im / 255., [.4, .6, .7, .8, 1][s - 1]), 0, 1) * 255) for im in imgs]
    close(ours("gaussian_blur", imgs, s), np.stack(ref), levels=1)


@pytest.mark.parametrize("s", range(1, 6))
def test_defocus_blur_is_cv2_filter2d_with_the_antialiased_disk(imgs, s):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    t = np.arange(-8, 9)
    xx, yy = np.meshgrid(t, t)
    disk = np.array((xx ** 2 + yy ** 2) <= radius ** 2, dtype=np.float32)
    disk = cv2.GaussianBlur(disk / disk.sum(), ksize=(3, 3), sigmaX=alias)
    ref = [np.uint8(np.clip(np.stack([cv2.filter2D(im[..., k] / 255., -1, disk) for k in range(3)], -1), 0, 1) * 255)
           for im in imgs]
    close(ours("defocus_blur", imgs, s), np.stack(ref), levels=1)


@pytest.mark.parametrize("s", [1, 3, 5])
def test_zoom_blur_averages_scipy_order1_clipped_zooms(imgs, s):
    factors = np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][s - 1], 0.01)
    assert len(factors) == [7, 12, 16, 21, 26][s - 1]  # the reference's float arange, last step included
    ref = []
    for im in imgs:
        x = (im / 255.).astype(np.float32)
        out = np.zeros_like(x)
        for z in factors:
            out += _clipped_zoom(x, z)
        ref.append(np.uint8(np.clip((x + out) / (len(factors) + 1), 0, 1) * 255))
    close(ours("zoom_blur", imgs, s), np.stack(ref), levels=1)


@pytest.mark.parametrize("s", range(1, 6))
def test_contrast_brightness_saturate_follow_numpy_and_skimage_hsv(imgs, s):
    x = imgs / 255.
    c = [.75, .5, .4, .3, .15][s - 1]
    m = x.mean(axis=(1, 2), keepdims=True)
    close(ours("contrast", imgs, s), np.uint8(np.clip((x - m) * c + m, 0, 1) * 255), levels=1)
    b = [.05, .1, .15, .2, .3][s - 1]
    sat = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][s - 1]
    rb, rs = [], []
    for im in x:
        hsv = skimage.color.rgb2hsv(im)
        hb, hs = hsv.copy(), hsv.copy()
        hb[..., 2] = np.clip(hb[..., 2] + b, 0, 1)
        hs[..., 1] = np.clip(hs[..., 1] * sat[0] + sat[1], 0, 1)
        rb.append(np.uint8(np.clip(skimage.color.hsv2rgb(hb), 0, 1) * 255))
        rs.append(np.uint8(np.clip(skimage.color.hsv2rgb(hs), 0, 1) * 255))
    close(ours("brightness", imgs, s), np.stack(rb), levels=1)
    close(ours("saturate", imgs, s), np.stack(rs), levels=1)


@pytest.mark.parametrize("s", range(1, 6))
def test_pixelate_and_jpeg_are_pils_exactly(imgs, s):
    from PIL import Image
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    q = [80, 65, 58, 50, 40][s - 1]
    pix, jpg = [], []
    for im in imgs:
        p = Image.fromarray(im).resize((int(32 * c), int(32 * c)), Image.BOX).resize((32, 32), Image.BOX)
        pix.append(np.asarray(p))
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=q)
        jpg.append(np.asarray(Image.open(buf)))
    assert np.array_equal(ours("pixelate", imgs, s), np.stack(pix))
    assert np.array_equal(ours("jpeg_compression", imgs, s), np.stack(jpg))


# ───────── random corruptions: the reference's operation on our draws ─────────

def _glass_loop(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """The reference's loop, literally (with its numpy-view "swap")."""
    x = x.copy()
    h_, w_ = x.shape[:2]
    for it in range(shifts.shape[0]):
        for i, h in enumerate(range(h_ - 1, 1, -1)):
            for j, w in enumerate(range(w_ - 1, 1, -1)):
                dx, dy = shifts[it, i, j]
                x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
    return x


@pytest.mark.parametrize("s", range(1, 6))
def test_glass_blur_is_the_references_sequential_pixel_loop(imgs, s):
    sigma, delta, iters = C._GLASS[s - 1]
    g = torch.Generator().manual_seed(s)
    shifts = C._randint(g, -delta, delta, (len(imgs), iters, 30, 30, 2))
    assert set(shifts.unique().tolist()) == {-1, 0}  # numpy's randint(-1, 1): high exclusive
    ref = []
    for im, sh in zip(imgs, shifts.numpy()):
        x = np.uint8(ref_gaussian(im / 255., sigma) * 255)
        ref.append(np.uint8(np.clip(ref_gaussian(_glass_loop(x, sh) / 255., sigma), 0, 1) * 255))
    close(via(C.glass_blur_with, imgs, s, shifts), np.stack(ref), levels=2, share=0.001)


def test_glass_shuffle_is_the_loop_exactly_on_integers():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 12, 12), generator=g).float()
    shifts = C._randint(g, -1, 1, (3, 2, 10, 10, 2))
    got = C.glass_shuffle(x, shifts)
    for b in range(3):
        ref = _glass_loop(x[b].permute(1, 2, 0).numpy(), shifts[b].numpy())
        assert np.array_equal(got[b].permute(1, 2, 0).numpy(), ref)


def _imagemagick_motion(img: np.ndarray, radius, sigma, angle) -> np.ndarray:
    """A literal port of MotionBlurImage's loop (ImageMagick 6, no alpha) on a uint8 (H, W, C) image."""
    width = int(2 * math.ceil(radius) + 1)
    kernel = np.array([math.exp(-(i * i) / (2 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
                       for i in range(width)])
    kernel /= kernel.sum()
    px, py = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    offs = [(math.ceil(i * py / math.hypot(px, py) - 0.5), math.ceil(i * px / math.hypot(px, py) - 0.5))
            for i in range(width)]
    h, w, _ = img.shape
    out = np.zeros_like(img)
    for y in range(h):
        for x in range(w):
            acc = sum(k * img[min(max(y + oy, 0), h - 1), min(max(x + ox, 0), w - 1)].astype(float) * 257
                      for k, (ox, oy) in zip(kernel, offs))
            q = np.clip(np.floor(acc + 0.5), 0, 65535)
            out[y, x] = (q + 128) // 257
    return out


@pytest.mark.parametrize("angle", [-45.0, -7.3, 0.0, 30.0])
def test_motion_blur_is_imagemagicks_kernel(imgs, angle):
    got = via(C.motion_blur_with, imgs[:1, :12, :12], 5, torch.tensor([angle]))
    ref = _imagemagick_motion(imgs[0, :12, :12], 9, 2.5, angle)
    close(got[0], ref, levels=1)


@pytest.mark.needs_imagemagick
def test_motion_blur_matches_wand_when_imagemagick_is_installed(imgs):
    import ctypes

    import wand.image as wand_image
    from PIL import Image
    from wand.api import library
    library.MagickMotionBlurImage.argtypes = (ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_double)
    buf = io.BytesIO()
    Image.fromarray(imgs[0]).save(buf, format="PNG")
    with wand_image.Image(blob=buf.getvalue()) as im:
        library.MagickMotionBlurImage(im.wand, 6, 2, 17.0)
        ref = cv2.imdecode(np.frombuffer(im.make_blob(), np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    close(via(C.motion_blur_with, imgs[:1], 3, torch.tensor([17.0]))[0], ref, levels=1)


def _plasma_reference(mapsize, decay, draw):
    """The reference's diamond-square, with ``draw(shape)`` for its uniform(−1, 1) draws (× wibble)."""
    m = np.empty((mapsize, mapsize))
    m[0, 0] = 0
    step, wibble = mapsize, 100.0

    def wm(a):
        return a / 4 + wibble * (wibble * draw(a.shape))

    while step >= 2:
        half = step // 2
        cr = m[0:mapsize:step, 0:mapsize:step]
        sq = cr + np.roll(cr, -1, 0)
        sq += np.roll(sq, -1, 1)
        m[half:mapsize:step, half:mapsize:step] = wm(sq)
        dr, ul = m[half::step, half::step], m[0::step, 0::step]
        m[0::step, half::step] = wm(dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1))
        m[half::step, 0::step] = wm(dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0))
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / m.max()


def test_plasma_fractal_is_the_references_diamond_square():
    rng = np.random.default_rng(0)
    stream = rng.uniform(-1, 1, 5000)
    pos = [0, 0]

    def drawer(k):
        def draw(shape):
            n = int(np.prod(shape))
            out = stream[pos[k]:pos[k] + n].reshape(shape)
            pos[k] += n
            return out
        return draw

    ref = _plasma_reference(32, 2.5, drawer(0))
    got = C.plasma_fractal(1, 32, 2.5, draw=lambda shape: torch.from_numpy(drawer(1)(shape[1:]))[None])
    assert np.allclose(got[0].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("s", [1, 5])
def test_fog_and_frost_blend_as_the_reference(imgs, s):
    g = torch.Generator().manual_seed(0)
    plasma = C.plasma_fractal(len(imgs), 32, C._FOG[s - 1][1], g)
    c = C._FOG[s - 1][0]
    x = imgs / 255.
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    ref = np.uint8(np.clip((x + c * plasma.numpy()[..., None]) * peak / (peak + c), 0, 1) * 255)
    close(via(C.fog_with, imgs, s, plasma), ref, levels=1)

    which, starts = torch.tensor([0, 1, 3, 4]), torch.tensor([[5, 7], [0, 0], [30, 40], [2, 90]])
    cf = C._FROST[s - 1]
    ref = []
    for im, i, (y0, x0) in zip(imgs, which.tolist(), starts.tolist()):
        name = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"][i]
        fr = cv2.resize(cv2.imread(str(C._frost_dir() / name)), (0, 0), fx=0.2, fy=0.2)
        ref.append(np.uint8(np.clip(cf[0] * im + cf[1] * fr[y0:y0 + 32, x0:x0 + 32][..., [2, 1, 0]], 0, 255)))
    close(via(C.frost_with, imgs, s, which, starts), np.stack(ref), levels=1)


@pytest.mark.parametrize("s", range(1, 6))
def test_elastic_transform_is_cv2_warp_then_scipy_map_coordinates(imgs, s):
    from scipy.ndimage import map_coordinates
    b = len(imgs)
    c = C._elastic_params(s, 32)
    g = torch.Generator().manual_seed(s)
    jitter, fields = C._uniform(g, (b, 3, 2), -c[2], c[2]), C._uniform(g, (b, 2, 32, 32), -1, 1)
    ref = []
    for im, j, f in zip(imgs, jitter.numpy(), fields.numpy()):
        image = im.astype(np.float32) / 255.
        cs, sq = np.float32([32, 32]) // 2, 32 // 3
        pts1 = np.float32([cs + sq, [cs[0] + sq, cs[1] - sq], cs - sq])
        m = cv2.getAffineTransform(pts1, pts1 + j.astype(np.float32))
        image = cv2.warpAffine(image, m, (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        dx = (ref_gaussian(f[0], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)[..., None]
        dy = (ref_gaussian(f[1], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)[..., None]
        xx, yy, zz = np.meshgrid(np.arange(32), np.arange(32), np.arange(3))
        ind = (yy + dy).reshape(-1, 1), (xx + dx).reshape(-1, 1), zz.reshape(-1, 1)
        ref.append(np.uint8(np.clip(map_coordinates(image, ind, order=1, mode="reflect").reshape(32, 32, 3), 0, 1)
                            * 255))
    close(via(C.elastic_with, imgs, s, jitter, fields), np.stack(ref), levels=2, share=0.002)


@pytest.mark.parametrize("s", range(1, 6))
def test_snow_is_the_references_layer_zoom_motion_and_blend(imgs, s):
    from PIL import Image
    c = C._SNOW[s - 1]
    g = torch.Generator().manual_seed(s)
    layer = c[0] + c[1] * torch.randn((2, 1, 32, 32), generator=g, dtype=torch.float64)
    angles = C._uniform(g, (2,), -135, -45)
    ref = []
    for im, lay, a in zip(imgs[:2], layer.numpy(), angles.tolist()):
        x = im.astype(np.float32) / 255.
        lay = _clipped_zoom(lay[0][..., None], c[2])
        lay[lay < c[3]] = 0
        u8 = np.asarray(Image.fromarray((np.clip(lay.squeeze(), 0, 1) * 255).astype(np.uint8), mode="L"))
        flakes = _imagemagick_motion(u8[..., None], c[4], c[5], a) / 255.
        gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(32, 32, 1)
        x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
        ref.append(np.uint8(np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1) * 255))
    close(via(C.snow_with, imgs[:2], s, layer, angles), np.stack(ref), levels=2)


@pytest.mark.parametrize("s", range(1, 6))
def test_spatter_is_the_references_water_or_mud(imgs, s):
    c = C._SPATTER[s - 1]
    g = torch.Generator().manual_seed(s)
    liquid = c[0] + c[1] * torch.randn((len(imgs), 32, 32), generator=g, dtype=torch.float64)
    ref = []
    for im, liq in zip(imgs, liquid.numpy()):
        x = im.astype(np.float32) / 255.
        liq = ref_gaussian(liq, c[2])
        liq[liq < c[3]] = 0
        if c[5] == 0:
            u8 = (liq * 255).astype(np.uint8)
            dist = cv2.distanceTransform(255 - cv2.Canny(u8, 50, 150), cv2.DIST_L2, 5)
            _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
            dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])), (3, 3))
            m = u8 * dist.astype(np.float32)
            m = m / m.max() * c[4]
            out = x + m[..., None] * np.array([175, 238, 238]) / 255.
        else:
            m = ref_gaussian((liq > c[3]).astype(np.float32), c[4])
            m[m < 0.8] = 0
            out = x * (1 - m[..., None]) + m[..., None] * np.array([63, 42, 20]) / 255.
        ref.append(np.uint8(np.clip(out, 0, 1) * 255))
    close(via(C.spatter_with, imgs, s, liquid), np.stack(ref), levels=1)


# ───────── noise: parameters and statistics ─────────

@pytest.mark.parametrize("s", [1, 5])
def test_noise_statistics(s):
    grey = np.full((64, 32, 32, 3), 128, np.uint8)
    x = grey / 255.
    d = (ours("gaussian_noise", grey, s) - 128) / 255.
    assert abs(d.std() - [0.04, 0.06, .08, .09, .10][s - 1]) < 0.003 and abs(d.mean()) < 0.003
    lam = [500, 250, 100, 75, 50][s - 1]
    d = ours("shot_noise", grey, s) / 255.
    assert abs(d.std() - math.sqrt(x.mean() / lam)) < 0.1 * math.sqrt(x.mean() / lam)
    amount = [.01, .02, .03, .05, .07][s - 1]
    out = ours("impulse_noise", grey, s)
    assert abs((out != 128).mean() - amount) < 0.2 * amount and abs((out == 255).mean() - amount / 2) < 0.2 * amount
    d = (ours("speckle_noise", grey, s) - 128) / 255.
    c = [.06, .1, .12, .16, .2][s - 1]
    assert abs(d.std() - x.mean() * c) < 0.05 * x.mean() * c


def test_random_draws_have_the_references_ranges():
    g = torch.Generator().manual_seed(0)
    p = C.plasma_fractal(8, 32, 2, g)  # fog: a height map spanning [0, 1]
    assert torch.allclose(p.amin((1, 2)), torch.zeros(8, dtype=p.dtype))
    assert torch.allclose(p.amax((1, 2)), torch.ones(8, dtype=p.dtype))
    which, starts = C.frost_draws(2000, 32, 32, g)  # frost: textures 1-5 (frost6 never), crops inside
    assert set(which.tolist()) == {0, 1, 2, 3, 4}
    tex = C.frost_textures(0.2)
    for i, (y0, x0) in zip(which.tolist(), starts.tolist()):
        assert 0 <= y0 < tex[i].shape[1] - 32 and 0 <= x0 < tex[i].shape[2] - 32


# ───────── the suite ─────────

def test_the_suite_is_the_references_19_in_four_families_and_extras():
    assert len(STANDARD) == 15 and len(EXTRAS) == 4 and set(CORRUPTIONS) == set(STANDARD) | set(EXTRAS)
    assert sorted(n for f in FAMILIES.values() for n in f) == sorted(STANDARD)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_is_deterministic_and_grows_with_severity(name, imgs):
    x = torch.from_numpy(_smooth(8)).permute(0, 3, 1, 2).contiguous()
    outs = [corrupt(x, name, s, seed=0) for s in (1, 3, 5)]
    assert all(o.dtype == torch.uint8 and o.shape == x.shape for o in outs)
    assert torch.equal(outs[1], corrupt(x, name, 3, seed=0))
    err = [float((o.float() - x.float()).abs().mean()) for o in outs]
    assert min(err) > 0
    if name != "elastic_transform":  # its severity 1 is the largest affine jitter (2.56 px), 5 the smallest
        assert err[2] > err[0]


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_works_on_8px_grey_images(name):
    x = torch.from_numpy(_smooth(4, size=8, channels=1)).permute(0, 3, 1, 2).contiguous()
    assert corrupt(x, name, 5).shape == x.shape


@pytest.mark.slow
def test_every_corruption_works_on_224px_images():
    x = torch.from_numpy(_smooth(1, size=224)).permute(0, 3, 1, 2).contiguous()
    for name in CORRUPTIONS:
        out = corrupt(x, name, 5)
        assert out.shape == x.shape and not torch.equal(out, x), name


def test_noise_depends_on_the_seed(imgs):
    assert not np.array_equal(ours("gaussian_noise", imgs, 3, seed=0), ours("gaussian_noise", imgs, 3, seed=1))


def test_bad_names_severities_and_sizes_are_one_clear_error(imgs):
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    with pytest.raises(AMEError, match="unknown corruption"):
        corrupt(x, "rain", 1)
    with pytest.raises(AMEError, match="severities"):
        corrupt(x, "contrast", 6)
    with pytest.raises(AMEError, match="below the 8 px"):
        corrupt(x[..., :4, :4], "contrast", 1)
    with pytest.raises(AMEError, match="larger than the frost textures"):
        corrupt(torch.zeros(1, 3, 400, 400, dtype=torch.uint8), "frost", 1)
