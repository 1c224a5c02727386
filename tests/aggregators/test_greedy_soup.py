"""Greedy soup (Wortsman et al., 2022): ingredients in order of their own validation score, each kept
only if the soup's score does not drop; the score is the one data-using part, passed in."""
from __future__ import annotations

import pytest
import torch

from ame.aggregators import average
from ame.errors import AMEError


def max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_greedy_soup_never_adds_an_ingredient_that_lowers_validation_accuracy():
    from ame.aggregators import GreedySoup

    values = [1.0, -1.0, 5.0, 0.5]  # "accuracy" = −|w|: the best ingredient alone is 0.5
    experts = [{"w": torch.tensor([v])} for v in values]
    greedy = GreedySoup()
    out = greedy(experts, [1] * 4, score=lambda sd: -abs(float(sd["w"][0])))
    # 0.5 first; +1.0 → mean 0.75 (worse, rejected); −1.0 → mean −0.25 (better, kept); +5.0 → 1.5 (rejected)
    assert greedy.info["chosen"] == [1, 3] and torch.allclose(out["w"], torch.tensor([-0.25]))
    best = -float("inf")
    for step in greedy.info["tried"]:
        assert step["added"] == (step["val_acc"] >= best)
        best = max(best, step["val_acc"]) if step["added"] else best
    assert not greedy.data_free


def test_greedy_soup_without_validation_data_says_what_to_set(tiny_experts):
    from ame.aggregators import GreedySoup

    with pytest.raises(AMEError, match="data.val_size"):
        GreedySoup()(tiny_experts(2), [1, 1])


def test_greedy_soup_reads_each_expert_twice_at_most_and_returns_the_soup_of_the_chosen(monkeypatch, buffers,
                                                                                        tiny_experts):
    from ame.aggregators import GreedySoup
    from ame.pool import ExpertPool

    reads = []  # expert reads, whole or by chunk (the soup of a subset reads by chunk)
    whole, read = ExpertPool.whole, ExpertPool.read
    monkeypatch.setattr(ExpertPool, "whole", lambda self, i, keys=None: reads.append(i) or whole(self, i, keys))
    monkeypatch.setattr(ExpertPool, "read", lambda self, i, chunk, *a, **k: reads.append(i) or read(self, i, chunk, *a, **k))
    experts = tiny_experts(8)
    target = average(experts[2:5], buffers=buffers)  # the score prefers networks near this soup
    greedy = GreedySoup()
    out = greedy(experts, [1] * 8, buffers=buffers, score=lambda sd: -float((sd["layer.weight"] - target["layer.weight"]).norm()))
    chosen = greedy.info["chosen"]
    # a running sum: N reads to score them alone, N − 1 candidates, the chosen soup written once: linear
    # (re-averaging every candidate soup from the files took 55 reads here)
    assert len(reads) <= 4 * 8
    assert max_diff(out, average([experts[i] for i in chosen], buffers=buffers)) < 1e-6
