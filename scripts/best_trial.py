"""The hyperparameter value(s) a search chose, from its trials' results (reproducible under ties).

    python scripts/best_trial.py multirun/search/strong/data_shards_iid/ame_adam   # prints e.g. 0.0003
    python scripts/best_trial.py DIR --param aggregator.density --param aggregator.scaling
        # several knobs: prints the chosen overrides, e.g. aggregator.density=0.2 aggregator.scaling=1
    python scripts/best_trial.py DIR --param aggregator.scaling --among 0,0.25
        # only the trials with these values (e.g. "the base or the soup" out of an interpolation grid)

Reads every trial's ``results.json`` and ``.hydra/overrides.yaml`` under the search directory and
prints the value of ``--param`` (default ``aggregator.optimizer.lr``) whose trial scored the highest
``--metric`` (default ``val/acc``); with several ``--param``, the overrides ``key=value`` of the
best trial. Ties go to the smallest value (the first ``--param`` first), whatever order the sampler
visited the grid in (Optuna's GridSampler visits it in random order, and its ``best_params`` is the
first trial to reach the top score). A winner at the edge of the values tried is reported on
stderr: the grid may be too narrow.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ame.analysis import overrides, readable
from ame.errors import one_line


def trials(search_dir: Path, param: str | list[str], metric: str) -> list[tuple]:
    """(value, score) of every finished trial under ``search_dir``; with a list of params,
    (tuple of values, score)."""
    params = [param] if isinstance(param, str) else list(param)
    out = []
    for f in sorted(search_dir.rglob("results.json")):
        given = dict(o.lstrip("+~").split("=", 1) for o in overrides(f) if "=" in o)
        score = readable(lambda p: json.loads(p.read_text())["metrics"], f, "a run's results.json").get(metric)
        if all(p in given for p in params) and isinstance(score, (int, float)):
            try:
                values = tuple(float(given[p]) for p in params)
            except ValueError:
                sys.exit(f"error: {params}={[given[p] for p in params]} in {f.parent}: not all numbers; best_trial.py "
                         "ranks numeric hyperparameters (--param)")
            out.append((values[0] if isinstance(param, str) else values, float(score)))
    return out


def best(found: list[tuple]) -> float | tuple:
    """The value with the highest score; ties: the smallest value."""
    return min(found, key=lambda vs: (-vs[1], vs[0]))[0]


@one_line  # an AMEError (e.g. from ame.analysis): one error: line
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("search_dir", type=Path)
    ap.add_argument("--param", action="append", help="the hyperparameter (repeat for a grid of several; default "
                    "aggregator.optimizer.lr)")
    ap.add_argument("--metric", default="val/acc")
    ap.add_argument("--among", help="comma-separated values of the first --param: only those trials compete")
    args = ap.parse_args()
    params = args.param or ["aggregator.optimizer.lr"]
    found = trials(args.search_dir, params, args.metric)
    if args.among:
        try:
            allowed = {float(v) for v in args.among.split(",")}
        except ValueError:
            sys.exit(f"error: --among {args.among}: give comma-separated numbers, e.g. --among 0,0.25")
        found = [(v, s) for v, s in found if v[0] in allowed]
    if not found:
        sys.exit(f"error: no finished trial with {', '.join(params)} and {args.metric} under {args.search_dir}"
                 + (f" among {args.among}" if args.among else "") + "; run the search first")
    value = best(found)
    for i, p in enumerate(params):
        values = sorted({v[i] for v, _ in found})
        if len(values) > 2 and value[i] in (values[0], values[-1]):
            print(f"warning: {p}={value[i]:g} is at the edge of the values tried ({values[0]:g}–{values[-1]:g}); "
                  "widen the grid", file=sys.stderr)
    if len(params) == 1:
        print(f"{value[0]:g}")
    else:
        print(" ".join(f"{p}={v:g}" for p, v in zip(params, value)))


if __name__ == "__main__":
    main()
