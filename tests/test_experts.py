"""Models and expert training: shapes, batched augmentation, determinism, the expert cache."""
from __future__ import annotations

import pytest
import torch

from hydra.utils import instantiate

from ame.data import load_digits, split
from ame.errors import AMEError
from ame.experts import cache_key, trained_experts
from ame.models import CNN, MLP, ResNet
from ame.models import buffer_names, build_model
from ame.train import augment
from tests.conftest import compose_cfg


@pytest.mark.parametrize("make, shape", [
    (lambda: MLP(3, 32, 10), (3, 32, 32)), (lambda: CNN(3, 32, 10, norm="group"), (3, 32, 32)),
    (lambda: ResNet(3, 32, 10, norm="batch"), (3, 32, 32)), (lambda: CNN(1, 8, 10), (1, 8, 8)),
    (lambda: ResNet(1, 8, 10), (1, 8, 8))])
def test_models_map_images_to_logits(make, shape):
    assert make()(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet20_has_the_paper_size_and_batchnorm_buffers():
    m = ResNet(3, 32, 10, depth=20, norm="batch")
    assert 0.26e6 < sum(p.numel() for p in m.parameters()) < 0.28e6  # He et al.: 0.27M
    assert any(k.endswith("running_mean") for k in buffer_names(m))
    assert buffer_names(ResNet(3, 32, 10, norm="group")) == []


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


def test_expert_training_is_deterministic_and_cached(tmp_path):
    cfg = compose_cfg(["train.epochs=1", "train.warm_epochs=1", "data.shards.num_shards=2"], tmp_path)
    data = load_digits()
    shards = split(data.train_y.numpy(), instantiate(cfg.data.shards), seed=0, public_size=250)
    a = trained_experts(cfg, data, shards, torch.device("cpu"))
    assert not a.cached and len(a.experts) == 2 and a.sizes == shards.sizes
    b = trained_experts(cfg, data, shards, torch.device("cpu"))
    assert b.cached
    # a tampered file fails its hash and is retrained, to the same weights
    path = b.experts.paths[1]
    ref = {k: v.clone() for k, v in b.experts[1].items()}
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    c = trained_experts(cfg, data, shards, torch.device("cpu"))
    assert not c.cached and all(torch.equal(c.experts[1][k], ref[k]) for k in ref)
    # a different training setting is a different cache entry
    other = compose_cfg(["train.epochs=2", "train.warm_epochs=1", "data.shards.num_shards=2"], tmp_path)
    assert cache_key(other, data)[0] != cache_key(cfg, data)[0]
    assert cache_key(compose_cfg(["train.epochs=1", "train.warm_epochs=1", "data.shards.num_shards=2",
                                  "train.device=cpu"], tmp_path), data)[0] == cache_key(cfg, data)[0]


def test_cached_experts_and_base_keep_the_provenance_of_the_run_that_made_them(tmp_path):
    import json

    cfg = compose_cfg(["train.epochs=1", "train.warm_epochs=1", "data.shards.num_shards=2"], tmp_path)
    data = load_digits()
    shards = split(data.train_y.numpy(), instantiate(cfg.data.shards), seed=0, public_size=250)
    cpu = torch.device("cpu")
    first, second, third = ({"run_id": name} for name in ("first", "second", "third"))
    a = trained_experts(cfg, data, shards, cpu, made_by=first)
    assert a.made_by == [first, first] and a.base_made_by == first
    b = trained_experts(cfg, data, shards, cpu, made_by=second)
    assert b.cached and b.made_by == [first, first] and b.base_made_by == first
    # entries written before provenance was recorded: no provenance.json, read as unknown, not a crash
    for entry in [p for kind in ("bases", "experts") for p in (tmp_path / "cache" / kind).iterdir() if p.is_dir()]:
        manifest = json.loads((entry / "manifest.json").read_text())
        assert "provenance.json" in manifest["files"]
        del manifest["files"]["provenance.json"]
        (entry / "manifest.json").write_text(json.dumps(manifest))
        (entry / "provenance.json").unlink()
    c = trained_experts(cfg, data, shards, cpu, made_by=second)
    assert c.cached and c.made_by == [None, None] and c.base_made_by is None
    assert c.fingerprint == a.fingerprint  # the provenance is not part of what the experts are
    # an expert retrained (its file damaged) is made by the run that retrained it; the others keep theirs
    path = c.experts.paths[1]
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    d = trained_experts(cfg, data, shards, cpu, made_by=third)
    assert not d.cached and d.made_by == [None, third] and d.base_made_by is None
    assert trained_experts(cfg, data, shards, cpu).made_by == [None, third]


def test_one_warm_base_serves_sweeps_over_shards_and_expert_epochs(tmp_path):
    from ame.experts import base_key

    data = load_digits()
    keys = {base_key(compose_cfg(o, tmp_path), data)[0] for o in (
        [], ["data.shards.num_shards=7"], ["data/shards=iid"], ["train.epochs=9"])}
    assert len(keys) == 1
    assert base_key(compose_cfg(["train.warm_epochs=3"], tmp_path), data)[0] not in keys
    assert base_key(compose_cfg(["seed=1"], tmp_path), data)[0] not in keys


def test_build_model_reports_bad_architecture_settings(tmp_path):
    cfg = compose_cfg(["model=resnet20", "model.depth=21"], tmp_path)
    with pytest.raises(AMEError, match="6n\\+2"):
        build_model(cfg.model, load_digits(), 0)


@pytest.mark.parametrize("model", [["model=cnn", "model.widths=[8,16]", "model.norm=group"], ["model=mlp"]])
def test_parallel_experts_are_the_sequential_experts(model, tmp_path):
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


def test_parallel_training_refuses_batchnorm(tmp_path):
    from ame.train import train_experts

    cfg = compose_cfg(["model=cnn", "model.widths=[8]", "model.norm=batch", "train.parallel_experts=true"], tmp_path)
    data = load_digits()
    shards = split(data.train_y.numpy(), instantiate(cfg.data.shards), seed=0)
    with pytest.raises(AMEError, match="parallel_experts=true needs a model without buffers"):
        list(train_experts(cfg.model, cfg.train, data, shards.shards, None, [1, 2, 3, 4], torch.device("cpu")))


@pytest.mark.parametrize("init", ["independent", "shared"])
def test_expert_cache_key_depends_on_the_data_content_not_only_its_config(init, tmp_path):
    cfg = compose_cfg([f"train.init={init}"], tmp_path)
    a, b = load_digits(), load_digits()
    b.train_x[0] = 255 - b.train_x[0]  # same config, different pixels
    assert cache_key(cfg, a)[0] != cache_key(cfg, b)[0]


def test_pretrained_weights_are_keyed_by_content_not_path(tmp_path):
    from ame.experts import _model_spec
    from omegaconf import OmegaConf

    (tmp_path / "w.safetensors").write_bytes(b"one")
    (tmp_path / "v.safetensors").write_bytes(b"one")
    spec = lambda name: _model_spec(OmegaConf.create({"_target_": "m", "pretrained": str(tmp_path / name)}))  # noqa: E731
    assert spec("w.safetensors") == spec("v.safetensors") and spec("w.safetensors")["pretrained"].startswith("sha256:")
    (tmp_path / "w.safetensors").write_bytes(b"two")
    assert spec("w.safetensors") != spec("v.safetensors")
