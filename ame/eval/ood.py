"""The out-of-distribution test sets: generated corruptions (built once, cached) or the published
CIFAR-10-C / CIFAR-100-C arrays.

Both give ``{(corruption, severity): (images uint8 (N, C, H, W), labels int64 (N,))}``.

- :func:`generated_sets` corrupts a seeded subsample of the test set with
  :func:`ame.eval.corruptions.corrupt`. Each set is an entry of :mod:`ame.cache`
  (``<cache_dir>/corrupted/<key>/``), keyed by the subsampled images' content, the corruption, the
  severity, the seed and the generator's version: written atomically, verified by content on
  every read, rebuilt when damaged. Missing sets are built by ``workers`` threads, one torch
  thread each.
- :func:`published_sets` reads the published layout: one ``<corruption>.npy`` of the five
  severities stacked (5·N, H, W, C) uint8 per corruption, plus ``labels.npy`` (5·N,).
  :func:`download_published` fetches the Zenodo archives (only when asked: ``eval.download``).
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ame.cache import Entry, cached_tensors
from ame.eval.corruptions import CORRUPTIONS, VERSION, corrupt
from ame.errors import AMEError, require

log = logging.getLogger(__name__)
Sets = dict[tuple[str, int], tuple[Tensor, Tensor]]

# The published archives (Hendrycks & Dietterich 2019): URL and md5 of the tar.
PUBLISHED = {
    "cifar10-c": ("https://zenodo.org/record/2535967/files/CIFAR-10-C.tar", "56bf5dcef84df0e2308c6dcbcbbd8499",
                  "CIFAR-10-C"),
    "cifar100-c": ("https://zenodo.org/record/3555552/files/CIFAR-100-C.tar", "11f0ed0f1191edbf9fa23466ae6021d3",
                   "CIFAR-100-C"),
}


def check_names(names: Sequence[str], key: str = "eval.corruptions") -> None:
    unknown = [n for n in names if n not in CORRUPTIONS]
    require(not unknown, f"{key}: unknown {unknown}; choose from {sorted(CORRUPTIONS)}")


def check_severities(severities: Sequence[int]) -> None:
    bad = [s for s in severities if not (isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 5)]
    require(not bad, f"eval.severities must be a list of integers in 1..5, e.g. [1,3,5], got {list(severities)}")


def subsample(n: int, size: int | None, seed: int) -> Tensor:
    """The sorted indices of a seeded subsample of ``size`` of ``n`` items (all when ``size`` is None)."""
    require(size is None or (isinstance(size, int) and size > 0),
            f"eval.ood_subsample must be a positive integer or null, got {size!r}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size or n].sort().values


def _key(images: str, name: str, severity: int, seed: int) -> str:
    """The cache key of one corrupted set: the images' digest, the corruption, severity, seed, code version."""
    return hashlib.sha256(f"{VERSION}|{name}|{severity}|{seed}|{images}".encode()).hexdigest()[:20]


def generated_sets(x: Tensor, y: Tensor, names: Sequence[str], severities: Sequence[int], seed: int,
                   cache_dir: str | Path | None = None, workers: int = 2) -> Sets:
    """Corrupted copies of (``x``, ``y``) for every name × severity, cached in ``cache_dir``
    (names and severities checked by the caller: :func:`check_names`, :func:`check_severities`)."""
    jobs = [(n, s) for n in names for s in severities]
    out: dict[tuple[str, int], Tensor] = {}
    images = hashlib.sha256(f"{tuple(x.shape)}|".encode() + x.contiguous().numpy().tobytes()).hexdigest()  # once
    keys = {j: _key(images, *j, seed) for j in jobs}
    if cache_dir:  # read what is there first, so threads are started only for the rest
        for j in jobs:
            entry = Entry(cache_dir, "corrupted", keys[j])
            hit = entry.load_tensors("data.safetensors") if (entry.root / "manifest.json").exists() else None
            if hit is not None:
                out[j] = hit[0]["x"]
    todo = [j for j in jobs if j not in out]

    def build(job: tuple[str, int]) -> Tensor:
        n, s = job
        spec = {"corruption": n, "severity": s, "seed": seed, "images": list(x.shape), "version": VERSION}
        return cached_tensors(cache_dir, "corrupted", keys[job], lambda: {"x": corrupt(x, n, s, seed)}, spec,
                              what=f"the {n} s{s} test set")["x"]

    if todo:
        threads = torch.get_num_threads()
        try:
            if workers > 1 and len(todo) > 1:
                torch.set_num_threads(1)  # parallel over sets, one torch thread each
                with ThreadPoolExecutor(min(workers, len(todo))) as pool:
                    out.update(zip(todo, pool.map(build, todo)))
            else:
                out.update((j, build(j)) for j in todo)
        finally:
            torch.set_num_threads(threads)
    return {j: (out[j], y) for j in jobs}


def _array_folder(folder: Path) -> Path:
    """``folder`` or the archive's own sub-folder inside it (CIFAR-10-C/, CIFAR-100-C/)."""
    for d in [folder] + [folder / sub for *_, sub in PUBLISHED.values()]:
        if (d / "labels.npy").is_file():
            return d
    return folder


def download_published(name: str, folder: str | Path) -> Path:
    """Fetch and unpack the published ``name`` archive (cifar10-c | cifar100-c) into ``folder``
    unless it is there already; returns the folder holding the arrays."""
    require(name in PUBLISHED, f"eval.download must be one of {sorted(PUBLISHED)} or null, got {name!r}")
    folder = Path(folder).expanduser()
    found = _array_folder(folder)
    if (found / "labels.npy").is_file():
        return found
    from torchvision.datasets.utils import download_and_extract_archive

    url, md5, _ = PUBLISHED[name]
    try:
        download_and_extract_archive(url, download_root=str(folder), md5=md5, remove_finished=True)
    except Exception as e:  # network, disk, checksum
        raise AMEError(f"eval.download={name}: could not fetch {url} into {folder} ({str(e)[:120]}); "
                       f"download and unpack it there by hand") from None
    return _array_folder(folder)


def published_sets(folder: str | Path, names: Sequence[str], severities: Sequence[int], seed: int,
                   size: int | None, image_shape: tuple[int, int, int], num_classes: int) -> Sets:
    """The published arrays in ``folder`` (e.g. an unpacked CIFAR-10-C), as :func:`generated_sets`
    gives them: the same seeded subsample of each severity's N images (names and severities
    checked by the caller)."""
    folder = _array_folder(Path(folder).expanduser())
    require(folder.is_dir(), f"eval.source: {folder} is not a folder; point it at the unpacked CIFAR-10-C / "
                             f"CIFAR-100-C arrays, or set eval.source=generated")
    labels = _load(folder / "labels.npy")
    require(labels.ndim == 1 and len(labels) % 5 == 0 and len(labels) > 0,
            f"eval.source: {folder / 'labels.npy'} has shape {labels.shape}; expected (5·N,): the labels of "
            f"the five severities stacked")
    require(np.issubdtype(labels.dtype, np.integer), f"eval.source: {folder / 'labels.npy'} holds {labels.dtype} "
            "values; labels are integers (class ids), as the published archives store them")
    require(labels.min() >= 0 and labels.max() < num_classes,
            f"eval.source: {folder / 'labels.npy'} holds labels outside 0..{num_classes - 1}; "
            f"is it the archive of this dataset?")
    n = len(labels) // 5
    c, h, w = image_shape
    keep = subsample(n, size, seed).numpy()
    out: Sets = {}
    for name in names:
        arr = _load(folder / f"{name}.npy")
        require(arr.dtype == np.uint8 and arr.shape == (5 * n, h, w, c),
                f"eval.source: {folder / f'{name}.npy'} is {arr.dtype} {arr.shape}; expected uint8 "
                f"{(5 * n, h, w, c)} (5 severities × {n} images of {h}×{w}×{c}, as labels.npy says)")
        for s in severities:
            rows = (s - 1) * n + keep
            out[name, s] = (torch.from_numpy(np.ascontiguousarray(arr[rows].transpose(0, 3, 1, 2))),
                            torch.from_numpy(labels[rows].astype(np.int64)))
    return out


def _load(path: Path) -> np.ndarray:
    require(path.is_file(), f"eval.source: {path} is missing; the folder must hold <corruption>.npy for every "
                            f"evaluated corruption and labels.npy (the published CIFAR-10-C / CIFAR-100-C layout)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise AMEError(f"eval.source: cannot read {path} as a .npy array ({str(e)[:100]})") from None
