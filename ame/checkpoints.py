"""Checkpoints in and out: one lazy reader for every weight layout, one writer that gives it back.

An expert (or an init) is a path:

- a ``.safetensors`` file: its header is read, and a slice of a tensor is read on demand
  (:meth:`Checkpoint.rows`, with ``pread`` into the caller's buffer), so nothing of the file stays
  resident and memory is bounded by the slices in use;
- a timm / Hugging Face folder: ``model.safetensors``, or shards with ``model.safetensors.index.json``
  (any single ``*.safetensors[.index.json]``), or ``pytorch_model.bin`` (+ its index);
- a ``.pt``/``.pth``/``.bin`` state dict, or a Lightning ``.ckpt`` (its ``state_dict``): read with
  ``torch.load(weights_only=True)`` (memory-mapped where the file allows), never unpickled freely.

``key_prefix`` keeps only the keys under that prefix and strips it (``model.`` for a Lightning
module's network); the writer puts it back. :func:`writer` writes an aggregate in a checkpoint's
layout: a folder gives a folder with the same files, the same key → shard assignment, a fresh
index, and every other file (``config.json``, tokenizer files, ...) copied.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ame.errors import AMEError, require
from ame.io import atomic_path

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)


class _SafetensorsFile:
    """One safetensors file: its header, and slices of its tensors read with ``pread``.

    Reading into a buffer the caller reuses is the fastest way on every machine tried, and keeps
    nothing of the file resident: a memory map costs a page fault per 4 KB page whenever a slice is
    touched again after being released (several µs each on a virtual machine), and copies from
    mapped pages of a virtual machine's shared memory were measured 5-40× slower than ``pread``."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                require(0 < n < 100_000_000, "bad header size")
                header = json.loads(f.read(n))
            size = path.stat().st_size
        except (OSError, ValueError, struct.error, AMEError) as e:
            raise AMEError(f"cannot read {path} as safetensors ({str(e)[:100] or type(e).__name__}); "
                           "is the file complete?") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.start = 8 + n
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for k, v in header.items():
            dtype = SAFETENSORS_DTYPES.get(v.get("dtype"))
            require(dtype is not None, f"{path}: tensor '{k}' has dtype {v.get('dtype')}, which is not supported")
            begin, end = v["data_offsets"]
            require(self.start + end <= size, f"cannot read {path} as safetensors (tensor '{k}' lies past the end "
                    "of the file); is the file complete?")
            self.tensors[k] = (dtype, tuple(v["shape"]), begin, end)
        self._fd: int | None = None

    def view(self, key: str, start: int | None = None, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``start:stop`` (along the first axis) of ``key``, flat, read into ``out`` (a
        contiguous tensor of that many entries, of the tensor's dtype) or a new tensor."""
        dtype, shape, begin, end = self.tensors[key]
        numel = 1
        for s in shape:
            numel *= s
        row = numel // shape[0] if shape and shape[0] else numel
        if start is None:
            start, stop = 0, (shape[0] if shape else 1)
        count = (stop - start) * row
        t = torch.empty(count, dtype=dtype) if out is None else out
        if count == 0:
            return t
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        item = t.element_size()
        offset = self.start + begin + start * row * item
        buf = memoryview(t.view(torch.uint8).numpy()) if t.dim() else memoryview(t.reshape(1).view(torch.uint8).numpy())
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got <= 0:
                raise AMEError(f"cannot read {self.path}: it ended early (was it changed while reading?)")
            done += got
        return t

    def release(self) -> None:
        """Nothing of the file stays in this process between reads (kept for the source interface)."""

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def _torch_load(path: Path) -> dict[str, Tensor]:
    """A weights-only state dict from a torch file (a Lightning checkpoint's ``state_dict``)."""
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — unpickling errors come in many types; all mean the same here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AMEError(f"cannot read weights from {path}: {first[:200]}; use a safetensors file "
                       f"(or a weights-only .pt state dict)") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # a Lightning checkpoint (or a dict wrapping one)
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise AMEError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    return dict(sd)


def _folder_weights(path: Path) -> tuple[str, list[str], dict[str, str] | None, str | None]:
    """The weight files of a timm / Hugging Face folder: (format, files, key → file map, index name)."""
    for suffix, fmt in ((".safetensors", "safetensors"), (".bin", "torch")):
        preferred = path / f"{'model' if fmt == 'safetensors' else 'pytorch_model'}{suffix}.index.json"
        indices = [preferred] if preferred.is_file() else sorted(path.glob(f"*{suffix}.index.json"))
        if len(indices) == 1:
            try:
                weight_map = json.loads(indices[0].read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise AMEError(f"{indices[0]} is not a checkpoint index (no weight_map); is the file complete?") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise AMEError(f"{path}: the index names {missing[0]}, which is not in the folder; "
                               "is the download complete?")
            return fmt, files, dict(weight_map), indices[0].name
        single = path / f"{'model' if fmt == 'safetensors' else 'pytorch_model'}{suffix}"
        files = [single] if single.is_file() else sorted(path.glob(f"*{suffix}"))
        if len(files) == 1:
            return fmt, [files[0].name], None, None
    raise AMEError(f"{path}: no weights found in the folder; expected model.safetensors (or shards with "
                   "model.safetensors.index.json), or pytorch_model.bin")


class Checkpoint(Mapping):
    """A lazy, key-addressable view of one checkpoint (see the module docstring). As a ``Mapping``
    it gives full tensors (copies); :meth:`rows` gives zero-copy slices for streaming."""

    def __init__(self, path: str | Path, key_prefix: str | None = None, what: str = "experts.paths"):
        self.path = Path(str(path)).expanduser()
        self.prefix = key_prefix or ""
        self.name = str(path)
        if self.path.is_dir():
            self.layout = "folder"
            self.format, files, self.weight_map, self.index_name = _folder_weights(self.path)
        elif self.path.is_file():
            self.layout, self.weight_map, self.index_name = "file", None, None
            suffix = self.path.suffix
            require(suffix in WEIGHT_SUFFIXES, f"{self.path}: unknown weight format {suffix!r}; use .safetensors, "
                    ".pt/.pth/.bin, a Lightning .ckpt, or a timm/Hugging Face folder (check {what})"
                    .replace("{what}", what))
            self.format, files = ("safetensors" if suffix == ".safetensors" else "torch"), [self.path.name]
            self._refuse_shard(what)
        else:
            raise AMEError(f"weight file {self.path} does not exist; check {what}")
        root = self.path if self.layout == "folder" else self.path.parent
        self.files = files
        self._st: dict[str, _SafetensorsFile] = {}
        self._sd: dict[str, Tensor] = {}
        self._where: dict[str, tuple[str, str]] = {}  # stripped key → (file, full key)
        self.metadata: dict[str, str] = {}
        for name in files:
            if self.format == "safetensors":
                f = self._st[name] = _SafetensorsFile(root / name)
                keys = list(f.tensors)
                self.metadata = self.metadata or dict(f.metadata)
            else:
                sd = _torch_load(root / name)
                self._sd.update(sd)
                keys = list(sd)
            for k in keys:
                if k.startswith(self.prefix):
                    self._where[k[len(self.prefix):]] = (name, k)
        if self.prefix and not self._where:
            example = keys[0] if keys else "(none)"
            raise AMEError(f"{self.path}: no key starts with key_prefix={self.prefix!r} (e.g. {example!r}); "
                           "check experts.key_prefix")
        require(self._where, f"{self.path} holds no tensors; check {what}")
        self.infos: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for k, (name, full) in self._where.items():
            if self.format == "safetensors":
                dtype, shape, _, _ = self._st[name].tensors[full]
            else:
                t = self._sd[full]
                dtype, shape = t.dtype, tuple(t.shape)
            self.infos[k] = (tuple(shape), dtype)

    def _refuse_shard(self, what: str) -> None:
        for index in self.path.parent.glob("*.index.json"):
            try:
                shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
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
        return (t if self.format == "safetensors" else t.clone()).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    # -- streaming -----------------------------------------------------------------------------
    def rows(self, key: str, start: int | None = None, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``start:stop`` of ``key`` (all of it by default), flattened: read into ``out`` (a
        buffer of that many entries and the tensor's dtype, reused by the caller) for a file, a
        view for an in-memory (torch) checkpoint (``out`` unused). Treat it as read-only."""
        name, full = self._where[key]
        if self.format == "safetensors":
            return self._st[name].view(full, start, stop, out)
        t = self._sd[full]
        t = t if start is None else t[start:stop]
        return t.reshape(-1)

    def release(self) -> None:
        for f in self._st.values():
            f.release()

    def file_of(self, key: str) -> str:
        return self._where[key][0]


# -- writing ---------------------------------------------------------------------------------

def _header(infos: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]) -> tuple[bytes, dict]:
    """A safetensors header for ``infos`` (tensors laid out widest dtype first, so every tensor is
    aligned), and each key's byte offset from the start of the file."""
    order = sorted(infos, key=lambda k: -torch.empty((), dtype=infos[k][1]).element_size())
    entries, offset, where = {}, 0, {}
    for k in order:
        shape, dtype = infos[k]
        n = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            n *= s
        entries[k] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        where[k] = offset
        offset += n
    head = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    start = 8 + len(head)
    return struct.pack("<Q", len(head)) + head, {k: (start + v, offset) for k, v in where.items()}


class _StreamedSafetensors:
    """A safetensors file written piece by piece: header first, then each slice at its offset."""

    def __init__(self, path: Path, infos: dict, metadata: dict[str, str]):
        self.infos = infos
        head, self.offsets = _header(infos, metadata)
        total = len(head) + (next(iter(self.offsets.values()))[1] if self.offsets else 0)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.pwrite(self.fd, head, 0)
        os.ftruncate(self.fd, total)

    def write(self, key: str, start_row: int, values: Tensor) -> None:
        shape, dtype = self.infos[key]
        row = 1
        for s in shape[1:]:
            row *= s
        data = values.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = self.offsets[key][0] + start_row * row * torch.empty((), dtype=dtype).element_size()
        view = memoryview(data)
        while len(view):
            view = view[os.pwrite(self.fd, view, offset + (len(data) - len(view))):]

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


class Output:
    """Where an aggregate goes, slice by slice: ``write(key, start_row, values)`` then ``close()``.
    This base keeps it in memory and returns the state dict."""

    def __init__(self, infos: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.infos = infos
        self.sd = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in infos.items()}

    def write(self, key: str, start_row: int, values: Tensor) -> None:
        t = self.sd[key]
        flat = t.view(-1) if t.dim() else t.view(1)
        row = t[0].numel() if t.dim() else 1
        flat[start_row * row: start_row * row + values.numel()].copy_(values.reshape(-1))

    def close(self) -> Mapping[str, Tensor]:
        return self.sd

    def abort(self) -> None:
        pass


class FileOutput(Output):
    """An aggregate written to ``out`` in the layout of ``template`` (a :class:`Checkpoint`), or,
    for a single-file template, in the format ``out``'s suffix names. Safetensors outputs stream
    to disk (nothing of the model is held); torch formats are assembled in memory and saved.
    Everything is written beside ``out`` and moved into place only when complete."""

    def __init__(self, infos: dict, out: str | Path, template: Checkpoint | None = None,
                 metadata: dict[str, str] | None = None):
        self.infos, self.out, self.template = infos, Path(str(out)).expanduser(), template
        folder = template is not None and template.layout == "folder"
        if folder:
            fmt = template.format
        else:
            suffix = self.out.suffix
            require(suffix in WEIGHT_SUFFIXES, f"out={out}: give a file name ending in .safetensors, .pt, .pth, "
                    ".bin or .ckpt (the experts are single files), or a folder for folder experts")
            fmt = "safetensors" if suffix == ".safetensors" else "torch"
        self.fmt, self.folder = fmt, folder
        prefix = template.prefix if template is not None else ""
        self.full = {k: prefix + k for k in infos}
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        except OSError as e:
            raise AMEError(f"cannot write {self.out} ({e.strerror}); choose a writable out=") from None
        # which file each key goes to
        if folder and template.weight_map is not None:
            self.file_of = {k: template.file_of(k) for k in infos}
        elif folder:
            self.file_of = {k: template.files[0] for k in infos}
        else:
            self.file_of = {k: self.out.name for k in infos}
        files = list(dict.fromkeys(self.file_of.values()))
        meta = dict(metadata if metadata is not None else (template.metadata if template is not None else {}))
        meta.setdefault("format", "pt")  # transformers refuses safetensors files without it
        self.streams: dict[str, _StreamedSafetensors] = {}
        self.memory: Output | None = None
        if fmt == "safetensors":
            for f in files:
                self.streams[f] = _StreamedSafetensors(self.tmp / f, {self.full[k]: infos[k] for k in infos
                                                                      if self.file_of[k] == f}, meta)
        else:
            self.memory = Output(infos)

    def write(self, key: str, start_row: int, values: Tensor) -> None:
        if self.memory is not None:
            self.memory.write(key, start_row, values)
        else:
            self.streams[self.file_of[key]].write(self.full[key], start_row, values)

    def close(self) -> Mapping[str, Tensor]:
        try:
            if self.memory is not None:
                sd = self.memory.close()
                for f in dict.fromkeys(self.file_of.values()):
                    part = {self.full[k]: v for k, v in sd.items() if self.file_of[k] == f}
                    if self.template is not None and self.template.path.suffix == ".ckpt" and not self.folder:
                        part = {"state_dict": part}
                    torch.save(part, self.tmp / f)
            for s in self.streams.values():
                s.close()
            if self.folder:
                self._finish_folder()
                final = self.tmp
            else:
                final = self.tmp / self.out.name
            _replace(final, self.out)
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
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
            total = sum(torch.empty((), dtype=d).element_size() * _numel(s) for s, d in self.infos.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {self.full[k]: self.file_of[k] for k in self.infos}}
            (self.tmp / t.index_name).write_text(json.dumps(index, indent=2) + "\n")
        os.chmod(self.tmp, 0o755)

    def abort(self) -> None:
        for s in self.streams.values():
            try:
                os.close(s.fd)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing what was there only once ``src`` is complete."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
        if dst.is_file():
            os.chmod(dst, 0o644)


def save(sd: Mapping[str, Tensor], out: str | Path, like: Checkpoint | None = None) -> Mapping[str, Tensor]:
    """Write the state dict ``sd`` to ``out`` in the layout of ``like`` (see :class:`FileOutput`)."""
    infos = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    dest = FileOutput(infos, out, like)
    try:
        for k, v in sd.items():
            dest.write(k, 0, v.detach().cpu())
        return dest.close()
    except BaseException:
        dest.abort()
        raise


__all__ = ["Checkpoint", "Output", "FileOutput", "save", "atomic_path"]
