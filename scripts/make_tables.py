"""Turn the ``results.json`` files under one or more run / multirun directories into a table.

    python scripts/make_tables.py multirun/2026-11-22/12-00-00 [--out table.md]

Rows: the warm-start base, the experts (mean and best), the soup, and each aggregator, with the
mean ± std over runs (seeds) where there are several. Columns: in-distribution accuracy and NLL,
corruption (OOD) accuracy, worst-shard accuracy, and how far the aggregate moved from its pivot
and from the soup (relative to ‖pivot − soup‖). Deterministic given the inputs.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = [("id/acc", "ID acc", 100), ("id/nll", "ID NLL", 1), ("ood/acc", "OOD acc", 100),
           ("shard/min_acc", "worst-shard acc", 100), ("dist/pivot", "dist. to pivot", 1),
           ("dist/soup", "dist. to soup", 1)]


def load(dirs: list[Path]) -> list[dict]:
    files = sorted({f for d in dirs for f in ([d] if d.is_file() else d.rglob("results.json"))})
    if not files:
        raise SystemExit(f"no results.json under {', '.join(map(str, dirs))}")
    return [json.loads(f.read_text()) for f in files]


def rows(results: list[dict]) -> list[tuple[str, list[dict]]]:
    """(row name, one metrics dict per run) in display order; reference rows once per expert set."""
    by_set = {tuple(e["path"] for e in r["experts"]): r for r in results}.values()
    out = []
    if any(r.get("base") for r in by_set):
        out.append(("base (warm start)", [r["base"] for r in by_set if r.get("base")]))
    out.append(("experts (mean)", [{k: statistics.mean(e[k] for e in r["experts"]) for k in r["experts"][0]
                                    if isinstance(r["experts"][0][k], float)} for r in by_set]))
    out.append(("experts (best ID)", [max(r["experts"], key=lambda e: e["id/acc"]) for r in by_set]))
    out.append(("soup", [r["soup"] for r in by_set]))
    for name in dict.fromkeys(r["aggregator"] for r in results):
        out.append((f"{name} (aggregate)", [r["metrics"] for r in results if r["aggregator"] == name]))
    return out


def cell(values: list, scale: float) -> str:
    values = [v * scale for v in values if isinstance(v, (int, float))]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown(results: list[dict]) -> str:
    lines = ["| network | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, ms in rows(results):
        lines.append(f"| {name} | " + " | ".join(cell([m.get(k) for m in ms], s) for k, _, s in COLUMNS) + " |")
    runs = len({tuple(e["path"] for e in r["experts"]) for r in results})
    return "\n".join(lines) + f"\n\nAccuracies in %; {runs} expert set(s), {len(results)} run(s).\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories (or results.json files)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here instead of printing it")
    args = ap.parse_args()
    table = markdown(load(args.dirs))
    if args.out:
        args.out.write_text(table)
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
