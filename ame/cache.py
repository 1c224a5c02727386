"""One cache for every expensive, reusable result: decoded datasets, shard indices, warm bases,
trained experts, aligned copies, reference metrics (and corrupted test sets).

An entry is a folder ``<cache_dir>/<kind>/<key>/`` (the key hashes exactly what determines it)
holding files and ``manifest.json``, which records each file's sha256. Every file is written to a
temporary name and renamed into place, then recorded; a lock from ``filelock`` (beside the folder,
``<key>.lock``) makes concurrent jobs build an entry once: a job that has to wait says so in one
line. Files are verified by content whenever they are read: tensors are read straight into their
storage while the same bytes are hashed (no second copy, no second read), JSON likewise; a file
whose bytes differ from the recorded hash (bit rot, truncation, a bad restore), a manifest that is
not a manifest, or a file the manifest does not know is reported in one line, dropped and rebuilt,
never used and never a reason to delete the cache by hand.

Use it as::

    entry = Entry(cache_dir, "corruptions", key, spec, what="corrupted test sets")
    with entry.lock():
        tensors = entry.load_tensors("data.safetensors")
        if tensors is None:
            entry.put_tensors("data.safetensors", build())

or, for one file of tensors, :func:`cached_tensors` does exactly that.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from filelock import FileLock, Timeout
from torch import Tensor

from ame.errors import AMEError
from ame.io import atomic_path, read_safetensors, sha256_file, write_json, write_safetensors

log = logging.getLogger(__name__)

# flock's errors on a filesystem that grants no locks (an NFS mount without a lock daemon, a FUSE mount);
# where flock is not implemented at all (ENOSYS), filelock (>= 3.24) falls back to a lock file by itself
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP)

LOCK_TIMEOUT_S = 24 * 3600  # a job waits this long for another job building the same entry

def lock_timeout() -> float:
    """Seconds to wait for another job's lock: ``$AME_CACHE_LOCK_TIMEOUT`` or :data:`LOCK_TIMEOUT_S`."""
    value = os.environ.get("AME_CACHE_LOCK_TIMEOUT")
    try:
        return float(value) if value else LOCK_TIMEOUT_S
    except ValueError:
        raise AMEError(f"AME_CACHE_LOCK_TIMEOUT must be a number of seconds, got {value!r}") from None


class Entry:
    """One cache entry: ``<cache_dir>/<kind>/<key>/`` with its files, manifest and lock.

    ``spec`` (what the key hashes, for people reading the cache) is stored in the manifest;
    ``what`` names the entry in messages ("trained experts", "decoded cifar10", ...)."""

    def __init__(self, cache_dir: str | Path, kind: str, key: str, spec: Any = None, what: str | None = None):
        self.root = Path(cache_dir).expanduser() / kind / key
        self.manifest_path = self.root / "manifest.json"
        self.spec, self.what = spec, what or f"cache entry {kind}/{key}"
        self._lock = FileLock(str(self.root) + ".lock", timeout=-1)

    # -- locking -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator["Entry"]:
        """Hold the entry's lock (reentrant); a job that has to wait for another says so."""
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._lock.acquire(timeout=0)
            except Timeout:
                print(f"waiting for {self.what} (held by another job) ... [{self._lock.lock_file}]", file=sys.stderr,
                      flush=True)
                log.info("waiting for %s (held by another job): %s", self.what, self._lock.lock_file)
                try:
                    self._lock.acquire(timeout=lock_timeout())
                except Timeout:
                    raise AMEError(f"gave up after {lock_timeout():.0f} s waiting for {self.what} (lock "
                                   f"{self._lock.lock_file}); if no other job is running, delete that lock file and "
                                   f"rerun (or raise $AME_CACHE_LOCK_TIMEOUT)") from None
        except OSError as e:
            if e.errno in NO_LOCKS:
                raise AMEError(f"cannot lock {self._lock.lock_file} ({e.strerror}): the filesystem of the cache gives "
                               f"no file locks; put paths.cache_dir (or $AME_CACHE_DIR) on one that does (README: "
                               f"the cache on a shared filesystem)") from None
            raise AMEError(f"cannot write the cache at {self.root.parent} ({e.strerror}); set paths.cache_dir "
                           f"(or $AME_CACHE_DIR) to a writable directory") from None
        try:
            yield self
        finally:
            self._lock.release()

    # -- the manifest --------------------------------------------------------------------------
    def manifest(self) -> dict:
        """The manifest as on disk; a missing one is empty, a damaged one is reported and treated
        as empty (its files are then rebuilt)."""
        fresh = {"config": self.spec, "files": {}}
        try:
            text = self.manifest_path.read_text()
        except FileNotFoundError:
            return fresh
        except OSError as e:
            raise AMEError(f"cannot read {self.manifest_path} ({e.strerror}); check paths.cache_dir") from None
        try:
            m = json.loads(text)
            if not (isinstance(m, dict) and isinstance(m.get("files"), dict)
                    and all(isinstance(v, str) for v in m["files"].values())):
                raise ValueError
        except ValueError:
            self._damaged(self.manifest_path, "is not a valid manifest")
            return fresh
        return m

    def _update(self, change: Callable[[dict], None]) -> None:
        with self.lock():
            m = self.manifest()
            change(m)
            write_json(m, self.manifest_path)

    def record(self, name: str, digest: str) -> None:
        self._update(lambda m: m["files"].__setitem__(name, digest))

    def forget(self, name: str) -> None:
        self._update(lambda m: m["files"].pop(name, None))

    def recorded(self) -> dict[str, str]:
        return dict(self.manifest()["files"])

    def _damaged(self, path: Path, why: str) -> None:
        log.warning("cache: %s %s (%s); rebuilding it", path, why, self.what)
        print(f"warning: cache file {path} {why}; rebuilding it", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            path.unlink()

    def _expect(self, name: str) -> str | None:
        """The recorded hash of ``name`` if the file is there; a file without a record (written by
        a job killed before it recorded it) is not trusted."""
        if not (self.root / name).is_file():
            return None
        return self.manifest()["files"].get(name)

    def _check(self, name: str, digest: str, expected: str) -> bool:
        if digest == expected:
            return True
        self._damaged(self.root / name, "does not match the hash its manifest recorded (damaged)")
        self.forget(name)
        return False

    # -- reading (verified) --------------------------------------------------------------------
    def verify(self, name: str) -> bool:
        """Whether ``name`` is present and its bytes are the recorded ones (one streaming read)."""
        expected = self._expect(name)
        return expected is not None and self._check(name, sha256_file(self.root / name), expected)

    def load_tensors(self, name: str) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """(tensors, metadata) of ``name``, verified while read; None if missing or damaged."""
        expected = self._expect(name)
        if expected is None:
            return None
        try:
            tensors, metadata, digest = read_safetensors(self.root / name)
        except (AMEError, OSError) as e:
            self._damaged(self.root / name, f"is not a readable safetensors file ({str(e)[:80]})")
            self.forget(name)
            return None
        return (tensors, metadata) if self._check(name, digest, expected) else None

    def load_json(self, name: str) -> Any | None:
        """The JSON object in ``name``, verified; None if missing, damaged or not JSON."""
        expected = self._expect(name)
        if expected is None:
            return None
        data = (self.root / name).read_bytes()
        if not self._check(name, hashlib.sha256(data).hexdigest(), expected):
            return None
        try:
            return json.loads(data)
        except ValueError:
            self._damaged(self.root / name, "is not JSON")
            self.forget(name)
            return None

    # -- writing -------------------------------------------------------------------------------
    def put_tensors(self, name: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
        """Write and record ``name``; returns its sha256."""
        digest = write_safetensors(self.root / name, tensors, metadata)
        self.record(name, digest)
        return digest

    def put_json(self, name: str, obj: Any) -> None:
        data = (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()
        with atomic_path(self.root / name) as tmp:
            tmp.write_bytes(data)
        self.record(name, hashlib.sha256(data).hexdigest())


def cached_tensors(cache_dir: str | Path | None, kind: str, key: str, build: Callable[[], dict[str, Tensor]],
                   spec: Any = None, what: str | None = None, name: str = "data.safetensors") -> dict[str, Tensor]:
    """``build()`` once per ``key``, then read back verified (no cache when ``cache_dir`` is falsy).
    The simple case of :class:`Entry` (e.g. corrupted test sets)."""
    if not cache_dir:
        return build()
    entry = Entry(cache_dir, kind, key, spec, what)
    with entry.lock():
        hit = entry.load_tensors(name)
        if hit is not None:
            return hit[0]
        tensors = build()
        entry.put_tensors(name, tensors)
        return tensors
