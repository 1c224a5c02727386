"""Checkpoints in and out: every layout reads to the same tensors, the aggregate comes back in the
input's layout, and every bad input is one clear line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import ame
from ame.aggregators import average
from ame.io import Checkpoint, save
from ame.errors import AMEError
from ame.pool import ExpertPool


def net(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(50, 8, generator=g).to(dtype), "fc.weight": torch.randn(8, 8, generator=g).to(dtype),
            "fc.bias": torch.randn(8, generator=g).to(dtype), "bn.running_mean": torch.randn(8, generator=g).to(dtype),
            "bn.running_var": torch.rand(8, generator=g).to(dtype) + 0.5, "bn.num_batches_tracked": torch.tensor(seed)}


def sharded_folder(path, sd, shards=(("embed.weight",), ("fc.weight", "fc.bias", "bn.running_mean", "bn.running_var",
                                                         "bn.num_batches_tracked"))):
    path.mkdir(parents=True)
    weight_map = {}
    for j, keys in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in keys}, str(path / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text('{"model_type": "toy"}')
    return path


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close(a, b, atol=1e-6) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.allclose(a[k].double(), b[k].double(), atol=atol)
                                        for k in a)


def test_every_layout_reads_the_same_tensors(tmp_path):
    sd = net(1)
    save_file(sd, str(tmp_path / "e.safetensors"))
    torch.save(sd, tmp_path / "e.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "hyper_parameters": {"lr": 0.1}},
               tmp_path / "e.ckpt")
    (tmp_path / "hf").mkdir()
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    sharded_folder(tmp_path / "sharded", sd)
    for path, prefix in (("e.safetensors", None), ("e.pt", None), ("e.ckpt", "model."), ("hf", None), ("bin", None),
                         ("sharded", None)):
        ck = Checkpoint(tmp_path / path, prefix)
        assert same(dict(ck), sd), path


def test_rows_are_read_from_the_file_into_the_callers_buffer(tmp_path):
    sd = net(2)
    save_file(sd, str(tmp_path / "e.safetensors"))
    ck = Checkpoint(tmp_path / "e.safetensors")
    want = sd["embed.weight"][10:20].reshape(-1)
    assert torch.equal(ck.rows("embed.weight", 10, 20), want)
    out = torch.full_like(want, float("nan"))  # a buffer the caller reuses: filled in place
    assert ck.reads_into and ck.rows("embed.weight", 10, 20, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, want) and torch.equal(ck.rows("embed.weight"), sd["embed.weight"].reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_experts_are_averaged_in_float32_and_written_back_in_their_dtype(dtype, tmp_path):
    experts = [net(i, dtype) for i in range(3)]
    out = average(experts)
    assert out["fc.weight"].dtype == dtype
    exact = torch.stack([e["fc.weight"].double() for e in experts]).mean(0)
    assert torch.allclose(out["fc.weight"].double(), exact, atol=float(torch.finfo(dtype).eps) * 4)
    out32 = ame.merge(experts, "soup", dtype="float32")
    assert out32["fc.weight"].dtype == torch.float32 and float((out32["fc.weight"].double() - exact).abs().max()) < 1e-6


def test_folder_in_folder_out_same_sharding_index_and_other_files(tmp_path):
    experts = [sharded_folder(tmp_path / f"e{i}", net(i)) for i in range(3)]
    out = ame.merge(experts, "soup", out=tmp_path / "merged")
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert files == sorted([".ame-merge.json", "README.md", *(p.name for p in experts[0].iterdir())])  # + its card
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((experts[0] / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in net(0).values())
    assert (tmp_path / "merged" / "config.json").read_text() == '{"model_type": "toy"}'
    shard = load_file(str(tmp_path / "merged" / "model-00001-of-00002.safetensors"))
    assert list(shard) == ["embed.weight"]
    soup = average([net(i) for i in range(3)])
    assert close(dict(out), soup) and same(dict(Checkpoint(tmp_path / "merged")), dict(out))


def test_lightning_checkpoint_out_keeps_its_prefix(tmp_path):
    for i in range(2):
        torch.save({"state_dict": {f"model.{k}": v for k, v in net(i).items()}}, tmp_path / f"e{i}.ckpt")
    ame.merge([tmp_path / "e0.ckpt", tmp_path / "e1.ckpt"], "soup", key_prefix="model.", out=tmp_path / "m.ckpt")
    back = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    assert set(back) == {f"model.{k}" for k in net(0)}


def test_streamed_safetensors_output_is_read_by_safetensors(tmp_path):
    sd = {**net(3), "half": torch.randn(7, 3).half(), "odd": torch.randn(5).to(torch.bfloat16)}
    save(sd, tmp_path / "x.safetensors")
    assert same(load_file(str(tmp_path / "x.safetensors")), sd)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.safetensors", "does not exist"),
    (lambda p: (p / "w.npz").write_bytes(b"x") and p / "w.npz", "unknown weight format '.npz'"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no weights found in the folder"),
    (lambda p: (p / "t.safetensors").write_bytes(b"\x10\x00\x00") and p / "t.safetensors", "is not a valid safetensors file"),
])
def test_bad_checkpoints_are_one_clear_line(make, message, tmp_path):
    path = make(tmp_path)
    with pytest.raises(AMEError, match=message) as err:
        Checkpoint(path)
    assert "\n" not in str(err.value)


def test_a_shard_given_as_an_expert_is_refused(tmp_path):
    sharded_folder(tmp_path / "e", net(0))
    with pytest.raises(AMEError, match="one shard of the sharded checkpoint"):
        Checkpoint(tmp_path / "e" / "model-00001-of-00002.safetensors")


def test_prefix_not_found_and_key_mismatch_and_bad_sizes(tmp_path):
    save_file(net(0), str(tmp_path / "a.safetensors"))
    with pytest.raises(AMEError, match="no key starts with key_prefix='model.'"):
        Checkpoint(tmp_path / "a.safetensors", "model.")
    other = net(1)
    other.pop("fc.bias")
    save_file(other, str(tmp_path / "b.safetensors"))
    with pytest.raises(AMEError, match=r"expert 1 \(.*b.safetensors\) does not match the first expert: missing keys \['fc.bias'\]"):
        ExpertPool([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    with pytest.raises(AMEError, match="one positive shard size per expert"):
        ame.merge([net(0), net(1)], "weighted_soup", sizes=[1])


def test_merge_defaults_soup_pivot_without_init_and_finds_buffers(tmp_path):
    experts = [net(i) for i in range(3)]
    lr0 = ame.merge(experts, "ame_sgd", optimizer={"lr": 0.0}, lr_schedule="constant")  # pivot=init → soup
    assert same(lr0, average(experts))
    with pytest.raises(AMEError, match="needs the experts' shared initialisation"):
        ame.merge(experts, "task_arithmetic")
    pool = ExpertPool(experts)
    assert pool.buffers == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}


def test_command_line_merge_of_safetensors_files(tmp_path, root):
    for i in range(3):
        save_file(net(i), str(tmp_path / f"e{i}.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "ame.merge", "aggregator=soup", f"experts.paths={tmp_path}/e*.safetensors",
                           f"out={tmp_path / 'soup.safetensors'}"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert close(load_file(str(tmp_path / "soup.safetensors")), average([net(i) for i in range(3)]))
    assert not list(tmp_path.glob("*.log")) and not (root / "merge.log").exists()
    bad = subprocess.run([sys.executable, "-m", "ame.merge", "aggregator=soup", f"experts.paths=[{tmp_path}/nope]",
                          f"out={tmp_path / 'x.safetensors'}"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: ") and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
