"""scripts/bench_merge.py: its experts are real Llama checkpoints (``transformers`` loads them), made
deterministically with small task vectors, and its soup check counts bf16 ulps correctly."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]  # the repository (the `root` fixture, at module level)
transformers = pytest.importorskip("transformers")
spec = importlib.util.spec_from_file_location("bench_merge", ROOT / "scripts" / "bench_merge.py")
bench = sys.modules["bench_merge"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(bench)


def test_experts_load_in_transformers_and_differ_by_small_deltas(tmp_path):
    config = bench.llama_config("tiny", 0, layers=2)
    paths = bench.make_experts(tmp_path / "a", config, 3, delta=0.002, shard_bytes=100_000)
    assert len(list(paths[0].glob("*.safetensors"))) > 1 and (paths[0] / "model.safetensors.index.json").is_file()
    models = [transformers.AutoModelForCausalLM.from_pretrained(p) for p in paths]
    assert type(models[0]).__name__ == "LlamaForCausalLM" and models[0].dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(models[1](torch.arange(8)[None]).logits).all()
    sds = [m.state_dict() for m in models]
    key = "model.layers.1.mlp.down_proj.weight"
    base, tau = sds[0][key].float(), (sds[1][key].float() - sds[0][key].float())
    assert 0.015 < base.std() < 0.025 and 0.0015 < tau.std() < 0.0025  # task vectors: small, not zero
    assert not torch.equal(sds[1][key], sds[2][key])
    # deterministic: made again elsewhere, the same bytes; made again here, reused untouched
    again = bench.make_experts(tmp_path / "b", config, 2, delta=0.002, shard_bytes=100_000)
    for f in paths[1].glob("*.safetensors"):
        assert f.read_bytes() == (again[1] / f.name).read_bytes()
    stamp = {f: f.stat().st_mtime_ns for f in paths[0].iterdir()}
    bench.make_experts(tmp_path / "a", config, 3, delta=0.002, shard_bytes=100_000)
    assert {f: f.stat().st_mtime_ns for f in paths[0].iterdir()} == stamp


def test_ulp_distance_counts_bf16_steps_across_zero():
    x = torch.tensor([1.0, -1.0, 0.0, 3.0e-3], dtype=torch.bfloat16)
    up = (x.view(torch.int16) + 1).view(torch.bfloat16)  # one step away from zero for x ≠ 0
    assert bench.ulp_distance(x, x).tolist() == [0, 0, 0, 0]
    assert bench.ulp_distance(x, up).tolist() == [1, 1, 1, 1]
    tiny = torch.tensor([1e-40], dtype=torch.bfloat16)  # the smallest subnormals either side of ±0
    assert bench.ulp_distance(tiny, -tiny).tolist() == [2 * int(tiny.view(torch.int16))]
    assert bench.ulp_distance(torch.tensor([0.0], dtype=torch.bfloat16),
                              torch.tensor([-0.0], dtype=torch.bfloat16)).tolist() == [0]
