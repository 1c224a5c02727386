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

It streams chunk by chunk like every aggregator. TIES's top-k is global over each task vector, so
its threshold is found first without holding the model: an exact radix selection over the float32
bit patterns of |τ_i| (non-negative floats order like their bits), two streaming passes of
65,536-bin histograms, giving exactly the k-th largest value. DARE's random mask is drawn per
tensor in fixed blocks of 2^20 entries (seeded by seed, expert, key and block), so it does not
depend on the chunk size.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping

import torch
from torch import Tensor

from ame.aggregators.base import Aggregator
from ame.io import Output
from ame.errors import AMEError, require
from ame.pool import INIT, Chunk, ExpertPool

SPARSIFY = ("none", "magnitude", "random")
COMBINE = ("sum", "mean")
BLOCK = 1 << 20  # DARE's mask is drawn in blocks of this many entries of a tensor


def _bits(x: Tensor) -> Tensor:
    """|x| (float32) as its int32 bit pattern, which orders like the value."""
    return x.abs().view(torch.int32)


class TaskVectors(Aggregator):
    needs_init = True

    def __init__(self, scaling: float = 1.0, density: float = 1.0, sparsify: str = "none",
                 sign_election: bool = False, combine: str = "sum", seed: int = 0, name: str = "task_arithmetic",
                 chunk_mb: float = 64):
        super().__init__()
        require(sparsify in SPARSIFY, f"aggregator.sparsify must be one of {SPARSIFY}, got {sparsify!r}")
        require(combine in COMBINE, f"aggregator.combine must be one of {COMBINE}, got {combine!r}")
        require(isinstance(density, (int, float)) and 0 < density <= 1, f"aggregator.density must be in (0, 1], got {density}")
        require(isinstance(scaling, (int, float)), f"aggregator.scaling must be a number, got {scaling!r}")
        require(isinstance(chunk_mb, (int, float)) and not isinstance(chunk_mb, bool) and math.isfinite(chunk_mb)
                and chunk_mb > 0, f"aggregator.chunk_mb must be a finite number > 0 (MB), got {chunk_mb!r}")
        self.scaling, self.density, self.sparsify = float(scaling), float(density), sparsify
        self.sign_election, self.combine, self.seed, self.name = sign_election, combine, seed, name
        self.chunk_bytes = int(chunk_mb * 2**20)

    def pivot(self, pool: ExpertPool) -> dict[str, Tensor]:
        return pool.whole(INIT)

    def _tau(self, pool: ExpertPool, i: int, chunk: Chunk, base: Tensor, out: Tensor) -> Tensor:
        torch.sub(pool.read(i, chunk, out=out), base, out=out)
        return out

    # -- TIES: the global top-k threshold of every task vector, streamed -------------------------
    @staticmethod
    def _buffer_mask(pool: ExpertPool, chunk: Chunk) -> Tensor | None:
        """Which entries of ``chunk`` are float buffers (None: none are)."""
        pieces = [p for p in chunk.pieces if p.key in pool.buffers]
        if not pieces:
            return None
        mask = torch.zeros(chunk.numel, dtype=torch.bool)
        for p in pieces:
            mask[p.lo:p.hi] = True
        return mask

    def thresholds(self, pool: ExpertPool, chunks: list[Chunk]) -> list[tuple[float, float]]:
        """Per expert, the trimming thresholds (parameters, float buffers), each over its own group
        as published TIES does over the parameters: the entries kept are those with
        |τ| ≥ ``kthvalue(size − int(density · size))`` of the group's |τ_i|, so the parameters'
        budget never depends on the normalisation statistics. Exact: a streaming radix selection."""
        groups = [pool.numel(pool.params), pool.numel([k for k in pool.floats if k in pool.buffers])]
        ranks = [[max(1, size - int(size * self.density))] * pool.n for size in groups]
        hist = torch.zeros(2, pool.n, 1 << 16, dtype=torch.int64)

        def split(bits: Tensor, mask: Tensor | None):  # (group, its entries' bit patterns)
            if mask is None:
                return [(0, bits)]
            return [(0, bits[~mask]), (1, bits[mask])]

        for chunk in chunks:  # pass 1: the high 16 bits
            base, mask = pool.read(INIT, chunk), self._buffer_mask(pool, chunk)
            tau = torch.empty_like(base)
            for i in range(pool.n):
                self._tau(pool, i, chunk, base, tau)
                if not torch.isfinite(tau).all():
                    pool.scan(chunk)
                    raise AMEError("the task vectors have NaN/Inf values")
                for g, bits in split(_bits(tau), mask):
                    hist[g, i] += torch.bincount((bits >> 16).long(), minlength=1 << 16)
        high = [[0] * pool.n for _ in groups]
        for g in range(2):
            for i in range(pool.n):
                if not groups[g]:
                    continue
                cum = hist[g, i].cumsum(0)
                b = int(torch.searchsorted(cum, ranks[g][i]))
                high[g][i] = b
                ranks[g][i] -= int(cum[b - 1]) if b > 0 else 0
        hist.zero_()
        for chunk in chunks:  # pass 2: the low 16 bits, among the entries in the chosen high bin
            base, mask = pool.read(INIT, chunk), self._buffer_mask(pool, chunk)
            tau = torch.empty_like(base)
            for i in range(pool.n):
                for g, bits in split(_bits(self._tau(pool, i, chunk, base, tau)), mask):
                    low = bits[(bits >> 16) == high[g][i]] & 0xFFFF
                    hist[g, i] += torch.bincount(low.long(), minlength=1 << 16)
        out = []
        for i in range(pool.n):
            pair = []
            for g in range(2):
                lo = int(torch.searchsorted(hist[g, i].cumsum(0), ranks[g][i])) if groups[g] else 0
                pair.append(float(torch.tensor([(high[g][i] << 16) | lo], dtype=torch.int32).view(torch.float32)))
            out.append((pair[0], pair[1]))
        return out

    def _dare_keep(self, pool: ExpertPool, i: int, chunk: Chunk) -> Tensor:
        keep = torch.empty(chunk.numel, dtype=torch.bool)
        for p in chunk.pieces:
            shape = pool.infos[p.key][0]
            row = 1
            for s in shape[1:]:
                row *= s
            first, last = p.start * row, p.stop * row  # the piece's entries within its tensor
            for block in range(first // BLOCK, (last - 1) // BLOCK + 1 if last > first else first // BLOCK):
                h = hashlib.sha256(f"{self.seed}/{i}/{p.key}/{block}".encode()).digest()
                g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
                a, b = block * BLOCK, min((block + 1) * BLOCK, _numel(shape))
                draw = torch.rand(b - a, generator=g) < self.density
                lo, hi = max(a, first), min(b, last)
                keep[p.lo + lo - first: p.lo + hi - first] = draw[lo - a: hi - a]
        return keep

    def run(self, pool: ExpertPool, out: Output | None = None) -> Mapping[str, Tensor]:
        out = self._begin(pool, out, integers_from=INIT)
        chunks = pool.chunks(self.chunk_bytes)
        try:
            threshold = (self.thresholds(pool, chunks) if self.sparsify == "magnitude" and self.density < 1
                         else None)

            def taus(chunk: Chunk, base: Tensor):
                tau = torch.empty_like(base)
                mask = self._buffer_mask(pool, chunk) if threshold is not None else None
                for i in range(pool.n):
                    self._tau(pool, i, chunk, base, tau)
                    if threshold is not None:
                        params, buffers = threshold[i]
                        limit = params if mask is None else torch.where(mask, buffers, params)
                        tau = torch.where(tau.abs() >= limit, tau, torch.zeros_like(tau))
                    elif self.sparsify == "random" and self.density < 1:
                        tau = torch.where(self._dare_keep(pool, i, chunk), tau / self.density, torch.zeros_like(tau))
                    yield tau

            for chunk in chunks:
                base = pool.read(INIT, chunk)
                elected = None
                if self.sign_election:
                    total = torch.zeros_like(base)
                    for tau in taus(chunk, base):
                        total += tau
                    elected = torch.sign(total)
                total, count = torch.zeros_like(base), torch.zeros_like(base)
                for tau in taus(chunk, base):
                    if elected is not None:
                        tau = torch.where(torch.sign(tau) == elected, tau, torch.zeros_like(tau))
                    total += tau
                    if self.combine == "mean":
                        count += (tau != 0).float()
                merged = total / count.clamp_min(1) if self.combine == "mean" else total
                self._finish_chunk(pool, chunk, base + self.scaling * merged, out,
                                   "the aggregate has NaN/Inf values; lower aggregator.scaling")
        except BaseException:
            out.abort()
            raise
        return self._end(out)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
