"""Streaming is exact: any chunk size (down to rows of one tensor) gives the whole-model result,
and TIES's streamed top-k threshold is the in-memory k-th value."""
from __future__ import annotations

import functools

import pytest
import torch

from ame.aggregators import AME, TaskVectors
from ame.pool import ExpertPool


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(13, 7, generator=g), "a.bias": torch.randn(13, generator=g),
            "b.weight": torch.randn(3, 5, 2, generator=g), "c": torch.randn((), generator=g),
            "count": torch.tensor(seed)}


EXPERTS = [model(i) for i in range(5)]
INIT = model(99)
TINY = 40 / 2**20  # chunk_mb: 10 floats, so tensors are cut into rows


def max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_chunks_cover_every_float_entry_once():
    pool = ExpertPool(EXPERTS)
    for max_bytes in (4, 40, 100, 10**9):
        seen = {k: torch.zeros(v.numel()) for k, v in EXPERTS[0].items() if v.is_floating_point()}
        for chunk in pool.chunks(max_bytes):
            assert chunk.numel <= max(max_bytes // 4, 7 * 2)  # at most one over-long row
            for p in chunk.pieces:
                row = EXPERTS[0][p.key][0].numel() if EXPERTS[0][p.key].dim() else 1
                seen[p.key][p.start * row:p.stop * row] += 1
                assert p.hi - p.lo == (p.stop - p.start) * row
        assert all(bool((s == 1).all()) for s in seen.values())


@pytest.mark.parametrize("kwargs", [dict(pivot="init"), dict(pivot="soup", order="shuffle", epochs=2),
                                    dict(pivot="first", pseudogradient="pivot", amplification="shard_size")])
def test_ame_adam_is_the_same_for_every_chunk_size(kwargs):
    adam = functools.partial(torch.optim.Adam, lr=0.05)
    whole = AME(adam, **kwargs)(EXPERTS, [1, 2, 3, 4, 5], INIT)
    cut = AME(adam, chunk_mb=TINY, **kwargs)(EXPERTS, [1, 2, 3, 4, 5], INIT)
    assert max_diff(whole, cut) <= 1e-6  # the same maths; vector and scalar tails of a kernel may differ by an ulp


def ties_reference(experts, base, density, scaling):
    """TIES on whole flattened task vectors, as published (Yadav et al. 2023; their code's
    ``topk_values_mask``: keep |τ| ≥ the (d − int(d·density))-th smallest), in memory."""
    keys = [k for k in base if base[k].is_floating_point()]
    flat = lambda sd: torch.cat([sd[k].reshape(-1).float() for k in keys])  # noqa: E731
    taus = [flat(e) - flat(base) for e in experts]
    d = taus[0].numel()
    trimmed = [torch.where(t.abs() >= t.abs().kthvalue(d - int(d * density)).values, t, torch.zeros_like(t))
               for t in taus]
    sign = torch.sign(sum(trimmed))
    agree = [torch.where(torch.sign(t) == sign, t, torch.zeros_like(t)) for t in trimmed]
    merged = sum(agree) / torch.stack([(a != 0).float() for a in agree]).sum(0).clamp_min(1)
    out, vec, o = {}, flat(base) + scaling * merged, 0
    for key in keys:
        out[key] = vec[o:o + base[key].numel()].reshape(base[key].shape)
        o += base[key].numel()
    return out


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_ties_streamed_threshold_matches_the_in_memory_top_k(density):
    ties = TaskVectors(scaling=1.0, density=density, sparsify="magnitude", sign_election=True, combine="mean",
                       chunk_mb=TINY)
    out = ties(EXPERTS, None, INIT)
    ref = ties_reference(EXPERTS, INIT, density, 1.0)
    assert max(float((out[k] - ref[k]).abs().max()) for k in ref) <= 1e-6
    pool = ExpertPool(EXPERTS, init=INIT)
    flat = lambda sd: torch.cat([sd[k].reshape(-1) for k in pool.floats])  # noqa: E731
    d = pool.numel()
    exact = [(float((flat(e) - flat(INIT)).abs().kthvalue(d - int(d * density)).values), 0.0) for e in EXPERTS]
    assert ties.thresholds(pool, pool.chunks(40)) == exact  # (parameters, float buffers: none here)


def test_dare_masks_do_not_depend_on_the_chunk_size():
    dare = dict(scaling=1.0, density=0.5, sparsify="random", seed=3)
    assert max_diff(TaskVectors(**dare)(EXPERTS, None, INIT), TaskVectors(**dare, chunk_mb=TINY)(EXPERTS, None, INIT)) <= 1e-6
