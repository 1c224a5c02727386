"""Task-vector merging: task arithmetic, TIES-merging and DARE, one family.

Each expert is read as a task vector τ_i = x_i − base from the shared base (the experts'
initialisation, or a given ``experts.init``). A merge sparsifies each τ_i (``magnitude``: keep
the top ``density`` fraction by |value|, as TIES trims; ``random``: keep each entry with
probability ``density`` and rescale by 1/density, as DARE drops), optionally elects a sign per
entry (TIES: the sign of Σ_i τ_i), combines (``sum``, or ``mean`` over the experts that are
non-zero and agree with the elected sign), and returns base + ``scaling`` · combined.

    task_arithmetic: sparsify=none,      sign_election=false, combine=sum
    ties:            sparsify=magnitude, sign_election=true,  combine=mean
    dare:            sparsify=random,    sign_election=false, combine=sum

Like every aggregator here it sees weights only, and streams: one expert is held at a time (TIES
reads the experts twice). Float buffers are averaged; integer buffers come from the first expert.
"""
from __future__ import annotations

from typing import Collection, Sequence

import torch
from torch import Tensor

from ame.aggregate import FlatSpec, _name
from ame.errors import require
from ame.io import StateDict

SPARSIFY = ("none", "magnitude", "random")
COMBINE = ("sum", "mean")


class TaskVectors:
    data_free = True

    def __init__(self, scaling: float = 1.0, density: float = 1.0, sparsify: str = "none",
                 sign_election: bool = False, combine: str = "sum", seed: int = 0, name: str = "task_arithmetic"):
        require(sparsify in SPARSIFY, f"aggregator.sparsify must be one of {SPARSIFY}, got {sparsify!r}")
        require(combine in COMBINE, f"aggregator.combine must be one of {COMBINE}, got {combine!r}")
        require(0 < density <= 1, f"aggregator.density must be in (0, 1], got {density}")
        require(isinstance(scaling, (int, float)), f"aggregator.scaling must be a number, got {scaling!r}")
        self.scaling, self.density, self.sparsify = float(scaling), float(density), sparsify
        self.sign_election, self.combine, self.seed, self.name = sign_election, combine, seed, name
        self.pivot_kind = "init"  # the base is the shared initialisation: required, like AME's pivot=init

    def pivot(self, experts: Sequence[StateDict], init: StateDict | None, buffers: Collection[str] = ()) -> StateDict:
        require(init is not None, f"aggregator={self.name} needs the experts' shared base (train.init=shared|warm, "
                "or experts.init=<file>)")
        return FlatSpec.of(experts[0], buffers).check(init, "the base (initialisation)")

    def task_vector(self, spec: FlatSpec, base: Tensor, sd: StateDict, i: int, name: str) -> Tensor:
        tau = spec.flatten(spec.check(sd, name)) - base
        if self.sparsify == "magnitude" and self.density < 1:
            k = max(1, int(round(self.density * tau.numel())))
            threshold = tau.abs().kthvalue(tau.numel() - k + 1).values
            tau = torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))
        elif self.sparsify == "random" and self.density < 1:
            keep = torch.rand(tau.shape, generator=torch.Generator().manual_seed(self.seed * 100_003 + i)) < self.density
            tau = torch.where(keep, tau / self.density, torch.zeros_like(tau))
        return tau

    def __call__(self, experts: Sequence[StateDict], sizes: Sequence[int], init: StateDict | None = None,
                 buffers: Collection[str] = ()) -> StateDict:
        n = len(experts)
        require(n > 0, "no experts to aggregate; check experts.paths or data.shards.num_shards")
        spec = FlatSpec.of(experts[0], buffers)
        base = spec.flatten(self.pivot(experts, init, buffers))
        copied = {k: experts[0][k].clone() for k in spec.copied}
        averaged = torch.zeros(sum(spec.reference[k].numel() for k in spec.averaged), dtype=torch.float64)

        def taus(buffers_too: bool = False):
            for i in range(n):
                sd = experts[i]
                if buffers_too:  # float buffers (BatchNorm statistics): their plain mean, as in the soup
                    averaged.add_((1.0 / n) * spec.flatten(sd, spec.averaged).double())
                yield self.task_vector(spec, base, sd, i, _name(experts, i))

        elected = None
        if self.sign_election:
            elected = torch.sign(sum(taus()))
        total, count = torch.zeros_like(base), torch.zeros_like(base)
        for tau in taus(buffers_too=True):
            if elected is not None:
                tau = torch.where(torch.sign(tau) == elected, tau, torch.zeros_like(tau))
            total += tau
            count += (tau != 0).float()
        merged = total / count.clamp_min(1) if self.combine == "mean" else total
        out = {**spec.unflatten(averaged, spec.averaged), **copied, **spec.unflatten(base + self.scaling * merged)}
        return {k: out[k] for k in spec.reference}
