"""Where experts come from: trained (and cached) for this run's shards, or files a user hands in.

Trained experts live in the cache entry ``<cache_dir>/experts/<key>/`` (:mod:`ame.cache`), the key
hashing everything that determines them (data content and config, shards, model, training, seed,
the base's hash). Every expert is verified by its content hash each run before it is used; a file
missing from the manifest or whose bytes differ is (re)trained, so an interrupted run resumes where
it stopped, and the entry's lock makes concurrent jobs train a set once. Each entry's
``provenance.json`` (recorded in its manifest; see :mod:`ame.provenance`) keeps the provenance of
the run that made it: for experts, per file (a resumed set was made by two runs); entries from
before it was recorded have none (``None``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ame.cache import Entry, sha256_file
from ame.data import ImageData, Split
from ame.device import resolve_device
from ame.errors import require
from ame.io import Checkpoint, StateDict, expand
from ame.io.metadata import expert_set
from ame.pool import ExpertPool
from ame.train import check_train, expert_seed, initial_state, train_experts

log = logging.getLogger(__name__)

CACHE_VERSION = 1
PROVENANCE = "provenance.json"  # in a base's or an expert set's cache entry: who made it


class Experts(Sequence):
    """Expert checkpoints on disk (files or folders, see :mod:`ame.io.checkpoint`), read on access:
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
    made_by: list[dict | None] | None = None  # per expert, the provenance of the run that trained it (cached experts)
    base_made_by: dict | None = None  # the provenance of the run that made the shared base (cached bases)
    origin: str = ""  # how they came, for the log: trained, from the cache, read from files
    warm_base: bool = False  # init is a base trained on the public split (train.init=warm): evaluated as "base"


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
        st = path.stat()
        spec["pretrained"] = f"sha256:{_file_sha(str(path.resolve()), st.st_size, st.st_mtime_ns)}"
    return spec


@functools.lru_cache(maxsize=8)
def _file_sha(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per process while its size and mtime stay the same (base_key and
    cache_key both need the pretrained weights' hash)."""
    return sha256_file(path)


def cache_key(train_cfg: DictConfig, data_cfg: DictConfig, model_cfg: DictConfig, seed: int,
              base_seed: int | None, data: ImageData, base_sha: str | None = None) -> tuple[str, dict]:
    """Hash of everything that determines the experts: the data by content (not by path), the
    settings, and the exact base file they start from (``base_sha``)."""
    train = OmegaConf.to_container(train_cfg, resolve=True)
    if train["init"] != "warm":
        train.pop("warm_epochs", None), train.pop("warm_lr", None)
    spec = {"version": CACHE_VERSION, "content": data.fingerprint(), "seed": int(seed), "base": base_sha,
            "train": train, "data": OmegaConf.to_container(data_cfg, resolve=True), "model": _model_spec(model_cfg)}
    if base_seed is not None:  # it draws the public and validation splits (keys unchanged without it)
        spec["base_seed"] = int(base_seed)
    return config_hash(spec), _strip(spec)


def shared_seed(seed: int, base_seed: int | None) -> int:
    """The seed of the experts' shared base (its init, its public split and its data order):
    ``base_seed``, or ``seed`` when that is null."""
    return int(seed if base_seed is None else base_seed)


def base_key(train_cfg: DictConfig, data_cfg: DictConfig, model_cfg: DictConfig, seed: int,
             data: ImageData) -> tuple[str, dict]:
    """Hash of what determines the experts' shared starting point: model, ``seed`` (the base's:
    :func:`shared_seed`) and init kind; for a warm start also the data settings but its sharding,
    and the base's own training (not the experts' epochs, nor their lr when ``warm_lr`` is set).
    Sweeps over shards or expert epochs thus share one base, and so do sweeps over ``seed`` when
    ``base_seed`` is set."""
    spec = {"version": CACHE_VERSION, "data": data.fingerprint(), "seed": int(seed), "init": train_cfg.init,
            "model": _model_spec(model_cfg)}
    if train_cfg.init == "warm":
        train = OmegaConf.to_container(train_cfg, resolve=True)
        train.pop("epochs")
        if train.get("warm_lr") is not None:
            train["optimizer"].pop("lr", None)
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
        data_cfg.pop("shards")
        spec |= {"train": train, "data_cfg": data_cfg}
    return config_hash(spec), _strip(spec)


def _made_by(entry: Entry) -> dict:
    """An entry's ``provenance.json``; {} when it has none (made before it was recorded) or a damaged one."""
    made = entry.load_json(PROVENANCE)
    return made if isinstance(made, dict) else {}


def _record(entry: Entry, made: dict) -> None:
    """Write ``made`` as the entry's ``provenance.json`` (or drop the file when it is empty)."""
    if made:
        entry.put_json(PROVENANCE, made)
    else:
        entry.forget(PROVENANCE)


class ExpertSource:
    """Where a run's experts come from: the ``_target_`` of ``conf/experts/<option>.yaml``. The
    pipeline uses nothing else of it:

        check() -> None           # its settings, before anything is trained or written
        missing_init: str | None  # why the experts have no shared initialisation (None: they have one)
        trained_here: bool        # the run knows their training data: a validation split is unseen by them
        count: int | None         # how many experts, when known before they are made
        experts(data, split, made_by=None) -> ExpertSet
    """

    missing_init: str | None = None
    trained_here: bool = False
    count: int | None = None

    def check(self) -> None:
        """Fail now, before any work, on settings that cannot work."""

    def experts(self, data: ImageData, split: Split, made_by: dict | None = None) -> ExpertSet:
        raise NotImplementedError


class TrainedExperts(ExpertSource):
    """One expert per shard, trained here (``experts=train``) and cached in ``cache_dir``, keyed by
    everything that determines them. Its inputs are the run's ``train``, ``model`` and ``data``
    settings, ``seed`` and ``base_seed`` (null: ``seed``), interpolated in ``conf/experts/train.yaml``."""

    trained_here = True

    def __init__(self, train: DictConfig, model: DictConfig, data: DictConfig, seed: int, base_seed: int | None,
                 cache_dir: str):
        self.train, self.model, self.data = train, model, data
        self.seed, self.base_seed, self.cache_dir = seed, base_seed, Path(cache_dir)
        self.missing_init = "train.init=independent" if train.init == "independent" else None
        self.count = int(data.shards.num_shards)

    def check(self) -> None:
        check_train(self.train, self.data.public_size)
        resolve_device(self.train.device, "train.device")

    def experts(self, data: ImageData, split: Split, made_by: dict | None = None) -> ExpertSet:
        """Train one expert per shard (or reuse the cached ones, each verified by its content hash:
        a damaged file is reported and retrained, never used). ``made_by``: this run's provenance,
        kept in the cache entries beside what this call trains (None: nothing recorded)."""
        train, seed = self.train, int(self.seed)
        device = resolve_device(train.device)
        counts = split.class_counts(data.train_y.numpy(), data.num_classes)
        init, base_sha, cached = None, None, True  # cached: no expert had to be trained (the base may have)
        base_made_by = None
        if train.init != "independent":
            bseed = shared_seed(seed, self.base_seed)
            bkey, bspec = base_key(train, self.data, self.model, bseed, data)
            base = Entry(self.cache_dir, "bases", bkey, bspec, what="the experts' shared base")
            with base.lock():
                hit = base.load_tensors("init.safetensors")  # read once, verified while read
                if hit is None:
                    init = initial_state(self.model, train, data, split.public, bseed, device)
                    base_sha = base.put_tensors("init.safetensors", init, _meta(init=str(train.init),
                                                                                 public_size=str(len(split.public))))
                    _record(base, made_by or {})  # never an earlier base's record
                    base_made_by = made_by
                else:
                    init, base_sha = hit[0], base.recorded()["init.safetensors"]
                    base_made_by = _made_by(base) or None
        key, spec = cache_key(train, self.data, self.model, seed, self.base_seed, data, base_sha)
        entry = Entry(self.cache_dir, "experts", key, spec, what="these trained experts")
        with entry.lock():
            if not entry.verify("shards.safetensors"):  # a record of which examples each expert saw
                entry.put_tensors("shards.safetensors", {"public": torch.from_numpy(split.public),
                                                         **{f"shard_{i:03d}": torch.from_numpy(s)
                                                            for i, s in enumerate(split.shards)}}, _meta())
            todo = [i for i in range(len(split.shards)) if not entry.verify(f"expert_{i:03d}.safetensors")]
            log.info("experts: %d of %d from the cache (%s), %d to train", len(split.shards) - len(todo),
                     len(split.shards), entry.root, len(todo))
            trained = train_experts(self.model, train, data, [split.shards[i] for i in todo], init,
                                    [expert_seed(seed, i) for i in todo], device, [f"expert_{i}" for i in todo])
            names = [f"expert_{i:03d}.safetensors" for i in range(len(split.shards))]
            made = _made_by(entry)  # file name → the provenance of the run that trained it
            for i, sd in zip(todo, trained):
                cached = False
                entry.put_tensors(names[i], sd, _meta(shard_size=str(len(split.shards[i])),
                                                      class_counts=json.dumps(counts[i].tolist())))
                made.pop(names[i], None)
                if made_by is not None:
                    made[names[i]] = made_by
                _record(entry, made)  # after each expert: a run stopped later still says who made this one
            files = {k: v for k, v in entry.recorded().items() if k == "shards.safetensors" or k.startswith("expert_")}
            fingerprint = config_hash({"files": files, "base": base_sha})  # the exact files (as before: keys unchanged)
        return ExpertSet(Experts([entry.root / n for n in names]), split.sizes, init, counts, cached, entry.root,
                         fingerprint, [made.get(n) if isinstance(made.get(n), dict) else None for n in names],
                         base_made_by, origin="from the cache" if cached else "trained",
                         warm_base=train.init == "warm")


def _meta(**fields: str) -> dict[str, str]:
    """File metadata as this project writes it: one JSON entry (see :func:`ame.io.save_state_dict`)."""
    return {"ame": json.dumps(fields, sort_keys=True)}


class FileExperts(ExpertSource):
    """Bring your own experts (``experts=files``): ``paths`` (checkpoint files or folders, or globs:
    see :mod:`ame.io.checkpoint`), optionally ``init`` (their shared initialisation), ``key_prefix``
    and ``sizes``. Without ``sizes``, shard sizes and class mixes come from the files' safetensors
    metadata when present (as this project writes them), else the shards count as equal."""

    def __init__(self, paths, init: str | None, key_prefix: str | None, sizes):
        self.paths = OmegaConf.to_container(paths) if isinstance(paths, DictConfig | ListConfig) else paths
        self.init, self.key_prefix = init, key_prefix or None
        self.sizes = OmegaConf.to_container(sizes) if isinstance(sizes, ListConfig) else sizes
        self.missing_init = None if init else "experts.init is not set"

    def check(self) -> None:
        require(self.paths is not None and str(self.paths) not in ("", "None", "???", "[]"), "experts=files needs "
                "experts.paths, a list of checkpoints or a glob such as experts.paths='ckpts/*.safetensors'")

    def experts(self, data: ImageData | None = None, split: Split | None = None,
                made_by: dict | None = None) -> ExpertSet:
        """The files' experts (``data`` and ``split`` are not needed: the files say what they hold)."""
        self.check()
        init = dict(Checkpoint(self.init, self.key_prefix, "experts.init")) if self.init else None
        paths = expand(self.paths)
        experts = Experts(paths, self.key_prefix)
        meta = [experts.checkpoint(i).metadata for i in range(len(paths))]  # opens each (headers only): bad files fail here
        recorded, counts = expert_set(meta, paths)
        sizes = self.sizes
        if sizes is not None:
            require(isinstance(sizes, (list, tuple)) and len(sizes) == len(paths)
                    and all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
                            for s in sizes),
                    f"experts.sizes must be a list of {len(paths)} positive numbers (one per expert), got {sizes}")
            sizes = list(sizes)
        else:
            sizes = recorded or [1] * len(paths)
        return ExpertSet(experts, sizes, init, counts, cached=True, origin="read from files")
