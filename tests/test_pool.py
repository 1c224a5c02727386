"""ame.pool.ExpertPool as a unit: which entries are parameters and which buffers, reads of a chunk
from state dicts and from files (the same float32 vector), whole networks, subsets, the NaN scan,
and one clear error for experts that do not fit together or a model."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ame.errors import AMEError
import ame.pool as pool_module
from ame.pool import INIT, ExpertPool


def net(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 2, generator=g).to(dtype), "conv.bias": torch.randn(4, generator=g).to(dtype),
            "bn.running_mean": torch.randn(4, generator=g).to(dtype), "bn.num_batches_tracked": torch.tensor(7 + seed),
            "head.weight": torch.randn(2, 4, generator=g).to(dtype)}


def test_parameters_buffers_and_counters_are_told_apart():
    pool = ExpertPool([net(0), net(1)])
    assert pool.keys == list(net(0)) and pool.n == 2 and pool.sizes == [1, 1]
    assert pool.buffers == {"bn.running_mean", "bn.num_batches_tracked"}  # statistics by name, integers always
    assert pool.floats == ["conv.weight", "conv.bias", "bn.running_mean", "head.weight"]
    assert pool.params == ["conv.weight", "conv.bias", "head.weight"]
    assert pool.numel() == 24 + 4 + 4 + 8 and pool.numel(["head.weight"]) == 8
    named = ExpertPool([net(0), net(1)], buffers=["conv.bias"])  # given names replace the guess (integers stay)
    assert named.buffers == {"conv.bias", "bn.num_batches_tracked"}


def gather(pool: ExpertPool, i: int, max_bytes: int) -> dict[str, torch.Tensor]:
    """Expert ``i``'s float entries put back together from its reads, chunk by chunk."""
    out = {k: torch.full((pool.numel([k]),), float("nan")) for k in pool.floats}
    for chunk in pool.chunks(max_bytes):
        x = pool.read(i, chunk)
        assert x.shape == (chunk.numel,) and chunk.numel <= max(max_bytes // 4, 6)  # one row over at most
        for p in chunk.pieces:
            row = pool.numel([p.key]) // (pool.infos[p.key][0][0] if pool.infos[p.key][0] else 1)
            out[p.key][p.start * row:p.stop * row] = x[p.lo:p.hi]
    return out


@pytest.mark.parametrize("max_bytes", [4, 24, 64, 10**6])
def test_chunked_reads_give_every_float_entry_from_state_dicts_and_from_files(max_bytes, tmp_path):
    experts, init = [net(i) for i in range(3)], net(9)
    for i, sd in enumerate(experts):
        save_file(sd, str(tmp_path / f"e{i}.safetensors"))
    on_disk = ExpertPool(sorted(tmp_path.glob("e*.safetensors")), init=init)  # keys in the file's order
    for pool in (ExpertPool(experts, init=init), on_disk):
        for i, sd in [*enumerate(experts), (INIT, init)]:
            got = gather(pool, i, max_bytes)
            assert got.keys() == {k for k, v in sd.items() if v.is_floating_point()}
            assert all(torch.equal(got[k], sd[k].reshape(-1)) for k in got)


def test_half_precision_files_are_read_as_float32_and_keep_their_dtype_for_the_output(tmp_path):
    sd = net(0, torch.float16)
    save_file(sd, str(tmp_path / "e.safetensors"))
    pool = ExpertPool([tmp_path / "e.safetensors"])
    got = gather(pool, 0, 10**6)
    assert all(v.dtype == torch.float32 and torch.equal(v, sd[k].float().reshape(-1)) for k, v in got.items())
    assert pool.out_dtype("conv.weight") == torch.float16 and pool.out_dtype("bn.num_batches_tracked") == torch.int64
    assert ExpertPool([tmp_path / "e.safetensors"], dtype="float32").out_dtype("conv.weight") == torch.float32


def test_whole_gives_copies_and_subset_keeps_init_sizes_and_buffers():
    experts, init = [net(i) for i in range(4)], net(9)
    pool = ExpertPool(experts, sizes=[1, 2, 3, 4], init=init, buffers=["bn.running_mean"], names=list("abcd"))
    w = pool.whole(2)
    assert w.keys() == experts[2].keys() and all(torch.equal(w[k], experts[2][k]) for k in w)
    w["conv.weight"].zero_()
    assert not torch.equal(experts[2]["conv.weight"], w["conv.weight"])  # a copy: the expert is untouched
    assert torch.equal(pool.whole(INIT, ["head.weight"])["head.weight"], init["head.weight"])
    sub = pool.subset([3, 1])
    assert sub.n == 2 and sub.sizes == [4, 2] and sub.names == ["d", "b"] and sub.buffers == pool.buffers
    assert torch.equal(sub.whole(0)["conv.bias"], experts[3]["conv.bias"])
    assert torch.equal(sub.whole(INIT)["conv.bias"], init["conv.bias"])


def test_scan_names_the_first_expert_with_nan_or_inf():
    experts = [net(i) for i in range(3)]
    experts[2]["head.weight"][1, 0] = float("inf")
    pool = ExpertPool(experts, names=["a.pt", "b.pt", "c.pt"])
    chunks = pool.chunks(10**6)
    with pytest.raises(AMEError, match=r"expert 2 \(c.pt\) has NaN/Inf values in 'head.weight'"):
        pool.scan(chunks[0])
    pool.scan(chunks[0], which=[0, 1])  # the others are finite


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("head.weight"), "expert 1 does not match the first expert: missing keys ['head.weight']"),
    (lambda sd: sd.update({"head.weight": torch.zeros(3, 4)}), "expert 1 does not match the first expert at 'head.weight'"),
    (lambda sd: sd.update({"conv.bias": sd["conv.bias"].double()}), "at 'conv.bias'"),
])
def test_experts_that_do_not_fit_together_are_one_clear_error(change, message):
    other = net(1)
    change(other)
    with pytest.raises(AMEError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as err:
        ExpertPool([net(0), other])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sizes=[1]), "need one positive shard size per expert"),
    (dict(sizes=[1, 0]), "need one positive shard size per expert"),
    (dict(names=["a"]), "need one name per expert"),
    (dict(dtype="int8"), "is not a floating torch dtype"),
])
def test_bad_sizes_names_and_dtype_are_one_clear_error(kwargs, message):
    with pytest.raises(AMEError, match=message):
        ExpertPool([net(0), net(1)], **kwargs)
    with pytest.raises(AMEError, match="no experts to aggregate"):
        ExpertPool([])


def test_check_against_a_model_names_the_first_difference():
    pool = ExpertPool([net(0), net(1)], init=net(2))
    model = {k: (tuple(v.shape), v.dtype) for k, v in net(0).items()}
    pool.check_against(model, "model=X")  # fits
    wider = {**model, "head.weight": ((3, 4), torch.float32)}
    with pytest.raises(AMEError, match=r"expert 0 does not match model=X at 'head.weight': \(2, 4\) vs \(3, 4\)"):
        pool.check_against(wider, "model=X")
    with pytest.raises(AMEError, match=r"missing keys \['extra'\]"):
        pool.check_against({**model, "extra": ((1,), torch.float32)}, "model=X")


def test_a_lazy_sequence_is_read_on_access_and_checked_like_the_others():
    made = []

    class Lazy(list):
        def __getitem__(self, i):
            made.append(i)
            return net(0) if i == 0 else {k: v for k, v in net(i).items() if k != "conv.bias"}

    pool = ExpertPool(Lazy([None, None]))  # a sequence that makes state dicts on access
    assert made == [0]  # the first one, for the layout
    with pytest.raises(AMEError, match="expert 1 does not match the first expert: missing keys"):
        pool.read(1, pool.chunks(10**6)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("from_files", [True, False])
def test_blocked_add_equals_read_then_add_exactly(dtype, from_files, tmp_path, monkeypatch):
    monkeypatch.setattr(pool_module, "ADD_BLOCK", 5)  # blocks that cut tensors and runs of tensors
    experts, init = [net(i, dtype) for i in range(2)], net(9, dtype)
    if from_files:
        for i, sd in enumerate(experts):
            save_file(sd, str(tmp_path / f"e{i}.safetensors"))
        experts = sorted(tmp_path.glob("e*.safetensors"))
    pool = ExpertPool(experts, init=init)
    for chunk in pool.chunks(64):
        base = pool.read(INIT, chunk)
        for acc in (torch.float32, torch.float64):
            start = torch.randn(chunk.numel, generator=torch.Generator().manual_seed(chunk.numel)).to(acc)
            x = pool.read(1, chunk).to(acc)
            assert torch.equal(pool.add_to(start.clone(), 1, chunk, 0.3), start.clone().add_(x, alpha=0.3))
            assert torch.equal(pool.add_to(start.clone(), 1, chunk, 2.0, less=base.to(acc)),
                               start.clone().add_(x - base.to(acc), alpha=2.0))
