"""The aggregator contract, and what every aggregator shares: integer entries, the output's
finiteness check, and the one rule for normalisation statistics.

    class Aggregator:
        name: str
        data_free: bool = True        # greedy soup: False, and ``run`` is handed ``score``
        needs_init: bool = False      # AME with pivot=init, task vectors
        single_network: bool = True   # the output ensemble: False (N networks: ``run`` is never called)
        info: dict                    # what it chose, for results (after ``run``)
        def check(self) -> None       # settings, before anything is trained
        def missing_init(self, why) -> AMEError   # the one message when needs_init fails
        def pivot(self, pool) -> StateDict | None  # the network it starts from (None: the soup)
        def run(self, pool, out=None, callbacks=(), score=None) -> StateDict

The pipeline and ``ame.merge`` use nothing else: no isinstance, no attributes set from outside.
``callbacks`` are :class:`Callback` objects (as Lightning's): an aggregator that takes steps (AME)
calls their ``on_step``; ``score`` (a function of a state dict → validation accuracy) is handed only
to an aggregator that declares ``data_free = False``.

**Statistics rule** (the same for every aggregator): float buffers (BatchNorm's ``running_mean``
and ``running_var``) are treated exactly like parameters: each aggregator applies to them what it
applies to the weights, so an aggregate's statistics come from the same point as its weights
(AME's lr = 0 returns the pivot network, statistics included; GD with step 1/k the soup; task
arithmetic with λ = 0 the init). Integer buffers (``num_batches_tracked``) come from the pivot
network (AME with pivot=init|first; the base for task vectors), else from the first expert. A
``running_var`` entry that an aggregator drives below zero (possible on a trajectory that
overshoots, e.g. Adam, or task arithmetic with large λ) is clamped to the smallest value any
expert has there; the count is logged and recorded in ``info["clamped_running_var"]``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Callable, Mapping

import torch
from torch import Tensor

from ame.io import Output
from ame.errors import AMEError
from ame.pool import Chunk, ExpertPool, Piece

log = logging.getLogger(__name__)
StateDict = dict[str, Tensor]
CHUNK_BYTES = 64 << 20  # float32 bytes per chunk: big enough for fused kernels at full speed


class Callback:
    """Hooks an aggregator calls while it runs (all optional; override what you need).

    ``every``: call :meth:`on_step` every this many steps (None: about 32 points over the run)."""

    every: int | None = None

    def on_step(self, aggregator: "Aggregator", step: int, metrics: dict) -> None:
        """After the run, for step 0 (the pivot) and every ``every`` steps and the last: the iterate's
        distances to the soup and to the pivot (``dist_soup``, ``dist_pivot`` and their ``_l2``)."""


class Aggregator:
    name: str = "aggregator"
    data_free: bool = True
    needs_init: bool = False
    single_network: bool = True
    chunk_bytes: int = CHUNK_BYTES
    #: why the init is needed and the other ways out, for :meth:`missing_init`
    init_reason: str = ""
    other_ways: str = "choose an aggregator that needs no base"

    def __init__(self):
        self.info: dict = {}

    def check(self) -> None:
        """Fail now, before any expert is trained, on settings that cannot work."""

    def run(self, pool: ExpertPool, out: Output | None = None, callbacks: Sequence[Callback] = (),
            score: Callable[[StateDict], float] | None = None) -> Mapping[str, Tensor]:
        raise NotImplementedError

    def missing_init(self, why: str = "none was given") -> AMEError:
        """The one message for a missing shared initialisation; ``why``: how it came to be missing
        (e.g. ``train.init=independent``), which also says how to give one."""
        return AMEError(f"aggregator={self.name} needs the experts' shared initialisation{self.init_reason}, but "
                        f"{why}; give one (train.init=shared|warm for trained experts, experts.init=<file> for "
                        f"files, init= in Python) or {self.other_ways}")

    def pivot(self, pool: ExpertPool) -> StateDict | None:
        """The network this aggregator starts from, for reporting distances (None: the soup)."""
        return None

    def __call__(self, experts, sizes: Sequence[float] | None = None, init=None, buffers=None, score=None,
                 callbacks: Sequence[Callback] = (), **kwargs) -> Mapping[str, Tensor]:
        """Convenience: ``run`` on ``ExpertPool(experts, sizes, init, buffers)``."""
        pool = ExpertPool(experts, sizes, init, buffers, **kwargs)
        return self.run(pool, callbacks=callbacks, **({"score": score} if score is not None else {}))

    # -- shared steps ----------------------------------------------------------------------------
    def _begin(self, pool: ExpertPool, out: Output | None, integers_from: int = 0) -> Output:
        if self.needs_init and pool.init is None:
            raise self.missing_init()
        self.info = {}
        out = Output(pool.out_infos()) if out is None else out
        ints = [k for k in pool.keys if k not in pool.floats]
        if ints:
            for k, v in pool.whole(integers_from, ints).items():
                out.write(k, 0, v)
        return out

    def _finish_chunk(self, pool: ExpertPool, chunk: Chunk, values: Tensor, out: Output,
                      diverged: str = "the aggregate has NaN/Inf values") -> None:
        """Check ``values`` (float32, the chunk's aggregate), apply the running_var guard, write."""
        values = values.detach()
        if values.device.type != "cpu":
            values = values.cpu()
        if not torch.isfinite(values.sum()) and not torch.isfinite(values).all():  # one pass, no allocation
            pool.scan(chunk)  # names an expert (or the init) with NaN/Inf values, if there is one
            raise AMEError(diverged)
        for p in chunk.pieces:
            if p.key.endswith("running_var") and p.key in pool.buffers:
                seg = values[p.lo:p.hi]
                neg = seg < 0
                if neg.any():
                    lowest = None
                    for i in range(pool.n):
                        x = _piece(pool, i, p)
                        lowest = x if lowest is None else torch.minimum(lowest, x)
                    seg[neg] = lowest[neg]
                    count = int(neg.sum())
                    self.info["clamped_running_var"] = self.info.get("clamped_running_var", 0) + count
                    log.warning("%s: %d running_var entries of '%s' went below zero; clamped to the experts' "
                                "smallest value there", self.name, count, p.key)
        for p in chunk.pieces:  # the output converts to each tensor's dtype as it stores the slice
            out.write(p.key, p.start, values[p.lo:p.hi])

    def _end(self, out: Output) -> Mapping[str, Tensor]:
        return out.close()


def chunk_bytes(chunk_mb) -> int:
    """``aggregator.chunk_mb`` checked, in bytes."""
    if not (isinstance(chunk_mb, (int, float)) and not isinstance(chunk_mb, bool) and math.isfinite(chunk_mb)
            and chunk_mb > 0):
        raise AMEError(f"aggregator.chunk_mb must be a finite number > 0 (MB), got {chunk_mb!r}")
    return int(chunk_mb * 2**20)


@contextmanager
def aborting(out: Output) -> Iterator[None]:
    """Abort ``out`` (its temporaries removed, nothing half-written left) if the block raises."""
    try:
        yield
    except BaseException:
        out.abort()
        raise


def _piece(pool: ExpertPool, i: int, p: Piece) -> Tensor:
    """Expert ``i``'s values of one piece, as a float32 vector of its own."""
    one = Chunk((Piece(p.key, p.start, p.stop, 0, p.hi - p.lo),), p.hi - p.lo)
    return pool.read(i, one)


def average_chunk(pool: ExpertPool, chunk: Chunk, weights: Sequence[float], out: Tensor | None = None,
                  read: Callable[[int], Tensor] | None = None) -> Tensor:
    """The weighted mean Σ w_i x_i / Σ w_i of the experts over ``chunk``, one expert at a time:
    accumulated in float32 when every entry of the chunk is 16-bit in the experts (exact inputs;
    one float32 rounding per addition), else in float64 (into ``out`` when given: a float64
    workspace reused from chunk to chunk). ``read(i)``: expert i's float32 slice, if the caller
    holds them (default: read from the pool)."""
    n = chunk.numel

    def add(total: Tensor, i: int) -> None:
        if read is None:
            pool.add_to(total, i, chunk, weights[i])
        else:  # mixed-dtype arithmetic is 5× slower than a copy
            x = read(i) if total.dtype == torch.float32 else pool.buffer("x64", n, torch.float64).copy_(read(i))
            total.add_(x, alpha=weights[i])

    if all(pool.infos[p.key][1].itemsize <= 2 for p in chunk.pieces):
        total, rest = pool.buffer("soup32", n), range(1, pool.n)
        if read is None:  # the first expert straight into the sum: no zeroing, one pass fewer
            pool.read(0, chunk, out=total)
        elif pool.n > 1 and weights[0] == 1.0:
            torch.add(read(0), read(1), alpha=weights[1], out=total)
            rest = range(2, pool.n)
        else:
            total.copy_(read(0))
        if weights[0] != 1.0:
            total.mul_(weights[0])
        for i in rest:
            add(total, i)
        return total.div_(sum(weights))
    total = torch.zeros(n, dtype=torch.float64) if out is None else out[:n].zero_()
    for i in range(pool.n):
        add(total, i)
    return total.div_(sum(weights))
