"""The one parser of experts' file metadata: what a checkpoint says about the expert in it.

This project writes its fields (``shard_size``, ``class_counts``, ...) as one JSON entry ``ame``
of the safetensors metadata (see :func:`ame.io.save_state_dict`); plain string entries of the same
names, as other tools write them, are read too. ``run.py experts=files``, ``python -m ame.merge``
and the cache all read them through :func:`expert_fields` / :func:`expert_set`, so a value is
valid or refused the same way everywhere: one line naming the file and the field.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ame.errors import AMEError, require

log = logging.getLogger(__name__)


def fields(metadata: Mapping[str, str], path: str | Path) -> dict:
    """The metadata entries, with this project's ``ame`` JSON entry unpacked over them."""
    out = dict(metadata)
    if "ame" in out:
        try:
            extra = json.loads(out.pop("ame"))
        except ValueError:
            raise AMEError(f"{path}: metadata entry 'ame' is not JSON; fix or remove that entry") from None
        require(isinstance(extra, dict), f"{path}: metadata entry 'ame' must be a JSON object, got "
                f"{type(extra).__name__}; fix or remove that entry")
        out.update(extra)
    return out


def shard_size(value, path: str | Path, field: str = "shard_size") -> int:
    """A shard size from a file's metadata: a positive integer, else one line naming file and field."""
    text = str(value).strip()
    require(not isinstance(value, bool) and text.lstrip("+").isdigit() and int(text) >= 1,
            f"{path}: metadata field '{field}' must be a positive integer (the expert's number of training "
            f"examples), got {value!r}; fix or remove that field")
    return int(text)


def class_counts(value, path: str | Path, field: str = "class_counts") -> list[int]:
    """Examples per class from a file's metadata: a list of non-negative integers, not all zero."""
    row = value
    if isinstance(value, str):
        try:
            row = json.loads(value)
        except ValueError:
            row = value
    ok = (isinstance(row, list) and len(row) > 0
          and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row) and sum(row) > 0)
    require(ok, f"{path}: metadata field '{field}' must be a list of non-negative integer counts, not all zero "
            f"(examples per class in the expert's shard), got {str(value)[:80]}; fix or remove that field")
    return row


def expert_set(metadata: Sequence[Mapping[str, str]], paths: Sequence[str | Path]
               ) -> tuple[list[int] | None, np.ndarray | None]:
    """Shard sizes and class counts of a set of experts from their files' metadata: each ``None``
    unless every file records it (a warning when only some do)."""
    parsed = [fields(m, p) for m, p in zip(metadata, paths)]
    sizes = None
    if all("shard_size" in f for f in parsed):
        sizes = [shard_size(f["shard_size"], p) for f, p in zip(parsed, paths)]
    elif any("shard_size" in f for f in parsed):
        log.warning("only some expert files record their shard size; treating all shards as equal-sized")
    counts = None
    if all("class_counts" in f for f in parsed):
        rows = [class_counts(f["class_counts"], p) for f, p in zip(parsed, paths)]
        lengths = {len(r) for r in rows}
        require(len(lengths) == 1, f"metadata field 'class_counts' has different lengths across the expert files "
                f"({sorted(lengths)}); every expert must count the same classes")
        counts = np.array(rows, dtype=np.int64)
    return sizes, counts
