"""ame.train: batched augmentation, and experts trained side by side equal the experts trained one by one."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from ame.data import load_digits, split
from ame.errors import AMEError
from ame.train import augment


def test_augment_crops_and_flips_each_image_independently():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, 0, False, g), x)
    flipped = augment(x, 0, True, torch.Generator().manual_seed(0))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(-1)) for f, o in zip(flipped, x))
    big = torch.randn(64, 3, 8, 8)
    out = augment(big, 2, False, torch.Generator().manual_seed(1))
    assert out.shape == big.shape
    for o, b in zip(out, big):  # each crop is a window of the zero-padded image
        padded = torch.nn.functional.pad(b, (2, 2, 2, 2))
        assert any(torch.equal(o, padded[:, i:i + 8, j:j + 8]) for i in range(5) for j in range(5))
    assert len({tuple(o.flatten()[:5].tolist()) for o in out - big}) > 1  # not all the same shift


@pytest.mark.parametrize("model", [["model=cnn", "model.widths=[8,16]", "model.norm=group"], ["model=mlp"]])
def test_parallel_experts_are_the_sequential_experts(model, tmp_path, compose_cfg):
    from ame.train import expert_seed, initial_state, train_experts

    cfg = compose_cfg([*model, "train.epochs=2", "train.batch_size=48", "train.augment.crop_padding=1",
                       "train.augment.flip=true", "train.label_smoothing=0.1", "train.init=shared"], tmp_path)
    data = load_digits()
    shards = split(data.train_y.numpy(), instantiate(cfg.data.shards), seed=0, public_size=250)
    assert len(set(shards.sizes)) > 1  # unequal shards: experts finish at different steps
    init = initial_state(cfg.model, cfg.train, data, shards.public, 0, torch.device("cpu"))
    seeds = [expert_seed(0, i) for i in range(len(shards.shards))]
    seq = list(train_experts(cfg.model, cfg.train, data, shards.shards, init, seeds, torch.device("cpu")))
    cfg.train.parallel_experts = True
    par = list(train_experts(cfg.model, cfg.train, data, shards.shards, init, seeds, torch.device("cpu")))
    for a, b in zip(seq, par):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
        assert any(not torch.equal(a[k], init[k]) for k in a)  # they did train


def test_parallel_training_refuses_batchnorm(tmp_path, compose_cfg):
    from ame.train import train_experts

    cfg = compose_cfg(["model=cnn", "model.widths=[8]", "model.norm=batch", "train.parallel_experts=true"], tmp_path)
    data = load_digits()
    shards = split(data.train_y.numpy(), instantiate(cfg.data.shards), seed=0)
    with pytest.raises(AMEError, match="parallel_experts=true needs a model without buffers"):
        list(train_experts(cfg.model, cfg.train, data, shards.shards, None, [1, 2, 3, 4], torch.device("cpu")))
