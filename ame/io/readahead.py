"""Reading weight files at the speed of the disk: byte ranges read ahead of the arithmetic, in a
thread, straight from the disk when they are not in the page cache.

A merge reads every expert once (or a few times), each byte once: the page cache buys nothing, and
on the virtual machines tried, copying freshly read pages out of it (what ``pread`` does) costs
more CPU than the merge's arithmetic (1–2 ns per byte: ``cat`` of 8.8 GB spent 10 s in the
kernel). So a range is read

- from the page cache when all of it is there (``mincore`` says so; asking with ``RWF_NOWAIT``
  instead would start the kernel's read-ahead into the cache on a miss): the range is *mapped*,
  so the arithmetic reads the page cache's own pages (no copy: a copy out of it runs at ~3 GB/s
  and, at 22M parameters × 32 float32 experts in tmpfs, doubled AME-Adam's time per step),
- else with ``O_DIRECT`` (the disk writes into our page-aligned buffer: no copy, almost no CPU),
- else (a file system without ``O_DIRECT``, e.g. older tmpfs) with a plain ``pread``.

:class:`ReadAhead` runs a known sequence of reads (a *plan*) one step ahead in a thread
(``preadv`` releases the GIL), so the disk and the arithmetic overlap; a range needed twice in
the plan is read once and kept until its last use. Memory is bounded by ``budget`` bytes of
read-ahead plus what the plan itself must hold.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ame.errors import AMEError

ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and buffer addresses (a safe superset)
DIRECT_MIN = 1 << 20  # smaller ranges are read through the page cache (O_DIRECT's set-up is not worth it)
O_DIRECT = getattr(os, "O_DIRECT", 0)


@dataclass(frozen=True)
class Span:
    """``nbytes`` bytes at ``offset`` of the file ``path``."""

    path: str
    offset: int
    nbytes: int


def aligned(nbytes: int) -> Tensor:
    """A page-aligned uint8 buffer of ``nbytes`` (anonymous memory, as O_DIRECT needs)."""
    m = mmap.mmap(-1, max(ALIGN, round_up(nbytes)))
    return torch.frombuffer(m, dtype=torch.uint8)[:nbytes]


def round_up(n: int) -> int:
    """``n`` rounded up to a multiple of ALIGN."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def merge(spans: Sequence[Span]) -> list[tuple[Span, list[int]]]:
    """Adjacent spans of one file joined into one read: [(joined span, indices of its parts)]."""
    out: list[tuple[Span, list[int]]] = []
    for j, s in enumerate(spans):
        if out:
            last, parts = out[-1]
            if last.path == s.path and last.offset + last.nbytes == s.offset:
                out[-1] = (Span(s.path, last.offset, last.nbytes + s.nbytes), parts + [j])
                continue
        out.append((s, [j]))
    return out


def room(spans: Sequence[Span]) -> int:
    """Bytes of buffer :meth:`Files.read` needs for ``spans``."""
    return sum(round_up(s.nbytes) + 2 * ALIGN for s, _ in merge(spans))


class Files:
    """Open files (a buffered and, where the file system allows, an O_DIRECT descriptor each),
    shared by the threads that read them (``preadv`` has no file position)."""

    def __init__(self, direct: bool = True):
        self.direct = direct and bool(O_DIRECT)
        self._fds: dict[str, tuple[int, int | None]] = {}
        self._lock = threading.Lock()

    def _open(self, path: str) -> tuple[int, int | None]:
        with self._lock:
            fds = self._fds.get(path)
            if fds is None:
                try:
                    plain = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise AMEError(f"cannot read {path}: {e.strerror}") from None
                direct = None
                if self.direct:
                    try:
                        direct = os.open(path, os.O_RDONLY | O_DIRECT)
                    except OSError:  # the file system has no O_DIRECT
                        direct = None
                fds = self._fds[path] = (plain, direct)
            return fds

    def read(self, spans: Sequence[Span], buf: Tensor) -> list[Tensor]:
        """Read ``spans`` into ``buf`` (page-aligned, at least :func:`room` bytes): a uint8 view per span."""
        views: list[Tensor | None] = [None] * len(spans)
        at = 0
        for s, parts in merge(spans):
            data = self._one(s, buf, at)
            at += round_up(s.nbytes) + 2 * ALIGN
            pos = 0
            for j in parts:
                views[j] = data[pos:pos + spans[j].nbytes]
                pos += spans[j].nbytes
        return views  # type: ignore[return-value]

    def _one(self, s: Span, buf: Tensor, at: int) -> Tensor:
        plain, direct = self._open(s.path)
        if s.nbytes == 0:
            return buf[at:at]
        if s.nbytes >= DIRECT_MIN and _cached(plain, s.offset, s.nbytes):
            mapped = _mapped(plain, s.offset, s.nbytes)  # the page cache's own pages: no copy at all
            if mapped is not None:
                return mapped
        elif direct is not None and self.direct and s.nbytes >= DIRECT_MIN:  # not cached: the disk, no copy
            first = s.offset // ALIGN * ALIGN
            span = round_up(s.offset + s.nbytes) - first
            raw = buf[at:at + span]
            try:
                _full(direct, raw, first, want=s.offset + s.nbytes - first)
                return raw[s.offset - first:s.offset - first + s.nbytes]
            except OSError:  # e.g. EINVAL: this file system's O_DIRECT wants another alignment
                self.direct = False
        dest = buf[at:at + s.nbytes]
        _full(plain, dest, s.offset, want=s.nbytes)
        return dest

    def close(self) -> None:
        with self._lock:
            for fds in self._fds.values():
                for fd in fds:
                    if fd is not None:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
            self._fds.clear()

    def __del__(self):
        self.close()


try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype, _libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
except (OSError, AttributeError):  # no libc with mincore: treat every range as not cached
    _libc = None


def _cached(fd: int, offset: int, nbytes: int) -> bool:
    """Whether every page of the range is in the page cache (``mincore`` on a mapping of it, which
    reads nothing)."""
    if _libc is None:
        return False
    first = offset // mmap.PAGESIZE * mmap.PAGESIZE
    length = offset + nbytes - first
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, first)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        return False
    try:
        vec = torch.empty((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE, dtype=torch.uint8)
        if _libc.mincore(addr, length, vec.data_ptr()) != 0:
            return False
        return bool(vec.bitwise_and_(1).all())
    finally:
        _libc.munmap(addr, length)


def _mapped(fd: int, offset: int, nbytes: int) -> Tensor | None:
    """The range as a read-only view of a shared mapping of the file (its pages are the page
    cache's, mapped in advance), or None where it cannot be mapped (past the end of the file, no
    ``mmap``). The mapping lives as long as a tensor viewing it."""
    first = offset // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    try:
        if offset + nbytes > os.fstat(fd).st_size:
            return None  # the plain read says clearly that the file ended early
        m = mmap.mmap(fd, offset + nbytes - first, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                      mmap.PROT_READ, offset=first)
    except (OSError, ValueError, AttributeError):
        return None
    with warnings.catch_warnings():  # read-only: torch warns that the buffer is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(m, dtype=torch.uint8)[offset - first:]


def drop_from_page_cache(paths: Sequence[str | os.PathLike]) -> None:
    """Drop these files' pages from the page cache (these files only; their written pages flushed
    first), so the next read of them goes to the disk: for benchmarks and tests of cold reads."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _full(fd: int, dest: Tensor, offset: int, want: int) -> int:
    """Read into ``dest`` from ``offset`` until ``want`` bytes are in (the end of the file may come
    after them); an error if the file ends first."""
    view, done = memoryview(dest.numpy()), 0
    while done < want:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise AMEError(f"a weight file ended early at byte {offset + done} (was it changed while reading?)")
        done += got
    return done


class ReadAhead:
    """Runs ``plan`` (a sequence of ``(key, spans)``) in a thread, up to ``budget`` bytes ahead of
    :meth:`take`, which must ask for the keys in the plan's order. A key that appears more than once
    is read once and kept until its last use. Use as a context manager (the thread stops on exit)."""

    def __init__(self, files: Files, plan: Sequence[tuple[Hashable, Sequence[Span]]], budget: int = 256 << 20):
        self.files, self.plan, self.budget = files, list(plan), budget
        self.last = {key: j for j, (key, _) in enumerate(self.plan)}
        self.size = max((room(spans) for _, spans in self.plan), default=0)
        self.ready: dict[Hashable, list[Tensor]] = {}
        self.held: dict[Hashable, Tensor] = {}  # key → its buffer
        self.spare: list[Tensor] = []
        self.used = 0  # bytes of buffers holding ranges read and not yet past their last use
        self.next = 0  # the plan's step the consumer asks for next
        self.error: BaseException | None = None
        self.stopped = False
        self._pending: Hashable | None = None
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="ame-readahead", daemon=True)

    def __enter__(self) -> "ReadAhead":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        self.thread.join()

    def _buffer(self) -> Tensor:
        """A buffer for any step (all of one size: a buffer given back fits every later read, so
        none is mapped twice; fresh pages cost a fault each)."""
        return self.spare.pop() if self.spare else aligned(self.size)

    def _run(self) -> None:
        try:
            seen: set = set()
            for j, (key, spans) in enumerate(self.plan):
                if key in seen:
                    continue
                seen.add(key)
                need = self.size
                with self.cv:  # wait for room (or for the consumer to need exactly this read)
                    while not self.stopped and self.used and self.used + need > self.budget and self.next <= j:
                        self.cv.wait()
                    if self.stopped:
                        return
                    buf = self._buffer()
                    self.used += need
                views = self.files.read(spans, buf)
                with self.cv:
                    self.held[key], self.ready[key] = buf, views
                    self.cv.notify_all()
        except BaseException as e:  # noqa: BLE001 — handed to the consumer, raised there
            with self.cv:
                self.error = e
                self.cv.notify_all()

    def take(self, key: Hashable) -> list[Tensor] | None:
        """The views of ``key``'s spans, if ``key`` is the plan's next step (else None: read it yourself).
        Valid until the next :meth:`take`."""
        with self.cv:
            self._free_past()
            if self.next >= len(self.plan) or self.plan[self.next][0] != key:
                return None
            self.next += 1
            self.cv.notify_all()
            while key not in self.ready and self.error is None:
                self.cv.wait()
            if self.error is not None:
                raise self.error
            self._pending = key
            return self.ready[key]

    def _free_past(self) -> None:
        """Give back the buffer of the step just used if that was its last use."""
        key = self._pending
        if key is not None and self.last[key] < self.next:
            buf = self.held.pop(key)
            del self.ready[key]
            self.used -= self.size
            self.spare.append(buf)
            self.cv.notify_all()
        self._pending = None
