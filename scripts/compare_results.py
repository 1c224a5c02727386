"""Compare two results trees (or summary CSVs) row by row, with the seed spread as the yardstick.

    python scripts/compare_results.py multirun/table/strong multirun-rerun/table/strong   # seed by seed
    python scripts/compare_results.py experiments/table/table.csv multirun/table/strong    # means over seeds

Rows are those of ``make_tables.py`` (:mod:`ame.analysis`): the same setting and network (the
aggregator and its variant). Two results trees are compared seed by seed (the same seed on both
sides); a summary CSV only has the mean over its seeds, so against one the means are compared.
Every metric both sides have is compared; each difference is printed with the seed spread of its
row (the std over seeds, pooled over both sides: the root mean square of the two stds), and
flagged when it is larger than it. A reproduction on the same machine and versions is identical
(no difference at all); on another CPU, small float differences grow through training, and what
matters is whether they stay within the seed spread. The environments of both sides (commit,
versions, device, threads) are printed first.

Exit status: 0 when no difference is larger than its row's seed spread, 1 when some are, 2 for
inputs that cannot be read.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ame.analysis import (COLUMNS, Row, Stat, environment_line, environments, load, merge_environments, pretty_setting,
                          read_summary, readable, summarize)
from ame.errors import AMEError


class Side:
    """One side of the comparison: its rows summarised over seeds, and, for a results tree, per seed."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".csv":
            self.rows = readable(read_summary, path, "a summary CSV written by make_tables.py --out")
            self.per_seed = None
            self.envs = merge_environments(self.rows)
            self.what = f"summary CSV {path}"
        else:
            results = load([path])
            self.rows = summarize(results)
            seeds = list(dict.fromkeys(r.get("seed") for r in results))
            self.per_seed = {(row.setting, row.label, seed): row.stats for seed in seeds
                             for row in summarize([r for r in results if r.get("seed") == seed])}
            self.envs = environments(results)
            self.what = (f"results tree {path} ({len(results)} run{'s' * (len(results) > 1)}, "
                         f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})")
        self.by_row: dict[tuple[str, str], Row] = {(r.setting, r.label): r for r in self.rows}


def spread(a: Stat | None, b: Stat | None) -> float | None:
    """The seed spread of a row: the root mean square of the two sides' stds over seeds (None
    when neither has more than one seed)."""
    stds = [s.std for s in (a, b) if s is not None and s.std is not None]
    return math.sqrt(sum(x * x for x in stds) / len(stds)) if stds else None


def compare(a: Side, b: Side) -> tuple[list[str], dict]:
    """The report's lines and its counts."""
    seeded = a.per_seed is not None and b.per_seed is not None
    if seeded:
        order = {k: i for i, k in enumerate(a.by_row)}  # A's rows in table order, each row's seeds together
        keys = sorted((k for k in a.per_seed if k in b.per_seed), key=lambda k: order[k[:2]])
        values = lambda side, k: side.per_seed[k]  # noqa: E731
    else:
        keys = [k for k in a.by_row if k in b.by_row]
        values = lambda side, k: side.by_row[k].stats  # noqa: E731
    counts = {"values": 0, "identical": 0, "differ": 0, "larger": 0, "unjudged": 0}
    lines: list[str] = []
    setting = None
    for key in keys:
        va, vb = values(a, key), values(b, key)
        ra, rb = a.by_row.get(key[:2]), b.by_row.get(key[:2])
        for col in COLUMNS:
            if col.key not in va or col.key not in vb:
                continue
            counts["values"] += 1
            x, y = va[col.key].mean, vb[col.key].mean
            if x == y:
                counts["identical"] += 1
                continue
            counts["differ"] += 1
            scale = 100 if col.percent else 1
            yard = spread(ra.stats.get(col.key) if ra else None, rb.stats.get(col.key) if rb else None)
            if yard is None:
                counts["unjudged"] += 1
                verdict = "no seed spread to judge by (one seed)"
            elif abs(y - x) > yard:
                counts["larger"] += 1
                verdict = "LARGER than the seed spread"
            else:
                verdict = "within the seed spread"
            if key[0] != setting:
                setting = key[0]
                lines.append(f"\n{pretty_setting(setting)}" + (f" (`{setting}`)" if setting else ""))
            where = f"seed {key[2]}" if seeded else f"mean of {va[col.key].n}/{vb[col.key].n} runs"
            std = "—" if yard is None else f"{scale * yard:.2f}"
            lines.append(f"  {key[1]}, {where}, {col.short}: {scale * x:.2f} → {scale * y:.2f} "
                         f"(Δ {scale * (y - x):+.3f}; seed std {std}): {verdict}")
    for name, side, other in (("A", a, b), ("B", b, a)):
        missing = [k for k in side.by_row if k not in other.by_row]
        if missing:
            lines.append(f"\nonly in {name}: " + "; ".join(f"{pretty_setting(s)}: {label}" for s, label in missing))
    counts["rows"] = f"{len({k[:2] for k in keys})} rows" + (f" × {len({k[2] for k in keys})} seeds" if seeded else "")
    return lines, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="a run or multirun directory, or a summary .csv (make_tables.py --out)")
    ap.add_argument("b", type=Path, help="the other one (e.g. the reproduction)")
    args = ap.parse_args()
    try:
        a, b = Side(args.a), Side(args.b)
    except AMEError as e:  # one line from ame.analysis
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, side in (("A", a), ("B", b)):
        print(f"{name}: {side.what}")
        for env in side.envs:
            print(f"   {environment_line(env)}")
    lines, n = compare(a, b)
    if not n["values"]:
        found = [" | ".join(dict.fromkeys(pretty_setting(r.setting) for r in side.rows)) for side in (a, b)]
        print(f"error: the two sides have no row in common (same setting and network): A has {found[0]}; "
              f"B has {found[1]}; check the paths", file=sys.stderr)
        sys.exit(2)
    if lines:
        print("\n".join(lines))
    print(f"\n{n['values']} values compared over {n['rows']}: {n['identical']} identical, {n['differ']} differ"
          + (f" ({n['larger']} by more than the seed spread, {n['unjudged']} with no spread to judge by)"
             if n["differ"] else ""))
    sys.exit(1 if n["larger"] else 0)


if __name__ == "__main__":
    main()
