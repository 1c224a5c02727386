"""One reader class per weight file format, found by suffix in a small registry.

Every reader gives the same interface: ``infos`` (key → (shape, dtype)), ``metadata`` (str → str),
``rows(key, start, stop, out=None)`` (rows of a tensor, flat), ``release()``, and ``reads_into``
(whether ``rows`` fills a caller's buffer, as a file read does, or returns a view of tensors held in
memory). A new format is one class here with ``@reader(".suffix")``; :func:`folder_weights` finds the
weight files of a timm / Hugging Face folder, strictly (an index names files inside its folder).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ame.errors import AMEError
from ame.io.safetensors import SafetensorsFile

READERS: dict[str, type] = {}


def reader(*suffixes: str) -> Callable[[type], type]:
    """Register a reader class for files ending in ``suffixes``."""
    def register(cls: type) -> type:
        for s in suffixes:
            READERS[s] = cls
        cls.suffixes = suffixes
        return cls
    return register


def reader_for(path: Path, what: str) -> type:
    cls = READERS.get(path.suffix)
    if cls is None:
        raise AMEError(f"{path}: unknown weight format {path.suffix!r}; use {', '.join(READERS)} or a timm/Hugging "
                       f"Face folder (check {what})")
    return cls


@reader(".safetensors")
class SafetensorsReader(SafetensorsFile):
    """A ``.safetensors`` file, validated as the library would, read slice by slice (``pread``)."""

    format = "safetensors"


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def torch_load(path: Path) -> dict[str, Tensor]:
    """A state dict from a torch file, read with ``torch.load(weights_only=True)`` only (memory-mapped
    where the file allows): a file that holds anything but tensors and containers is refused and
    nothing in it runs. A Lightning checkpoint gives its ``state_dict``."""
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — unpickling errors come in many types; all mean the same here
        text = str(e)
        found = _GLOBAL.search(text)
        if found or "Weights only load failed" in text:
            what = f" ({found.group(1)})" if found else ""
            raise AMEError(f"{path} holds Python objects{what}, not only tensors; it is never unpickled here (that "
                           "could run code). Save model.state_dict() with torch.save, or use safetensors") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise AMEError(f"cannot read weights from {path}: {first[:200]}; use a safetensors file "
                       f"(or a weights-only .pt state dict)") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # a Lightning checkpoint (or a dict wrapping one)
    if (not isinstance(sd, dict) or not sd or not all(isinstance(k, str) for k in sd)
            or not all(isinstance(v, Tensor) for v in sd.values())):
        raise AMEError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    return dict(sd)


@reader(".pt", ".pth", ".bin")
class TorchReader:
    """A torch state dict file (``torch.save(model.state_dict())``), held in memory (memory-mapped)."""

    format = "torch"
    reads_into = False

    def __init__(self, path: Path):
        self.path = path
        self._sd = torch_load(path)
        self.infos = {k: (tuple(v.shape), v.dtype) for k, v in self._sd.items()}
        self.metadata: dict[str, str] = {}

    def rows(self, key: str, start: int | None = None, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        t = self._sd[key]
        return (t if start is None else t[start:stop]).reshape(-1)

    def release(self) -> None:
        pass

    @staticmethod
    def wrap(sd: dict[str, Tensor]) -> dict:
        """What is saved for ``sd`` in this format."""
        return sd


@reader(".ckpt")
class LightningReader(TorchReader):
    """A Lightning checkpoint: its ``state_dict`` (written back wrapped the same way)."""

    @staticmethod
    def wrap(sd: dict[str, Tensor]) -> dict:
        return {"state_dict": sd}


def _index(path: Path, folder: Path) -> dict[str, str]:
    """The weight map of an index file, every file it names inside ``folder`` and present."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise AMEError(f"{path} is not a readable JSON checkpoint index; is the file complete?") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise AMEError(f"{path}: 'weight_map' must map tensor names to file names (strings); is the index "
                       "complete?")
    root = folder.resolve()
    for name in dict.fromkeys(weight_map.values()):
        target = (folder / name).resolve()
        if Path(name).is_absolute() or target.parent != root:
            raise AMEError(f"{path} names {name!r}, which is not a file of {folder}; an index may only name "
                           "files in its own folder")
        if not target.is_file():
            raise AMEError(f"{folder}: the index names {name}, which is not in the folder; is the download "
                           "complete?")
    return dict(weight_map)


def folder_weights(path: Path) -> tuple[type, list[str], dict[str, str] | None, str | None]:
    """The weight files of a timm / Hugging Face folder: (reader class, files, key → file map or
    None, index file name or None). safetensors first, then ``pytorch_model.bin``."""
    for cls, stem, suffix in ((SafetensorsReader, "model", ".safetensors"), (TorchReader, "pytorch_model", ".bin")):
        preferred = path / f"{stem}{suffix}.index.json"
        indices = [preferred] if preferred.is_file() else sorted(path.glob(f"*{suffix}.index.json"))
        if len(indices) == 1:
            weight_map = _index(indices[0], path)
            return cls, list(dict.fromkeys(weight_map.values())), weight_map, indices[0].name
        single = path / f"{stem}{suffix}"
        files = [single] if single.is_file() else sorted(path.glob(f"*{suffix}"))
        if len(files) == 1:
            return cls, [files[0].name], None, None
    raise AMEError(f"{path}: no weights found in the folder; expected model.safetensors (or shards with "
                   "model.safetensors.index.json), or pytorch_model.bin")
