"""Helpers shared by the components' own checks (each component validates its settings in one
``check`` method that the pipeline calls before any work): numbers in a range, seeds, an optimizer
that can take a step. Every problem is one :class:`~ame.errors.AMEError` line naming the key and
the fix."""
from __future__ import annotations

import math

import torch

from ame.config import instantiate
from ame.errors import AMEError, positive_int, require


def number(value, key: str, low: float | None = None, high: float | None = None, low_open: bool = False,
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
