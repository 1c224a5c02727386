"""Stage 2: split the training set into disjoint shards (one per expert), deterministically.

Each splitter maps labels → a list of index arrays; :func:`split` first takes out the optional
"public" split (for warm starts), then shards the rest. numpy's PCG64 with an integer seed
gives the same indices on every machine.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ame.errors import AMEError, positive_int, require


@dataclass
class Split:
    shards: list[np.ndarray]  # indices into the training set, disjoint, sorted
    public: np.ndarray  # indices held out before sharding (empty unless data.public_size > 0)
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # data.val_size held out

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.shards]

    def class_counts(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """(num_shards, num_classes) example counts: each shard's class mix."""
        return np.stack([np.bincount(labels[s], minlength=num_classes) for s in self.shards])


def _check(labels: np.ndarray, num_shards: int) -> None:
    require(isinstance(num_shards, int) and num_shards >= 1,
            f"data.shards.num_shards must be a positive integer, got {num_shards!r}")
    require(num_shards <= len(labels),
            f"data.shards.num_shards={num_shards} is more than the {len(labels)} training examples left "
            f"to shard; lower data.shards.num_shards (or data.public_size)")


def iid(labels: np.ndarray, num_shards: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Uniformly random, equal-size shards."""
    _check(labels, num_shards)
    return list(np.array_split(rng.permutation(len(labels)), num_shards))


def dirichlet(labels: np.ndarray, num_shards: int, rng: np.random.Generator, alpha: float = 0.5,
              min_size: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: each class is spread over the shards in Dirichlet(alpha) proportions.

    Small ``alpha`` → each shard sees few classes. Draws are repeated until every shard holds at
    least ``min_size`` examples."""
    _check(labels, num_shards)
    require(alpha > 0, f"data.shards.alpha must be > 0, got {alpha}; e.g. data.shards.alpha=0.5")
    require(min_size * num_shards <= len(labels),
            f"data.shards.min_size={min_size} × {num_shards} shards exceeds the {len(labels)} examples")
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_shards)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_shards)) * len(idx)).astype(int)[:-1]
            for s, part in enumerate(np.split(idx, cuts)):
                shards[s].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.array(s, dtype=np.int64) for s in shards]
    raise AMEError(f"Dirichlet(alpha={alpha}) left a shard below data.shards.min_size={min_size} in "
                   f"{max_tries} draws; raise data.shards.alpha or lower data.shards.num_shards")


def classes(labels: np.ndarray, num_shards: int, rng: np.random.Generator, k: int = 2) -> list[np.ndarray]:
    """Pathological non-IID: each shard holds ``k`` classes; a class held by several shards is
    split evenly among them. Classes are dealt round-robin, so all are used when num_shards·k ≥ C."""
    _check(labels, num_shards)
    cs = np.unique(labels)
    require(1 <= k <= len(cs), f"data.shards.k must be in [1, {len(cs)}] (classes per shard), got {k}")
    order = rng.permutation(cs)
    owned = [[order[(s * k + j) % len(cs)] for j in range(k)] for s in range(num_shards)]
    owners = {c: [s for s in range(num_shards) if c in owned[s]] for c in cs}
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for c, holders in owners.items():
        if not holders:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for s, part in zip(holders, np.array_split(idx, len(holders))):
            shards[s].extend(part.tolist())
    for s, part in enumerate(shards):
        require(len(part) > 0, f"shard {s} is empty; lower data.shards.num_shards or raise data.shards.k")
    return [np.array(s, dtype=np.int64) for s in shards]


def natural(labels: np.ndarray, num_shards: int, rng: np.random.Generator,
            groups: np.ndarray | None = None) -> list[np.ndarray]:
    """The data's own clients (GLD-23K's 233 photographers), grouped whole into ``num_shards``
    shards of near-equal size: clients in a seeded random order, largest first, each to the
    currently smallest shard. With ``num_shards`` = the number of clients, one client per shard."""
    require(groups is not None, "data/shards=natural needs a dataset that records its clients (data=gld23k); "
            "use data/shards=iid or dirichlet")
    _check(labels, num_shards)
    clients = rng.permutation(np.unique(groups))
    members = {c: np.flatnonzero(groups == c) for c in clients}
    require(num_shards <= len(clients), f"data.shards.num_shards={num_shards}, but the data has only "
            f"{len(clients)} clients; lower num_shards")
    shards: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    sizes = np.zeros(num_shards, dtype=np.int64)
    for c in sorted(clients, key=lambda c: -len(members[c])):  # stable: ties keep the seeded order
        k = int(np.argmin(sizes))
        shards[k].append(members[c])
        sizes[k] += len(members[c])
    return [np.sort(np.concatenate(s)) for s in shards]


def split(labels: np.ndarray, splitter: Callable[..., list[np.ndarray]], seed: int, public_size: int = 0,
          val_size: int = 0, groups: np.ndarray | None = None, holdout_seed: int | None = None) -> Split:
    """Take out ``public_size`` examples, then ``val_size`` more (a validation split, for the
    aggregators that are not data-free), uniformly at random; then shard the rest with
    ``splitter(labels, rng=...)`` (one of the functions above, with its settings bound: the
    ``data.shards`` config), which also gets the examples' ``groups`` (client ids) if it takes them.
    Returned indices refer to the full training set. ``holdout_seed`` (None: ``seed``) draws the
    public and validation splits alone, so that runs of several seeds can share one base trained on
    one public split while their shards differ."""
    labels = np.asarray(labels)
    require(0 <= public_size < len(labels),
            f"data.public_size must be in [0, {len(labels)}), got {public_size}")
    require(0 <= val_size < len(labels) - public_size,
            f"data.val_size must be in [0, {len(labels) - public_size}), got {val_size}")
    rng = np.random.default_rng(seed)
    hold = rng if holdout_seed is None or int(holdout_seed) == seed else np.random.default_rng(int(holdout_seed))
    perm = hold.permutation(len(labels))
    public, val = np.sort(perm[:public_size]), np.sort(perm[public_size:public_size + val_size])
    rest = np.sort(perm[public_size + val_size:])
    takes_groups = "groups" in inspect.signature(splitter).parameters
    try:
        local = splitter(labels[rest], rng=rng,
                         **({"groups": np.asarray(groups)[rest]} if takes_groups and groups is not None else {}))
    except AMEError as e:
        if public_size + val_size == 0:
            raise
        raise AMEError(f"{e} (data.public_size={public_size} and data.val_size={val_size} leave {len(rest)} of the "
                       f"{len(labels)} training examples to shard; lower them)") from None
    return Split([np.sort(rest[s]) for s in local], public, val)


def check_settings(data_cfg) -> None:
    """The data settings that need no data (``data``), before any work: the held-out sizes (their
    upper bounds need the data: :func:`split`) and the dataset's own split seed, if it has one."""
    from ame.checks import seed

    for key in ("public_size", "val_size"):
        positive_int(data_cfg[key], f"data.{key}", minimum=0)
    if "split_seed" in data_cfg.dataset:
        seed(data_cfg.dataset.split_seed, "data.dataset.split_seed")
