"""Turn the ``results.json`` files under one or more run / multirun directories into a table.

    python scripts/make_tables.py multirun/2026-11-22/12-00-00 [--out table.md]   # + table.tex, table.csv

Runs are grouped by their Hydra overrides (``.hydra/overrides.yaml`` beside each file): one table
per setting (overrides other than ``seed``, ``aggregator*``, ``hydra.*``, ``logger*``, ``paths.*``),
one row per aggregator setting (``aggregator=`` and ``aggregator.*`` overrides), and the mean ±
std over the runs that differ only in ``seed``. Rows: the warm-start base, the experts (mean and
best), the soup, and each aggregator. Columns: in-distribution accuracy and NLL,
corruption (OOD) accuracy, worst-shard accuracy, and how far the aggregate moved from its pivot
and from the soup (relative to ‖pivot − soup‖). Deterministic given the inputs.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

COLUMNS = [("id/acc", "ID acc", 100), ("id/nll", "ID NLL", 1), ("ood/acc", "OOD acc", 100),
           ("shard/min_acc", "worst-shard acc", 100), ("dist/pivot", "dist. to pivot", 1),
           ("dist/soup", "dist. to soup", 1)]


ORDER = ["soup", "weighted_soup", "ame_sgd", "ame_adam", "ame_adamw", "ame_adagrad", "ame_adadelta", "ame_rmsprop",
         "task_arithmetic", "ties", "dare", "greedy_soup", "ensemble"]  # aggregator rows: soups first, as in the paper
IGNORED = ("seed=", "hydra.", "hydra/", "logger", "paths.", "experiment=")


def overrides(results_file: Path) -> list[str]:
    path = results_file.parent / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def load(dirs: list[Path]) -> list[dict]:
    """Every results.json under ``dirs``, with ``setting`` and ``variant`` keys from its overrides."""
    files = sorted({f for d in dirs for f in ([d] if d.is_file() else d.rglob("results.json"))},
                   key=lambda f: [int(p) if p.isdigit() else p for p in f.parts])  # job 2 before job 10
    if not files:
        raise SystemExit(f"no results.json under {', '.join(map(str, dirs))}")
    out = []
    for f in files:
        r = json.loads(f.read_text())
        kept = [o for o in overrides(f) if not o.startswith(IGNORED)]
        r["setting"] = ", ".join(o for o in kept if not o.startswith("aggregator"))
        r["variant"] = ", ".join(o for o in kept if o.startswith("aggregator.") and "=" in o)
        r["overrides"] = dict(o.lstrip("+~").split("=", 1) for o in kept if "=" in o)
        out.append(r)
    return out


def expert_set(r: dict) -> tuple:
    """Which experts a run aggregated (their files): runs sharing it share the reference rows."""
    return tuple(e["path"] for e in r["experts"])


def rows(results: list[dict]) -> list[tuple[str, list[dict]]]:
    """(row name, one metrics dict per run) in display order; reference rows once per expert set."""
    by_set = {expert_set(r): r for r in results}.values()
    out = []
    if any(r.get("base") for r in by_set):
        out.append(("base (warm start)", [r["base"] for r in by_set if r.get("base")]))
    out.append(("experts (mean)", [{k: statistics.mean(e[k] for e in r["experts"]) for k in r["experts"][0]
                                    if all(isinstance(e.get(k), float) for e in r["experts"])} for r in by_set]))
    out.append(("experts (best ID)", [max(r["experts"], key=lambda e: e["id/acc"]) for r in by_set]))
    if all(r.get("ensemble") for r in by_set):
        out.append(("output ensemble (N networks)", [r["ensemble"] for r in by_set]))
    out.append(("soup", [r["soup"] for r in by_set]))
    found = list(dict.fromkeys((r["aggregator"], r["variant"]) for r in results))
    rank = {name: i for i, name in enumerate(ORDER)}
    for name, variant in sorted(found, key=lambda nv: rank.get(nv[0], len(ORDER))):  # stable: variants in run order
        label = f"{name} (aggregate{', ' + variant if variant else ''})"
        out.append((label, [r["metrics"] for r in results if (r["aggregator"], r["variant"]) == (name, variant)]))
    return out


def cell(values: list, scale: float) -> str:
    values = [v * scale for v in values if isinstance(v, (int, float))]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown(results: list[dict]) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in results))
    if len(settings) > 1:
        return "\n".join(f"### {s or 'defaults'}\n\n" + markdown([r for r in results if r["setting"] == s])
                         for s in settings)
    lines = ["| network | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, ms in rows(results):
        lines.append(f"| {name} | " + " | ".join(cell([m.get(k) for m in ms], s) for k, _, s in COLUMNS) + " |")
    sets = len({expert_set(r) for r in results})
    return "\n".join(lines) + f"\n\nAccuracies in %; {sets} expert set(s), {len(results)} run(s).\n"


def csv_rows(results: list[dict]) -> str:
    """One CSV line per (setting, row): mean, std and run count of every column, unrounded."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["setting", "network", "runs"] + [f"{k}_{s}" for k, _, _ in COLUMNS for s in ("mean", "std")])
    for setting in dict.fromkeys(r["setting"] for r in results):
        for name, ms in rows([r for r in results if r["setting"] == setting]):
            line = [setting, name, len(ms)]
            for k, _, _ in COLUMNS:
                v = [m[k] for m in ms if isinstance(m.get(k), (int, float))]
                line += [repr(statistics.mean(v)) if v else "", repr(statistics.stdev(v)) if len(v) > 1 else ""]
            out.writerow(line)
    return buf.getvalue()


def latex(results: list[dict]) -> str:
    """A booktabs table per setting, with the same cells as the Markdown one."""
    parts = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        lines = [f"% {setting or 'defaults'}", "\\begin{tabular}{l" + "r" * len(COLUMNS) + "}", "\\toprule",
                 "network & " + " & ".join(title for _, title, _ in COLUMNS) + " \\\\", "\\midrule"]
        for name, ms in rows([r for r in results if r["setting"] == setting]):
            cells = [cell([m.get(k) for m in ms], sc).replace("±", "$\\pm$") for k, _, sc in COLUMNS]
            lines.append(name.replace("_", "\\_") + " & " + " & ".join(cells) + " \\\\")
        parts.append("\n".join(lines + ["\\bottomrule", "\\end{tabular}"]))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories (or results.json files)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here (and, beside it, .tex and .csv) "
                    "instead of printing it")
    args = ap.parse_args()
    results = load(args.dirs)
    table = markdown(results)
    if args.out:
        args.out.write_text(table)
        args.out.with_suffix(".tex").write_text(latex(results))
        args.out.with_suffix(".csv").write_text(csv_rows(results))
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
