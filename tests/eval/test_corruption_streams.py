"""A corruption's random stream is keyed by its name: inserting or reordering corruptions changes no
other corruption's draws (``ame.eval.corruptions.stream_seed``)."""
from __future__ import annotations

import torch

import ame.eval.corruptions as C


def test_a_corruptions_draws_do_not_depend_on_its_place_in_the_list(monkeypatch):
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = {n: C.corrupt(x, n, 3, seed=1) for n in ("gaussian_noise", "spatter")}
    monkeypatch.setattr(C, "CORRUPTIONS", dict(reversed(list(C.CORRUPTIONS.items()))))  # every index changes
    for name, out in before.items():
        assert torch.equal(C.corrupt(x, name, 3, seed=1), out), name


def test_streams_differ_by_name_severity_and_seed():
    seeds = {C.stream_seed(seed, name, s) for seed in (0, 1) for name in C.CORRUPTIONS for s in range(1, 6)}
    assert len(seeds) == 2 * len(C.CORRUPTIONS) * 5
    assert all(0 <= v < 2**63 for v in seeds)
