"""A checkpoint as a lazy, key-addressable view, whatever its layout.

An expert (or an init) is a path:

- a weight file, read by the reader its suffix names (:mod:`ame.io.readers`): ``.safetensors``
  (its validated header; slices read on demand with ``pread`` into the caller's buffer, so memory is
  bounded by the slices in use), ``.pt``/``.pth``/``.bin`` state dicts and Lightning ``.ckpt`` (read
  with ``torch.load(weights_only=True)`` only, memory-mapped where the file allows);
- a timm / Hugging Face folder: ``model.safetensors``, or shards with ``model.safetensors.index.json``
  (any single ``*.safetensors[.index.json]``), or ``pytorch_model.bin`` (+ its index).

``key_prefix`` keeps only the keys under that prefix and strips it (``model.`` for a Lightning
module's network); the writer (:mod:`ame.io.writer`) puts it back.
"""
from __future__ import annotations

import glob
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ame.errors import AMEError, require
from ame.io.readahead import Span
from ame.io.readers import folder_weights, reader_for


class Checkpoint(Mapping):
    """A lazy view of one checkpoint. As a ``Mapping`` it gives full tensors (copies);
    :meth:`rows` gives slices for streaming."""

    def __init__(self, path: str | Path, key_prefix: str | None = None, what: str = "experts.paths"):
        require(isinstance(path, (str, Path)), f"{what}: expected a checkpoint path, got {type(path).__name__}")
        require(key_prefix is None or isinstance(key_prefix, str),
                f"experts.key_prefix must be a string, got {key_prefix!r}")
        self.path = Path(str(path)).expanduser()
        self.prefix = key_prefix or ""
        self.name = str(path)
        if self.path.is_dir():
            self.layout = "folder"
            self.reader, files, self.weight_map, self.index_name = folder_weights(self.path)
        elif self.path.is_file():
            self.layout, self.weight_map, self.index_name = "file", None, None
            self.reader, files = reader_for(self.path, what), [self.path.name]
            self._refuse_shard(what)
        else:
            raise AMEError(f"weight file {self.path} does not exist; check {what}")
        self.format = self.reader.format
        self.reads_into = self.reader.reads_into
        root = self.path if self.layout == "folder" else self.path.parent
        self.files = files
        self._files: dict[str, object] = {}
        self._where: dict[str, tuple[str, str]] = {}  # stripped key → (file, full key)
        self.metadata: dict[str, str] = {}
        self.total = 0  # tensors in the checkpoint, before key_prefix
        keys: list[str] = []
        for name in files:
            f = self._files[name] = self.reader(root / name)
            keys = list(f.infos)
            if self.weight_map is not None:  # as transformers reads it: each key from the file its index names
                keys = [k for k in keys if self.weight_map.get(k) == name]
            self.total += len(keys)
            self.metadata = self.metadata or dict(f.metadata)
            for k in keys:
                if k.startswith(self.prefix):
                    self._where[k[len(self.prefix):]] = (name, k)
        if self.weight_map is not None:
            held = {k for name, f in self._files.items() for k in f.infos if self.weight_map.get(k) == name}
            missing = sorted(set(self.weight_map) - held)
            if missing:
                raise AMEError(f"{self.path}: the index names {missing[0]!r}, which its file does not hold; is the "
                               "download complete?")
        if self.prefix and not self._where:
            example = keys[0] if keys else "(none)"
            raise AMEError(f"{self.path}: no key starts with key_prefix={self.prefix!r} (e.g. {example!r}); "
                           "check experts.key_prefix")
        require(self._where, f"{self.path} holds no tensors; check {what}")
        self.infos: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            k: self._files[name].infos[full] for k, (name, full) in self._where.items()}

    @property
    def partial(self) -> bool:
        """Whether ``key_prefix`` leaves some of the checkpoint's tensors out."""
        return len(self._where) < self.total

    def _refuse_shard(self, what: str) -> None:
        for index in self.path.parent.glob("*.index.json"):
            try:
                shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError, TypeError):
                continue
            if self.path.name in shards and len(shards) > 1:
                raise AMEError(f"{self.path} is one shard of the sharded checkpoint {self.path.parent}; give the "
                               f"folder, not its files ({what})")

    # -- Mapping: full tensors ---------------------------------------------------------------
    def __getitem__(self, key: str) -> Tensor:
        if key not in self._where:
            raise KeyError(key)
        shape, _ = self.infos[key]
        t = self.rows(key)
        return (t if self.reads_into else t.clone()).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    # -- streaming -----------------------------------------------------------------------------
    def rows(self, key: str, start: int | None = None, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``start:stop`` of ``key`` (all of it by default), flattened: read into ``out`` (a
        buffer of that many entries and the tensor's dtype, reused by the caller) when the reader
        reads into buffers (``reads_into``), else a view of the tensor held in memory (``out``
        unused). Treat it as read-only."""
        name, full = self._where[key]
        return self._files[name].rows(full, start, stop, out)

    def span(self, key: str, start: int | None = None, stop: int | None = None):
        """Where rows ``start:stop`` of ``key`` lie on disk, as a :class:`~ame.io.readahead.Span`
        (None unless the reader reads into buffers: a safetensors file)."""
        if not self.reads_into:
            return None
        name, full = self._where[key]
        f = self._files[name]
        offset, nbytes = f.span(full, start, stop)
        return Span(str(f.path), offset, nbytes)

    def release(self) -> None:
        for f in self._files.values():
            f.release()

    def file_of(self, key: str) -> str:
        return self._where[key][0]

    def inputs(self) -> list[Path]:
        """The paths this checkpoint was read from (for the writer's never-over-an-input rule)."""
        return [self.path]


def expand(paths, what: str = "experts.paths") -> list:
    """Experts as given: one path or glob (a string), or a list of paths, globs, checkpoints or
    state dicts. Globs expand in sorted order; a glob that matches nothing is an error."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    require(isinstance(paths, Sequence) and not isinstance(paths, (bytes, bytearray)) and len(paths) > 0,
            f"{what} must be a checkpoint path, a glob, or a non-empty list of them (or of state dicts), "
            f"got {type(paths).__name__}")
    out = []
    for item in paths:
        if isinstance(item, (Mapping, Checkpoint)):
            out.append(item)
            continue
        require(isinstance(item, (str, Path)) and str(item).strip(), f"{what}: each expert must be a path (file or "
                f"folder), a glob or a state dict, got {type(item).__name__} {str(item)[:40]!r}")
        pattern = str(item)
        if glob.has_magic(pattern):
            found = sorted(glob.glob(str(Path(pattern).expanduser())))
            require(found, f"{what}={pattern!r} matches no files; check the glob (quote it on the command line)")
            out += found
        else:
            out.append(pattern)
    return out
