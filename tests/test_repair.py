"""bn_reset's statistics (ame.repair.reset_batchnorm), checked against the batch statistics computed
by hand: clean images give the exact mean and variance; augmented as in training, the zero-padded
crops bring black borders into the statistics, as they were in training's (issue 23)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ame.data.datasets import ImageData
from ame.repair import reset_batchnorm
from ame.train import augment


def setup(images):
    data = ImageData("t", images, torch.zeros(len(images), dtype=torch.long), images[:2], torch.zeros(2, dtype=torch.long),
                     ["a"])
    model = nn.Sequential(nn.BatchNorm2d(3))  # sees the normalised images themselves
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return data, model, sd


def by_hand(data, batches):
    """The mean of the batch means and of the batch unbiased variances, per channel (momentum None)."""
    xs = [data.normalize(b).float() for b in batches]
    means = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    var = torch.stack([x.permute(1, 0, 2, 3).reshape(3, -1).var(1) for x in xs]).mean(0)
    return means, var


def test_clean_statistics_are_the_exact_mean_and_variance_and_counters_stay():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    data, model, sd = setup(images)
    sd["0.num_batches_tracked"] = torch.tensor(77)
    out = reset_batchnorm(model, sd, data, images, torch.device("cpu"), batch_size=40)
    mean, var = by_hand(data, [images])
    assert torch.allclose(out["0.running_mean"], mean, atol=1e-6) and torch.allclose(out["0.running_var"], var, atol=1e-5)
    assert out["0.num_batches_tracked"].item() == 77 and torch.equal(out["0.weight"], sd["0.weight"])


def test_augmented_statistics_average_every_pass_of_crops_and_flips_as_training_draws_them():
    images = torch.full((20, 3, 8, 8), 200, dtype=torch.uint8)
    images[:, :, :, :4] = 100  # a left half that a flip moves: flips change nothing in a channel mean here
    data, model, sd = setup(torch.cat([images, torch.zeros(1, 3, 8, 8, dtype=torch.uint8)]))  # normalised: not all 0
    clean = reset_batchnorm(model, sd, data, images, torch.device("cpu"), batch_size=8)
    out = reset_batchnorm(model, sd, data, images, torch.device("cpu"), batch_size=8, crop_padding=2, flip=True,
                          passes=3, seed=4)
    g = torch.Generator().manual_seed(4)  # the same draws, in the same order: 3 passes × batches of 8, 8, 4
    batches = [augment(images[i:i + 8], 2, True, g) for _ in range(3) for i in range(0, 20, 8)]
    mean, var = by_hand(data, batches)
    assert torch.allclose(out["0.running_mean"], mean, atol=1e-6) and torch.allclose(out["0.running_var"], var, atol=1e-5)
    # the black borders of the zero-padded crops lower every channel's mean and widen its spread
    assert (out["0.running_mean"] < clean["0.running_mean"] - 0.1).all()
    assert (out["0.running_var"] > clean["0.running_var"]).all()
    again = reset_batchnorm(model, sd, data, images, torch.device("cpu"), batch_size=8, crop_padding=2, flip=True,
                            passes=3, seed=4)
    other = reset_batchnorm(model, sd, data, images, torch.device("cpu"), batch_size=8, crop_padding=2, flip=True,
                            passes=3, seed=5)
    assert torch.equal(again["0.running_mean"], out["0.running_mean"])  # seeded: the same statistics
    assert not torch.equal(other["0.running_mean"], out["0.running_mean"])
