"""User input checked before any work: config values, and the metadata of users' files.

Every problem is one :class:`~ame.errors.AMEError` line naming the key (or the file and field)
and the fix. :func:`check_config` runs before anything is trained or written; the metadata
checks run where users' files are read.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from omegaconf import DictConfig

from ame.config import instantiate
from ame.errors import AMEError, positive_int, require

METRIC_PREFIXES = ("id/", "ood/", "shard/", "dist/", "val/")
# the aggregate's metrics outside ood/ (whose keys follow eval.corruptions): a typo is caught before any work
FIXED_METRICS = ("id/acc", "id/nll", "shard/min_acc", "dist/scale", "dist/soup", "dist/pivot", "dist/soup_l2",
                 "dist/pivot_l2", "val/acc")
WANDB_MODES = ("online", "offline", "disabled", "shared")


def _number(value, key: str, low: float | None = None, high: float | None = None, low_open: bool = False,
            high_open: bool = False, example: str = "") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        where = f" in {lo}, {hi}" if lo and hi else (f" {'>' if low_open else '≥'} {low}" if lo else "")
        raise AMEError(f"{key} must be a number{where}, got {value!r}{example}")
    return float(value)


def seed(value, key: str) -> int:
    return positive_int(value, key, minimum=0)


def optimizer_works(node, key: str) -> None:
    """Build the optimizer ``node`` (a ``_partial_`` torch.optim class) on a dummy parameter and take
    one step, so a bad class or setting fails now, whatever exception it raises, in one line."""
    make = instantiate(node, key)
    name = getattr(getattr(make, "func", make), "__name__", "the optimizer")
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.ones(2)
    try:
        make([w]).step()
    except AMEError:
        raise
    except Exception as e:  # noqa: BLE001 — any failure of a user-chosen class is a bad input
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AMEError(f"{key}: {name} cannot train here ({first[:160]}); use a torch.optim optimizer such as "
                       f"SGD, Adam or AdamW with valid settings") from None
    require(torch.isfinite(w).all(), f"{key}: one step on a dummy parameter gave NaN/Inf; check its settings")


def check_train(train: DictConfig) -> None:
    """The training settings that :func:`ame.train.check_train_cfg` does not cover."""
    optimizer_works(train.optimizer, "train.optimizer")
    if train.get("warm_lr") is not None:
        _number(train.warm_lr, "train.warm_lr", 0, low_open=True, example="; or null to use train.optimizer.lr")
    _number(train.get("label_smoothing", 0.0), "train.label_smoothing", 0, 1, high_open=True,
            example="; e.g. 0.1 (0: none)")
    require(train.get("lr_schedule", "cosine") in ("cosine", "constant"),
            f"train.lr_schedule must be cosine or constant, got {train.get('lr_schedule')!r}")
    aug = train.get("augment") or {}
    positive_int(aug.get("crop_padding", 0), "train.augment.crop_padding", minimum=0)
    require(isinstance(aug.get("flip", False), bool), f"train.augment.flip must be true or false, got {aug.get('flip')!r}")
    require(isinstance(train.get("parallel_experts", False), bool),
            f"train.parallel_experts must be true or false, got {train.get('parallel_experts')!r}")


def check_eval(ev: DictConfig) -> None:
    from ame.data.ood import PUBLISHED, check_names, check_severities

    positive_int(ev.batch_size, "eval.batch_size")
    seed(ev.seed, "eval.seed")
    if ev.ood_subsample is not None:
        positive_int(ev.ood_subsample, "eval.ood_subsample", minimum=1)  # null: the whole test set
    if ev.get("test_subsample") is not None:
        positive_int(ev.test_subsample, "eval.test_subsample", minimum=1)  # null: the whole test set
    corruptions, severities = ev.corruptions, ev.severities
    for key, names in (("eval.corruptions", corruptions), ("eval.extras", ev.get("extras") or [])):
        require(isinstance(names, Sequence) and not isinstance(names, str),
                f"{key} must be a list, e.g. [gaussian_noise,contrast] (or [] for none), got {names!r}")
        check_names([str(c) for c in names], key)
    positive_int(ev.get("workers", 2), "eval.workers")
    require(ev.get("download") in (None, *PUBLISHED),
            f"eval.download must be one of {sorted(PUBLISHED)} or null, got {ev.get('download')!r}")
    require(ev.get("download") is None or str(ev.get("source", "generated")) != "generated",
            "eval.download needs eval.source set to the folder to hold the arrays, e.g. eval.source=~/data/CIFAR-10-C")
    require(isinstance(severities, Sequence) and not isinstance(severities, str),
            f"eval.severities must be a list of integers in 1..5, e.g. [1,3,5], got {severities!r}")
    check_severities(severities)


def check_logger(logger: DictConfig) -> None:
    if "WandbLogger" not in str(logger.get("_target_", "")):
        return
    mode = logger.get("mode") or os.environ.get("WANDB_MODE")
    require(mode is None or mode in WANDB_MODES,
            f"logger.mode (or $WANDB_MODE) must be one of {WANDB_MODES} or null, got {mode!r}")
    _number(logger.get("init_timeout", 20), "logger.init_timeout", 0, low_open=True)
    if logger.get("ame_every") is not None:  # null: about 32 points per run; 0: no AME curves
        positive_int(logger.ame_every, "logger.ame_every", minimum=0)
    tags = logger.get("tags") or []
    require(isinstance(tags, Sequence) and not isinstance(tags, str) and all(isinstance(t, str) for t in tags),
            f"logger.tags must be a list of strings, e.g. [baseline], got {tags!r}")


def check_metric_name(metric, corruptions: Sequence[str]) -> None:
    """The form of ``optimized_metric`` (the exact set of metrics is checked again before writing)."""
    require(isinstance(metric, str) and metric.startswith(METRIC_PREFIXES) and len(metric.split("/")) >= 2,
            f"optimized_metric must name a metric such as id/acc, ood/acc or val/acc, got {metric!r}")
    require(metric.startswith("ood/") or metric in FIXED_METRICS,
            f"optimized_metric={metric} is not a metric of this project; choose one of {', '.join(FIXED_METRICS)} "
            "or an ood/ metric")
    if metric.startswith("ood/"):
        require(len(corruptions) > 0, f"optimized_metric={metric}, but eval.corruptions is empty; "
                "evaluate some corruptions or choose id/acc")


def check_config(cfg: DictConfig) -> None:
    """Every value that needs no data, before anything is trained or written."""
    seed(cfg.seed, "seed")
    if cfg.get("base_seed") is not None:
        seed(cfg.base_seed, "base_seed")
    if cfg.experts.source == "train":
        check_train(cfg.train)
    check_eval(cfg.eval)
    check_logger(cfg.logger)
    check_metric_name(cfg.get("optimized_metric", "id/acc"), cfg.eval.corruptions)
    for key in ("public_size", "val_size"):
        positive_int(cfg.data.get(key, 0), f"data.{key}", minimum=0)
    dataset = cfg.data.dataset
    if "split_seed" in dataset:
        seed(dataset.split_seed, "data.dataset.split_seed")
