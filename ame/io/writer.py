"""Where an aggregate goes: in memory, or a checkpoint written in the experts' layout, safely.

A user's files are sacred:

- ``out`` is refused when it is, contains, or lies inside any input (an expert, the init):
  resolved paths are compared, and existing files by device and inode (links included);
- an existing ``out`` is replaced only when it is a previous output of this tool (folders hold a
  ``.ame-merge.json`` record, safetensors files an ``ame_merge`` metadata entry) or ``overwrite=true``
  is given; nothing else is ever deleted, and a folder is never replaced by a file or a file by a folder;
- everything is written into a temporary folder beside ``out`` and renamed into place only when
  complete; the temporary folder is removed on every exit path (errors, Ctrl-C, SIGTERM, a full
  disk or a file-size limit: the command line turns them into exceptions).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ame.errors import AMEError, require
from ame.io.checkpoint import Checkpoint
from ame.io.readers import READERS, SafetensorsReader
from ame.io.safetensors import StreamedSafetensors
from ame.progress import Meter

MARK = ".ame-merge.json"  # in a folder this tool wrote
MARK_KEY = "ame_merge"  # in the metadata of a safetensors file this tool wrote
TOKENIZER_FILES = {"special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "added_tokens.json"}  # besides tokenizer*.*


class Output:
    """An aggregate, slice by slice: ``write(key, start_row, values)`` then ``close()``. This base
    keeps it in memory and returns the state dict."""

    def __init__(self, infos: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.infos = infos
        self.sd = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in infos.items()}

    def write(self, key: str, start_row: int, values: Tensor) -> None:
        t = self.sd[key]
        if values.numel() == 0:
            return
        row = math.prod(t.shape[1:]) if t.dim() else 1
        t.view(-1)[start_row * row: start_row * row + values.numel()].copy_(values.reshape(-1))

    def close(self) -> Mapping[str, Tensor]:
        return self.sd

    def abort(self) -> None:
        pass


def _resolved(p: Path) -> Path:
    return Path(os.path.abspath(p.expanduser())).resolve()


def _ours(out: Path) -> bool:
    """Whether ``out`` is a previous output of this tool."""
    if out.is_dir():
        return (out / MARK).is_file()
    if out.suffix == ".safetensors" and out.is_file():
        try:
            return MARK_KEY in SafetensorsReader(out).metadata
        except AMEError:
            return False
    return False


def check_out(out: Path, inputs: Sequence[Path], folder: bool, overwrite: bool = False) -> None:
    """Refuse, in one line, an ``out`` that would overwrite, delete or nest into a user's files."""
    target = _resolved(out)
    stat = os.stat(target) if target.exists() else None
    for p in inputs:
        src = _resolved(Path(p))
        same = stat is not None and src.exists() and os.path.samestat(stat, os.stat(src))
        if target == src or same:
            raise AMEError(f"out={out} is an input of this merge ({p}); choose a new path for the output")
        if target.is_relative_to(src):
            raise AMEError(f"out={out} lies inside the input {p}; write the output outside the inputs")
        if src.is_relative_to(target):
            raise AMEError(f"out={out} contains the input {p}; choose a new path for the output")
    if os.path.lexists(out):
        kind = "folder" if out.is_dir() else "file"
        require(out.is_dir() == folder, f"out={out} is an existing {kind}, but this merge writes a "
                f"{'folder' if folder else 'file'}; choose a new path (nothing was changed)")
        require(overwrite or _ours(out), f"out={out} exists and was not written by ame.merge; choose a new path, or "
                "give overwrite=true to replace it")


class FileOutput(Output):
    """An aggregate written to ``out`` in the layout of ``template`` (a :class:`Checkpoint`), or,
    for a single-file template, in the format ``out``'s suffix names. Safetensors outputs stream
    to disk (nothing of the model is held); torch formats are assembled in memory and saved.

    ``inputs``: every path read for this merge (see :func:`check_out`); ``record``: what made the
    output (written as the folder's ``.ame-merge.json`` or the file's ``ame_merge`` metadata)."""

    def __init__(self, infos: dict, out: str | Path, template: Checkpoint | None = None,
                 metadata: dict[str, str] | None = None, inputs: Sequence[Path] = (), overwrite: bool = False,
                 record: Mapping | None = None, card: str | None = None, extra_files: Path | None = None,
                 desc: str = "writing"):
        require(isinstance(out, (str, Path)) and str(out).strip(), f"out must be a path, got {out!r}")
        self.infos, self.out, self.template = infos, Path(str(out)).expanduser(), template
        # folder experts give a folder, unless out names a weight file (e.g. a slice chosen by key_prefix)
        self.folder = template is not None and template.layout == "folder" and self.out.suffix not in READERS
        if self.folder:
            self.writer = template.reader
            require(not template.partial, f"experts.key_prefix={template.prefix!r} keeps {len(template)} of the "
                    f"{template.total} tensors of {template.path}; a folder output would be a partial model that "
                    "loads with the rest re-initialised. Write a file instead (out=<name>.safetensors), or drop "
                    "experts.key_prefix")
        else:
            self.writer = READERS.get(self.out.suffix)
            require(self.writer is not None, f"out={out}: give a file name ending in {', '.join(READERS)} (the "
                    "experts are single files), or a folder for folder experts")
        check_out(self.out, inputs, self.folder, overwrite)
        prefix = template.prefix if template is not None else ""
        self.full = {k: prefix + k for k in infos}
        self.record = json.dumps(dict(record or {"tool": "ame.merge"}), sort_keys=True)
        self.card, self.extra_files = card, extra_files
        self.meter = Meter(f"{desc} → {self.out.name}", sum(d.itemsize * math.prod(s) for s, d in infos.values()))
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        except OSError as e:
            raise AMEError(f"cannot write {self.out} ({e.strerror}); choose a writable out=") from None
        if self.folder and template.weight_map is not None:
            self.file_of = {k: template.file_of(k) for k in infos}
        elif self.folder:
            self.file_of = {k: template.files[0] for k in infos}
        else:
            self.file_of = {k: self.out.name for k in infos}
        files = list(dict.fromkeys(self.file_of.values()))
        meta = dict(metadata if metadata is not None else (template.metadata if template is not None else {}))
        if template is not None and template.reader is not self.writer:
            meta = {}  # metadata of another format (or file) do not carry over
        meta.setdefault("format", "pt")  # transformers refuses safetensors files without it
        meta.pop(MARK_KEY, None)
        if not self.folder:
            meta[MARK_KEY] = self.record
        self.streams: dict[str, StreamedSafetensors] = {}
        self.memory: Output | None = None
        try:
            if self.writer is SafetensorsReader:
                for f in files:
                    self.streams[f] = StreamedSafetensors(self.tmp / f, {self.full[k]: infos[k] for k in infos
                                                                         if self.file_of[k] == f}, meta)
            else:
                self.memory = Output(infos)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise self.failed(e) from None
            raise

    def failed(self, e: OSError) -> AMEError:
        """The one line for a write that the system refused (a full disk, a file-size limit, ...)."""
        return AMEError(f"cannot write {self.out} ({e.strerror or e}); free some space or choose another out= "
                        "(nothing was written)")

    def write(self, key: str, start_row: int, values: Tensor) -> None:
        self.meter.update(values.numel() * self.infos[key][1].itemsize)
        try:
            if self.memory is not None:
                self.memory.write(key, start_row, values)
            else:
                self.streams[self.file_of[key]].write(self.full[key], start_row, values)
        except OSError as e:
            raise self.failed(e) from None

    def close(self) -> Mapping[str, Tensor]:
        try:
            if self.memory is not None:
                sd = self.memory.close()
                for f in dict.fromkeys(self.file_of.values()):
                    part = {self.full[k]: v for k, v in sd.items() if self.file_of[k] == f}
                    torch.save(self.writer.wrap(part), self.tmp / f)
            for s in self.streams.values():
                s.close()
            if self.folder:
                self._finish_folder()
                final = self.tmp
            else:
                final = self.tmp / self.out.name
            _replace(final, self.out)
        except OSError as e:
            raise self.failed(e) from None
        finally:
            self.abort()
        return Checkpoint(self.out, self.template.prefix if self.template is not None else None, what="out")

    def _finish_folder(self) -> None:
        t = self.template
        weights = set(t.files) | ({t.index_name} if t.index_name else set())
        for item in t.path.iterdir():  # every non-weight file: config.json, tokenizer, README, ...
            if item.name in weights or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, self.tmp / item.name)
            else:
                shutil.copy2(item, self.tmp / item.name)
        if t.index_name:
            total = sum(d.itemsize * math.prod(s) for s, d in self.infos.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {self.full[k]: self.file_of[k] for k in self.infos}}
            (self.tmp / t.index_name).write_text(json.dumps(index, indent=2) + "\n")
        if self.extra_files is not None:  # e.g. the tokenizer of a recipe's tokenizer_source
            for item in sorted(self.extra_files.iterdir()):
                if item.is_file() and (item.name.startswith("tokenizer") or item.name in TOKENIZER_FILES):
                    shutil.copy2(item, self.tmp / item.name)
        if self.card is not None:
            (self.tmp / "README.md").write_text(self.card)
        (self.tmp / MARK).write_text(self.record + "\n")
        os.chmod(self.tmp, 0o755)

    def abort(self) -> None:
        """Close what is open and remove the temporary folder (idempotent)."""
        if getattr(self, "meter", None) is not None:
            self.meter.close()
        for s in self.streams.values():
            s.abort()
        if getattr(self, "tmp", None) is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; a previous output there (checked by :func:`check_out`) is moved
    aside first and removed only once ``src`` is in place."""
    if dst.is_dir() and not dst.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
        if dst.is_file():
            os.chmod(dst, 0o644)


def save(sd: Mapping[str, Tensor], out: str | Path, like: Checkpoint | None = None, overwrite: bool = False
         ) -> Mapping[str, Tensor]:
    """Write the state dict ``sd`` to ``out`` in the layout of ``like`` (see :class:`FileOutput`)."""
    infos = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    dest = FileOutput(infos, out, like, inputs=like.inputs() if like is not None else (), overwrite=overwrite)
    try:
        for k, v in sd.items():
            dest.write(k, 0, v.detach().cpu())
        return dest.close()
    except BaseException:
        dest.abort()
        raise
