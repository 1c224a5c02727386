"""What a person watching a run sees, for every stage: labelled progress bars on a terminal, a
timer per stage with a summary line that stays in the log, and per-step metrics (training loss
and accuracy per epoch, AME's distances per step) that go to ``run.log`` and to any listener.

Stages report metrics with :func:`report`; the experiment logger (``ame.report``) listens with
:func:`listening`. Stage code thus never imports W&B, and a run without a logger pays nothing
but one log line per epoch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

log = logging.getLogger("ame")

Listener = Callable[[str, str, int, dict], None]  # (stage, x name, x, metrics)
_listeners: list[Listener] = []


def interactive() -> bool:
    """Bars are drawn on an interactive terminal only: silent in logs, pipes and tests."""
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """A labelled tqdm bar over ``iterable`` on a terminal; it vanishes when done (the stage's
    summary line, logged, stays)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=not interactive(),
                dynamic_ncols=True)


def bar(desc: str, total: int, unit: str = "it") -> tqdm:
    """A manually advanced bar (``.update()``, ``.set_postfix_str()``), silent off a terminal."""
    return tqdm(desc=desc, total=total, unit=unit, leave=False, disable=not interactive(), dynamic_ncols=True)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener(stage, x_name, x, metrics)`` for every :func:`report` inside the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def wanted() -> bool:
    """Whether anyone listens: stages compute optional metrics (AME's per-step distances) only then."""
    return bool(_listeners)


def _fmt(k: str, v) -> str:
    if isinstance(v, float) and k.endswith("acc"):
        return f"{k} {100 * v:.2f}%"
    return f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"


def report(stage: str, x_name: str, x: int, metrics: dict, of: int | None = None, quiet: bool = False) -> None:
    """Metrics of ``stage`` at ``x_name`` = ``x`` (e.g. ``expert_2``, ``epoch``, 5): one log line
    (unless ``quiet``: per-step curves that would flood the log) and every listener."""
    if not quiet:
        where = f"{x}/{of}" if of else str(x)
        log.info("%s %s %s: %s", stage.replace("_", " "), x_name, where,
                 "  ".join(_fmt(k, v) for k, v in metrics.items()))
    for listener in list(_listeners):
        listener(stage, x_name, x, metrics)


class Timer:
    """Wall time per stage: ``with timer("experts"): ...`` logs ``experts done in 1.2 s`` when the
    stage ends; ``timer.seconds`` feeds ``results["timings_s"]``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str, summary: Callable[[], str] | None = None):
        """Time ``stage``; on success log one line, with ``summary()`` (what the stage produced)."""
        t0 = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            dt = time.perf_counter() - t0
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + dt, 3)
            if ok:
                extra = summary() if summary is not None else ""
                log.info("%s done in %s%s", stage, _duration(dt), f": {extra}" if extra else "")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(math.floor(seconds)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


_quiet = False


@contextlib.contextmanager
def quiet(on: bool = True) -> Iterator[None]:
    """Inside the block, :class:`Meter` shows nothing (``quiet=true`` of ``python -m ame.merge``)."""
    global _quiet
    saved, _quiet = _quiet, on
    try:
        yield
    finally:
        _quiet = saved


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Meter:
    """Progress of a long step over a known amount of work (bytes, or chunks): a bar with rate and
    ETA on a terminal, else a log line every ``every`` seconds (``desc: 40% (1.2 GB of 3.0 GB,
    310 MB/s, ETA 6 s)``); nothing under :func:`quiet`. Costs one clock read per update."""

    def __init__(self, desc: str, total: float, unit: str = "B", every: float = 10.0):
        self.desc, self.total, self.unit, self.every = desc, max(float(total), 1.0), unit, every
        self.done, self.t0 = 0.0, time.perf_counter()
        self.last = self.t0
        self.bar = None if _quiet or not interactive() else tqdm(
            desc=desc, total=int(self.total), unit=unit, unit_scale=unit == "B", unit_divisor=1000, leave=False,
            dynamic_ncols=True)

    def update(self, n: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(int(n))
            return
        now = time.perf_counter()
        if not _quiet and now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            amount = (f"{_size(self.done)} of {_size(self.total)}, {_size(rate)}/s" if self.unit == "B"
                      else f"{self.done:.0f} of {self.total:.0f} {self.unit}, {rate:.3g}/s")
            log.info("%s: %d%% (%s, ETA %s)", self.desc, int(100 * self.done / self.total), amount,
                     _duration(eta) if math.isfinite(eta) else "?")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
