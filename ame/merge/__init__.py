"""Merge checkpoints without a model class, data or evaluation.

Command line (composed by Hydra from the same ``conf/aggregator`` and ``conf/experts`` groups as
``run.py``, so every aggregator and its knobs work)::

    python -m ame.merge aggregator=ame_adam 'experts.paths=[a,b,c]' [experts.init=x] out=merged

Python::

    import ame
    sd = ame.merge(["a", "b", "c"], aggregator="ame_adam", optimizer={"lr": 1e-4})

Defaults that do the right thing: shard sizes are optional (from the files' metadata, else
equal); with no init, AME starts from the soup (``pivot=soup``) unless a pivot was asked for;
buffers are found by name (normalisation statistics) and dtype (integers).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ame.checkpoints import Checkpoint, FileOutput
from ame.config import instantiate
from ame.errors import AMEError, require
from ame.pool import ExpertPool

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[2] / "conf"


def _sizes(pool: ExpertPool) -> list[float] | None:
    """Shard sizes recorded in the experts' safetensors metadata (as this project writes them)."""
    import json

    sizes = []
    for s in pool.sources:
        meta = getattr(s, "metadata", None) or {}
        meta = {**meta, **json.loads(meta.get("ame", "{}"))}
        if "shard_size" not in meta:
            return None
        sizes.append(int(meta["shard_size"]))
    return sizes


def merge_pool(aggregator_cfg: DictConfig, experts: Sequence, init=None, out: str | Path | None = None,
               sizes: Sequence[float] | None = None, key_prefix: str | None = None, dtype: str | None = None,
               buffers=None, pivot_given: bool = False) -> Mapping[str, Tensor]:
    """Build the aggregator from its config and run it on ``experts``; write to ``out`` if given."""
    require(isinstance(experts, Sequence) and not isinstance(experts, (str, bytes)) and len(experts) > 0,
            "experts.paths must be a non-empty list of checkpoints (files or folders) or state dicts")
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
    if sizes is None:
        pool.sizes = _sizes(pool) or pool.sizes
    if aggregator.needs_init and pool.init is None:
        raise AMEError(f"aggregator={aggregator.name} needs the experts' shared initialisation"
                       f"{aggregator.init_reason}; give experts.init (init= in Python), or "
                       + ("use aggregator.pivot=soup|first|zero" if aggregator.init_reason else "another aggregator"))
    dest = None
    if out is not None:
        first = pool.sources[0]
        dest = FileOutput(pool.out_infos(), out, first if isinstance(first, Checkpoint) else None)
    result = aggregator.run(pool, dest)
    if out is not None:
        log.info("%s of %d experts written to %s", aggregator.name, pool.n, out)
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


def merge(experts: Sequence, aggregator: str = "ame_adam", init=None, out: str | Path | None = None, *,
          sizes: Sequence[float] | None = None, key_prefix: str | None = None, dtype: str | torch.dtype | None = None,
          seed: int = 0, buffers=None, **overrides) -> Mapping[str, Tensor]:
    """Merge ``experts`` (checkpoint paths — files or timm/Hugging Face folders — or state dicts) with
    ``aggregator`` (an option of ``conf/aggregator``), its settings changed by ``overrides``
    (``pivot="soup"``, ``optimizer={"lr": 1e-4}``, ``scaling=0.5``, ...). Writes ``out`` (in the
    first expert's layout) when given. Returns the aggregate: a state dict, or with ``out`` a
    lazy view of the written checkpoint."""
    cfg = _compose(aggregator, [f"seed={int(seed)}"])
    agg_cfg = cfg.aggregator
    try:
        agg_cfg = OmegaConf.merge(agg_cfg, OmegaConf.create(overrides))
    except Exception as e:  # noqa: BLE001
        raise AMEError(f"aggregator settings {overrides}: {str(e).splitlines()[0]}") from None
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return merge_pool(agg_cfg, list(experts), init, out, sizes, key_prefix, dtype, buffers,
                      pivot_given="pivot" in overrides)
