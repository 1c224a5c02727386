"""safetensors: the one parser of its header, the one layout of its writers, and its readers.

A file is accepted only if the ``safetensors`` library itself would accept it (its
``Metadata::validate``): an 8-byte little-endian header length below 100 MB; a header that is a
UTF-8 JSON object; an optional ``__metadata__`` mapping of strings to strings; every other entry
an object with a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets`` of two
non-negative integers; tensors laid end to end from offset 0 without gaps or overlaps, each
``end − begin = numel × itemsize``, and the data ending exactly at the end of the file. Anything
else is one line naming the file and what is wrong (tests build each bad file and check that the
library rejects it too).

Readers: :class:`SafetensorsFile` reads slices with ``pread`` into the caller's buffer (nothing of
the file stays resident); :func:`read_safetensors` reads a whole file while hashing its bytes (the
cache). Writers: :func:`write_safetensors` (a whole state dict, atomically, hashed) and
:class:`StreamedSafetensors` (an aggregate, slice by slice); both lay tensors out in the
library's own order, so their bytes equal ``safetensors.torch.save_file``'s.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ame.errors import AMEError
from ame.io.files import atomic_path, tensor_bytes
from ame.io.readahead import ALIGN, DIRECT_MIN, O_DIRECT, aligned, round_up

MAX_HEADER = 100_000_000  # the library's limit
STAGE_BYTES = 64 << 20  # the most a streamed write stages at once (two such buffers take turns)
_CHUNK = 64 << 20  # bytes per read/write/hash call
DTYPES: dict[str, torch.dtype] = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                                  "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                                  "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
NAMES = {v: k for k, v in DTYPES.items()}
# the library's Dtype enum order: save_file writes tensors by descending dtype, then by name
_RANK = {n: i for i, n in enumerate(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
                                     "U32", "F32", "F64", "I64", "U64"))}


class Tensors(dict):
    """name → (dtype, shape, begin, end): the validated header entries of one file."""


def parse_header(path: Path, head_and_size: tuple[bytes, int] | None = None) -> tuple[dict[str, str], Tensors, int]:
    """Read and validate the header of ``path``: returns (metadata, tensors, data start)."""
    def bad(what: str) -> AMEError:
        return AMEError(f"{path} is not a valid safetensors file ({what}); is it complete, and was it written "
                        "by safetensors?")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(8)
            if len(first) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", first)
            if n > MAX_HEADER:
                raise bad(f"header length {n} is over the library's limit of {MAX_HEADER} bytes")
            if 8 + n > size:
                raise bad(f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise AMEError(f"cannot read {path} ({e.strerror or e}); check the path and its permissions") from None
    if not raw.startswith(b"{"):
        raise bad("its header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise bad("__metadata__ must map strings to strings")
    tensors = Tensors()
    for name, spec in header.items():
        if not isinstance(spec, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype = DTYPES.get(spec.get("dtype")) if isinstance(spec.get("dtype"), str) else None
        if dtype is None:
            raise bad(f"tensor {name!r} has dtype {spec.get('dtype')!r}, which is not a safetensors dtype "
                      "supported here")
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise bad(f"tensor {name!r} has shape {shape!r}; a shape is a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise bad(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], non-negative integers")
        tensors[name] = (dtype, tuple(shape), offsets[0], offsets[1])
    position = 0
    for name, (dtype, shape, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != position:
            raise bad(f"tensor {name!r} starts at byte {begin} of the data, expected {position} "
                      f"({'overlapping' if begin < position else 'a gap after'} the previous tensor)")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise bad(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)} of "
                      f"{NAMES[dtype]} ({math.prod(shape) * dtype.itemsize} expected)")
        position = end
    if 8 + n + position != size:
        raise bad(f"its tensors hold {position} bytes but the file has {size - 8 - n} after the header")
    return metadata, tensors, 8 + n


# -- writing -----------------------------------------------------------------------------------

def layout(infos: Mapping[str, tuple[tuple[int, ...], torch.dtype]], metadata: Mapping[str, str] | None
           ) -> tuple[bytes, dict[str, int], int]:
    """The file's first bytes (length + header) for tensors ``infos`` (name → (shape, dtype)), in
    the library's order, and each tensor's absolute byte offset, and the file's total size."""
    unknown = sorted({str(d) for _, d in infos.values() if d not in NAMES})
    if unknown:
        raise AMEError(f"cannot store tensors of dtype {unknown} in safetensors; use float, int, uint8 or bool tensors")
    names = sorted(infos, key=lambda k: (-_RANK[NAMES[infos[k][1]]], k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, where = 0, {}
    for k in names:
        shape, dtype = infos[k]
        nbytes = math.prod(shape) * dtype.itemsize
        header[k] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        where[k] = offset
        offset += nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    start = 8 + len(head)
    return struct.pack("<Q", len(head)) + head, {k: start + o for k, o in where.items()}, start + offset


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file, atomically and streaming (no serialised copy in
    memory); returns the file's sha256. The bytes are exactly ``safetensors.torch.save_file``'s."""
    head, where, _ = layout({k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, metadata)
    h = hashlib.sha256(head)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(head)
        for k in sorted(where, key=where.get):
            data = tensor_bytes(tensors[k])
            for i in range(0, len(data), _CHUNK):
                f.write(data[i:i + _CHUNK]), h.update(data[i:i + _CHUNK])
    return h.hexdigest()


class StreamedSafetensors:
    """A safetensors file written piece by piece: header first, then each slice at its offset.

    A slice (of any dtype: converted to the file's) is converted straight into a page-aligned staging
    buffer (reused: no fresh pages) and its whole 4 KB blocks are
    written with ``O_DIRECT`` by a writer thread (the disk reads the buffer: no copy into the page
    cache, no write-back to wait for at the end, and the arithmetic goes on meanwhile; two buffers
    take turns). The partial blocks at a slice's ends, small slices, and file systems without
    ``O_DIRECT`` go through the page cache. A block is only ever written one way, so the two never
    mix within a block."""

    def __init__(self, path: Path, infos: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str]):
        self.infos = infos
        head, self.offsets, total = layout(infos, metadata)
        self.direct, self.writer, self.fd = -1, None, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.staging: list[Tensor | None] = [None, None]
        self.pending: list[Future | None] = [None, None]
        self.turn = 0
        _pwrite(self.fd, memoryview(head), 0)
        os.ftruncate(self.fd, total)
        if total >= DIRECT_MIN and O_DIRECT:
            try:
                self.direct = os.open(path, os.O_WRONLY | O_DIRECT)
            except OSError:  # tmpfs and others: the page cache only
                self.direct = -1
            else:
                self.writer = ThreadPoolExecutor(1, thread_name_prefix="ame-writer")

    def write(self, key: str, start_row: int, values: Tensor) -> None:
        shape, dtype = self.infos[key]
        offset = self.offsets[key] + start_row * math.prod(shape[1:]) * dtype.itemsize
        flat, step = values.reshape(-1), STAGE_BYTES // dtype.itemsize
        for a in range(0, flat.numel(), step):  # a whole large tensor in parts: the staging buffers stay small
            self._write(offset + a * dtype.itemsize, flat[a:a + step], dtype)

    def _write(self, offset: int, values: Tensor, dtype: torch.dtype) -> None:
        nbytes = values.numel() * dtype.itemsize
        j, self.turn = self.turn, 1 - self.turn
        self._wait(j)  # staging buffer j is free again
        phase = offset % ALIGN  # the slice sits in the buffer as in the file: its blocks start page-aligned
        if self.staging[j] is None or self.staging[j].numel() < phase + nbytes:
            self.staging[j] = None
            self.staging[j] = aligned(phase + nbytes)
        data = self.staging[j].numpy()
        self.staging[j][phase:phase + nbytes].view(dtype).copy_(values)  # converted on the way in
        first, last = round_up(offset), (offset + nbytes) // ALIGN * ALIGN  # the slice's whole blocks
        if self.direct < 0 or last - first < DIRECT_MIN:
            _pwrite(self.fd, memoryview(data[phase:phase + nbytes]), offset)
            return
        _pwrite(self.fd, memoryview(data[phase:phase + first - offset]), offset)
        _pwrite(self.fd, memoryview(data[phase + last - offset:phase + nbytes]), last)
        self.pending[j] = self.writer.submit(self._direct, memoryview(data[phase + first - offset:phase + last - offset]),
                                             first)

    def _direct(self, data: memoryview, offset: int) -> None:
        try:
            _pwrite(self.direct, data, offset)
        except OSError as e:  # a file system that opens with O_DIRECT but refuses the write: the page cache
            if e.errno != errno.EINVAL:
                raise
            _pwrite(self.fd, data, offset)

    def _wait(self, j: int) -> None:
        f, self.pending[j] = self.pending[j], None
        if f is not None:
            f.result()  # the writer's error, if any, is raised here

    def close(self) -> None:
        for j in (0, 1):
            self._wait(j)
        os.fsync(self.fd)
        self.abort()

    def abort(self) -> None:
        for j in (0, 1):
            try:
                self._wait(j)
            except OSError:
                pass
        if self.writer is not None:
            self.writer.shutdown()
            self.writer = None
        for fd in (self.fd, self.direct):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.direct = -1
        self.staging = [None, None]


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` at ``offset``."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


# -- reading -----------------------------------------------------------------------------------

class SafetensorsFile:
    """One validated safetensors file: its metadata, its tensors' (dtype, shape), and slices read
    with ``pread`` into the caller's buffer.

    Reading into a buffer the caller reuses is the fastest way on every machine tried, and keeps
    nothing of the file resident: a memory map costs a page fault per 4 KB page whenever a slice is
    touched again after being released (several µs each on a virtual machine), and copies from
    mapped pages of a virtual machine's shared memory were measured 5-40× slower than ``pread``."""

    reads_into = True  # :meth:`rows` fills a caller's buffer

    def __init__(self, path: Path):
        self.path = path
        self.metadata, self._tensors, self.start = parse_header(path)
        self.infos = {k: (shape, dtype) for k, (dtype, shape, _, _) in self._tensors.items()}
        self._fd: int | None = None

    def span(self, key: str, start: int | None = None, stop: int | None = None) -> tuple[int, int]:
        """Where rows ``start:stop`` of ``key`` lie in the file: (byte offset, byte count)."""
        dtype, shape, begin, _ = self._tensors[key]
        row = (math.prod(shape[1:]) if shape else 1) * dtype.itemsize
        if start is None:
            start, stop = 0, (shape[0] if shape else 1)
        return self.start + begin + start * row, (stop - start) * row

    def rows(self, key: str, start: int | None = None, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``start:stop`` (along the first axis) of ``key``, flat, read into ``out`` (a
        contiguous tensor of that many entries, of the tensor's dtype) or a new tensor."""
        dtype, shape, begin, _ = self._tensors[key]
        row = math.prod(shape[1:]) if shape else 1
        if start is None:
            start, stop = 0, (shape[0] if shape else 1)
        count = (stop - start) * row
        t = torch.empty(count, dtype=dtype) if out is None else out
        if count == 0:
            return t
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        offset = self.start + begin + start * row * dtype.itemsize
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got <= 0:
                raise AMEError(f"cannot read {self.path}: it ended early (was it changed while reading?)")
            done += got
        return t

    def release(self) -> None:
        """Nothing of the file stays in this process between reads."""

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """Read a whole safetensors file into fresh tensors, hashing the very bytes read: returns
    (tensors, metadata, sha256). Raises :class:`AMEError` for a file the library would reject."""
    path = Path(path)
    metadata, tensors, start = parse_header(path)
    h = hashlib.sha256()
    out = {}
    with open(path, "rb") as f:
        h.update(f.read(start))
        for k, (dtype, shape, begin, end) in sorted(tensors.items(), key=lambda kv: kv[1][2]):
            t = torch.empty(shape, dtype=dtype)
            buf = tensor_bytes(t) if t.numel() else memoryview(bytearray(0))
            for i in range(0, len(buf), _CHUNK):
                part = buf[i:i + _CHUNK]
                if f.readinto(part) != len(part):
                    raise AMEError(f"{path} ended early (was it changed while reading?)")
                h.update(part)
            out[k] = t
    return out, metadata, h.hexdigest()


def fingerprint(path: Path) -> str:
    """A cheap identity of a weight file: the sha256 of a safetensors file's header (its tensor
    names, dtypes, shapes and offsets) and its size; of a whole torch file, which is read whole anyway."""
    h = hashlib.sha256()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if path.suffix == ".safetensors":
                first = f.read(8)
                h.update(first + f.read(struct.unpack("<Q", first)[0] if len(first) == 8 else 0))
                h.update(str(size).encode())
            else:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    h.update(block)
    except OSError:
        return "unreadable"
    return h.hexdigest()[:16]
