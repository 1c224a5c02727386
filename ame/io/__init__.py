"""Weight and file I/O, one layer: every checkpoint read or written, and every cache file, goes
through this package.

- :mod:`ame.io.safetensors`: the one safetensors header parser (strict: what the library rejects,
  it rejects), its writers (whole files, streamed slices) and readers (``pread`` slices, hashed reads);
- :mod:`ame.io.readers`: one reader class per weight format, found by suffix; folders and indices;
- :mod:`ame.io.checkpoint`: :class:`Checkpoint`, a lazy key-addressable view of a file or folder;
- :mod:`ame.io.writer`: :class:`Output` / :class:`FileOutput` (the aggregate in the experts' layout,
  never over, inside or around an input, never deleting what this tool did not write);
- :mod:`ame.io.metadata`: the one parser of experts' metadata (shard sizes, class counts);
- :mod:`ame.io.files`: atomic writes, strict JSON, hashes.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ame.io.checkpoint import Checkpoint, expand
from ame.io.files import StateDict, atomic_path, finite_json, sha256_file, tensor_bytes, write_json
from ame.io.readers import READERS, reader
from ame.io.safetensors import read_safetensors, write_safetensors
from ame.io.writer import FileOutput, Output, save


def save_state_dict(sd: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """Save as safetensors, atomically; returns the file's sha256. The metadata go in one JSON
    entry ``ame`` (read back by :mod:`ame.io.metadata`): safetensors writes several entries in a
    per-process random order, which would make the file bytes (and their sha256) differ from run to run."""
    return write_safetensors(path, sd, {"ame": json.dumps(dict(metadata or {}), sort_keys=True)})


__all__ = ["Checkpoint", "FileOutput", "expand", "Output", "READERS", "StateDict", "atomic_path", "finite_json",
           "read_safetensors", "reader", "save", "save_state_dict", "sha256_file", "tensor_bytes", "write_json",
           "write_safetensors"]
