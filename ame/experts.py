"""Where experts come from: trained (and cached) for this run's shards, or files a user hands in.

Trained experts live in ``<cache_dir>/experts/<key>/``, the key hashing everything that
determines them (data content and config, shards, model, training, seed). Each file is written
atomically and recorded with its sha256 (and size and mtime) in ``manifest.json``; a file missing
from the manifest or whose hash differs is retrained (the hash is checked again whenever the size or
mtime changed), so an interrupted run resumes where it stopped, and a file
lock makes concurrent jobs train a set once.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ame.checkpoints import Checkpoint

from ame.data import ImageData, Split
from ame.errors import require
from ame.io import StateDict, file_lock, load_state_dict, save_state_dict, sha256_file, write_json
from ame.pool import ExpertPool
from ame.report import progress
from ame.train import expert_seed, initial_state, train_experts

log = logging.getLogger(__name__)

CACHE_VERSION = 1


class Experts(Sequence):
    """Expert checkpoints on disk (files or folders, see :mod:`ame.checkpoints`), read on access:
    ``experts[i]`` is a full state dict, :meth:`checkpoint` a lazy view for streaming."""

    def __init__(self, paths: Sequence[str | Path], key_prefix: str | None = None):
        self.paths = [Path(p) for p in paths]
        self.names = [str(p) for p in self.paths]
        self.key_prefix = key_prefix

    def __len__(self) -> int:
        return len(self.paths)

    def checkpoint(self, i: int) -> Checkpoint:
        return Checkpoint(self.paths[i], self.key_prefix)

    def __getitem__(self, i: int) -> StateDict:
        return dict(self.checkpoint(i))

    def pool(self, sizes=None, init=None, buffers=None, dtype=None) -> ExpertPool:
        """An :class:`ExpertPool` over these checkpoints (read slice by slice)."""
        return ExpertPool([self.checkpoint(i) for i in range(len(self))], sizes, init, buffers, self.names, dtype)


@dataclass
class ExpertSet:
    experts: Experts
    sizes: list[int]
    init: StateDict | None  # the shared starting point (warm base for init=warm), if any
    class_counts: np.ndarray | None  # (N, classes) shard class mixes, when known
    cached: bool  # every expert came from the cache
    root: Path | None = None  # the cache entry (trained experts), where derived results may be cached
    fingerprint: str | None = None  # hash of the exact expert and base files (trained experts)


_NOT_IN_KEY = {"root", "download", "cache_dir", "device", "parallel_experts"}  # how or where, not what


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in _NOT_IN_KEY}
    return [_strip(v) for v in node] if isinstance(node, list) else node


def config_hash(spec) -> str:
    """Short sha256 of a config (a container, or a DictConfig resolved), ignoring where things
    run or live (``root``, ``download``, ``cache_dir``, ``device``)."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    return hashlib.sha256(json.dumps(_strip(spec), sort_keys=True).encode()).hexdigest()[:20]


def _model_spec(model_cfg: DictConfig) -> dict:
    """The model config, with a pretrained weights file named by its content (not its path)."""
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    path = Path(str(spec.get("pretrained") or "")).expanduser()
    if spec.get("pretrained") and path.is_file():
        spec["pretrained"] = f"sha256:{_file_sha(str(path.resolve()), *_stat(path))}"
    return spec


@functools.lru_cache(maxsize=8)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per process while its size and mtime stay the same (base_key and
    cache_key both need the pretrained weights' hash)."""
    return sha256_file(path)


def cache_key(cfg: DictConfig, data: ImageData, base_sha: str | None = None) -> tuple[str, dict]:
    """Hash of everything that determines the experts: the data by content (not by path), the
    settings, and the exact base file they start from (``base_sha``)."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    if train["init"] != "warm":
        train.pop("warm_epochs", None), train.pop("warm_lr", None)
    spec = {"version": CACHE_VERSION, "content": data.fingerprint(), "seed": int(cfg.seed), "base": base_sha,
            "train": train, "data": OmegaConf.to_container(cfg.data, resolve=True), "model": _model_spec(cfg.model)}
    return config_hash(spec), _strip(spec)


def base_key(cfg: DictConfig, data: ImageData) -> tuple[str, dict]:
    """Hash of what determines the experts' shared starting point: model, seed and init kind; for a
    warm start also the data settings but its sharding, and the base's own training (not the
    experts' epochs, nor their lr when ``warm_lr`` is set). Sweeps over shards or expert epochs
    thus share one base."""
    spec = {"version": CACHE_VERSION, "data": data.fingerprint(), "seed": int(cfg.seed), "init": cfg.train.init,
            "model": _model_spec(cfg.model)}
    if cfg.train.init == "warm":
        train = OmegaConf.to_container(cfg.train, resolve=True)
        train.pop("epochs")
        if train.get("warm_lr") is not None:
            train["optimizer"].pop("lr", None)
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
        data_cfg.pop("shards")
        spec |= {"train": train, "data_cfg": data_cfg}
    return config_hash(spec), _strip(spec)


class _Entry:
    """One cache directory: files plus a manifest of their hashes."""

    def __init__(self, root: Path, spec: dict):
        self.root, self.manifest_path = root, root / "manifest.json"
        try:
            self.manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            self.manifest = {"config": spec, "files": {}}

    def valid(self, name: str) -> bool:
        """The file is there and is the one recorded. Its sha256 is checked once; after that an
        unchanged (size, mtime) stands for it, so a run does not re-hash gigabytes of experts."""
        path = self.root / name
        if not path.is_file() or name not in self.manifest["files"]:
            return False
        stat = self.manifest.setdefault("stat", {})
        if stat.get(name) == _stat(path):
            return True
        if sha256_file(path) != self.manifest["files"][name]:
            return False
        stat[name] = _stat(path)
        write_json(self.manifest, self.manifest_path)
        return True

    def put(self, name: str, sd: StateDict, metadata: dict[str, str]) -> None:
        save_state_dict(sd, self.root / name, metadata)
        self.manifest["files"][name] = sha256_file(self.root / name)
        self.manifest.setdefault("stat", {})[name] = _stat(self.root / name)
        write_json(self.manifest, self.manifest_path)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def trained_experts(cfg: DictConfig, data: ImageData, split: Split, device: torch.device) -> ExpertSet:
    """Train one expert per shard (or reuse the cached ones)."""
    counts = split.class_counts(data.train_y.numpy(), data.num_classes)
    init, base_sha, cached = None, None, True  # cached: no expert had to be trained (the base may have)
    if cfg.train.init != "independent":
        bkey, bspec = base_key(cfg, data)
        broot = Path(cfg.paths.cache_dir) / "bases" / bkey
        with file_lock(broot.with_suffix(".lock")):
            base = _Entry(broot, bspec)
            if not base.valid("init.safetensors"):
                sd = initial_state(cfg.model, cfg.train, data, split.public, int(cfg.seed), device)
                base.put("init.safetensors", sd, {"init": str(cfg.train.init), "public_size": str(len(split.public))})
            init = load_state_dict(broot / "init.safetensors")
            base_sha = base.manifest["files"]["init.safetensors"]
    key, spec = cache_key(cfg, data, base_sha)
    root = Path(cfg.paths.cache_dir) / "experts" / key
    with file_lock(root.with_suffix(".lock")):
        entry = _Entry(root, spec)
        if not entry.valid("shards.safetensors"):  # a record of which examples each expert saw
            entry.put("shards.safetensors", {"public": torch.from_numpy(split.public),
                                             **{f"shard_{i:03d}": torch.from_numpy(s) for i, s in enumerate(split.shards)}}, {})
        todo = [i for i in range(len(split.shards)) if not entry.valid(f"expert_{i:03d}.safetensors")]
        log.info("experts: %d of %d from the cache (%s), %d to train", len(split.shards) - len(todo),
                 len(split.shards), root, len(todo))
        trained = train_experts(cfg.model, cfg.train, data, [split.shards[i] for i in todo], init,
                                [expert_seed(int(cfg.seed), i) for i in todo], device)
        for i, sd in zip(todo, progress(trained, "training experts", total=len(todo))):
            cached = False
            entry.put(f"expert_{i:03d}.safetensors", sd, {"shard_size": str(len(split.shards[i])),
                                                          "class_counts": json.dumps(counts[i].tolist())})
        fingerprint = config_hash({"files": entry.manifest["files"], "base": base_sha})
    paths = [root / f"expert_{i:03d}.safetensors" for i in range(len(split.shards))]
    return ExpertSet(Experts(paths), split.sizes, init, counts, cached, root, fingerprint)


def _expand(paths) -> list[str]:
    """``experts.paths``: a list of paths or globs (or one), each a checkpoint file or folder."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out = []
    for item in items:
        pattern = str(item)
        if glob.has_magic(pattern):
            found = sorted(glob.glob(str(Path(pattern).expanduser())))
            require(found, f"experts.paths={pattern!r} matches no files; check the glob (quote it on the command line)")
            out += found
        else:
            out.append(pattern)
    return out


def file_experts(experts_cfg: DictConfig) -> ExpertSet:
    """Bring your own experts: ``experts.paths`` (checkpoint files or folders, or globs: see
    :mod:`ame.checkpoints`), optionally ``experts.init`` (their shared initialisation),
    ``experts.key_prefix`` and ``experts.sizes``. Without ``sizes``, shard sizes and class mixes
    come from the files' safetensors metadata when present (as this project writes them), else
    the shards count as equal."""
    prefix = experts_cfg.get("key_prefix") or None
    init = dict(Checkpoint(experts_cfg.init, prefix, "experts.init")) if experts_cfg.get("init") else None
    given = experts_cfg.get("paths")
    require(given is not None and str(given) not in ("", "None", "???", "[]"), "experts=files needs experts.paths, "
            "a list of checkpoints or a glob such as experts.paths='ckpts/*.safetensors'")
    given = OmegaConf.to_container(given) if isinstance(given, DictConfig | ListConfig) else given
    paths = _expand(given)
    experts = Experts(paths, prefix)
    meta = [experts.checkpoint(i).metadata for i in range(len(paths))]  # opens each (headers only): bad files fail here
    meta = [{**m, **json.loads(m.get("ame", "{}"))} for m in meta]
    sizes = experts_cfg.get("sizes")
    if sizes is not None:
        sizes = list(sizes)
        require(len(sizes) == len(paths) and all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0
                                                 for s in sizes),
                f"experts.sizes must be {len(paths)} positive numbers (one per expert), got {sizes}")
    elif all("shard_size" in m for m in meta):
        sizes = [int(m["shard_size"]) for m in meta]
    else:
        if any("shard_size" in m for m in meta):
            log.warning("only some expert files record their shard size; treating all shards as equal-sized")
        sizes = [1] * len(paths)
    counts = None
    if all("class_counts" in m for m in meta):
        counts = np.array([json.loads(m["class_counts"]) for m in meta])
    return ExpertSet(experts, sizes, init, counts, cached=True)
