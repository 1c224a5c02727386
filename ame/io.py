"""Files: atomic writes, strict JSON, and state dicts as safetensors (``.pt`` only weights-only).

safetensors files are written and read here by streaming (:func:`write_safetensors`,
:func:`read_safetensors`): no serialised copy of the tensors in memory, and the sha256 of the
bytes comes with every write and read, for :mod:`ame.cache`. The bytes are exactly those of
``safetensors.torch.save_file``; the real library reads them (tests check both)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from ame.errors import AMEError

StateDict = dict[str, Tensor]
log = logging.getLogger(__name__)
_CHUNK = 64 << 20  # bytes per read/write/hash call: large enough for disk speed, small enough to stay flat
# safetensors' dtype names (https://github.com/huggingface/safetensors, format spec)
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_TORCH = {v: k for k, v in _DTYPES.items()}
_RANK = {n: i for i, n in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"))}  # its Dtype enum order
_UMASK = os.umask(0o022)  # read once, at import (setting it is process-wide)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds,
    so a reader never sees a half-written file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise AMEError(f"cannot write {path} ({e.strerror}); choose a writable directory") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide shared cache entries from colleagues
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, a file-size limit: nothing half-written stays
        raise AMEError(f"cannot write {path} ({e.strerror or e}); free some space or choose another "
                       f"directory") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def finite_json(obj, where: str = ""):
    """``obj`` with every NaN/±Inf float replaced by None, and the places listed under
    ``"non_finite"`` (at the top level) with a warning: results stay valid JSON and say why a number
    is missing."""
    found: list[str] = []

    def walk(o, at):
        if isinstance(o, float) and not math.isfinite(o):
            found.append(f"{at}: {o}")
            return None
        if isinstance(o, dict):
            return {k: walk(v, f"{at}/{k}" if at else str(k)) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(o)]
        return o

    out = walk(obj, where)
    if found and isinstance(out, dict):
        log.warning("non-finite values written as null: %s", "; ".join(found[:5]))
        out["non_finite"] = [*out.get("non_finite", []), *found]
    return out


def write_json(obj, path: str | Path) -> None:
    """Write ``obj`` as strict JSON (NaN and Infinity are not JSON: refused), atomically."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as e:
        raise AMEError(f"refusing to write {path}: {e} (NaN/Inf are not JSON)") from None
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_state_dict(sd: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """Save as safetensors, atomically; returns the file's sha256. The metadata go in one JSON
    entry: safetensors writes several entries in a per-process random order, which would make the
    file bytes (and their sha256) differ from run to run."""
    return write_safetensors(path, sd, {"ame": json.dumps(dict(metadata or {}), sort_keys=True)})


def tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy (safetensors' layout: C order, little endian)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file, atomically and streaming (no serialised copy of the
    tensors in memory), and return the file's sha256. The bytes are exactly those of
    ``safetensors.torch.save_file`` (same header and tensor order), so hashes agree with files it wrote."""
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _DTYPES})
    if unknown:
        raise AMEError(f"cannot store tensors of dtype {unknown} in the cache; use float, int, uint8 or bool tensors")
    names = sorted(tensors, key=lambda k: (-_RANK[_DTYPES[tensors[k].dtype]], k))  # safetensors' order
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in names:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for block in (struct.pack("<Q", len(head)), head):
            f.write(block), h.update(block)
        for k in names:
            data = tensor_bytes(tensors[k])
            for i in range(0, len(data), _CHUNK):
                f.write(data[i:i + _CHUNK]), h.update(data[i:i + _CHUNK])
    return h.hexdigest()


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """Read a safetensors file into fresh tensors, hashing the very bytes read: returns
    (tensors, metadata, sha256). Raises ``ValueError`` for a file that is not well-formed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", first)
        if n > 100 << 20:
            raise ValueError("implausible header length")
        head = f.read(n)
        h.update(first), h.update(head)
        header = json.loads(head)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        out, position = {}, 0
        for k, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = spec["data_offsets"]
            t = torch.empty(spec["shape"], dtype=_TORCH[spec["dtype"]])
            buf = tensor_bytes(t) if t.numel() else memoryview(bytearray(0))
            if start != position or end - start != len(buf):
                raise ValueError(f"tensor {k!r} has inconsistent offsets")
            for i in range(0, len(buf), _CHUNK):
                part = buf[i:i + _CHUNK]
                if f.readinto(part) != len(part):
                    raise ValueError("truncated")
                h.update(part)
            out[k], position = t, end
        for block in iter(lambda: f.read(_CHUNK), b""):  # trailing bytes: part of the file, so of its hash
            h.update(block)
    return out, metadata, h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(path: str | Path) -> dict[str, str]:
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        return {**meta, **json.loads(meta.pop("ame", "{}"))}
    except Exception as e:
        raise AMEError(f"cannot read {path} as safetensors ({str(e)[:120]}); is the file complete?") from None


def load_state_dict(path: str | Path, key: str = "experts.paths") -> StateDict:
    """Load weights from ``.safetensors`` (memory-mapped) or, for ``.pt``/``.pth``, with
    ``torch.load(weights_only=True)``: expert files are untrusted input, never unpickled freely."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AMEError(f"weight file {path} does not exist; check {key}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if path.suffix in (".pt", ".pth", ".bin"):
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
                raise AMEError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
            return dict(sd)
    except AMEError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AMEError(f"cannot read weights from {path}: {first[:200]}; use a safetensors file "
                       f"(or a weights-only .pt state dict)") from None
    raise AMEError(f"{path}: unknown weight format {path.suffix!r}; use .safetensors (or .pt/.pth)")
