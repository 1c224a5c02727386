"""Files: atomic writes, a file lock, and state dicts as safetensors (``.pt`` only weights-only)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor

from ame.errors import AMEError

StateDict = dict[str, Tensor]
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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: concurrent jobs needing the same cache entry queue here."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except OSError as e:
        raise AMEError(f"cannot write the cache at {path.parent} ({e.strerror}); set paths.cache_dir "
                       f"(or $AME_CACHE_DIR) to a writable directory") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_state_dict(sd: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Save as safetensors, atomically. The metadata go in one JSON entry: safetensors writes
    several entries in a per-process random order, which would make the file bytes (and their
    sha256) differ from run to run."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ame": json.dumps(dict(metadata or {}), sort_keys=True)})


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_verified(sd: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Save ``sd`` atomically with a ``<path>.sha256`` sidecar, for :func:`is_verified`."""
    path = Path(path)
    save_state_dict(sd, path, metadata)
    with atomic_path(path.with_name(path.name + ".sha256")) as tmp:
        tmp.write_text(sha256_file(path) + "\n")


def is_verified(path: str | Path) -> bool:
    """True if ``path`` exists and matches the hash its sidecar recorded (not truncated or altered)."""
    path, sidecar = Path(path), Path(str(path) + ".sha256")
    try:
        return path.is_file() and sidecar.read_text().strip() == sha256_file(path)
    except OSError:
        return False


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
