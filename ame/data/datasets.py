"""Datasets held in memory as uint8 tensors (N, C, H, W), decoded once and cached.

Every loader returns an :class:`ImageData`; training and evaluation never see PIL images or a
DataLoader, only index arithmetic on these tensors.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ame.errors import AMEError, require
from ame.cache import Entry
from ame.io import tensor_bytes
from ame.progress import progress

log = logging.getLogger(__name__)


@dataclass
class ImageData:
    name: str
    train_x: Tensor  # uint8 (N, C, H, W)
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    train_groups: Tensor | None = None  # int64 (N,): who contributed each image (GLD-23K clients), if known
    mean: Tensor = field(init=False)  # per-channel, on the [0, 1] scale, from the training images
    std: Tensor = field(init=False)

    def __post_init__(self):
        require(self.train_x.dtype == torch.uint8 and self.test_x.dtype == torch.uint8,
                f"{self.name}: images must be uint8 tensors")
        require(self.train_x.ndim == 4 and len(self.train_x) > 1, f"{self.name}: need at least 2 training images "
                f"(N, C, H, W), got shape {tuple(self.train_x.shape)}")
        self.mean, self.std = channel_stats(self.train_x)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (or [0, 1] float) images → float32, standardised per channel, channels-last
        (2-3× faster convolutions on CPU, the layout tensor cores want on GPU)."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x - mean[:, None, None]) / std[:, None, None]).contiguous(memory_format=torch.channels_last)

    def fingerprint(self) -> str:
        """sha256 of the pixels and labels (computed once, in slices: no copy of the images): what
        the caches key on, not file paths."""
        if "_fingerprint" not in self.__dict__:
            h = hashlib.sha256()
            for t in (self.train_x, self.train_y, self.test_x, self.test_y, self.train_groups):
                if t is not None:
                    step = max(1, _CHUNK_BYTES // max(1, t[:1].numel() * t.element_size()))
                    for i in range(0, len(t), step):
                        h.update(tensor_bytes(t[i:i + step]))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


_CHUNK_BYTES = 8 << 20  # images handled at once by the statistics and the fingerprint


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (unbiased) std of uint8 images ``x`` (N, C, H, W) on the [0, 1] scale,
    from exact per-channel histograms of the 256 pixel values, built a slice of images at a time:
    memory stays at one slice (not a float copy of the whole set), and the result does not depend
    on the slicing. float64 from the histogram, as float32."""
    n, c = x.shape[:2]
    hist = torch.zeros(c, 256, dtype=torch.int64)
    step = max(1, _CHUNK_BYTES // max(1, x[:1].numel()))
    for i in range(0, n, step):
        part = x[i:i + step].transpose(0, 1).reshape(c, -1)  # one slice, channels first (a copy of the slice only)
        for ch in range(c):
            hist[ch] += torch.bincount(part[ch], minlength=256)
    v = torch.arange(256, dtype=torch.float64) / 255
    count = hist.sum(1).double()
    mean = (hist.double() @ v) / count
    var = (hist.double() * (v[None, :] - mean[:, None]) ** 2).sum(1) / (count - 1)
    return mean.float(), var.sqrt().clamp_min(1e-3).float()


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[: int(round(fraction * len(idx)))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(y)), test)
    return train, test


def load_digits(test_fraction: float = 0.3, split_seed: int = 0) -> ImageData:
    """scikit-learn's 8×8 handwritten digits (1,797 images, ships with the package: no download).

    There is no official test split, so a fixed stratified ``test_fraction`` is held out
    (``split_seed`` is the dataset's, not the run's: the test set is the same for every run).
    """
    from sklearn.datasets import load_digits as sk_digits

    require(0 < test_fraction < 1, f"data.dataset.test_fraction must be in (0, 1), got {test_fraction}")
    d = sk_digits()
    x = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = _stratified_holdout(d.target, test_fraction, split_seed)
    return ImageData("digits", x[tr], y[tr], x[te], y[te], [str(c) for c in range(10)])


_TORCHVISION = {"cifar10": ("CIFAR10", "cifar-10-batches-py"), "cifar100": ("CIFAR100", "cifar-100-python")}


def _find_image_folder(root: Path, name: str) -> Path | None:
    for d in (root, root / f"{name}-jpeg", root / name):
        if (d / "train").is_dir() and (d / "test").is_dir():
            return d
    return None


def _decode_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """Decode an ImageFolder split (``<class>/<image>``) into one uint8 tensor, in batches."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    classes = classes or sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, c in enumerate(progress(classes, f"decoding {split_dir.name}")):
        files = sorted(p for p in (split_dir / c).iterdir() if p.is_file())
        for f in files:
            try:
                xs.append(decode_image(read_file(str(f)), mode=ImageReadMode.RGB))
            except RuntimeError as e:
                raise AMEError(f"cannot decode image {f} ({str(e).splitlines()[0][:80]}); replace or remove it") from None
        ys += [label] * len(files)
    require(len(xs) > 0, f"no images under {split_dir}; expected {split_dir}/<class>/<image>.jpg")
    sizes = {tuple(x.shape) for x in xs}
    require(len(sizes) == 1, f"images under {split_dir} differ in size ({sorted(sizes)[:3]}...); resize them first")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), classes


def _load_torchvision(name: str, root: Path, download: bool) -> ImageData:
    import torchvision

    cls_name, folder = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable mirror must fail, not hang
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except Exception as e:  # torchvision raises RuntimeError (missing) or URLError/OSError (offline)
        why = "download failed" if download else "download disabled (data.download=false)"
        raise AMEError(
            f"{name}: no data at data.root={root} and {why} ({type(e).__name__}); set data.root to a "
            f"directory holding torchvision's '{folder}' or an ImageFolder tree (train/<class>/*.jpg, "
            f"test/<class>/*.jpg), e.g. the extracted cifar10-jpeg.tar.gz") from None
    finally:
        socket.setdefaulttimeout(old_timeout)

    def to_tensor(ds):
        return (torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ds.targets, dtype=torch.int64))

    return ImageData(name, *to_tensor(train), *to_tensor(test), list(train.classes))


def load_cifar(name: str, root: str, download: bool = True, cache_dir: str | None = None) -> ImageData:
    """CIFAR-10/100 from ``root``: an ImageFolder tree (e.g. the JPEG re-encoding) or torchvision's
    files (downloaded when ``download`` and the network allow). Decoded once, cached as uint8,
    keyed by the files' listing (a changed folder is decoded again)."""
    require(name in _TORCHVISION, f"data.dataset.name must be one of {sorted(_TORCHVISION)}, got {name!r}")
    root = Path(root).expanduser().resolve()
    folder = _find_image_folder(root, name)
    source = f"imagefolder:{folder}" if folder else f"torchvision:{root}"
    watch = [folder / "train", folder / "test"] if folder else [root / _TORCHVISION[name][1]]
    return cached(name, source, cache_dir, lambda: _decode(name, root, folder, download), watch)


def _decode(name: str, root: Path, folder: Path | None, download: bool) -> ImageData:
    if folder:
        train_x, train_y, classes = _decode_folder(folder / "train")
        test_x, test_y, _ = _decode_folder(folder / "test", classes)
        return ImageData(name, train_x, train_y, test_x, test_y, classes)
    return _load_torchvision(name, root, download)


def listing(paths: Sequence[Path]) -> str:
    """sha256 of every file under ``paths`` by relative path, size and modification time (a few
    stat calls per thousand files, no reads): what a decoded dataset is keyed on. It notices images
    added, removed, renamed or rewritten; not a same-size edit whose mtime was restored."""
    h = hashlib.sha256()
    for top in paths:
        h.update(f"{top}\0".encode())
        if top.is_file():
            st = top.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
            continue
        for d, dirs, files in os.walk(top):
            dirs.sort()
            for f in sorted(files):
                st = os.stat(os.path.join(d, f))
                h.update(f"{os.path.relpath(os.path.join(d, f), top)}\0{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached(name: str, source: str, cache_dir: str | None, build: Callable[[], ImageData],
           watch: Sequence[Path] = ()) -> ImageData:
    """``build()``, decoded once per (``name``, ``source``, :func:`listing` of the ``watch``ed files)
    and then read from the cache entry ``<cache_dir>/datasets/<key>`` (verified by content while
    read; a damaged entry is decoded again)."""
    if not cache_dir:
        return build()
    key = hashlib.sha256(f"{name}|{source}|{listing(watch)}".encode()).hexdigest()[:20]
    entry = Entry(cache_dir, "datasets", key, {"name": name, "source": source}, what=f"the decoded {name} dataset")
    with entry.lock():
        hit = entry.load_tensors("data.safetensors")
        if hit is not None:
            t, meta = hit
            try:
                classes = json.loads(meta["classes"])
                return ImageData(name, t["train_x"], t["train_y"], t["test_x"], t["test_y"], classes,
                                 t.get("train_groups"))
            except (KeyError, ValueError, AMEError) as e:  # written by other code: decode again
                log.warning("decoded-data cache %s is incomplete (%s); decoding again", entry.root, e)
        data = build()
        tensors = {"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x, "test_y": data.test_y}
        if data.train_groups is not None:
            tensors["train_groups"] = data.train_groups
        entry.put_tensors("data.safetensors", tensors, {"classes": json.dumps(data.classes), "source": source})
        return data
