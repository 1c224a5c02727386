"""Task-vector merging: task arithmetic, TIES-merging and DARE, one family.

Each expert is read as a task vector τ_i = x_i − base from the shared base (the experts'
initialisation, or a given ``experts.init``), weighted by w_i (``weights``, default 1). A merge
sparsifies each τ_i (``magnitude``: keep the top ``density`` fraction by |value|, as TIES trims;
``random``: keep each entry with probability ``density`` and rescale, as DARE drops), optionally
elects a sign per entry (TIES: the sign of Σ_i w_i τ_i), combines (``sum``, or ``mean``: Σ w_i τ_i
over the experts that are non-zero and agree with the elected sign, divided by their Σ w_i; with
``normalize``, a sum is divided by Σ w_i), and returns base + ``scaling`` · combined.

    task_arithmetic: sparsify=none,      sign_election=false, combine=sum
    ties:            sparsify=magnitude, sign_election=true,  combine=mean
    dare:            sparsify=random,    sign_election=false, combine=sum

Two conventions, each exact:

- **published** (the default; Yadav et al. 2023, FusionBench): ``trim=global``, one top-k budget
  over each task vector's parameters (|τ| ≥ the (d − ⌊d·density⌋)-th smallest: every entry tied
  with it is kept, as the authors' code keeps them), the float buffers
  with a budget of their own; an exact tie in the elected sign keeps 0 (``zero_sign=zero``); DARE
  rescales kept entries by 1/density (``rescale=inverse``).
- **mergekit** (what ``python -m ame.merge recipe=...`` uses; mergekit 0.1.5's
  ``generalized_task_arithmetic``): ``trim=tensor``, each tensor trimmed to its own top
  max(1, ⌊density·numel⌋), exactly that many (of the entries tied at the k-th |τ|, common with
  16-bit weights, the first in the tensor's order; mergekit's argsort leaves their order open);
  ``zero_sign=positive``; DARE matches the L1 norm of each tensor's task vector (``rescale=l1``).

``weights`` and ``density`` take a number, one value per expert, or mergekit-style rules
``[{filter: self_attn, value: 0.5}, {value: 0.3}]`` (the first rule whose ``filter`` is a
substring of the tensor's name, or has none, applies), also per expert. Per-tensor densities need
``trim=tensor``.

It streams chunk by chunk like every aggregator. A top-k threshold is found first without
holding the model: an exact radix selection over the float32 bit patterns of |τ_i| (non-negative
floats order like their bits), two streaming passes of 65,536-bin histograms, giving exactly the
k-th largest value (for ``trim=tensor``, a tensor that fits in a chunk is selected in memory). DARE's
random mask is drawn per tensor in fixed blocks of 2^20 entries (seeded by seed, expert, key and
block), so it does not depend on the chunk size.
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping

import torch
from torch import Tensor

from ame.aggregators.base import Aggregator, aborting, chunk_bytes
from ame.io import Output
from ame.errors import AMEError, require
from ame.pool import INIT, Chunk, ExpertPool
from ame.progress import Meter

SPARSIFY = ("none", "magnitude", "random")
COMBINE = ("sum", "mean")
TRIMS = ("global", "tensor")
ZERO_SIGNS = ("zero", "positive")
RESCALES = ("inverse", "l1", "none")
BLOCK = 1 << 20  # DARE's mask is drawn in blocks of this many entries of a tensor
MERGE_BYTES = 320 << 20  # float32 bytes of the N task vectors of one chunk, held together in the merge pass


def _bits(x: Tensor) -> Tensor:
    """|x| (float32) as its int32 bit pattern, which orders like the value."""
    return x.abs().view(torch.int32)


def _is_rules(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(r, Mapping) for r in x)


def _check_setting(value, key: str, ok, meaning: str) -> None:
    """A number, rules [{filter, value}], or one of those per expert; each value ``ok``."""
    def one(v) -> bool:
        if _is_rules(v):
            return all(set(r) <= {"filter", "value"} and "value" in r and (r.get("filter") is None
                       or isinstance(r["filter"], str)) and one(r["value"]) for r in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)
    good = one(value) or (isinstance(value, (list, tuple)) and len(value) > 0 and all(one(v) for v in value))
    require(good, f"aggregator.{key} must be {meaning}: a number, one per expert, or rules like "
            f"[{{filter: self_attn, value: 0.5}}, {{value: 0.3}}], got {value!r}")


def resolve(value, key: str, i: int) -> float:
    """The setting's value for tensor ``key`` of expert ``i`` (mergekit's rule: the first rule whose
    filter is in the name, or that has none, or ``*``)."""
    if isinstance(value, (list, tuple)) and not _is_rules(value):
        value = value[i]
    if _is_rules(value):
        for rule in value:
            f = rule.get("filter")
            if f is None or f == "*" or f in key:
                return resolve(rule["value"], key, i)
        raise AMEError(f"no rule of {value!r} applies to tensor '{key}'; end the rules with one without a filter")
    return float(value)


def _uniform(value) -> bool:
    """Whether a setting is the same for every tensor (no filter rules)."""
    if _is_rules(value):
        return False
    return all(_uniform(v) for v in value) if isinstance(value, (list, tuple)) else True


class TaskVectors(Aggregator):
    needs_init = True
    other_ways = "use a soup or AME with aggregator.pivot=soup"

    def __init__(self, scaling: float = 1.0, density=1.0, sparsify: str = "none",
                 sign_election: bool = False, combine: str = "sum", seed: int = 0, name: str = "task_arithmetic",
                 chunk_mb: float = 64, weights=None, trim: str = "global", zero_sign: str = "zero",
                 rescale: str = "inverse", normalize: bool = False):
        super().__init__()
        require(sparsify in SPARSIFY, f"aggregator.sparsify must be one of {SPARSIFY}, got {sparsify!r}")
        require(combine in COMBINE, f"aggregator.combine must be one of {COMBINE}, got {combine!r}")
        require(trim in TRIMS, f"aggregator.trim must be one of {TRIMS}, got {trim!r}")
        require(zero_sign in ZERO_SIGNS, f"aggregator.zero_sign must be one of {ZERO_SIGNS}, got {zero_sign!r}")
        require(rescale in RESCALES, f"aggregator.rescale must be one of {RESCALES}, got {rescale!r}")
        from omegaconf import OmegaConf

        density = OmegaConf.to_container(density) if OmegaConf.is_config(density) else density
        weights = OmegaConf.to_container(weights) if OmegaConf.is_config(weights) else weights
        _check_setting(density, "density", lambda d: 0 < d <= 1, "in (0, 1]")
        if weights is not None:
            _check_setting(weights, "weights", lambda w: True, "finite numbers")
        require(trim == "tensor" or _uniform(density), "aggregator.density rules per tensor need aggregator.trim=tensor "
                "(the published TIES trims one global budget per task vector)")
        require(isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and math.isfinite(scaling),
                f"aggregator.scaling must be a number, got {scaling!r}")
        self.scaling, self.density, self.sparsify, self.weights = float(scaling), density, sparsify, weights
        self.sign_election, self.combine, self.seed, self.name = sign_election, combine, seed, name
        require(isinstance(normalize, bool), f"aggregator.normalize must be true or false, got {normalize!r}")
        self.trim, self.zero_sign, self.rescale, self.normalize = trim, zero_sign, rescale, normalize
        self.chunk_bytes = chunk_bytes(chunk_mb)

    def _per_expert_check(self, n: int) -> None:
        for key, value in (("density", self.density), ("weights", self.weights)):
            if isinstance(value, (list, tuple)) and not _is_rules(value):
                require(len(value) == n, f"aggregator.{key} has {len(value)} values, one per expert, but there are "
                        f"{n} experts")

    def _dens(self, key: str, i: int) -> float:
        return resolve(self.density, key, i)

    def _w(self, key: str, i: int) -> float:
        return 1.0 if self.weights is None else resolve(self.weights, key, i)

    def _column(self, pool: ExpertPool, chunk: Chunk, i: int, value_of) -> Tensor | float:
        """A per-entry value over ``chunk`` (a number when it is the same for every piece)."""
        values = [value_of(p.key, i) for p in chunk.pieces]
        if len(set(values)) <= 1:
            return values[0] if values else 1.0
        col = torch.empty(chunk.numel)
        for p, v in zip(chunk.pieces, values):
            col[p.lo:p.hi] = v
        return col

    def pivot(self, pool: ExpertPool) -> dict[str, Tensor]:
        return pool.whole(INIT)

    def _tau(self, pool: ExpertPool, i: int, chunk: Chunk, base: Tensor, out: Tensor) -> Tensor:
        return torch.sub(pool.read(i, chunk, out=out), base, out=out)

    # -- TIES: top-k thresholds, streamed ---------------------------------------------------------
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

    def _radix(self, pool: ExpertPool, chunks: list[Chunk], pick, ranks: list[list[int]]
               ) -> tuple[list[list[float]], list[list[tuple[int, int]]]]:
        """Exact k-th values by radix selection over streamed |τ_i|: ``pick(chunk, bits)`` gives each
        group's entries of a chunk as [(group, bits)]; ``ranks[g][i]`` the 1-based rank from the
        smallest sought in group g of expert i. Two passes of 65,536-bin histograms, in workspaces
        reused from chunk to chunk (fresh pages cost a fault each: kernel time, not arithmetic).
        Returns the values ``[g][i]`` and, for each, (entries equal to it, how many of them have a
        rank ≥ the one sought: those a top-k of exactly k keeps)."""
        groups = len(ranks)
        hist = torch.zeros(groups, pool.n, 1 << 16, dtype=torch.int64)
        meter = Meter(f"{self.name}: top-k selection", 2 * len(chunks), unit="chunks")

        def bits_of(chunk: Chunk, base: Tensor, i: int) -> Tensor:
            """|τ_i| of the chunk as int32 bit patterns (in a reused buffer)."""
            tau = self._tau(pool, i, chunk, base, pool.buffer("tv_tau", chunk.numel))
            if not torch.isfinite(tau.sum()) and not torch.isfinite(tau).all():
                pool.scan(chunk)
                raise AMEError("the task vectors have NaN/Inf values")
            bits = pool.buffer("tv_bits", chunk.numel, torch.int32)
            torch.abs(tau, out=bits.view(torch.float32))
            return bits

        def streamed():  # (group, expert, bits, their high 16 bits) over every chunk: one pass
            for chunk in chunks:
                meter.update(1)
                base = pool.read(INIT, chunk, out=pool.buffer("tv_base", chunk.numel))
                high_bits = pool.buffer("tv_high", chunk.numel, torch.int32)
                for i in range(pool.n):
                    for g, bits in pick(chunk, bits_of(chunk, base, i)):
                        yield g, i, bits, torch.bitwise_right_shift(bits, 16, out=high_bits[:bits.numel()])

        with _each_chunk(pool, chunks):
            for g, i, _, hb in streamed():  # pass 1: the high 16 bits
                hist[g, i] += torch.bincount(hb, minlength=1 << 16)
        high = [[0] * pool.n for _ in range(groups)]
        rest = [list(r) for r in ranks]
        for g in range(groups):
            for i in range(pool.n):
                if rest[g][i] <= 0:
                    continue
                cum = hist[g, i].cumsum(0)
                b = int(torch.searchsorted(cum, rest[g][i]))
                high[g][i] = b
                rest[g][i] -= int(cum[b - 1]) if b > 0 else 0
        hist.zero_()
        with _each_chunk(pool, chunks):
            for g, i, bits, hb in streamed():  # pass 2: the low 16 bits, among the entries in the chosen high bin
                low = bits[hb == high[g][i]] & 0xFFFF  # few entries: the chosen bin's
                hist[g, i] += torch.bincount(low, minlength=1 << 16)
        out = [[0.0] * pool.n for _ in range(groups)]
        ties = [[(0, 0)] * pool.n for _ in range(groups)]
        for g in range(groups):
            for i in range(pool.n):
                if rest[g][i] > 0:
                    cum = hist[g, i].cumsum(0)
                    lo = int(torch.searchsorted(cum, rest[g][i]))
                    out[g][i] = float(torch.tensor([(high[g][i] << 16) | lo], dtype=torch.int32).view(torch.float32))
                    # the value's entries rank up to cum[lo] within the bin: keep those from rest on
                    ties[g][i] = (int(hist[g, i, lo]), int(cum[lo]) - rest[g][i] + 1)
        meter.close()
        return out, ties

    def thresholds(self, pool: ExpertPool, chunks: list[Chunk]) -> list[tuple[float, float]]:
        """``trim=global``: per expert, the trimming thresholds (parameters, float buffers), each over
        its own group as published TIES does over the parameters: the entries kept are those with
        |τ| ≥ ``kthvalue(size − int(density · size))`` of the group's |τ_i|, so the parameters'
        budget never depends on the normalisation statistics."""
        buffers = [k for k in pool.floats if k in pool.buffers]
        sizes = [pool.numel(pool.params), pool.numel(buffers)]
        dens = [self._dens(pool.params[0] if pool.params else "", i) for i in range(pool.n)]
        ranks = [[max(1, size - int(size * d)) if size else 0 for d in dens] for size in sizes]

        def pick(chunk: Chunk, bits: Tensor):
            mask = self._buffer_mask(pool, chunk)
            return [(0, bits)] if mask is None else [(0, bits[~mask]), (1, bits[mask])]

        (params, bufs), _ = self._radix(pool, chunks, pick, ranks)
        return list(zip(params, bufs))

    def tensor_thresholds(self, pool: ExpertPool, chunks: list[Chunk]) -> dict[tuple[int, str], list]:
        """``trim=tensor`` (mergekit), for the tensors cut across chunks: per expert, the k-th largest
        |τ| t with k = max(1, ⌊density · numel⌋), by radix selection over those chunks only, as
        ``[t, entries equal to t, how many of them to keep]`` (mergekit keeps exactly k; the merge pass
        keeps the first ones in the tensor's order and counts them down). (A tensor within one chunk
        is selected in memory during the merge pass: :func:`top_k`.)"""
        out: dict[tuple[int, str], list] = {}
        split: dict[str, list[Chunk]] = {}
        for chunk in chunks:
            for p in chunk.pieces:
                if p.hi - p.lo != math.prod(pool.infos[p.key][0]):
                    split.setdefault(p.key, []).append(chunk)
        keys = list(split)
        for first in range(0, len(keys), 16):  # 16 tensors at a time: histograms of 0.5 MB per tensor and expert
            batch = keys[first:first + 16]
            group = {k: g for g, k in enumerate(batch)}
            numels = [math.prod(pool.infos[k][0]) for k in batch]
            ranks = [[n - max(1, int(self._dens(k, i) * n)) + 1 for i in range(pool.n)] for k, n in zip(batch, numels)]
            its = [c for c in chunks if any(p.key in group for p in c.pieces)]

            def pick(chunk: Chunk, bits: Tensor, group=group):
                return [(group[p.key], bits[p.lo:p.hi]) for p in chunk.pieces if p.key in group]

            values_of, ties = self._radix(pool, its, pick, ranks)
            for g, values in enumerate(values_of):
                for i, t in enumerate(values):
                    if self._dens(batch[g], i) < 1:
                        out[i, batch[g]] = [t, *ties[g][i]]
        return out

    def _trim_tensors(self, pool: ExpertPool, chunk: Chunk, i: int, tau: Tensor, absb: Tensor, cut: dict) -> None:
        """``trim=tensor``: keep exactly the k entries of largest |τ_i| of each tensor, as mergekit does
        (ties at the k-th value: the first in the tensor's order). A cut tensor's threshold comes from
        ``cut`` (its tie quota counted down piece by piece), a whole tensor's is selected here from
        |τ_i| (in ``absb``; workspaces: no fresh pages)."""
        keep = pool.buffer("tv_keep", chunk.numel)
        flags = pool.buffer("tv_flags", chunk.numel, torch.bool)
        for p in chunk.pieces:
            if p.hi == p.lo or self._dens(p.key, i) >= 1:
                continue
            t = tau[p.lo:p.hi]
            if (i, p.key) in cut:
                state = cut[i, p.key]  # [threshold, entries equal to it, how many of them are still to keep]
                limit, tied, quota = state
                if quota == 0 and limit > 0:  # the tensor's tied entries to keep came in earlier pieces
                    _trim(t, limit, strict=True)
                    continue
                _trim(t, limit)
                if quota < tied and limit > 0:  # some tied entries go: keep the first `quota` of the tensor's
                    here = torch.eq(torch.abs(t, out=absb[p.lo:p.hi]), limit, out=flags[p.lo:p.hi])
                    count = int(here.count_nonzero())
                    if count > quota:
                        t[here.nonzero().view(-1)[quota:]] = 0.0
                    state[2] = max(0, quota - count)
            else:
                k = max(1, int(self._dens(p.key, i) * (p.hi - p.lo)))
                limit, drop = top_k(torch.abs(t, out=absb[p.lo:p.hi]), k, (keep[p.lo:p.hi], flags[p.lo:p.hi]))
                _trim(t, limit)
                if drop is not None:
                    t[drop] = 0.0

    # -- DARE ----------------------------------------------------------------------------------------
    def _dare_keep(self, pool: ExpertPool, i: int, chunk: Chunk) -> Tensor:
        keep = torch.empty(chunk.numel, dtype=torch.bool)
        for p in chunk.pieces:
            shape = pool.infos[p.key][0]
            d = self._dens(p.key, i)
            row = math.prod(shape[1:]) if shape else 1
            first, last = p.start * row, p.stop * row  # the piece's entries within its tensor
            if d >= 1:
                keep[p.lo:p.hi] = True
                continue
            for block in range(first // BLOCK, (last - 1) // BLOCK + 1 if last > first else first // BLOCK):
                h = hashlib.sha256(f"{self.seed}/{i}/{p.key}/{block}".encode()).digest()
                g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
                a, b = block * BLOCK, min((block + 1) * BLOCK, math.prod(shape))
                draw = torch.rand(b - a, generator=g) < d
                lo, hi = max(a, first), min(b, last)
                keep[p.lo + lo - first: p.lo + hi - first] = draw[lo - a: hi - a]
        return keep

    def l1_factors(self, pool: ExpertPool, chunks: list[Chunk]) -> dict[tuple[int, str], float]:
        """``rescale=l1`` (mergekit's DARE): per expert and tensor, ‖τ‖₁ / ‖kept τ‖₁ (1 when either is
        below 1e-7), so the dropped task vector keeps its L1 norm."""
        before: dict[tuple[int, str], float] = {}
        after: dict[tuple[int, str], float] = {}
        meter = Meter(f"{self.name}: L1 norms", len(chunks), unit="chunks")
        with _each_chunk(pool, chunks):
            for chunk in chunks:
                meter.update(1)
                base = pool.read(INIT, chunk, out=pool.buffer("tv_base", chunk.numel))
                tau = pool.buffer("tv_tau", chunk.numel)
                for i in range(pool.n):
                    self._tau(pool, i, chunk, base, tau)
                    kept = torch.where(self._dare_keep(pool, i, chunk), tau, torch.zeros_like(tau))
                    for p in chunk.pieces:
                        before[i, p.key] = before.get((i, p.key), 0.0) + float(tau[p.lo:p.hi].abs().double().sum())
                        after[i, p.key] = after.get((i, p.key), 0.0) + float(kept[p.lo:p.hi].abs().double().sum())
        meter.close()
        return {k: (before[k] / after[k] if before[k] >= 1e-7 and after[k] >= 1e-7 else 1.0) for k in before}

    # -- the merge -----------------------------------------------------------------------------------
    def run(self, pool: ExpertPool, out: Output | None = None, callbacks=(), score=None) -> Mapping[str, Tensor]:
        self._per_expert_check(pool.n)
        out = self._begin(pool, out, integers_from=INIT)
        # the merge pass holds the N task vectors of a chunk: keep that under MERGE_BYTES whatever N
        chunks = pool.chunks(min(self.chunk_bytes, max(1 << 20, MERGE_BYTES // (pool.n + 1))))
        with aborting(out):  # nothing half-written is left on any error
            global_cut = tensor_cut = factors = None
            if self.sparsify == "magnitude" and self.trim == "global":
                if any(self._dens(pool.floats[0], i) < 1 for i in range(pool.n)):
                    global_cut = self.thresholds(pool, chunks)
            elif self.sparsify == "magnitude":
                tensor_cut = self.tensor_thresholds(pool, chunks)
            elif self.sparsify == "random" and self.rescale == "l1":
                factors = self.l1_factors(pool, chunks)

            with _each_chunk(pool, chunks):
                for chunk in chunks:
                    m = chunk.numel
                    base = pool.read(INIT, chunk, out=pool.buffer("tv_base", m))
                    if self.sparsify == "none" and not self.sign_election and self.combine == "sum":
                        self._sum_chunk(pool, chunk, base, out)  # task arithmetic: no task vector held
                        continue
                    mask = self._buffer_mask(pool, chunk) if global_cut is not None else None
                    # the N sparsified, weighted task vectors of this chunk, each read once (workspaces reused)
                    taus = pool.buffer("tv_taus", pool.n * m).view(pool.n, m)
                    absb = pool.buffer("tv_abs", m)
                    weights = []
                    for i in range(pool.n):
                        tau = self._tau(pool, i, chunk, base, taus[i])
                        if global_cut is not None:
                            params, buffers = global_cut[i]
                            if mask is None:
                                _trim(tau, params)
                            else:
                                _trim(tau, torch.where(mask, buffers, params), torch.abs(tau, out=absb),
                                      pool.buffer("tv_keep", m))
                        elif tensor_cut is not None:
                            self._trim_tensors(pool, chunk, i, tau, absb, tensor_cut)
                        elif self.sparsify == "random":
                            if self.rescale == "inverse":
                                scale = self._column(pool, chunk, i, lambda k, j: 1.0 / self._dens(k, j))
                            elif self.rescale == "l1":
                                scale = self._column(pool, chunk, i, lambda k, j: factors[j, k])
                            else:
                                scale = 1.0
                            tau.mul_(scale).masked_fill_(~self._dare_keep(pool, i, chunk), 0.0)
                        w = self._column(pool, chunk, i, self._w)
                        if not (isinstance(w, float) and w == 1.0):
                            tau.mul_(w)
                        weights.append(w)
                    total = torch.sum(taus, 0, out=pool.buffer("tv_total", m))
                    # masks as float 0/1 and arithmetic with them: comparisons into bool and masked_fill
                    # are not vectorised on the CPU (3-6x slower); workspaces only (fresh pages fault)
                    agree = pool.buffer("tv_keep", m)
                    count = pool.buffer("tv_count", m).zero_() if self.combine == "mean" else None
                    if self.sign_election:
                        elected = torch.sign(total, out=pool.buffer("tv_elected", m))
                        if self.zero_sign == "positive":  # sign(e + 1/2) maps 0 to 1 and keeps ±1
                            elected.add_(0.5).sign_()
                        total.zero_()
                        for i in range(pool.n):  # τ_i agrees where τ_i · elected > 0 (both non-zero, one sign)
                            agreeing = torch.mul(taus[i], elected, out=absb).clamp_min_(0)  # |τ_i| where it agrees
                            total += agreeing
                            if count is not None:
                                _add_weighted(count, agreeing.sign_(), weights[i])
                        total.mul_(elected)  # Σ |τ_i| over the agreeing, with their sign: Σ τ_i, exactly
                    elif count is not None:
                        for i in range(pool.n):
                            _add_weighted(count, torch.ne(taus[i], 0, out=agree), weights[i])
                    if count is not None:  # where no expert counts, the sum is 0: divide by 1
                        merged = total.div_(count.add_(torch.eq(count, 0, out=agree)))
                    elif self.normalize:  # Σ w_i τ_i / Σ w_i (mergekit's normalize without sign consensus)
                        merged = _normalized(total, weights)
                    else:
                        merged = total
                    self._finish_chunk(pool, chunk, base.add_(merged, alpha=self.scaling), out,
                                       "the aggregate has NaN/Inf values; lower aggregator.scaling")
        return self._end(out)


    def _sum_chunk(self, pool: ExpertPool, chunk: Chunk, base: Tensor, out: Output) -> None:
        """Task arithmetic's chunk, base + scaling · Σ w_i τ_i (normalised by Σ w_i with ``normalize``),
        each τ_i made and added a cache-sized block at a time."""
        total = pool.buffer("tv_total", chunk.numel).zero_()
        weights = []
        for i in range(pool.n):
            w = self._column(pool, chunk, i, self._w)
            if isinstance(w, Tensor):
                total.addcmul_(self._tau(pool, i, chunk, base, pool.buffer("tv_tau", chunk.numel)), w)
            else:
                pool.add_to(total, i, chunk, w, less=base)
            weights.append(w)
        if self.normalize:
            total = _normalized(total, weights)
        self._finish_chunk(pool, chunk, base.add_(total, alpha=self.scaling), out,
                           "the aggregate has NaN/Inf values; lower aggregator.scaling")


def _normalized(total: Tensor, weights: list) -> Tensor:
    """``total / Σ w_i`` (mergekit's normalize; 1 where the weights sum to about 0)."""
    wsum = sum(weights)
    return total / (torch.where(wsum.abs() < 1e-8, 1.0, wsum) if isinstance(wsum, Tensor)
                    else (wsum if abs(wsum) >= 1e-8 else 1.0))


def _each_chunk(pool: ExpertPool, chunks: list[Chunk]):
    """The read plan of a pass over ``chunks`` that reads the base, then each expert, per chunk."""
    return pool.ahead((i, c) for c in chunks for i in (INIT, *range(pool.n)))


SAMPLE = 1 << 14  # entries sampled to bracket a k-th value (random reads: a cache miss each)


def _trim(tau: Tensor, limit: float | Tensor, magnitude: Tensor | None = None, keep: Tensor | None = None,
          strict: bool = False) -> None:
    """Zero the entries of ``tau`` with |τ| below ``limit`` (``strict``: also those equal to it). A
    number: one pass, hardshrink, which keeps |τ| > λ: λ = ``limit`` if strict, else the float32 just
    below it (|τ| ≥ ``limit``, exactly). Per entry (a tensor): with ``magnitude`` = |τ| and a float
    workspace ``keep``."""
    if isinstance(limit, Tensor):
        tau.mul_(torch.ge(magnitude, limit, out=keep))
        return
    lam = torch.tensor(limit, dtype=torch.float32)
    if not strict:
        lam = torch.nextafter(lam, torch.tensor(-math.inf))
    torch.ops.aten.hardshrink.out(tau, float(lam), out=tau)


def _add_weighted(total: Tensor, flags: Tensor, w: float | Tensor) -> None:
    """``total += w · flags`` (``w`` a number or a per-entry column)."""
    if isinstance(w, Tensor):
        total.addcmul_(flags, w)
    else:
        total.add_(flags, alpha=w)


def top_k(a: Tensor, k: int, scratch: tuple[Tensor, Tensor] | None = None) -> tuple[float, Tensor | None]:
    """The k-th largest entry t of ``a`` (exactly, as :func:`kth_smallest`) and the positions of the
    entries equal to t that a top-k of exactly k leaves out: those after the first k − #(a > t) in
    index order (mergekit's argsort keeps exactly k; which of the tied entries, it does not say).
    None when there are none, or when t = 0 (dropping a zero changes nothing)."""
    return _kth(a, a.numel() - k + 1, scratch, drops=True)


def kth_smallest(a: Tensor, r: int, scratch: tuple[Tensor, Tensor] | None = None) -> float:
    """The ``r``-th smallest entry of ``a`` (1-based), exactly: a seeded sample brackets it (± 5
    standard deviations of the sample's rank), one pass counts the entries below the bracket and
    gathers those inside, and ``kthvalue`` runs on those few; if the sample missed (about once in
    10^6 calls), on all.
    ``scratch``: a float32 and a bool tensor of ``a``'s size to work in (the float one as bools)."""
    return _kth(a, r, scratch)[0]


def _kth(a: Tensor, r: int, scratch: tuple[Tensor, Tensor] | None = None, drops: bool = False
         ) -> tuple[float, Tensor | None]:
    """:func:`kth_smallest`'s value t, and with ``drops`` the positions :func:`top_k` leaves out
    (from the bracket's mask, which holds every entry equal to t: one more pass only when some go)."""
    n = a.numel()
    if n > 4 * SAMPLE:
        lo, hi = sample_bracket(a[sample_index(n)].sort().values, n, r)
        f, m = scratch if scratch is not None else (torch.empty(n), torch.empty(n, dtype=torch.bool))
        at_least = torch.ge(a, lo, out=m)  # one mask gives both the count below the bracket and what is in it
        below = n - int(at_least.count_nonzero())
        bracket = at_least.logical_and_(torch.le(a, hi, out=f.view(torch.bool)[:n]))
        where = bracket.nonzero().view(-1)  # once, for the values and (for the drops) their positions
        inside = a[where]
        if below < r <= below + inside.numel():
            t = inside.kthvalue(r - below).values
            if not drops:
                return float(t), None
            return float(t), _drops(t, below, inside, lambda: where, r)
    t = a.kthvalue(r).values
    return float(t), (_drops(t, 0, a, lambda: torch.arange(n), r) if drops else None)


def sample_index(n: int) -> Tensor:
    """The positions (seeded by ``n``: the same every call) whose values bracket a k-th value."""
    return torch.randint(n, (SAMPLE,), generator=torch.Generator().manual_seed(n))


def sample_bracket(sample: Tensor, n: int, r: int) -> tuple[float, float]:
    """From the sorted values at :func:`sample_index`, a range holding the ``r``-th smallest of all
    ``n`` values but about once in 10^6 (± 5 standard deviations of the sample's rank; ±inf at the ends)."""
    q, sd = r / n, 5 * math.sqrt(SAMPLE * (r / n) * (1 - r / n)) + 2
    lo_i, hi_i = math.floor(q * SAMPLE - sd), math.ceil(q * SAMPLE + sd)
    return (float(sample[lo_i]) if lo_i >= 0 else -math.inf, float(sample[hi_i]) if hi_i < SAMPLE else math.inf)


def _drops(t: Tensor, below: int, inside: Tensor, where, r: int) -> Tensor | None:
    """Of the entries of ``inside`` (positions ``where()``, above ``below`` smaller ones) equal to
    the r-th smallest t, as many as are ranked below r: the last ones in index order (the first
    ones are kept)."""
    if float(t) == 0.0:
        return None
    tied = torch.eq(inside, t)
    lose = r - 1 - below - int(torch.lt(inside, t).sum())  # tied entries ranked before r
    if lose <= 0:
        return None
    ids = where()[tied]
    return ids[ids.numel() - lose:]
