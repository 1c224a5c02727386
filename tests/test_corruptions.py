"""The corruption suite: deterministic, uint8 in and out, and harder with severity."""
from __future__ import annotations

import colorsys

import pytest
import torch

from ame.data.corruptions import CORRUPTIONS, brightness, corrupt
from ame.errors import AMEError


@pytest.fixture(scope="module")
def images():
    # Smooth random images (upsampled noise), as natural images are smoother than white noise.
    g = torch.Generator().manual_seed(0)
    low = torch.rand(16, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_is_deterministic_and_grows_with_severity(name, images):
    outs = [corrupt(images, name, s, seed=0) for s in range(1, 6)]
    assert all(o.dtype == torch.uint8 and o.shape == images.shape for o in outs)
    assert torch.equal(outs[2], corrupt(images, name, 3, seed=0))
    err = [float((o.float() - images.float()).abs().mean()) for o in outs]
    assert err[0] > 0 and err[4] > err[0]


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_works_on_small_grayscale_images(name):
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert corrupt(x, name, 5).shape == x.shape


def test_noise_depends_on_the_seed(images):
    assert not torch.equal(corrupt(images, "gaussian_noise", 3, seed=0), corrupt(images, "gaussian_noise", 3, seed=1))


def test_brightness_adds_to_the_hsv_value_and_keeps_hue_and_saturation():
    rgb = torch.tensor([[0.2, 0.4, 0.6], [0.9, 0.1, 0.3], [0.0, 0.0, 0.0], [0.95, 0.5, 0.5]])
    out = brightness(rgb[:, :, None, None], 3, torch.Generator())[:, :, 0, 0]
    for a, b in zip(rgb.tolist(), out.tolist()):
        h, s, v = colorsys.rgb_to_hsv(*a)
        assert torch.allclose(torch.tensor(colorsys.hsv_to_rgb(h, s, min(v + 0.15, 1.0))), torch.tensor(b), atol=1e-6)


def test_unknown_corruption_and_severity_are_rejected(images):
    with pytest.raises(AMEError, match="unknown corruption"):
        corrupt(images, "fog", 1)
    with pytest.raises(AMEError, match="severities"):
        corrupt(images, "contrast", 6)
