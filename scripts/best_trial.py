"""The hyperparameter value a search chose, from its trials' results (reproducible under ties).

    python scripts/best_trial.py multirun/search/strong/data_shards_iid/ame_adam   # prints e.g. 0.0003

Reads every trial's ``results.json`` and ``.hydra/overrides.yaml`` under the search directory and
prints the value of ``--param`` (default ``aggregator.optimizer.lr``) whose trial scored the highest
``--metric`` (default ``val/acc``). Ties go to the smallest value, whatever order the sampler visited
the grid in (Optuna's GridSampler visits it in random order, and its ``best_params`` is the first
trial to reach the top score). A winner at the edge of the values tried is reported on stderr:
the grid may be too narrow.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ame.analysis import overrides, readable


def trials(search_dir: Path, param: str, metric: str) -> list[tuple[float, float]]:
    """(value, score) of every finished trial under ``search_dir``."""
    out = []
    for f in sorted(search_dir.rglob("results.json")):
        given = dict(o.lstrip("+~").split("=", 1) for o in overrides(f) if "=" in o)
        score = readable(lambda p: json.loads(p.read_text())["metrics"], f, "a run's results.json").get(metric)
        if param in given and isinstance(score, (int, float)):
            try:
                out.append((float(given[param]), float(score)))
            except ValueError:
                sys.exit(f"error: {param}={given[param]} in {f.parent} is not a number; best_trial.py ranks numeric "
                         "hyperparameters (--param)")
    return out


def best(found: list[tuple[float, float]]) -> float:
    """The value with the highest score; ties: the smallest value."""
    return min(found, key=lambda vs: (-vs[1], vs[0]))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("search_dir", type=Path)
    ap.add_argument("--param", default="aggregator.optimizer.lr")
    ap.add_argument("--metric", default="val/acc")
    args = ap.parse_args()
    found = trials(args.search_dir, args.param, args.metric)
    if not found:
        sys.exit(f"error: no finished trial with {args.param} and {args.metric} under {args.search_dir}; "
                 "run the search first")
    value = best(found)
    values = sorted({v for v, _ in found})
    if len(values) > 2 and value in (values[0], values[-1]):
        print(f"warning: {args.param}={value:g} is at the edge of the values tried ({values[0]:g}–{values[-1]:g}); "
              "widen the grid", file=sys.stderr)
    print(f"{value:g}")


if __name__ == "__main__":
    main()
