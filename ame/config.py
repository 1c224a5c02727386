"""The config side of the code: building objects from config nodes, and describing a run's
config to people (the experiment logger): clean values, the command-line overrides, the sweep."""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ame.errors import AMEError


def instantiate(node, what: str, kind: type | None = None, **kwargs):
    """``hydra.utils.instantiate`` whose failures read as one line: an :class:`AMEError` raised by
    the constructor passes through (Hydra wraps it), anything else is prefixed with ``what``.
    ``kind``: the class the object must be an instance of (e.g. an aggregator config's target)."""
    from hydra.utils import instantiate as hydra_instantiate

    try:
        obj = hydra_instantiate(node, **kwargs)
    except AMEError:
        raise
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, AMEError):
            raise cause from None
        message = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
        first = " ".join(message[:2]) if message and message[0].endswith(":") else (message or [type(cause).__name__])[0]
        raise AMEError(f"{what}: {first}") from None
    if kind is not None and not isinstance(obj, kind):
        raise AMEError(f"{what}: {type(obj).__name__} is not an instance of {kind.__module__}.{kind.__name__}; "
                       "point _target_ at one")
    return obj


def target(node, what: str) -> type:
    """The class (or function) a config node's ``_target_`` names, without building it: for the
    components built later from run-time objects (``_partial_``), whose settings are checked first."""
    from hydra.utils import get_object

    try:
        return get_object(str(node._target_))
    except Exception as e:  # noqa: BLE001 — a typo in a user's _target_: one line
        raise AMEError(f"{what}._target_: cannot import {node.get('_target_')!r} ({str(e).splitlines()[0][:120]})") \
            from None


_PLUMBING = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_ALIAS = re.compile(r"\$\{[\w.]+\}")


def clean_config(cfg: DictConfig) -> dict:
    """The resolved config as a person reads it: no ``_target_``/``_partial_`` plumbing, no node
    repeated under another name (``experts.train: ${train}``), no
    run-specific output path, no logger settings, no job-naming rules (``dirname_exclude``). What
    a tracker should show and compare."""

    def strip(node, raw):
        if isinstance(node, dict):  # a key that only repeats another config node (${train}) is shown there
            raw = raw if isinstance(raw, dict) else {}
            return {k: strip(v, raw.get(k)) for k, v in node.items()
                    if k not in _PLUMBING and not (isinstance(v, dict) and _ALIAS.fullmatch(str(raw.get(k))))}
        if isinstance(node, list):
            return [strip(v, r) for v, r in zip(node, raw if isinstance(raw, list) else [None] * len(node))]
        return node

    out = strip(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False))
    out.get("paths", {}).pop("output_dir", None)
    out.pop("logger", None)
    out.pop("dirname_exclude", None)
    return out


_NOT_IN_NAME = ("logger", "tags", "hydra", "paths")  # how a run is watched or stored, not what it is


def run_identity(cfg: DictConfig) -> dict:
    """Who this run is among others: its command-line ``overrides``, a ``name`` from them (but
    the logger's, tags, paths and Hydra's own settings), and its ``sweep`` (the multirun directory, relative to the
    ``multirun/`` root where it lies there), ``None`` for a single run. Empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {"overrides": [], "name": None, "sweep": None}
    hc = HydraConfig.get()
    overrides = [str(o) for o in hc.overrides.task]
    sweep = None
    if str(hc.mode) == "RunMode.MULTIRUN":
        path = Path(str(hc.sweep.dir))
        parts = path.parts
        sweep = str(Path(*parts[parts.index("multirun") + 1:])) if "multirun" in parts[:-1] else path.name
    named = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_IN_NAME)]
    return {"overrides": overrides, "name": ",".join(sorted(named)) or None, "sweep": sweep}
