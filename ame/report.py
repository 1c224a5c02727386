"""Stage 6: the run's outputs: ``results.json``, the results table (logged: console and
``run.log``), and the experiment logger (W&B, or none)."""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ame.checks import number
from ame.errors import AMEError, positive_int, require
from ame.io import write_json

log = logging.getLogger(__name__)

COLUMNS = {"id/acc": "ID acc", "id/nll": "ID NLL", "ood/acc": "OOD acc", "ood/extra_acc": "OOD extra",
           "shard/min_acc": "worst shard", "shard/own_acc": "own shard", "shard/other_acc": "other shards"}


def table_rows(results: dict) -> list[tuple[str, dict]]:
    """(name, metrics) rows: the base (warm start), each expert, the ensemble, the soup and the
    aggregate (once: with ``aggregator=soup`` the aggregate is the soup)."""
    rows = [("base (warm start)", results["base"])] if results.get("base") else []
    rows += [(f"expert {i} (n={e['shard_size']})", e) for i, e in enumerate(results["experts"])]
    if results.get("ensemble"):
        rows.append(("output ensemble (N networks)", results["ensemble"]))
    if results["aggregator"] != "soup":
        rows.append(("soup", results["soup"]))
    return rows + [(f"{results['aggregator']} (aggregate)", results["metrics"])]


def format_table(results: dict) -> str:
    """The results as a fixed-width table; accuracies in %, NLL in nats."""
    rows = table_rows(results)
    cols = [c for c in COLUMNS if any(c in m for _, m in rows)]
    width = max(len(name) for name, _ in rows)
    sizes = [max(6, len(COLUMNS[c])) for c in cols]
    lines = [f"{'network':<{width}}  " + "  ".join(f"{COLUMNS[c]:>{n}}" for c, n in zip(cols, sizes))]
    for name, m in rows:
        cells = [f"{(1 if c.endswith('nll') else 100) * m[c]:>{n}.2f}" if isinstance(m.get(c), float) else " " * n
                 for c, n in zip(cols, sizes)]
        lines.append((f"{name:<{width}}  " + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def write_results(results: dict, out_dir: Path) -> Path:
    path = out_dir / "results.json"
    write_json(results, path)
    return path


def flat_scalars(results: dict) -> dict[str, Any]:
    """Every scalar of ``results.json`` under a ``/``-joined key: ``aggregate/<metric>`` (the
    run's ``metrics``), ``soup/...``, ``base/...``, ``ensemble/...``, ``expert_<i>/...``,
    ``timings_s/...``, ``data/...``, ``aggregator``, ``seed``, ... Lists other than the experts
    are left out (they are in ``results.json``, logged as an artifact)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(node, (bool, int, float, str)):
            out[prefix] = node

    for key, value in results.items():
        if key == "experts":
            for i, e in enumerate(value):
                walk(f"expert_{i}", e)
        else:
            walk({"metrics": "aggregate"}.get(key, key), value)
    return out


class NullLogger:
    """``logger=none``: logs nothing, and asks the stages for nothing extra."""

    ame_every = 0  # AME's per-step distances: not computed

    def __init__(self, **_: Any):
        pass

    @staticmethod
    def check(settings) -> None:
        """The logger's settings (``logger``: its keyword arguments), before any work."""

    def log_metrics(self, stage: str, x_name: str, x: int, metrics: dict) -> None:
        pass

    def log_results(self, results: dict, out_dir: Path) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds: wandb's own
    online init would wait 90 s and more for a server it cannot reach."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


class WandbLogger(NullLogger):
    """Weights & Biases, offline unless ``mode``/``WANDB_MODE`` or an API key asks for online.

    One W&B run per job: ``group`` (default: the sweep directory in a multirun, else
    ``task_name``), ``job_type`` (default: the aggregator), ``name`` (default: the job's
    command-line overrides), ``tags``. Config: the resolved config without Hydra plumbing, plus
    the ``overrides``. History: per-epoch training loss and accuracy of the warm base and of each
    expert (x axis ``<stage>/epoch``) and AME's distances to the pivot and to the soup
    (``ame/step``, every ``ame_every`` steps; None: about 32 points per run; 0: off). Summary:
    every scalar of ``results.json``.
    Artifacts: ``results.json`` and ``aggregate.safetensors``. Any other keyword goes to
    ``wandb.init`` (e.g. ``+logger.notes=...``).

    An online init that cannot reach the server falls back to offline logging: a logging outage
    never costs a run. Offline runs land in ``<run dir>/wandb/offline-run-*``."""

    MODES = ("online", "offline", "disabled", "shared")

    @staticmethod
    def check(settings) -> None:
        mode = settings.mode or os.environ.get("WANDB_MODE")
        require(mode is None or mode in WandbLogger.MODES,
                f"logger.mode (or $WANDB_MODE) must be one of {WandbLogger.MODES} or null, got {mode!r}")
        number(settings.init_timeout, "logger.init_timeout", 0, low_open=True)
        if settings.ame_every is not None:  # null: about 32 points per run; 0: no AME curves
            positive_int(settings.ame_every, "logger.ame_every", minimum=0)
        tags = settings.tags or []
        require(isinstance(tags, Sequence) and not isinstance(tags, str) and all(isinstance(t, str) for t in tags),
                f"logger.tags must be a list of strings, e.g. [baseline], got {tags!r}")

    def __init__(self, dir: str | Path, config: dict, identity: dict | None = None, project: str = "ame",
                 entity: str | None = None, name: str | None = None, group: str | None = None,
                 job_type: str | None = None, tags: list[str] | None = None, mode: str | None = None,
                 init_timeout: float = 20.0, ame_every: int | None = None, **init_kwargs: Any):
        import wandb

        self.wandb, self.ame_every, self._axes = wandb, None if ame_every is None else int(ame_every), set()
        identity = identity or {}
        mode = mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        kwargs = dict(project=project, entity=entity, name=name or identity.get("name"),
                      group=group or identity.get("sweep") or config.get("task_name"), job_type=job_type,
                      tags=[str(t) for t in (tags or [])],
                      config={**config, "overrides": list(identity.get("overrides", []))},
                      dir=str(dir), reinit="finish_previous", **init_kwargs)
        Path(dir).mkdir(parents=True, exist_ok=True)
        if mode == "online" and not _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
            log.warning("W&B server unreachable; logging offline instead (upload later with `wandb sync %s`)", dir)
            mode = "offline"
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=init_timeout, silent=True), **kwargs)
        except TypeError as e:  # an unknown +logger.<key>
            raise AMEError(f"logger: wandb.init does not take that setting ({e}); see wandb.init's arguments") from None
        except Exception as e:
            if mode == "offline":
                raise
            log.warning("W&B %s init failed (%s); logging offline instead (upload later with `wandb sync %s`)",
                        mode, type(e).__name__, dir)
            self.run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)

    def log_metrics(self, stage: str, x_name: str, x: int, metrics: dict) -> None:
        """History: ``<stage>/<metric>`` against its own x axis ``<stage>/<x_name>``."""
        axis = f"{stage}/{x_name}"
        if axis not in self._axes:
            self.run.define_metric(axis, hidden=True)
            self.run.define_metric(f"{stage}/*", step_metric=axis)
            self._axes.add(axis)
        self.run.log({axis: x, **{f"{stage}/{k}": v for k, v in metrics.items()}})

    def log_results(self, results: dict, out_dir: Path) -> None:
        rows = table_rows(results)
        cols = [c for c in COLUMNS if any(c in m for _, m in rows)]
        table = self.wandb.Table(columns=["network", *cols], data=[[n, *(m.get(c) for c in cols)] for n, m in rows])
        self.run.log({"results": table})
        self.run.summary.update(flat_scalars(results))
        name = self.run.id
        files = [("results", "results", out_dir / "results.json"), ("aggregate", "model", out_dir / "aggregate.safetensors")]
        for prefix, kind, path in files:
            if path.is_file():  # no aggregate.safetensors for the output ensemble
                art = self.wandb.Artifact(f"{prefix}-{name}", type=kind,
                                          metadata={"aggregator": results["aggregator"], "seed": results["seed"]})
                art.add_file(str(path), policy="immutable")  # written once: no staging copy
                self.run.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)
