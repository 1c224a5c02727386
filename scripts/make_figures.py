"""PNG figures from the ``results.json`` files under run / multirun directories (matplotlib).

    python scripts/make_figures.py fig1 multirun/fig1 --out experiments/fig1/fig1.png
    python scripts/make_figures.py bars multirun/table --out experiments/table/table.png

``fig1`` (the paper's Fig. 1 design): one panel per aggregator, a metric (``--metric``, default
``id/acc``) against an override (``--x``, default ``train.epochs``), one line per value of another
(``--line``, default ``data.shards.num_shards``, coloured dark to light) and one line style per
aggregator setting (e.g. ``aggregator.optimizer.lr``); mean over seeds; the numbers also go to a
Markdown table beside the PNG (``fig1.md``). ``bars``: one panel per
setting, the rows of ``make_tables.py`` (base, experts, ensemble, soup, each aggregator) as bars of
ID and OOD accuracy. Runs are read and grouped as in ``make_tables.py``; the same inputs give the
same bytes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from make_tables import expert_set, load, rows  # noqa: E402

SAVE = {"dpi": 150, "metadata": {"Software": None}}  # no version stamp: deterministic bytes
STYLES = ["-", "--", ":", "-."]


def _number(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def _order(v) -> tuple:
    """Numbers in numeric order, then strings."""
    return (0, v, "") if isinstance(v, float) else (1, 0, str(v))


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def series(results: list[dict], x: str, line: str, metric: str) -> dict:
    """{panel (aggregator): {(line value, variant): [(x, mean over seeds, runs)]}}, sorted by x.
    Runs must differ only in ``x``, ``line``, the aggregator and the seed: anything else (another
    dataset, model, init, ...) is refused rather than averaged in."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    rest = set()
    for r in results:
        o = r["overrides"]
        if x not in o or line not in o or not isinstance(r["metrics"].get(metric), (int, float)):
            continue
        rest.add(", ".join(f"{k}={v}" for k, v in o.items() if k not in (x, line) and not k.startswith("aggregator")))
        if len(rest) > 1:
            raise SystemExit(f"runs from several settings ({' | '.join(sorted(rest)) or 'defaults'}); plot one "
                             "setting's directory at a time")
        variant = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in o.items() if k.startswith("aggregator.")
                            and k not in (x, line))
        acc[r["aggregator"]][(_number(o[line]), variant)][_number(o[x])].append(r["metrics"][metric])
    return {panel: {key: [(xv, statistics.mean(v), len(v)) for xv, v in sorted(pts.items(), key=lambda kv: _order(kv[0]))]
                    for key, pts in sorted(lines.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1]))}
            for panel, lines in acc.items()}


def references(results: list[dict], x: str, line: str, metric: str) -> dict:
    """Series of the networks every run reports beside its aggregate (one value per expert set):
    {"experts (mean)" | "output ensemble" | "base (warm start)": {(line value, ""): [(x, mean, runs)]}}."""
    pick = {"experts (mean)": lambda r: statistics.mean(e[metric] for e in r["experts"]),
            "output ensemble": lambda r: (r.get("ensemble") or {}).get(metric),
            "base (warm start)": lambda r: (r.get("base") or {}).get(metric)}
    sets = {expert_set(r): r for r in results
            if x in r["overrides"] and line in r["overrides"]}.values()
    out = {}
    for name, f in pick.items():
        rows = [dict(r, metrics={metric: f(r)}, overrides={k: v for k, v in r["overrides"].items()
                                                           if not k.startswith("aggregator")}) for r in sets]
        found = series([dict(r, aggregator=name) for r in rows], x, line, metric)
        out.update(found)
    return out


def fig1(results: list[dict], out: Path, x: str, line: str, metric: str) -> None:
    data = series(results, x, line, metric)
    if not data:
        raise SystemExit(f"no runs with the overrides {x} and {line} and the metric {metric}")
    paper = ["soup", "ame_sgd", "ame_adagrad", "ame_adamw", "ame_adadelta"]  # the paper's panel order: GD first
    panels = sorted(data, key=lambda p: paper.index(p) if p in paper else len(paper))
    levels = sorted({k[0] for lines in data.values() for k in lines}, key=_order)
    colours = dict(zip(levels, plt.cm.viridis([0.85 * i / max(1, len(levels) - 1) for i in range(len(levels))])))
    lo = min(y for lines in data.values() for pts in lines.values() for _, y, _ in pts)
    hi = max(y for lines in data.values() for pts in lines.values() for _, y, _ in pts)
    bases = [r["base"][metric] for r in results if isinstance((r.get("base") or {}).get(metric), float)]
    lo, hi = min([lo, *bases]), max([hi, *bases])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        variants = list(dict.fromkeys(k[1] for k in data[panel]))
        for (level, variant), pts in data[panel].items():
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], STYLES[variants.index(variant) % len(STYLES)],
                    color=colours[level], marker="o", markersize=3)
        if any(variants):  # line styles: this panel's settings
            ax.legend(handles=[Line2D([], [], color="black", linestyle=STYLES[i % len(STYLES)], label=v)
                               for i, v in enumerate(variants)], fontsize=6, loc="lower left")
        ax.set_title(panel)
        ax.set_xlabel(x)
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in data[panel].values() for p in pts}, key=_order)
        ax.set_xticks(ticks, [_fmt(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.set_ylim(100 * lo - 1, 100 * hi + 1)
    refs = references(results, x, line, metric)
    base = [y for pts in refs.get("base (warm start)", {}).values() for _, y, _ in pts]
    if base:  # one shared warm start: a horizontal reference in every panel
        for ax in axes[0]:
            ax.axhline(100 * statistics.mean(base), color="grey", linestyle="--", linewidth=0.8)
        axes[0][-1].text(1.0, 100 * statistics.mean(base), " base", color="grey", fontsize=7, va="center",
                         transform=axes[0][-1].get_yaxis_transform())
    axes[0][0].set_ylabel(f"{metric} (%)")
    fig.legend(handles=[Line2D([], [], color=colours[v], marker="o", markersize=3, label=f"{line.split('.')[-1]}={_fmt(v)}")
                        for v in levels], loc="upper center", ncol=len(levels), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(out, **SAVE)
    out.with_suffix(".md").write_text(series_table({**refs, **data}, [*refs, *panels], x, line, metric,
                                                   sum(p[2] for lines in data.values() for pts in lines.values() for p in pts)))


def series_table(data: dict, panels: list[str], x: str, line: str, metric: str, runs: int) -> str:
    """The plotted numbers as a Markdown table: one row per line, one column per x value."""
    xs = sorted({p[0] for lines in data.values() for pts in lines.values() for p in pts}, key=_order)
    head = f"| aggregator | setting | {line.split('.')[-1]} | " + " | ".join(f"{x.split('.')[-1]}={_fmt(v)}" for v in xs) + " |"
    out = [head, "|---|---|---:|" + "---:|" * len(xs)]
    for panel in panels:
        for (level, variant), pts in sorted(data[panel].items(), key=lambda kv: (kv[0][1], _order(kv[0][0]))):
            by_x = {p[0]: p[1] for p in pts}
            out.append(f"| {panel} | {variant} | {_fmt(level)} | "
                       + " | ".join(f"{100 * by_x[v]:.2f}" if v in by_x else "" for v in xs) + " |")
    return "\n".join(out) + f"\n\n{metric} in %, mean over seeds; {runs} run(s).\n"


def bars(results: list[dict], out: Path, metrics=("id/acc", "ood/acc")) -> None:
    settings = list(dict.fromkeys(r["setting"] for r in results))
    fig, axes = plt.subplots(len(settings), 1, figsize=(9, 3.2 * len(settings)), squeeze=False)
    for ax, setting in zip(axes[:, 0], settings):
        table = [(name, ms) for name, ms in rows([r for r in results if r["setting"] == setting])
                 if name != "soup (aggregate)"]  # the same network as the reference "soup" bar
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            means, errs = [], []
            for _, ms in table:
                v = [100 * m[metric] for m in ms if isinstance(m.get(metric), (int, float))]
                means.append(statistics.mean(v) if v else float("nan"))
                errs.append(statistics.stdev(v) if len(v) > 1 else 0.0)
            ax.bar([i + (j - (len(metrics) - 1) / 2) * width for i in range(len(table))], means, width, yerr=errs,
                   label=metric, capsize=2)
        ax.set_xticks(range(len(table)), [name.replace(" (aggregate)", "") for name, _ in table], rotation=35,
                      ha="right", fontsize=7)
        finite = [100 * m[k] for _, ms in table for m in ms for k in metrics if isinstance(m.get(k), (int, float))]
        ax.set_ylim(min(finite) - 3, max(finite) + 2)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(setting or "defaults", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, **SAVE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["fig1", "bars"])
    ap.add_argument("dirs", nargs="+", type=Path, help="run or multirun directories (or results.json files)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--x", default="train.epochs", help="fig1: the override on the x axis")
    ap.add_argument("--line", default="data.shards.num_shards", help="fig1: one line per value of this override")
    ap.add_argument("--metric", default="id/acc", help="fig1: the metric on the y axis")
    args = ap.parse_args()
    results = load(args.dirs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.kind == "fig1":
        fig1(results, args.out, args.x, args.line, args.metric)
    else:
        bars(results, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
