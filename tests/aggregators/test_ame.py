"""The aggregation maths: AME-GD is the soup from every pivot; Adam AME matches a hand computation."""
from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence

import pytest
import torch

from ame.aggregators import AME, PIVOTS, average
from ame.errors import AMEError
from ame.experts import Experts
from ame.io import save_state_dict


def max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def sgd(lr=1.0):
    return functools.partial(torch.optim.SGD, lr=lr)


def test_average_is_the_mean_and_copies_integer_buffers(buffers, tiny_experts):
    ex = tiny_experts(3)
    soup = average(ex, buffers=buffers)
    for k in ("layer.weight", "layer.bias", "norm.running_mean"):
        assert torch.allclose(soup[k], torch.stack([e[k] for e in ex]).mean(0), atol=1e-7)
    assert soup["norm.num_batches_tracked"] == ex[0]["norm.num_batches_tracked"]
    assert list(soup) == list(ex[0])


@pytest.mark.parametrize("pivot", PIVOTS)
def test_ame_gd_harmonic_equals_soup_from_every_pivot(pivot, buffers, tiny_experts):
    ex = tiny_experts(5)
    init = tiny_experts(1, seed=99)[0]
    agg = AME(sgd(), pivot=pivot, lr_schedule="harmonic")(ex, [1] * 5, init, buffers)
    assert max_diff(agg, average(ex, buffers=buffers)) <= 1e-6


@pytest.mark.parametrize("pivot", PIVOTS)
def test_pivot_form_constant_lr_one_equals_soup_from_every_pivot(pivot, buffers, tiny_experts):
    ex = tiny_experts(5)
    init = tiny_experts(1, seed=99)[0]
    agg = AME(sgd(), pivot=pivot, pseudogradient="pivot", lr_schedule="constant")(ex, [1] * 5, init, buffers)
    assert max_diff(agg, average(ex, buffers=buffers)) <= 1e-6


def test_harmonic_gd_over_several_epochs_and_shuffled_order_is_still_the_soup(buffers, tiny_experts):
    ex = tiny_experts(4)
    agg = AME(sgd(), epochs=3, pivot="zero", order="shuffle", lr_schedule="harmonic")(ex, [1] * 4, None, buffers)
    assert max_diff(agg, average(ex, buffers=buffers)) <= 1e-6


def test_shard_size_amplification_gives_the_weighted_soup(buffers, tiny_experts):
    ex, sizes = tiny_experts(3), [10, 30, 60]
    agg = AME(sgd(), pivot="first", pseudogradient="pivot", amplification="shard_size")(ex, sizes, None, buffers)
    ref = {k: sum(s * e[k] for s, e in zip(sizes, ex)) / 100 for k in ("layer.weight", "layer.bias")}
    assert max(float((agg[k] - ref[k]).abs().max()) for k in ref) <= 1e-6


def test_weighted_soup_weights_float_buffers_like_parameters(buffers, tiny_experts):
    ex, sizes = tiny_experts(3), [10, 30, 60]
    agg = AME(sgd(), pivot="first", pseudogradient="pivot", amplification="shard_size")(ex, sizes, None, buffers)
    ref = sum(s * e["norm.running_mean"] for s, e in zip(sizes, ex)) / 100
    assert float((agg["norm.running_mean"] - ref).abs().max()) <= 1e-6


def test_optimizer_that_needs_a_closure_is_one_clear_error(buffers, tiny_experts):
    with pytest.raises(AMEError, match="LBFGS.step"):
        AME(functools.partial(torch.optim.LBFGS, lr=1.0), pivot="zero")(tiny_experts(2), [1, 1], None, buffers)


def test_init_that_does_not_match_the_experts_is_refused(tiny_experts):
    init = {"layer.weight": torch.zeros(5, 4), "layer.bias": torch.zeros(5)}
    with pytest.raises(AMEError, match="the initialisation"):
        AME(sgd())(tiny_experts(2, buffers=False), [1, 1], init)


def test_two_step_adam_matches_hand_computation():
    # Two scalar-ish experts, pivot = init, iterate pseudogradient g_k = w - x_k.
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    w0, x1, x2 = [0.5, -1.0], [2.0, -3.0], [-1.0, 4.0]
    experts = [{"w": torch.tensor(x1)}, {"w": torch.tensor(x2)}]
    opt = functools.partial(torch.optim.Adam, lr=lr, betas=(b1, b2), eps=eps)
    out = AME(opt, pivot="init")(experts, [1, 1], {"w": torch.tensor(w0)})["w"]
    for j in range(2):
        w, m, v = w0[j], 0.0, 0.0
        for k, x in enumerate((x1[j], x2[j]), start=1):
            g = w - x
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w - lr * (m / (1 - b1**k)) / (math.sqrt(v / (1 - b2**k)) + eps)
        assert abs(float(out[j]) - w) < 1e-6
    # and an adaptive optimizer does not give the soup
    assert abs(float(out[0]) - 0.5) > 1e-3


def test_shuffle_is_seeded_and_matters_for_adaptive_optimizers(buffers, tiny_experts):
    ex = tiny_experts(6)
    adam = functools.partial(torch.optim.Adam, lr=0.05)
    a = AME(adam, pivot="zero", order="shuffle", seed=1)(ex, [1] * 6, None, buffers)
    b = AME(adam, pivot="zero", order="shuffle", seed=1)(ex, [1] * 6, None, buffers)
    c = AME(adam, pivot="zero", order="fixed")(ex, [1] * 6, None, buffers)
    assert max_diff(a, b) == 0
    assert max_diff(a, c) > 1e-4


def test_lazy_experts_from_files_give_the_same_aggregate(tmp_path, buffers, tiny_experts):
    ex = tiny_experts(3)
    paths = []
    for i, sd in enumerate(ex):
        paths.append(tmp_path / f"e{i}.safetensors")
        save_state_dict(sd, paths[-1])
    adam = functools.partial(torch.optim.Adam, lr=0.01)
    assert max_diff(AME(adam, pivot="soup")(Experts(paths), [1] * 3, None, buffers),
                    AME(adam, pivot="soup")(ex, [1] * 3, None, buffers)) == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.pop("layer.bias"), "missing keys"),
    (lambda sd: sd.__setitem__("extra", torch.zeros(1)), "unexpected keys"),
    (lambda sd: sd.__setitem__("layer.weight", torch.zeros(5, 4)), "(5, 4)"),
    (lambda sd: sd.__setitem__("layer.weight", torch.zeros(5, 3, dtype=torch.float64)), "float64"),
    (lambda sd: sd["layer.bias"].__setitem__(2, float("nan")), "NaN/Inf"),
    (lambda sd: sd["layer.bias"].__setitem__(0, float("inf")), "NaN/Inf"),
    (lambda sd: sd["norm.running_mean"].__setitem__(1, float("nan")), "NaN/Inf values in 'norm.running_mean'"),
])
def test_bad_experts_give_one_clear_error(mutate, message, buffers, tiny_experts):
    ex = tiny_experts(3)
    mutate(ex[2])
    adam = functools.partial(torch.optim.Adam, lr=0.1)
    for agg in (AME(sgd(), pivot="first", lr_schedule="harmonic"), AME(adam, pivot="zero", order="shuffle"),
                lambda e, s, i, b: average(e, buffers=b)):
        with pytest.raises(AMEError, match="expert 2") as err:
            agg(ex, [1] * 3, None, buffers)
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [dict(pivot="middle"), dict(pseudogradient="grad"), dict(order="random"),
                                    dict(lr_schedule="cosine"), dict(epochs=0), dict(amplification=-1.0),
                                    dict(amplification="size")])
def test_bad_aggregator_settings_are_rejected(kwargs):
    with pytest.raises(AMEError, match="aggregator."):
        AME(sgd(), **kwargs)


def test_pivot_init_without_init_says_what_to_do(buffers, tiny_experts):
    with pytest.raises(AMEError, match="needs the experts. shared initialisation \\(pivot=init\\)"):
        AME(sgd())(tiny_experts(2), [1, 1], None, buffers)


def test_diverging_optimizer_is_reported(buffers, tiny_experts):
    with pytest.raises(AMEError, match="diverged"):
        AME(sgd(lr=1e30), pivot="zero", amplification=1e30)(tiny_experts(3), [1] * 3, None, buffers)


class CountingExperts(Sequence):
    """Experts made on access, counting how many are alive at once."""

    def __init__(self, n: int, size: int = 1000):
        self.n, self.size, self.alive, self.peak = n, size, 0, 0

    def __len__(self):
        return self.n

    def _release(self):
        self.alive -= 1

    def __getitem__(self, i):
        w = torch.randn(self.size, generator=torch.Generator().manual_seed(i))
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(w, self._release)
        return {"w": w}


@pytest.mark.parametrize("pivot", ["soup", "first", "zero"])
def test_aggregation_streams_one_expert_at_a_time(pivot):
    experts = CountingExperts(32)
    adam = functools.partial(torch.optim.Adam, lr=0.01)
    out = AME(adam, pivot=pivot, epochs=2, order="shuffle")(experts, [1] * 32)
    soup = average(experts)
    assert experts.peak == 1 and experts.alive == 0
    assert torch.isfinite(out["w"]).all() and soup["w"].shape == (1000,)


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "Adagrad"])
def test_ame_on_cuda_is_the_cpu_result(optimizer, buffers, tiny_experts):
    """The chunk's iterate and optimizer state on the GPU (aggregator.device=cuda): the same AME."""
    ex, init = tiny_experts(4), tiny_experts(1, seed=7)[0]
    opt = functools.partial(getattr(torch.optim, optimizer), lr=0.05)
    cpu = AME(opt, pivot="init")(ex, [1, 2, 3, 4], init, buffers)
    gpu = AME(opt, pivot="init", device="cuda")(ex, [1, 2, 3, 4], init, buffers)
    assert all(v.device.type == "cpu" for v in gpu.values())
    assert max_diff(cpu, gpu) <= 1e-6
