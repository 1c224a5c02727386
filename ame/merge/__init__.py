"""Merge checkpoints without a model class, data or evaluation.

Command line (composed by Hydra from the same ``conf/aggregator`` and ``conf/experts`` groups as
``run.py``, so every aggregator and its knobs work)::

    python -m ame.merge aggregator=ame_adam 'experts.paths=[a,b,c]' [experts.init=x] out=merged

Python::

    import ame
    sd = ame.merge(["a", "b", "c"], aggregator="ame_adam", optimizer={"lr": 1e-4})

Defaults that do the right thing: shard sizes are optional (from the files' metadata, else
equal); with no init, AME starts from the soup (``pivot=soup``) unless a pivot was asked for;
buffers are found by name (normalisation statistics) and dtype (integers). Inputs are never
written over, and an existing ``out`` is replaced only when this tool wrote it (or with
``overwrite=True``): see :mod:`ame.io.writer`. Every bad input is one :class:`MergeError` line.
"""
from __future__ import annotations

import logging
import resource
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ame.config import instantiate
from ame.errors import AMEError, require
from ame.io import Checkpoint, FileOutput, expand
from ame.io.metadata import expert_set
from ame.io.safetensors import fingerprint
from ame.pool import ExpertPool
from ame.progress import quiet as progress_quiet

try:
    from importlib.metadata import version as _version

    __version__ = _version("ame")
except Exception:  # noqa: BLE001 — not installed (run from a source tree)
    __version__ = "unknown"

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[2] / "conf"


class MergeError(AMEError, ValueError):
    """A bad input to :func:`merge` (the same one-line message ``python -m ame.merge`` prints)."""


def _inputs(pool: ExpertPool) -> list[Path]:
    return [p for s in [*pool.sources, pool.init] if isinstance(s, Checkpoint) for p in s.inputs()]


def _describe(x) -> dict:
    """An input for the record: its path and a fingerprint of each of its weight files."""
    if isinstance(x, Checkpoint):
        root = x.path if x.layout == "folder" else x.path.parent
        return {"path": str(x.path), "files": {f: fingerprint(root / f) for f in x.files}}
    return {"path": None, "state_dict": True}


def _card(record: dict) -> str:
    """A model card (README.md) for a folder output: how it was made, from what, with which settings."""
    lines = ["---", "tags:", "- merge", "- ame", "---", "", f"# {record['aggregator']} of {len(record['experts'])} models",
             "", f"Made with `ame.merge` (ame {record['version']}) on {record['date']}: data-free, no training. "
             f"Aggregator `{record['aggregator']}`" + (f", from the recipe `{record['recipe_file']}`."
                                                       if record.get("recipe_file") else "."), "",
             "## Inputs", "", "| role | path | files (sha256 of each file's safetensors header and its size, or of the "
             "whole torch file) |", "|---|---|---|"]
    for role, entry in [("base", record["init"])] * (record["init"] is not None) + [
            (f"expert {i}", e) for i, e in enumerate(record["experts"])]:
        files = "; ".join(f"`{f}` {h}" for f, h in (entry.get("files") or {}).items()) or "(a state dict in memory)"
        lines.append(f"| {role} | `{entry.get('path')}` | {files} |")
    lines += ["", "## Settings", "", "```yaml", yaml_dump(record["settings"]).rstrip(), "```", ""]
    if record.get("recipe"):
        lines += ["## Recipe", "", "```yaml", record["recipe"].rstrip(), "```", ""]
    if record.get("command"):
        lines += ["## Command", "", "```bash", record["command"], "```", ""]
    return "\n".join(lines)


def yaml_dump(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=None)


def merge_pool(aggregator_cfg: DictConfig, experts: Sequence, init=None, out: str | Path | None = None,
               sizes: Sequence[float] | None = None, key_prefix: str | None = None, dtype: str | None = None,
               buffers=None, pivot_given: bool = False, overwrite: bool = False, recipe=None,
               command: str | None = None, quiet: bool = False) -> Mapping[str, Tensor]:
    """Build the aggregator from its config and run it on ``experts``; write to ``out`` if given
    (with a record of how: a model card in folders, metadata in files); log a summary line."""
    t0 = time.perf_counter()
    experts = expand(experts)
    require(sizes is None or (isinstance(sizes, Sequence) and not isinstance(sizes, str)),
            f"experts.sizes must be a list of {len(experts)} positive numbers (one per expert), got {sizes!r}")
    require(init is None or isinstance(init, (str, Path, Mapping, Checkpoint)),
            f"experts.init must be a checkpoint path or a state dict, got {type(init).__name__}")
    require(out is None or (isinstance(out, (str, Path)) and str(out).strip()), f"out must be a path, got {out!r}")
    require(isinstance(overwrite, bool), f"overwrite must be true or false, got {overwrite!r}")
    if init is None and aggregator_cfg.get("pivot") == "init" and not pivot_given:
        log.info("no init given: aggregator.pivot=soup")
        aggregator_cfg.pivot = "soup"
    aggregator = instantiate(aggregator_cfg, "aggregator")
    require(aggregator.data_free, f"aggregator={aggregator.name} needs held-out data; merge is data-free "
            "(use python run.py with data.val_size)")
    require(aggregator.single_network, f"aggregator={aggregator.name} is N networks, not one: there is nothing to "
            "merge; choose another aggregator")
    aggregator.check()
    pool = ExpertPool(list(experts), sizes, init, buffers, dtype=dtype, key_prefix=key_prefix)
    require(pool.floats, f"the experts hold no floating-point tensors (only {', '.join(sorted(pool.keys)[:3])}...); "
            "there is nothing to average")
    if sizes is None:
        files = [s for s in pool.sources if isinstance(s, Checkpoint)]
        if len(files) == pool.n:
            recorded, _ = expert_set([s.metadata for s in files], [s.name for s in files])
            pool.sizes = recorded or pool.sizes
    if aggregator.needs_init and pool.init is None:
        raise aggregator.missing_init("experts.init is not set")
    dest = None
    if out is not None:
        first = pool.sources[0]
        record = {"tool": "ame.merge", "version": __version__, "date": time.strftime("%Y-%m-%d"),
                  "aggregator": aggregator.name,
                  "settings": OmegaConf.to_container(aggregator_cfg, resolve=True),
                  "experts": [_describe(s) for s in pool.sources],
                  "init": _describe(pool.init) if pool.init is not None else None,
                  "recipe": recipe.text if recipe is not None else None,
                  "recipe_file": str(recipe.path) if recipe is not None else None, "command": command}
        dest = FileOutput(pool.out_infos(), out, first if isinstance(first, Checkpoint) else None,
                          inputs=_inputs(pool), overwrite=overwrite, record=record, card=_card(record),
                          extra_files=recipe.tokenizer if recipe is not None else None, desc=aggregator.name)
    with progress_quiet(quiet):
        try:
            result = aggregator.run(pool, dest)
        except BaseException:
            if dest is not None:
                dest.abort()
            raise
    if out is not None:
        size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) if Path(out).is_dir() \
            else Path(out).stat().st_size
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB → GB (Linux)
        log.info("merged: %s of %d experts → %s (%.2f GB) in %.1f s, peak memory %.2f GB", aggregator.name, pool.n,
                 out, size / 1e9, time.perf_counter() - t0, peak)
    return result


def _compose(aggregator: str, overrides: Sequence[str] = ()) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None  # called from inside a Hydra app: step aside, then restore
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("merge", overrides=[f"aggregator={aggregator}", *overrides])
    except Exception as e:  # noqa: BLE001 — Hydra's missing-option error, one line
        raise AMEError(f"aggregator={aggregator}: {str(e).splitlines()[0]}") from None
    finally:
        gh.clear()
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def merge(experts=None, aggregator: str = "ame_adam", init=None, out: str | Path | None = None, *,
          sizes: Sequence[float] | None = None, key_prefix: str | None = None, dtype: str | torch.dtype | None = None,
          seed: int = 0, buffers=None, overwrite: bool = False, recipe: str | Path | None = None, quiet: bool = False,
          **overrides) -> Mapping[str, Tensor]:
    """Merge ``experts`` (a checkpoint path or glob, or a list of paths — files or timm/Hugging Face
    folders — or state dicts) with ``aggregator`` (an option of ``conf/aggregator``), its settings
    changed by ``overrides`` (``pivot="soup"``, ``optimizer={"lr": 1e-4}``, ``scaling=0.5``, ...).
    Writes ``out`` (in the first expert's layout) when given; an existing ``out`` is replaced only
    if this tool wrote it, or with ``overwrite=True``. Returns the aggregate: a state dict, or with
    ``out`` a lazy view of the written checkpoint. Bad inputs raise :class:`MergeError`.

    ``recipe``: a mergekit YAML recipe instead of ``experts``/``aggregator``/``init`` (see
    :mod:`ame.merge.recipe`); ``overrides`` still change its aggregator's settings."""
    try:
        if recipe is not None:
            require(experts is None and init is None, "give either recipe= or experts (and init), not both")
            return merge_recipe(recipe, out, overrides=overrides, seed=seed, overwrite=overwrite, quiet=quiet,
                                dtype=dtype)
        require(experts is not None, "ame.merge needs experts (paths, a glob or state dicts) or recipe=<file.yml>")
        require(isinstance(aggregator, str), f"aggregator must be the name of a conf/aggregator option such as "
                f"'ame_adam', got {type(aggregator).__name__}")
        require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
                f"seed must be an integer ≥ 0, got {seed!r}")
        require(key_prefix is None or isinstance(key_prefix, str), f"key_prefix must be a string, got {key_prefix!r}")
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        require(dtype is None or isinstance(dtype, str), f"dtype must be a torch dtype or its name, got {dtype!r}")
        cfg = _compose(aggregator, [f"seed={seed}"])
        try:
            agg_cfg = OmegaConf.merge(cfg.aggregator, OmegaConf.create(overrides))
        except Exception as e:  # noqa: BLE001
            raise AMEError(f"aggregator settings {overrides}: {str(e).splitlines()[0]}") from None
        return merge_pool(agg_cfg, experts, init, out, sizes, key_prefix, dtype, buffers,
                          pivot_given="pivot" in overrides, overwrite=overwrite, quiet=quiet)
    except MergeError:
        raise
    except AMEError as e:
        raise MergeError(str(e)) from None


def merge_recipe(recipe: str | Path, out: str | Path | None = None, overrides: Mapping | Sequence[str] = (),
                 seed: int = 0, overwrite: bool = False, quiet: bool = False, dtype=None,
                 command: str | None = None) -> Mapping[str, Tensor]:
    """Run a mergekit recipe (see :mod:`ame.merge.recipe`); ``overrides``: a mapping of aggregator
    settings (Python) or Hydra override strings (command line)."""
    from ame.merge import recipe as recipes

    plan = recipes.load(recipe)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    cfg = _compose(plan.aggregator, [f"seed={seed}"])
    try:
        given = (OmegaConf.create(dict(overrides)) if isinstance(overrides, Mapping)
                 else OmegaConf.from_dotlist([o.removeprefix("aggregator.") for o in overrides]))
        agg_cfg = OmegaConf.merge(cfg.aggregator, OmegaConf.create(plan.settings), given)
    except Exception as e:  # noqa: BLE001
        raise AMEError(f"recipe {recipe}: {str(e).splitlines()[0]}") from None
    for note in plan.notes:
        log.info("recipe: %s", note)
    return merge_pool(agg_cfg, plan.experts, plan.init, out, plan.sizes, None, dtype or plan.dtype,
                      pivot_given="pivot" in plan.settings, overwrite=overwrite, recipe=plan, command=command,
                      quiet=quiet)
