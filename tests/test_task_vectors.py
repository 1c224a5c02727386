"""Task arithmetic, TIES and DARE against hand computations on tiny tensors."""
from __future__ import annotations

import pytest
import torch

from ame.aggregators import average
from ame.errors import AMEError
from ame.aggregators import TaskVectors
from tests.conftest import BUFFERS, tiny_experts

BASE = torch.ones(4)
TAUS = [torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([2.0, -4.0, 1.0, 0.2]), torch.tensor([-2.0, 0.1, 0.1, 0.5])]
EXPERTS = [{"w": BASE + t} for t in TAUS]


def test_task_arithmetic_is_base_plus_scaled_sum():
    out = TaskVectors(scaling=0.5)(EXPERTS, [1, 1, 1], {"w": BASE})["w"]
    assert torch.allclose(out, BASE + 0.5 * sum(TAUS))


def test_task_arithmetic_with_one_over_n_is_the_soup():
    ex, init = tiny_experts(4), tiny_experts(1, seed=5)[0]
    out = TaskVectors(scaling=0.25)(ex, [1] * 4, init, BUFFERS)
    soup = average(ex, buffers=BUFFERS)
    assert all(torch.allclose(out[k].float(), soup[k].float(), atol=1e-6) for k in soup)


def test_ties_trims_elects_signs_and_averages_agreeing_entries():
    # trimmed (top 2 of 4 by |τ|): [3,0,0,-2], [2,-4,0,0], [-2,0,0,0.5]; elected signs: [+,-,0,-];
    # agreeing entries: expert 1 → [3,0,0,-2], expert 2 → [2,-4,0,0], expert 3 → none
    out = TaskVectors(scaling=1.0, density=0.5, sparsify="magnitude", sign_election=True, combine="mean")(
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
    with pytest.raises(AMEError, match="needs the experts' shared base"):
        TaskVectors()(EXPERTS, [1, 1, 1], None)
    with pytest.raises(AMEError, match="density"):
        TaskVectors(density=0.0)
    with pytest.raises(AMEError, match="sparsify"):
        TaskVectors(sparsify="topk")
