"""Stage 6: the run's outputs: ``results.json``, the printed table, and the experiment logger."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, TypeVar
from urllib.parse import urlparse

from tqdm.auto import tqdm

from ame.io import write_json

T = TypeVar("T")

log = logging.getLogger(__name__)

COLUMNS = ("id/acc", "id/nll", "ood/acc", "shard/min_acc", "shard/own_acc", "shard/other_acc")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """A tqdm progress bar on an interactive terminal; silent in logs, pipes and tests."""
    return tqdm(iterable, desc=desc, total=total, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def table_rows(results: dict) -> list[tuple[str, dict]]:
    """(name, metrics) rows: the base (warm start), each expert, the soup and the aggregate."""
    rows = [("base (warm start)", results["base"])] if results.get("base") else []
    rows += [(f"expert {i} (n={e['shard_size']})", e) for i, e in enumerate(results["experts"])]
    if results.get("ensemble"):
        rows.append(("output ensemble (N networks)", results["ensemble"]))
    rows += [("soup", results["soup"]), (f"{results['aggregator']} (aggregate)", results["metrics"])]
    return rows


def format_table(results: dict) -> str:
    rows = table_rows(results)
    cols = [c for c in COLUMNS if any(c in m for _, m in rows)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'network':<{width}}  " + "  ".join(f"{c:>15}" for c in cols)]
    for name, m in rows:
        cells = [f"{m[c]:>15.4f}" if isinstance(m.get(c), float) else f"{'':>15}" for c in cols]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def write_results(results: dict, out_dir: Path) -> Path:
    path = out_dir / "results.json"
    write_json(results, path)
    return path


class NullLogger:
    """``logger=none``: logs nothing."""

    def __init__(self, **_: Any):
        pass

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def log_results(self, results: dict) -> None:
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

    An online init that cannot reach the server falls back to offline logging after
    ``init_timeout`` seconds: a logging outage never costs a run. Offline runs land in
    ``<run dir>/wandb/`` and can be uploaded later with ``wandb sync``."""

    def __init__(self, dir: str | Path, config: dict, project: str = "ame", entity: str | None = None,
                 name: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 mode: str | None = None, init_timeout: float = 20.0):
        import wandb

        self.wandb = wandb
        mode = mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        kwargs = dict(project=project, entity=entity, name=name, group=group, tags=list(tags or []),
                      config=config, dir=str(dir), reinit="finish_previous")
        Path(dir).mkdir(parents=True, exist_ok=True)
        if mode == "online" and not _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
            log.warning("W&B server unreachable; logging offline instead (upload later with `wandb sync %s`)", dir)
            mode = "offline"
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=init_timeout, silent=True), **kwargs)
        except Exception as e:
            if mode == "offline":
                raise
            log.warning("W&B %s init failed (%s); logging offline instead (upload later with `wandb sync %s`)",
                        mode, type(e).__name__, dir)
            self.run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log(metrics)

    def log_results(self, results: dict) -> None:
        rows = table_rows(results)
        cols = [c for c in COLUMNS if any(c in m for _, m in rows)]
        table = self.wandb.Table(columns=["network", *cols], data=[[n, *(m.get(c) for c in cols)] for n, m in rows])
        self.run.log({"results": table})
        flat = {f"{prefix}/{k}": v for prefix, m in (("aggregate", results["metrics"]), ("soup", results["soup"]))
                for k, v in m.items()}
        self.run.summary.update(flat | {"timings_s": results["timings_s"], "experts_cached": results["experts_cached"]})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class Timer:
    """Wall time per stage: ``with timer("experts"): ...``; ``timer.seconds`` feeds ``timings_s``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - t0, 3)
