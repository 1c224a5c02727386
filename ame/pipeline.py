"""One run, top-down like the paper's pipeline: data → shards → experts → aggregate → evaluate → report."""
from __future__ import annotations

import functools
import hashlib
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
from ame.checks import seed
from ame.config import clean_config, instantiate, run_identity, target
from ame.data import split
from ame.data.shards import check_settings as check_data
from ame.eval.corruptions import VERSION as CORRUPTIONS_VERSION
from ame.device import resolve_device
from ame.errors import require
from ame.eval.evaluate import Evaluator, accuracy
from ame.experts import ExpertSource, config_hash
from ame.io import finite_json, save_state_dict, tensor_bytes
from ame.models import buffer_names, build_model
from ame.progress import Timer, listening, report
from ame.provenance import collect as collect_provenance
from ame.repair import has_batchnorm, images_as_trained, reset_batchnorm
from ame.report import format_table, write_results

log = logging.getLogger(__name__)


METRIC_PREFIXES = ("id/", "ood/", "shard/", "dist/", "val/")
# the aggregate's metrics outside ood/ (whose keys follow eval.corruptions): a typo is caught before any work
FIXED_METRICS = ("id/acc", "id/nll", "shard/min_acc", "dist/scale", "dist/soup", "dist/pivot", "dist/soup_l2",
                 "dist/pivot_l2", "val/acc")


def _check_metric(metric, corruptions) -> None:
    """The form of ``optimized_metric`` (the exact set of metrics is checked again before writing)."""
    require(isinstance(metric, str) and metric.startswith(METRIC_PREFIXES) and len(metric.split("/")) >= 2,
            f"optimized_metric must name a metric such as id/acc, ood/acc or val/acc, got {metric!r}")
    require(metric.startswith("ood/") or metric in FIXED_METRICS,
            f"optimized_metric={metric} is not a metric of this project; choose one of {', '.join(FIXED_METRICS)} "
            "or an ood/ metric")
    if metric.startswith("ood/"):
        require(len(corruptions) > 0, f"optimized_metric={metric}, but eval.corruptions is empty; "
                "evaluate some corruptions or choose id/acc")


def check(cfg: DictConfig) -> tuple[ExpertSource, Aggregator, object | None]:
    """Build the run's components and have each check its own settings (its ``check``), then the
    rules between them: all before anything is trained or written. Returns the expert source, the
    aggregator and the aligner (None for ``align=none``)."""
    seed(cfg.seed, "seed")
    if cfg.base_seed is not None:
        seed(cfg.base_seed, "base_seed")
    check_data(cfg.data)
    source = instantiate(cfg.experts, "experts", ExpertSource)
    source.check()
    target(cfg.eval, "eval").check(cfg.eval)
    target(cfg.logger, "logger").check(cfg.logger)
    _check_metric(cfg.optimized_metric, cfg.eval.corruptions)
    aggregator = instantiate(cfg.aggregator, "aggregator", Aggregator)
    aligner = instantiate(cfg.align, "align") if cfg.align else None
    name, val_size = aggregator.name, cfg.data.val_size
    if not aggregator.data_free:
        require(source.trained_here and val_size > 0,
                f"aggregator={name} is not data-free: it needs a validation split; set "
                "data.val_size (e.g. data.val_size=1000), with experts=train")
    if aggregator.needs_init and source.missing_init:
        raise aggregator.missing_init(source.missing_init)
    if aligner is not None:
        require(not aggregator.needs_init,
                f"align=weight_matching permutes the experts but not their shared initialisation, which "
                f"aggregator={name} uses; use aggregator.pivot=soup|first|zero (AME) or align=none")
        require(source.count is None or aligner.reference < source.count,
                f"align.reference={aligner.reference}, but there are only {source.count} experts")
    if str(cfg.optimized_metric).startswith("val/"):
        require(aggregator.single_network, f"optimized_metric={cfg.optimized_metric} needs a "
                f"single network to score; aggregator={name} is an output ensemble; tune another aggregator")
        require(val_size > 0, f"optimized_metric={cfg.optimized_metric} is measured on a "
                "validation split, but data.val_size=0; set data.val_size (e.g. data.val_size=1000)")
    aggregator.check()  # e.g. the optimizer's settings, before any training
    require(isinstance(cfg.bn_reset, bool), f"bn_reset must be true or false, got {cfg.bn_reset!r}")
    if cfg.bn_reset:
        require(aggregator.single_network, f"bn_reset=true recomputes one network's BatchNorm statistics; "
                f"aggregator={name} is an output ensemble; use bn_reset=false")
        require(source.trained_here and val_size > 0,
                "bn_reset=true recomputes BatchNorm statistics on a validation split (not data-free); set "
                "data.val_size (e.g. data.val_size=1000), with experts=train")
    resolve_device(cfg.eval.device, "eval.device")
    return source, aggregator, aligner


def run(cfg: DictConfig) -> dict:
    """Run the pipeline for ``cfg``, logging to ``cfg.logger``; returns the ``results.json`` dict.
    The one function that reads the root config: each stage below gets the settings it uses."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    out_dir = Path(cfg.paths.output_dir)
    source, aggregator, aligner = check(cfg)
    devices = [cfg.eval.device, cfg.aggregator.get("device") or "cpu", *([cfg.train.device] if source.trained_here else [])]
    provenance = collect_provenance([resolve_device(d) for d in devices])  # the start time: before the logger
    logger = instantiate(cfg.logger, "logger")(dir=out_dir, config={**clean_config(cfg), "provenance": provenance},
                                               identity=run_identity(cfg))
    try:
        with logging_redirect_tqdm(), listening(logger.log_metrics):  # log lines above the bars
            timer, seed = Timer(), int(cfg.seed)
            torch.manual_seed(seed)
            data, shards = _data(cfg.data, seed, cfg.base_seed, timer)
            model = build_model(cfg.model, data, seed)
            require(not cfg.bn_reset or has_batchnorm(model), f"bn_reset=true, but model="
                    f"{cfg.model._target_.rsplit('.', 1)[-1]} has no BatchNorm statistics (e.g. model.norm=batch); "
                    "use bn_reset=false")
            ex, pool = _experts(source, aligner, data, shards, model, f"model={cfg.model._target_.rsplit('.', 1)[-1]}",
                                Path(cfg.paths.cache_dir), config_hash(cfg.align), provenance, timer)
            eval_device = resolve_device(cfg.eval.device)
            val = data.train_x[shards.val], data.train_y[shards.val]  # held out before sharding (data.val_size)
            bn_reset = images_as_trained(cfg.train.augment.crop_padding, cfg.train.augment.flip, seed) \
                if cfg.bn_reset else None
            aggregate = _aggregate(aggregator, pool, model, data, val, eval_device, logger.ame_every, bn_reset, timer)
            with timer("evaluate", lambda: f"aggregate {brief(results['metrics'])}"):
                evaluator = instantiate(cfg.eval, "eval")(model=model, data=data, class_counts=ex.class_counts,
                                                          device=eval_device, cache_dir=cfg.paths.cache_dir)
                soup = functools.cache(lambda: average(pool))  # the reference soup, once, and only if needed
                ref = _reference_metrics(evaluator, ex, soup, cfg.eval, cfg.paths.cache_dir, provenance)
                metrics, metrics_made_by = _metrics(evaluator, aggregator, aggregate, pool, soup, ref, model, data, val,
                                                    eval_device, _aggregate_entry(aggregate, ex, cfg, data, shards.val),
                                                    provenance)
                tuned = str(cfg.optimized_metric).startswith("val/")
                results = {
                    "aggregator": aggregator.name,
                    # a run whose hyperparameters a sweeper picks on validation data is no longer data-free
                    "data_free": aggregator.data_free and not tuned and not cfg.bn_reset,
                    "bn_reset": cfg.bn_reset,
                    "bn_reset_images": bn_reset,  # how the statistics were measured
                    "tuned_on_validation": tuned,
                    "aggregator_info": dict(aggregator.info),
                    "single_network": aggregator.single_network,
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
                                   "reference_metrics_made_by": ref["made_by"], "aggregate_metrics_made_by": metrics_made_by},
                }
            results["timings_s"] = timer.seconds
            results = _write(results, aggregate, cfg.optimized_metric, out_dir)
        logger.log_results(results, out_dir)
    except BaseException:
        logger.finish(exit_code=1)  # a failed run must not look finished in W&B
        raise
    logger.finish()
    return results


def _data(data_cfg: DictConfig, seed: int, base_seed: int | None, timer: Timer):
    """Stages 1-2: the dataset, and its public, validation and shard splits."""
    data = shards = None
    with timer("data", lambda: f"{data.name}: {len(data.train_y)} training and {len(data.test_y)} test images "
               f"{'×'.join(map(str, data.shape))}, {data.num_classes} classes"):
        data = instantiate(data_cfg.dataset, "data")
    with timer("shards", lambda: f"{len(shards.shards)} shards of {shards.sizes} images; public "
               f"{len(shards.public)}, validation {len(shards.val)}"):
        splitter = instantiate(data_cfg.shards, "data.shards")
        shards = split(data.train_y.numpy(), splitter, seed=seed, public_size=int(data_cfg.public_size),
                       val_size=int(data_cfg.val_size), holdout_seed=base_seed,
                       groups=None if data.train_groups is None else data.train_groups.numpy())
    return data, shards


def _experts(source: ExpertSource, aligner, data, shards, model, against: str, cache_dir: Path, align_key: str,
             provenance: dict, timer: Timer):
    """Stage 3: the experts from ``source`` (aligned by ``aligner`` if any), and their pool,
    checked against ``model``'s tensors (``against`` names the model in messages)."""
    spec = permutation_spec(model, data.shape) if aligner is not None else None  # refuse before training
    ex = None
    with timer("experts", lambda: f"{len(ex.experts)} experts {ex.origin}"):
        ex = source.experts(data, shards, made_by=provenance)
    require(ex.class_counts is None or ex.class_counts.shape[1] == data.num_classes,
            f"the experts' class_counts metadata count {0 if ex.class_counts is None else ex.class_counts.shape[1]} "
            f"classes, but {data.name} has {data.num_classes}; check data= or the expert files")
    buffers = buffer_names(model)
    pool = ex.experts.pool(ex.sizes, ex.init, buffers)
    pool.check_against({k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}, against)
    if aligner is not None:
        with timer("align"):
            ex = align_experts(ex, aligner, spec, cache_dir, align_key)
        pool = ex.experts.pool(ex.sizes, ex.init, buffers)  # the aligned copies
    return ex, pool


def _aggregate(aggregator: Aggregator, pool, model, data, val, device, ame_every: int | None, bn_reset: dict | None,
               timer: Timer):
    """Stage 4: the aggregate's weights (None for an output ensemble: N networks, no weights);
    with ``bn_reset`` (:func:`ame.repair.reset_batchnorm`'s augmentation settings), its BatchNorm
    statistics recomputed on the validation split ``val``."""
    if not aggregator.single_network:
        return None
    callbacks = [_ReportDistances(ame_every)] if ame_every != 0 else []  # only when a logger wants curves
    with timer("aggregate", lambda: aggregator.name):
        extra = {} if aggregator.data_free else {  # the declared exception (greedy soup): scored on validation
            "score": lambda sd: accuracy(model, data, sd, *val, device)}
        aggregate = dict(aggregator.run(pool, callbacks=callbacks, **extra))
    if bn_reset is not None:  # the data-using reference: statistics recomputed on the validation split
        with timer("bn_reset"):
            aggregate = reset_batchnorm(model, aggregate, data, val[0], device, **bn_reset)
    return aggregate


def _metrics(evaluator: Evaluator, aggregator: Aggregator, aggregate, pool, soup: Callable[[], dict], ref: dict,
             model, data, val, device, entry: Entry | None, provenance: dict) -> tuple[dict, dict | None]:
    """Stage 5: the aggregate's metrics, its distances to the soup and to its pivot, and (with a
    validation split) ``val/acc``; an output ensemble's are the reference ensemble's. The
    evaluation (not the distances) comes from ``entry`` when an earlier run evaluated these very
    weights the same way, and goes there otherwise (a rerun of a sweep evaluates nothing twice).
    Also returns the provenance of the run that evaluated them (the reference's for an ensemble)."""
    if aggregate is None:
        return {k: v for k, v in ref["ensemble"].items() if k != "single_network"}, ref["made_by"]
    cached = entry.load_json("metrics.json") if entry is not None else None
    if (isinstance(cached, dict) and isinstance(cached.get("metrics"), dict) and "id/acc" in cached["metrics"]
            and ("val/acc" in cached["metrics"]) == bool(len(val[1]))):
        log.info("%s (aggregate): metrics from the cache (%s)", aggregator.name, entry.root)
        metrics, made_by = cached["metrics"], cached.get("made_by")
    else:
        metrics, made_by = evaluator(aggregate, name=f"{aggregator.name} (aggregate)"), provenance
        if len(val[1]):  # for choosing hyperparameters, not for reporting
            metrics["val/acc"] = accuracy(model, data, aggregate, *val, device)
        if entry is not None:
            with entry.lock():
                entry.put_json("metrics.json", finite_json({"metrics": metrics, "made_by": provenance}))
    pivot = aggregator.pivot(pool)
    soup = soup()
    pivot = soup if pivot is None else pivot
    params = [k for k, v in aggregate.items() if v.is_floating_point() and k not in pool.buffers]
    scale, to_soup, to_pivot = (distance(a, b, params) for a, b in ((pivot, soup), (aggregate, soup), (aggregate, pivot)))
    metrics |= {"dist/scale": scale,  # ‖pivot − soup‖: the unit of the relative distances
                "dist/soup": to_soup / scale if scale > 0 else None,  # None when the pivot is the soup
                "dist/pivot": to_pivot / scale if scale > 0 else None,
                "dist/soup_l2": to_soup, "dist/pivot_l2": to_pivot}
    return metrics, made_by


def _eval_spec(eval_cfg: DictConfig) -> dict:
    """The evaluation settings that change its numbers (not how fast or where it runs)."""
    return {k: v for k, v in OmegaConf.to_container(eval_cfg, resolve=True).items()
            if k not in ("batch_size", "device", "_target_", "_partial_", "workers")}


def _aggregate_entry(aggregate, ex, cfg: DictConfig, data, val_index) -> Entry | None:
    """Where the evaluation of these aggregate weights is cached: keyed by their bytes, the expert
    set (trained experts only, as the reference metrics), the model, the evaluation settings and
    the validation split; None for an output ensemble or experts from files."""
    if aggregate is None or ex.fingerprint is None or not cfg.paths.cache_dir:
        return None
    h = hashlib.sha256()
    for k in sorted(aggregate):
        t = aggregate[k]
        h.update(f"{k}/{t.dtype}/{tuple(t.shape)}".encode())
        h.update(tensor_bytes(t))
    val = hashlib.sha256(tensor_bytes(torch.as_tensor(val_index, dtype=torch.int64))).hexdigest()
    spec = {"weights": h.hexdigest(), "experts": ex.fingerprint, "model": OmegaConf.to_container(cfg.model, resolve=True),
            "eval": _eval_spec(cfg.eval), "corruptions": CORRUPTIONS_VERSION, "data": data.fingerprint(), "val": val,
            "format": 1}
    return Entry(cfg.paths.cache_dir, "aggregates", config_hash(spec), spec, what="the aggregate's metrics")


def _write(results: dict, aggregate, optimized_metric: str, out_dir: Path) -> dict:
    """Stage 6: ``results.json`` (and ``aggregate.safetensors``), once the sweepers' objective is
    known to be among the metrics."""
    require(optimized_metric in results["metrics"], f"optimized_metric={optimized_metric} is not among this run's "
            f"metrics ({', '.join(sorted(results['metrics']))}); choose one of them")
    results = finite_json(results)
    if aggregate is not None:
        save_state_dict(aggregate, out_dir / "aggregate.safetensors", {"aggregator": results["aggregator"]})
    write_results(results, out_dir)
    log.info("results (accuracies in %%; also in %s):\n%s", out_dir / "results.json", format_table(results))
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


def _reference_metrics(evaluator: Evaluator, ex, soup: Callable[[], dict], eval_cfg: DictConfig, cache_dir: str, provenance: dict) -> dict:
    """Metrics of the experts, the soup and the warm-start base. They are the same for every
    aggregator in a sweep, so they are computed once per expert set and evaluation setting and
    cached beside the experts (trained experts only), with the ``provenance`` of the run that
    computed them (``made_by``; None in entries from before it was recorded). ``soup()`` gives the
    soup's weights (computed only when the cache misses)."""
    spec = {"eval": _eval_spec(eval_cfg), "experts": ex.fingerprint, "format": 3,  # tied to the exact expert files
            "corruptions": CORRUPTIONS_VERSION}  # and to the corruption code's outputs
    entry = Entry(cache_dir, "metrics", config_hash(spec), spec, what="the reference metrics") \
        if ex.fingerprint is not None else None
    if entry is not None:
        ref = entry.load_json("reference.json")  # verified; a damaged or foreign file is recomputed
        if isinstance(ref, dict) and {"soup", "experts", "ensemble", "base"} <= ref.keys():
            log.info("experts, ensemble, soup and base: metrics from the cache (%s)", entry.root)
            return {"made_by": None, **ref}
    own = ex.class_counts is not None
    base = None
    if ex.warm_base:
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
