"""Task arithmetic, TIES and DARE against hand computations on tiny tensors."""
from __future__ import annotations

import pytest
import torch

from ame.aggregators import average
from ame.errors import AMEError
from ame.aggregators import TaskVectors

BASE = torch.ones(4)
TAUS = [torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([2.0, -4.0, 1.0, 0.2]), torch.tensor([-2.0, 0.1, 0.1, 0.5])]
EXPERTS = [{"w": BASE + t} for t in TAUS]


def test_task_arithmetic_is_base_plus_scaled_sum():
    out = TaskVectors(scaling=0.5)(EXPERTS, [1, 1, 1], {"w": BASE})["w"]
    assert torch.allclose(out, BASE + 0.5 * sum(TAUS))


def test_task_arithmetic_with_one_over_n_is_the_soup(buffers, tiny_experts):
    ex, init = tiny_experts(4), tiny_experts(1, seed=5)[0]
    out = TaskVectors(scaling=0.25)(ex, [1] * 4, init, buffers)
    soup = average(ex, buffers=buffers)
    assert all(torch.allclose(out[k].float(), soup[k].float(), atol=1e-6) for k in soup)


def test_ties_trims_elects_signs_and_averages_agreeing_entries():
    # published TIES keeps |τ| ≥ the (d − int(d·density))-th smallest |τ|: at density 0.25 of d = 4, the top 2
    # trimmed: [3,0,0,-2], [2,-4,0,0], [-2,0,0,0.5]; elected signs: [+,-,0,-];
    # agreeing entries: expert 1 → [3,0,0,-2], expert 2 → [2,-4,0,0], expert 3 → none
    out = TaskVectors(scaling=1.0, density=0.25, sparsify="magnitude", sign_election=True, combine="mean")(
        EXPERTS, [1, 1, 1], {"w": BASE})["w"]
    assert torch.allclose(out, BASE + torch.tensor([2.5, -4.0, 0.0, -2.0]))


def test_dare_keeps_rescaled_entries_or_drops_them_reproducibly():
    dare = TaskVectors(scaling=1.0, density=0.5, sparsify="random", seed=3)
    big = [{"w": torch.full((1000,), 2.0)}]
    out = dare(big, [1], {"w": torch.zeros(1000)})["w"]
    assert set(out.unique().tolist()) == {0.0, 4.0}  # dropped, or kept × 1/density
    assert 400 < int((out > 0).sum()) < 600
    assert torch.equal(out, dare(big, [1], {"w": torch.zeros(1000)})["w"])
    assert torch.allclose(TaskVectors(density=1.0, sparsify="random")(EXPERTS, [1] * 3, {"w": BASE})["w"],
                          BASE + sum(TAUS))


def test_task_vectors_need_a_base_and_sane_settings():
    with pytest.raises(AMEError, match="needs the experts' shared initialisation, but none was given"):
        TaskVectors()(EXPERTS, [1, 1, 1], None)
    with pytest.raises(AMEError, match="density"):
        TaskVectors(density=0.0)
    with pytest.raises(AMEError, match="sparsify"):
        TaskVectors(sparsify="topk")


def _bn_net(seed: int) -> dict[str, torch.Tensor]:
    """A conv → BatchNorm → linear network's state dict, its BatchNorm statistics far from its weights'
    scale (as trained statistics are), so a shared top-k budget would be spent on them."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 5))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["1.running_mean"] = torch.randn(8) * 5
    sd["1.running_var"] = torch.rand(8) * 20 + 1
    sd["1.num_batches_tracked"] = torch.tensor(100 + seed)
    return sd


def _published_ties(experts, base, density, scaling, keys):
    """TIES as published (Yadav et al. 2023, and FusionBench's ``ties_merging``), written out here on the
    flattened task vectors of ``keys``: trim to |τ| ≥ the (d − int(d·density))-th smallest |τ|, elect
    the sign of the sum, average the entries that agree."""
    flat = lambda sd: torch.cat([sd[k].reshape(-1).float() for k in keys])  # noqa: E731
    taus = torch.stack([flat(e) - flat(base) for e in experts])
    d = taus.shape[1]
    kth = taus.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    taus = taus * (taus.abs() >= kth)
    sign = torch.sign(taus.sum(0))
    keep = torch.where(sign > 0, taus > 0, taus < 0)
    merged = (taus * keep).sum(0) / keep.sum(0).clamp_min(1)
    vec, out, o = flat(base) + scaling * merged, {}, 0
    for k in keys:
        out[k] = vec[o:o + base[k].numel()].reshape(base[k].shape)
        o += base[k].numel()
    return out


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5])
def test_ties_on_a_batchnorm_model_trims_the_parameters_exactly_as_published(density):
    base, experts = _bn_net(0), [_bn_net(s) for s in (1, 2, 3)]
    buffers = [k for k in base if "running" in k or "num_batches" in k]
    params = [k for k in base if k not in buffers]
    ties = TaskVectors(scaling=1.0, density=density, sparsify="magnitude", sign_election=True, combine="mean",
                       name="ties")
    out = ties(experts, None, base, buffers)
    ref = _published_ties(experts, base, density, 1.0, params)
    assert max(float((out[k] - ref[k]).abs().max()) for k in params) <= 1e-6
    # the statistics get the same rule with their own budget, so they never change which weights are kept
    stats = [k for k in buffers if base[k].is_floating_point()]
    assert all(torch.allclose(out[k], _published_ties(experts, base, density, 1.0, stats)[k]) for k in stats)
    for e in experts:
        e["1.running_var"] = e["1.running_var"] * 1000
    again = ties(experts, None, base, buffers)
    assert all(torch.equal(out[k], again[k]) for k in params)
    assert torch.equal(out["1.num_batches_tracked"], base["1.num_batches_tracked"])


def _magnitudes(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """n non-negative values: spread out, heavily duplicated, all equal, or all zero but ten."""
    if kind == "normal":
        return torch.randn(n, generator=gen).abs()
    if kind == "ties":
        return torch.randint(0, 7, (n,), generator=gen).float()
    if kind == "constant":
        return torch.full((n,), 0.5)
    return torch.cat([torch.zeros(n - 10), torch.rand(10, generator=gen)])


@pytest.mark.parametrize("kind", ["normal", "ties", "constant", "skewed"])
def test_top_k_keeps_exactly_k_the_first_of_the_ties(kind):
    """top_k's threshold and left-out positions keep exactly the k largest |x| (a stable descending
    sort's first k: among tied entries the first in index order), whatever the duplicates."""
    from ame.aggregators.task_vectors import top_k

    gen = torch.Generator().manual_seed(2)
    n = 300_001
    a = _magnitudes(kind, n, gen)
    x = a * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    for k in (1, 7, n // 5, n // 2, n - 1, n):
        ref = torch.zeros(n)
        ref[torch.argsort(a, descending=True, stable=True)[:k]] = 1
        t, drop = top_k(a, k)
        ours = x * (a >= t)
        if drop is not None:
            ours[drop] = 0
        assert torch.equal(ours, x * ref), (kind, k)


@pytest.mark.parametrize("kind", ["normal", "ties", "constant", "skewed"])
def test_kth_smallest_is_exactly_kthvalue(kind):
    """The sampled bracket gives kthvalue's answer at every rank tried, also where the sample
    cannot bracket (all equal, heavy duplicates) and at the ends."""
    from ame.aggregators.task_vectors import kth_smallest

    gen = torch.Generator().manual_seed(1)
    n = 300_001
    a = _magnitudes(kind, n, gen)
    for r in (1, 2, n // 5, n // 2, n - n // 5 + 1, n - 11, n - 1, n):
        assert kth_smallest(a, r) == float(a.kthvalue(r).values), (kind, r)
