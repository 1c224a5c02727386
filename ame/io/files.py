"""Files: atomic writes, strict JSON, hashes, a tensor's bytes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ame.errors import AMEError

StateDict = dict[str, Tensor]
log = logging.getLogger(__name__)
_CHUNK = 64 << 20  # bytes per read/write/hash call: large enough for disk speed, small enough to stay flat
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


def tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy (safetensors' layout: C order, little endian)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()
