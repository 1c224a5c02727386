"""The expert pool: what every aggregator receives, and the only way it reads weights.

An :class:`ExpertPool` carries the experts (lazily: checkpoints read slice by slice, or state
dicts), their shard sizes, the shared initialisation, which entries are buffers, and names.
Aggregators stream through it::

    for chunk in pool.chunks(max_bytes):        # a group of tensors, or rows of a big one
        for i in order:
            for lo, hi, x in pool.views(i, chunk):  # x: expert i's slice, in its own dtype
                ...
            pool.release(i)                     # its pages leave this process again

Memory is then bounded by the chunk (and the aggregator's state for it), not the model nor N.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Iterator, Union

import torch
from torch import Tensor

from ame.io import Checkpoint
from ame.io.readahead import Files, ReadAhead, Span, aligned, room
from ame.errors import AMEError, require

StateDict = dict[str, Tensor]
BUFFER_NAMES = re.compile(r"(^|\.)(running_mean|running_var|num_batches_tracked)$")
INIT = -1  # the index that names the initialisation in :meth:`ExpertPool.views`
READ_AHEAD = 192 << 20  # bytes a pool reads ahead of the arithmetic (within :meth:`ExpertPool.ahead`)
ADD_BLOCK = 1 << 18  # entries converted at a time by :meth:`ExpertPool._blocks` (1 MB of float32: the L2 cache)


@dataclass(frozen=True)
class Piece:
    key: str
    start: int  # first row (along the tensor's first axis)
    stop: int
    lo: int  # where its elements sit in the chunk's flat vector
    hi: int


@dataclass(frozen=True)
class Chunk:
    pieces: tuple[Piece, ...]
    numel: int


class _Dict:
    """A state dict as a source."""

    def __init__(self, sd: Mapping[str, Tensor], name: str | None = None):
        self.sd, self.name = sd, name
        self.infos = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> Tensor:
        t = self.sd[key].detach()
        return (t if start is None else t[start:stop]).reshape(-1)

    def release(self) -> None:
        pass


class _Lazy:
    """Expert ``i`` of a sequence that makes state dicts on access (e.g. loads a file): made on
    first use, dropped on :meth:`release`, so one is alive at a time."""

    def __init__(self, seq: Sequence, i: int, infos: dict | None):
        self.seq, self.i, self.sd, self.name = seq, i, None, None
        self.infos = infos  # filled by the pool from the first expert

    def load(self) -> Mapping[str, Tensor]:
        if self.sd is None:
            self.sd = self.seq[self.i]
        return self.sd

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> Tensor:
        t = self.load()[key].detach()
        return (t if start is None else t[start:stop]).reshape(-1)

    def release(self) -> None:
        self.sd = None


def _source(x, key_prefix: str | None, what: str):
    if isinstance(x, (str, Path)):
        return Checkpoint(x, key_prefix, what)
    if isinstance(x, (Checkpoint, _Dict, _Lazy)):
        return x
    if isinstance(x, Mapping):
        return _Dict(x)
    raise AMEError(f"{what}: expected a checkpoint path or a state dict, got {type(x).__name__}")


ExpertLike = Union[str, Path, Mapping[str, Tensor], Checkpoint]


class ExpertPool:
    """Experts for an aggregator.

    Args:
        experts: checkpoint paths, :class:`~ame.io.Checkpoint` s or state dicts; or any
            sequence that makes state dicts on access (read lazily, one at a time).
        sizes: shard sizes (equal when not given).
        init: the experts' shared initialisation (a path, checkpoint or state dict), if any.
        buffers: names of the non-parameter entries; by default found from the names of
            normalisation statistics (``running_mean``, ``running_var``, ``num_batches_tracked``)
            and every non-float entry.
        names: for messages (default: the paths).
        dtype: the aggregate's floating dtype (default: each entry's dtype in the experts).
        key_prefix: strip (and keep only keys under) this prefix when reading paths.
    """

    def __init__(self, experts: Sequence[ExpertLike], sizes: Sequence[float] | None = None,
                 init: ExpertLike | None = None, buffers: Collection[str] | None = None,
                 names: Sequence[str] | None = None, dtype: torch.dtype | str | None = None,
                 key_prefix: str | None = None):
        n = len(experts)
        require(n > 0, "no experts to aggregate; check experts.paths or data.shards.num_shards")
        lazy = not isinstance(experts, (list, tuple)) or not all(
            isinstance(e, (str, Path, Mapping, Checkpoint, _Dict, _Lazy)) for e in experts)
        if lazy:
            first = experts[0]
            infos = {k: (tuple(v.shape), v.dtype) for k, v in first.items()}
            self.sources = [_Lazy(experts, i, infos) for i in range(n)]
            del first
        else:
            self.sources = [_source(e, key_prefix, "experts.paths") for e in experts]
        self.names = [str(x) for x in names] if names is not None else [getattr(s, "name", None) for s in self.sources]
        require(len(self.names) == n, f"need one name per expert ({n}), got {len(self.names)}")
        self.n = n
        sizes = [1] * n if sizes is None else list(sizes)
        require(len(sizes) == n and all(isinstance(s, (int, float)) and s > 0 for s in sizes),
                f"need one positive shard size per expert ({n}), got {sizes}; check experts.sizes")
        self.sizes = sizes
        ref = self.sources[0].infos
        self.infos: dict[str, tuple[tuple[int, ...], torch.dtype]] = dict(ref)
        for i, s in enumerate(self.sources[1:], start=1):
            if not isinstance(s, _Lazy):
                self._match(s.infos, self.label(i), "the first expert")
        self.init = None
        if init is not None:
            self.init = _source(init, key_prefix, "experts.init")
            self._match(self.init.infos, "the initialisation", "the first expert", dtypes=False)
        self.keys = list(ref)
        self.floats = [k for k in self.keys if ref[k][1].is_floating_point]
        self.buffers = set(buffers) if buffers is not None else {k for k in self.keys if BUFFER_NAMES.search(k)}
        self.buffers |= {k for k in self.keys if k not in self.floats}
        self.params = [k for k in self.floats if k not in self.buffers]
        if dtype is not None and isinstance(dtype, str):
            require(isinstance(getattr(torch, dtype, None), torch.dtype) and getattr(torch, dtype).is_floating_point,
                    f"dtype={dtype!r} is not a floating torch dtype; use float32, bfloat16 or float16")
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        self._chunks: dict[int, list[Chunk]] = {}
        self._work: dict = {}
        self.files = Files()
        self._ahead: ReadAhead | None = None

    # -- description -------------------------------------------------------------------------
    def label(self, i: int) -> str:
        if i == INIT:
            return "the initialisation"
        return f"expert {i}" + (f" ({self.names[i]})" if self.names[i] else "")

    def _match(self, infos: dict, name: str, against: str, dtypes: bool = True) -> None:
        ref = self.infos
        if infos.keys() != ref.keys():
            missing, extra = sorted(ref.keys() - infos.keys()), sorted(infos.keys() - ref.keys())
            raise AMEError(f"{name} does not match {against}: missing keys {missing[:3]}, unexpected keys "
                           f"{extra[:3]}; experts, init and model= must share one architecture (or set "
                           "experts.key_prefix)")
        for k, (shape, dtype) in ref.items():
            s, d = infos[k]
            if s != shape or (dtypes and d != dtype) or d.is_floating_point != dtype.is_floating_point:
                raise AMEError(f"{name} does not match {against} at '{k}': {s} {d} vs {shape} {dtype}; experts, "
                               "init and model= must share one architecture")

    def check_against(self, infos: dict, against: str) -> None:
        """One clear error if the experts (and the init) do not fit ``infos`` (a model's state dict)."""
        want = {k: v for k, v in infos.items()}
        for name, have in ((self.label(0), self.infos),
                           *((("the initialisation (experts.init)", self.init.infos),) if self.init else ())):
            if have.keys() != want.keys():
                missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
                raise AMEError(f"{name} does not match {against}: missing keys {missing[:3]}, unexpected keys "
                               f"{extra[:3]}; experts, init and model= must share one architecture")
            for k, (shape, _) in want.items():
                if have[k][0] != shape:
                    raise AMEError(f"{name} does not match {against} at '{k}': {have[k][0]} vs {shape}; experts, "
                                   "init and model= must share one architecture")

    def out_dtype(self, key: str) -> torch.dtype:
        d = self.infos[key][1]
        return self.dtype if self.dtype is not None and d.is_floating_point else d

    def out_infos(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (shape, self.out_dtype(k)) for k, (shape, _) in self.infos.items()}

    def numel(self, keys: Sequence[str] | None = None) -> int:
        return sum(math.prod(self.infos[k][0]) for k in (self.floats if keys is None else keys))

    # -- streaming -----------------------------------------------------------------------------
    def chunks(self, max_bytes: int) -> list[Chunk]:
        """The float entries in order, grouped into chunks of at most ``max_bytes`` of float32. A
        tensor is never cut unless it is larger than a chunk (then into groups of rows, starting on
        a chunk of its own), so per-tensor work (a per-tensor top-k) mostly sees whole tensors."""
        max_numel = max(1, int(max_bytes) // 4)
        if max_numel in self._chunks:
            return self._chunks[max_numel]
        out, pieces, used = [], [], 0

        def close() -> None:
            nonlocal pieces, used
            if pieces:
                out.append(Chunk(tuple(pieces), used))
            pieces, used = [], 0

        for k in self.floats:
            shape = self.infos[k][0]
            numel = math.prod(shape)
            if used + numel > max_numel:  # it does not fit in what is left: the next chunk
                close()
            if numel <= max_numel:
                pieces.append(Piece(k, 0, shape[0] if shape else 1, used, used + numel))
                used += numel
                continue
            rows, row = shape[0], math.prod(shape[1:])  # larger than a chunk: groups of rows
            take = max(1, max_numel // max(row, 1))
            for start in range(0, rows, take):
                stop = min(rows, start + take)
                close()
                pieces.append(Piece(k, start, stop, 0, (stop - start) * row))
                used = (stop - start) * row
        close()
        self._chunks[max_numel] = out
        return out

    def buffer(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """A workspace of ``numel`` entries, reused from chunk to chunk (fresh pages cost a fault
        each, which at a few µs per 4 KB page is as slow as the arithmetic)."""
        t = self._work.get((name, dtype))
        if t is None or t.numel() < numel:
            t = self._work[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return t[:numel]

    def _src(self, i: int):
        if i == INIT:
            require(self.init is not None, "no initialisation was given; set experts.init")
            return self.init
        return self.sources[i]

    def views(self, i: int, chunk: Chunk) -> Iterator[tuple[int, int, Tensor]]:
        """Expert ``i``'s (or, for ``INIT``, the init's) slice of ``chunk``, piece by piece:
        ``(lo, hi, flat tensor)`` in the source's dtype. A file's slices are read into a buffer
        reused by the next call: use each piece before asking for another source's. Call
        :meth:`release` when done."""
        src = self._src(i)
        if isinstance(src, _Lazy) and src.sd is None:
            sd = src.load()
            self._match({k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, self.label(i), "the first expert")
        raw = None
        for p in chunk.pieces:
            rows = self._rows(p)
            if getattr(src, "reads_into", False):  # a file: read into a reused buffer
                if raw is None:
                    raw = self.buffer(f"raw{i == INIT}", chunk.numel * 8, torch.uint8)
                dtype = src.infos[p.key][1]
                x = src.rows(p.key, *rows, out=raw[p.lo * dtype.itemsize:p.hi * dtype.itemsize].view(dtype))
            else:
                x = src.rows(p.key, *rows)
            yield p.lo, p.hi, x

    def spans(self, i: int, chunk: Chunk) -> list[Span] | None:
        """Where expert ``i``'s (or the init's) pieces of ``chunk`` lie on disk (None: not a file read
        into buffers, e.g. a state dict or a torch file)."""
        src = self._src(i)
        if not getattr(src, "reads_into", False):
            return None
        return [src.span(p.key, *self._rows(p)) for p in chunk.pieces]

    def _rows(self, p: Piece) -> tuple[int | None, int | None]:
        shape = self.infos[p.key][0]
        whole = p.start == 0 and p.stop == (shape[0] if shape else 1)
        return (None, None) if whole else (p.start, p.stop)

    @contextmanager
    def ahead(self, steps: Iterable[tuple[int, Chunk]]) -> Iterator[None]:
        """Within the block, :meth:`read` calls that follow ``steps`` (``(expert, chunk)`` in the
        order they will be asked for) find their slices read ahead by a thread (the disk and the
        arithmetic overlap; a slice asked for again before the next is read once). Reads that do
        not follow the plan are done on the spot, so the plan is a hint: results never depend on it."""
        plan = [((i, c), s) for i, c in steps if (s := self.spans(i, c)) is not None]
        if not plan or self._ahead is not None:
            yield
            return
        budget = max(READ_AHEAD, 2 * max(room(s) for _, s in plan))
        with ReadAhead(self.files, plan, budget) as ra:
            self._ahead = ra
            try:
                yield
            finally:
                self._ahead = None

    def read(self, i: int, chunk: Chunk, out: Tensor | None = None, release: bool = True, view: bool = False) -> Tensor:
        """Expert ``i``'s slice of ``chunk`` as one float32 vector (into ``out`` when given).

        From a safetensors file the chunk's byte ranges are read (ahead, within :meth:`ahead`) into
        one page-aligned buffer (:mod:`ame.io.readahead`: from the page cache if the bytes are there,
        else straight from the disk) and converted to float32 with one kernel per run of adjacent
        tensors: a few large kernels rather than one per tensor, which on a busy machine (each
        multi-threaded kernel waits for its threads) is several times faster.

        ``view=True``: where the slice is float32 already and lies in one piece of the buffer, that
        buffer itself is returned (no copy; read-only, valid until the next ``read``)."""
        out = torch.empty(chunk.numel, dtype=torch.float32) if out is None else out
        runs = self._file_runs(i, chunk)
        if runs is not None:
            if view and len(runs) == 1 and runs[0][2].dtype == torch.float32 and runs[0][:2] == (0, chunk.numel):
                return runs[0][2]
            for lo, hi, typed in runs:
                out[lo:hi].copy_(typed)
            return out
        for lo, hi, x in self.views(i, chunk):
            out[lo:hi].copy_(x)
        if release:
            self.release(i)
        return out

    def add_to(self, total: Tensor, i: int, chunk: Chunk, alpha: float = 1.0, less: Tensor | None = None) -> Tensor:
        """``total += alpha · x_i`` (or ``alpha · (x_i − less)``) over ``chunk`` (``total`` float32 or
        float64), in cache-sized blocks (:meth:`_blocks`)."""
        for lo, hi, x in self._blocks(i, chunk, total.dtype, scratch=less is not None):
            total[lo:hi].add_(x if less is None else x.sub_(less[lo:hi]), alpha=alpha)
        return total

    def _blocks(self, i: int, chunk: Chunk, dtype: torch.dtype, scratch: bool = False
                ) -> Iterator[tuple[int, int, Tensor]]:
        """Expert ``i``'s slice of ``chunk`` as ``(lo, hi, values as dtype)`` (with ``scratch``, always
        copies the caller may change): slices of another dtype are converted ADD_BLOCK entries at a time into
        one small buffer, so the converted values never travel to memory and back (a whole-chunk
        conversion then the arithmetic moves about twice the bytes; ``scripts/bench_kernels.py``)."""
        runs = self._file_runs(i, chunk)
        if runs is None:
            runs = [(lo, hi, x.reshape(-1)) for lo, hi, x in self.views(i, chunk)]
        block = self.buffer("block", min(ADD_BLOCK, chunk.numel), dtype)
        for lo, hi, typed in runs:
            if typed.dtype == dtype and not scratch:
                yield lo, hi, typed
                continue
            for a in range(lo, hi, ADD_BLOCK):
                b = min(a + ADD_BLOCK, hi)
                yield a, b, block[:b - a].copy_(typed[a - lo:b - lo])
        if not getattr(self._src(i), "reads_into", False):
            self.release(i)

    def _file_runs(self, i: int, chunk: Chunk) -> list[tuple[int, int, Tensor]] | None:
        """Expert ``i``'s slice of ``chunk`` read from its file (ahead, within :meth:`ahead`) as runs
        ``(lo, hi, typed view of the buffer)``; None if it is not read from a file."""
        spans = self.spans(i, chunk)
        if spans is None:
            return None
        views = self._ahead.take((i, chunk)) if self._ahead is not None else None
        if views is None:
            views = self.files.read(spans, self._aligned(room(spans)))
        return self._runs(self._src(i), chunk, views)

    def _aligned(self, nbytes: int) -> Tensor:
        t = self._work.get("aligned")
        if t is None or t.numel() < nbytes:
            t = self._work["aligned"] = aligned(nbytes)
        return t

    @staticmethod
    def _runs(src, chunk: Chunk, views: Sequence[Tensor]) -> list[tuple[int, int, Tensor]]:
        """The pieces' views as ``(lo, hi, typed)``: one typed view per run of pieces adjacent both in
        the buffer and in the chunk and of one dtype (a few large kernels rather than one per tensor)."""
        run: list = []  # [first view, lo, hi, dtype, bytes]
        typed_runs = []

        def flush() -> None:
            if run:
                first, lo, hi, dtype, nbytes = run
                raw = torch.as_strided(first, (nbytes,), (1,))
                try:
                    typed = raw.view(dtype)
                except RuntimeError:  # a tensor at an offset its dtype does not divide
                    typed = raw.clone().view(dtype)
                typed_runs.append((lo, hi, typed))

        for p, v in zip(chunk.pieces, views):
            dtype = src.infos[p.key][1]
            if run and run[3] == dtype and run[2] == p.lo and v.numel() and run[0].data_ptr() + run[4] == v.data_ptr():
                run[2], run[4] = p.hi, run[4] + v.numel()
            else:
                flush()
                run = [v, p.lo, p.hi, dtype, v.numel()]
        flush()
        return typed_runs

    def release(self, i: int) -> None:
        self._src(i).release()

    def scan(self, chunk: Chunk, which: Sequence[int] | None = None) -> None:
        """Raise one clear error naming the first expert (or the init) with NaN/Inf values in ``chunk``."""
        which = ([INIT] if self.init is not None else []) + list(range(self.n)) if which is None else which
        for i in which:
            for p, (_, _, x) in zip(chunk.pieces, self.views(i, chunk)):
                if not torch.isfinite(x).all():
                    self.release(i)
                    raise AMEError(f"{self.label(i)} has NaN/Inf values in '{p.key}'; retrain that expert or "
                                   "leave it out")
            self.release(i)

    def whole(self, i: int, keys: Sequence[str] | None = None) -> StateDict:
        """Entries of expert ``i`` (or the init) as full tensors (copies), ``keys`` or all of them."""
        src = self._src(i)
        out = {k: src.rows(k).clone().reshape(self.infos[k][0]) for k in (self.keys if keys is None else keys)}
        src.release()
        return out

    def subset(self, idx: Sequence[int]) -> "ExpertPool":
        """The experts ``idx`` (same init, buffers, dtype), still lazy."""
        return ExpertPool([self.sources[i] for i in idx], [self.sizes[i] for i in idx], self.init, self.buffers,
                          [self.names[i] for i in idx], self.dtype)
