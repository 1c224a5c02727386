"""One run, top-down like the paper's pipeline: data → shards → experts → aggregate → evaluate → report."""
from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from ame.aggregators import Aggregator, average
from ame.aggregators.base import Callback
from ame.align import align_experts, permutation_spec
from ame.cache import Entry
from ame.checks import check_config
from ame.config import clean_config, instantiate, run_identity
from ame.data import split
from ame.data.corruptions import VERSION as CORRUPTIONS_VERSION
from ame.device import resolve_device
from ame.errors import AMEError, require
from ame.evaluate import Evaluator, accuracy
from ame.experts import config_hash, file_experts, trained_experts
from ame.io import finite_json, save_state_dict
from ame.models import buffer_names, build_model
from ame.progress import Timer, listening, report
from ame.provenance import collect as collect_provenance
from ame.repair import has_batchnorm, reset_batchnorm
from ame.report import format_table, write_results
from ame.train import check_train_cfg

log = logging.getLogger(__name__)


def _check(cfg: DictConfig):
    """Validate the settings that need no data, before anything is trained or written; returns
    the aggregator and the aligner (None for ``align=none``)."""
    require(cfg.experts.source in ("train", "files"), f"experts.source must be train or files, got {cfg.experts.source!r}")
    check_config(cfg)
    aggregator = instantiate(cfg.aggregator, "aggregator")
    aligner = instantiate(cfg.align, "align") if cfg.get("align") else None
    if cfg.experts.source == "train":
        check_train_cfg(cfg.train, cfg.data.public_size)
        no_init = cfg.train.init == "independent"
    else:
        no_init = not cfg.experts.get("init")
    require(isinstance(aggregator, Aggregator), f"aggregator: {type(aggregator).__name__} is not an "
            "ame.aggregators.Aggregator; point _target_ at one")
    name = aggregator.name
    if not aggregator.data_free:
        require(cfg.experts.source == "train" and int(cfg.data.get("val_size", 0)) > 0,
                f"aggregator={name} is not data-free: it needs a validation split; set "
                "data.val_size (e.g. data.val_size=1000), with experts=train")
    if aggregator.needs_init and no_init:
        raise aggregator.missing_init("train.init=independent" if cfg.experts.source == "train"
                                      else "experts.init is not set")
    if aligner is not None:
        require(not aggregator.needs_init,
                f"align=weight_matching permutes the experts but not their shared initialisation, which "
                f"aggregator={name} uses; use aggregator.pivot=soup|first|zero (AME) or align=none")
        require(cfg.experts.source != "train" or aligner.reference < int(cfg.data.shards.num_shards),
                f"align.reference={aligner.reference}, but there are only {cfg.data.shards.num_shards} experts")
    if str(cfg.get("optimized_metric")).startswith("val/"):
        require(aggregator.single_network, f"optimized_metric={cfg.optimized_metric} needs a "
                f"single network to score; aggregator={name} is an output ensemble; tune another aggregator")
        require(int(cfg.data.get("val_size", 0)) > 0, f"optimized_metric={cfg.optimized_metric} is measured on a "
                "validation split, but data.val_size=0; set data.val_size (e.g. data.val_size=1000)")
    aggregator.check()  # e.g. the optimizer's settings, before any training
    if cfg.get("bn_reset"):
        require(aggregator.single_network, f"bn_reset=true recomputes one network's BatchNorm statistics; "
                f"aggregator={name} is an output ensemble; use bn_reset=false")
        require(cfg.experts.source == "train" and int(cfg.data.get("val_size", 0)) > 0,
                "bn_reset=true recomputes BatchNorm statistics on a validation split (not data-free); set "
                "data.val_size (e.g. data.val_size=1000), with experts=train")
    resolve_device(cfg.train.device, "train.device"), resolve_device(cfg.eval.device, "eval.device")
    return aggregator, aligner


def run(cfg: DictConfig) -> dict:
    """Run the pipeline for ``cfg``, logging to ``cfg.logger``; returns the ``results.json`` dict."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    out_dir = Path(cfg.paths.output_dir)
    aggregator, aligner = _check(cfg)
    devices = [cfg.train.device, cfg.eval.device, cfg.aggregator.get("device") or "cpu"]
    provenance = collect_provenance([resolve_device(d) for d in devices])  # the start time: before the logger
    logger = instantiate(cfg.logger, "logger")(dir=out_dir, config={**clean_config(cfg), "provenance": provenance},
                                               identity=run_identity(cfg))
    try:
        with logging_redirect_tqdm(), listening(logger.log_metrics):  # log lines above the bars
            results = _run(cfg, aggregator, aligner, out_dir, provenance, ame_every=logger.ame_every)
        logger.log_results(results, out_dir)
    except BaseException:
        logger.finish(exit_code=1)  # a failed run must not look finished in W&B
        raise
    logger.finish()
    return results


def distance(a, b, keys) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys))


class _ReportDistances(Callback):
    """The iterate's distances to the pivot and to the soup at each traced step, reported as stage
    ``ame`` (to the logger's curves; not to the log)."""

    def __init__(self, every: int | None):
        self.every = every

    def on_step(self, aggregator, step: int, metrics: dict) -> None:
        report("ame", "step", step, metrics, quiet=True)


def brief(m: dict) -> str:
    """The headline metrics of one network, in %, for a log line."""
    names = {"id/acc": "ID", "ood/acc": "OOD", "ood/extra_acc": "OOD extra", "shard/min_acc": "worst shard"}
    return ", ".join(f"{label} {100 * m[k]:.2f}%" for k, label in names.items() if isinstance(m.get(k), float))


def _reference_metrics(evaluator: Evaluator, ex, soup: Callable[[], dict], cfg: DictConfig, provenance: dict) -> dict:
    """Metrics of the experts, the soup and the warm-start base. They are the same for every
    aggregator in a sweep, so they are computed once per expert set and evaluation setting and
    cached beside the experts (trained experts only), with the ``provenance`` of the run that
    computed them (``made_by``; None in entries from before it was recorded). ``soup()`` gives the
    soup's weights (computed only when the cache misses)."""
    eval_cfg = {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items()
                if k not in ("batch_size", "device", "_target_", "_partial_", "workers")}
    spec = {"eval": eval_cfg, "experts": ex.fingerprint, "format": 3,  # tied to the exact expert files
            "corruptions": CORRUPTIONS_VERSION}  # and to the corruption code's outputs
    entry = Entry(cfg.paths.cache_dir, "metrics", config_hash(spec), spec, what="the reference metrics") \
        if ex.fingerprint is not None else None
    if entry is not None:
        ref = entry.load_json("reference.json")  # verified; a damaged or foreign file is recomputed
        if isinstance(ref, dict) and {"soup", "experts", "ensemble", "base"} <= ref.keys():
            log.info("experts, ensemble, soup and base: metrics from the cache (%s)", entry.root)
            return {"made_by": None, **ref}
    own = ex.class_counts is not None
    base = None
    if cfg.experts.source == "train" and cfg.train.init == "warm":
        probs = evaluator.probabilities(ex.init, name="warm base")
        base = evaluator.metrics(probs)
        base_own = evaluator.shard_accs(probs) if own else None
    experts: list[dict] = []

    def each(i: int, probs: dict) -> None:
        m = evaluator.metrics(probs, shard=i if own else None)
        if base is not None and own:  # did fine-tuning on the shard beat the base on the shard's own mix?
            m |= {"shard/base_own_acc": base_own[i], "shard/own_gain": m["shard/own_acc"] - base_own[i]}
        experts.append(m)
        log.info("evaluated expert %d: %s", i, brief(experts[-1]))

    mean = evaluator.ensemble_probabilities(ex.experts, each)
    ensemble = evaluator.metrics(mean)
    ref = {"soup": evaluator(soup(), name="soup"), "experts": experts,
           "ensemble": {**ensemble, "single_network": False},  # the output ensemble: N networks, not one
           "base": base, "made_by": provenance}
    for name in ("ensemble", "soup", "base"):
        if ref[name] is not None:
            log.info("evaluated %s: %s", name, brief(ref[name]))
    ref = finite_json(ref)
    if entry is not None:
        with entry.lock():
            entry.put_json("reference.json", ref)
    return ref


def _run(cfg: DictConfig, aggregator, aligner, out_dir: Path, provenance: dict, ame_every: int | None = 0) -> dict:
    timer = Timer()
    seed = int(cfg.seed)
    train_device, eval_device = resolve_device(cfg.train.device), resolve_device(cfg.eval.device)
    torch.manual_seed(seed)

    data = shards = ex = None
    with timer("data", lambda: f"{data.name}: {len(data.train_y)} training and {len(data.test_y)} test images "
               f"{'×'.join(map(str, data.shape))}, {data.num_classes} classes"):
        data = instantiate(cfg.data.dataset, "data")
    with timer("shards", lambda: f"{len(shards.shards)} shards of {shards.sizes} images; public "
               f"{len(shards.public)}, validation {len(shards.val)}"):
        splitter = instantiate(cfg.data.shards, "data.shards")
        shards = split(data.train_y.numpy(), splitter, seed=seed, public_size=int(cfg.data.public_size),
                       val_size=int(cfg.data.get("val_size", 0)), holdout_seed=cfg.get("base_seed"),
                       groups=None if data.train_groups is None else data.train_groups.numpy())
    model = build_model(cfg.model, data, seed)
    require(not cfg.get("bn_reset") or has_batchnorm(model), f"bn_reset=true, but model="
            f"{cfg.model._target_.rsplit('.', 1)[-1]} has no BatchNorm statistics (e.g. model.norm=batch); use bn_reset=false")
    spec = permutation_spec(model, data.shape) if aligner is not None else None  # refuse before training
    with timer("experts", lambda: f"{len(ex.experts)} experts " + (
            "read from files" if cfg.experts.source != "train" else "from the cache" if ex.cached else "trained")):
        if cfg.experts.source == "train":
            ex = trained_experts(cfg, data, shards, train_device, made_by=provenance)
        else:
            ex = file_experts(cfg.experts)
    require(ex.class_counts is None or ex.class_counts.shape[1] == data.num_classes,
            f"the experts' class_counts metadata count {0 if ex.class_counts is None else ex.class_counts.shape[1]} "
            f"classes, but {data.name} has {data.num_classes}; check data= or the expert files")
    buffers = buffer_names(model)
    against = f"model={cfg.model._target_.rsplit('.', 1)[-1]}"
    pool = ex.experts.pool(ex.sizes, ex.init, buffers)
    pool.check_against({k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}, against)
    if aligner is not None:
        with timer("align"):
            ex = align_experts(ex, aligner, spec, Path(cfg.paths.cache_dir), config_hash(cfg.align))
        pool = ex.experts.pool(ex.sizes, ex.init, buffers)  # the aligned copies
    single = aggregator.single_network  # the output ensemble is N networks: no weights
    val_x, val_y = data.train_x[shards.val], data.train_y[shards.val]  # held out before sharding (data.val_size)
    callbacks = [_ReportDistances(ame_every or None)] if ame_every != 0 else []  # only when a logger wants curves
    with timer("aggregate", lambda: aggregator.name):
        extra = {} if aggregator.data_free else {  # the declared exception (greedy soup): scored on validation
            "score": lambda sd: accuracy(model, data, sd, val_x, val_y, eval_device)}
        aggregate = dict(aggregator.run(pool, callbacks=callbacks, **extra)) if single else None
    if cfg.get("bn_reset"):  # the data-using reference: statistics recomputed on the validation split
        with timer("bn_reset"):
            aggregate = reset_batchnorm(model, aggregate, data, val_x, eval_device)
    soup = functools.cache(lambda: average(pool))  # the reference soup, once, and only if needed

    with timer("evaluate", lambda: f"aggregate {brief(metrics)}"):
        evaluator = instantiate(cfg.eval, "eval")(model=model, data=data, class_counts=ex.class_counts,
                                                  device=eval_device,
                                                  cache_dir=cfg.paths.cache_dir)
        ref = _reference_metrics(evaluator, ex, soup, cfg, provenance)
        tuned = str(cfg.get("optimized_metric")).startswith("val/")
        if single:
            metrics = evaluator(aggregate, name=f"{aggregator.name} (aggregate)")
            pivot = aggregator.pivot(pool)
            soup = soup()
            pivot = soup if pivot is None else pivot
            params = [k for k, v in aggregate.items() if v.is_floating_point() and k not in buffers]
            scale, to_soup, to_pivot = (distance(a, b, params)
                                        for a, b in ((pivot, soup), (aggregate, soup), (aggregate, pivot)))
            metrics |= {"dist/scale": scale,  # ‖pivot − soup‖: the unit of the relative distances
                        "dist/soup": to_soup / scale if scale > 0 else None,  # None when the pivot is the soup
                        "dist/pivot": to_pivot / scale if scale > 0 else None,
                        "dist/soup_l2": to_soup, "dist/pivot_l2": to_pivot}
            if len(val_y):  # for choosing hyperparameters, not for reporting
                metrics["val/acc"] = accuracy(model, data, aggregate, val_x, val_y, eval_device)
        else:
            metrics = {k: v for k, v in ref["ensemble"].items() if k != "single_network"}
        results = {
            "aggregator": aggregator.name,
            # a run whose hyperparameters a sweeper picks on validation data is no longer data-free
            "data_free": aggregator.data_free and not tuned and not cfg.get("bn_reset"),
            "bn_reset": bool(cfg.get("bn_reset")),
            "tuned_on_validation": tuned,
            "aggregator_info": dict(aggregator.info),
            "single_network": single,
            "align": aligner.info if aligner is not None else None,
            "metrics": metrics,
            "soup": ref["soup"],
            "experts": [{"shard_size": n, "path": str(p), **m}
                        for n, p, m in zip(ex.sizes, ex.experts.paths, ref["experts"])],
            "base": ref["base"],
            "ensemble": ref["ensemble"],
            "experts_cached": ex.cached,
            "seed": seed,
            "data": {"name": data.name, "shard_sizes": ex.sizes, "public_size": int(cfg.data.public_size),
                     "val_size": len(shards.val), "fingerprint": data.fingerprint()},  # the pixels and labels
            # this run's environment (its wall time per stage: timings_s), and that of the runs that
            # made what it reused from the cache (null: not made by a run here, or not recorded then)
            "provenance": {**provenance, "experts_made_by": ex.made_by, "base_made_by": ex.base_made_by,
                           "reference_metrics_made_by": ref["made_by"]},
        }
    results["timings_s"] = timer.seconds
    metric = cfg.get("optimized_metric", "id/acc")  # the sweepers' objective: must exist before anything is written
    require(metric in results["metrics"], f"optimized_metric={metric} is not among this run's metrics "
            f"({', '.join(sorted(results['metrics']))}); choose one of them")
    results = finite_json(results)
    if single:
        save_state_dict(aggregate, out_dir / "aggregate.safetensors", {"aggregator": results["aggregator"]})
    write_results(results, out_dir)
    log.info("results (accuracies in %%; also in %s):\n%s", out_dir / "results.json", format_table(results))
    return results
