"""Issue 15: normalisation statistics follow the weights (float buffers are treated as parameters by
every aggregator; integer counters come from the pivot network)."""
from __future__ import annotations

import functools

import pytest
import torch

from ame.aggregators import AME, TaskVectors, average


def with_var(sds):
    g = torch.Generator().manual_seed(5)
    for sd in sds:
        sd["norm.running_var"] = torch.rand(5, generator=g) + 0.1
    return sds


@pytest.fixture(scope="module")
def nets(tiny_experts, buffers):
    """Four experts and an init with a running variance too, and every buffer's name."""
    experts = with_var(tiny_experts(4))
    init = with_var(tiny_experts(1, seed=9))[0]
    init["norm.num_batches_tracked"] = torch.tensor(1234)
    return experts, init, (*buffers, "norm.running_var")


def equal(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam, torch.optim.Adagrad])
@pytest.mark.parametrize("pivot", ["init", "first"])
def test_ame_with_learning_rate_zero_returns_the_pivot_network_exactly(optimizer, pivot, nets):
    EXPERTS, INIT, ALL_BUFFERS = nets
    agg = AME(functools.partial(optimizer, lr=0.0), pivot=pivot, epochs=2, order="shuffle")
    out = agg(EXPERTS, [1, 2, 3, 4], INIT, ALL_BUFFERS)
    assert equal(out, INIT if pivot == "init" else EXPERTS[0])  # weights, statistics and counters


def test_ame_gd_one_over_k_is_the_soup_statistics_included(nets):
    EXPERTS, INIT, ALL_BUFFERS = nets
    out = AME(functools.partial(torch.optim.SGD, lr=1.0), pivot="init", lr_schedule="harmonic")(
        EXPERTS, [1] * 4, INIT, ALL_BUFFERS)
    soup = average(EXPERTS, buffers=ALL_BUFFERS)
    for k in ("norm.running_mean", "norm.running_var"):
        assert torch.allclose(out[k], torch.stack([e[k] for e in EXPERTS]).mean(0), atol=1e-6)
        assert torch.allclose(out[k], soup[k], atol=1e-6)


def test_task_arithmetic_with_zero_scaling_returns_the_init_exactly(nets):
    EXPERTS, INIT, ALL_BUFFERS = nets
    for kind in (dict(), dict(density=0.3, sparsify="magnitude", sign_election=True, combine="mean"),
                 dict(density=0.5, sparsify="random")):
        assert equal(TaskVectors(scaling=0.0, **kind)(EXPERTS, None, INIT, ALL_BUFFERS), INIT)


def test_statistics_take_the_same_step_as_the_weights(nets):
    """Adam from the init: each statistic moves exactly as a parameter with the same values would."""
    EXPERTS, INIT, ALL_BUFFERS = nets
    agg = AME(functools.partial(torch.optim.Adam, lr=0.1), pivot="init")
    out = agg(EXPERTS, [1] * 4, INIT, ALL_BUFFERS)
    as_param = agg([{"w": e["norm.running_mean"]} for e in EXPERTS], [1] * 4, {"w": INIT["norm.running_mean"]})
    assert torch.equal(out["norm.running_mean"], as_param["w"])
    assert out["norm.num_batches_tracked"] == INIT["norm.num_batches_tracked"]


def test_a_running_variance_driven_below_zero_is_clamped_to_the_experts_smallest(caplog):
    experts = [{"bn.running_var": torch.tensor([1.0, 0.01]), "w": torch.tensor([1.0])},
               {"bn.running_var": torch.tensor([2.0, 0.02]), "w": torch.tensor([2.0])}]
    base = {"bn.running_var": torch.tensor([1.0, 0.5]), "w": torch.tensor([0.0])}
    ta = TaskVectors(scaling=2.0)  # base + 2 Σ τ: 0.5 + 2 (−0.49 − 0.48) < 0
    out = ta(experts, None, base)
    assert torch.equal(out["bn.running_var"], torch.tensor([1.0 + 2 * (0.0 + 1.0), 0.01]))
    assert ta.info["clamped_running_var"] == 1 and "clamped" in caplog.text
