"""ame.experts: trained experts (deterministic, cached by content, with the provenance of the run that
made them, one warm base for many sweeps) and experts from files."""
from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from ame.data import load_digits, split
from ame.errors import AMEError
from ame.experts import base_key as _base_key, cache_key as _cache_key, shared_seed


def trained_experts(cfg, data, shards, device, made_by=None):
    """The experts of ``cfg``'s source (experts=train; its device: train.device)."""
    return instantiate(cfg.experts).experts(data, shards, made_by=made_by)


def cache_key(cfg, data):
    return _cache_key(cfg.train, cfg.data, cfg.model, cfg.seed, cfg.base_seed, data)


def base_key(cfg, data):
    return _base_key(cfg.train, cfg.data, cfg.model, shared_seed(cfg.seed, cfg.base_seed), data)


def test_expert_training_is_deterministic_and_cached(tmp_path, compose_cfg):
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


def test_cached_experts_and_base_keep_the_provenance_of_the_run_that_made_them(tmp_path, compose_cfg):
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


def test_one_warm_base_serves_sweeps_over_shards_and_expert_epochs(tmp_path, compose_cfg):
    data = load_digits()
    keys = {base_key(compose_cfg(o, tmp_path), data)[0] for o in (
        [], ["data.shards.num_shards=7"], ["data/shards=iid"], ["train.epochs=9"])}
    assert len(keys) == 1
    assert base_key(compose_cfg(["train.warm_epochs=3"], tmp_path), data)[0] not in keys
    assert base_key(compose_cfg(["seed=1"], tmp_path), data)[0] not in keys


@pytest.mark.parametrize("init", ["independent", "shared"])
def test_expert_cache_key_depends_on_the_data_content_not_only_its_config(init, tmp_path, compose_cfg):
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


# -- experts from files (experts=files) -------------------------------------------------------------------

def _files(tmp_path, metadata):
    from ame.io import save_state_dict

    for i, meta in enumerate(metadata):
        save_state_dict({"w": torch.full((3,), float(i)), "n": torch.tensor(i)}, tmp_path / f"e{i}.safetensors", meta)
    save_state_dict({"w": torch.zeros(3), "n": torch.tensor(0)}, tmp_path / "init.safetensors")


def _file_experts(paths=None, init=None, sizes=None):
    from ame.experts import FileExperts

    return FileExperts(paths, init, None, sizes).experts()


def test_expert_files_bring_their_shard_sizes_and_class_mixes_and_are_read_on_access(tmp_path):
    _files(tmp_path, [{"shard_size": "10", "class_counts": "[4, 6]"}, {"shard_size": "30", "class_counts": "[25, 5]"}])
    ex = _file_experts(paths=str(tmp_path / "e*.safetensors"), init=str(tmp_path / "init.safetensors"))
    assert ex.sizes == [10, 30] and ex.class_counts.tolist() == [[4, 6], [25, 5]] and ex.cached
    assert [p.name for p in ex.experts.paths] == ["e0.safetensors", "e1.safetensors"] and len(ex.experts) == 2
    assert torch.equal(ex.experts[1]["w"], torch.full((3,), 1.0)) and torch.equal(ex.init["w"], torch.zeros(3))
    assert ex.fingerprint is None  # not from the cache: nothing derived from them is cached
    pool = ex.experts.pool(ex.sizes, ex.init)
    assert pool.n == 2 and pool.sizes == [10, 30] and pool.buffers == {"n"}


def test_expert_files_without_metadata_count_as_equal_shards_unless_sizes_are_given(tmp_path):
    _files(tmp_path, [{}, {"shard_size": "5"}])  # only some record it: all equal (with a warning)
    pattern = str(tmp_path / "e*.safetensors")
    ex = _file_experts(paths=pattern)
    assert ex.sizes == [1, 1] and ex.class_counts is None and ex.init is None
    assert _file_experts(paths=pattern, sizes=[2, 3.5]).sizes == [2, 3.5]
    with pytest.raises(AMEError, match="experts.sizes must be a list of 2 positive numbers"):
        _file_experts(paths=pattern, sizes=[2])
    with pytest.raises(AMEError, match="experts=files needs experts.paths"):
        _file_experts(paths=None)
