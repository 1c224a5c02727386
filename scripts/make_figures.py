"""PNG figures from the ``results.json`` files under run / multirun directories (matplotlib).

    python scripts/make_figures.py fig1 multirun/fig1/cifar10_shards --out experiments/fig1/fig1_cifar10_shards.png
    python scripts/make_figures.py summary multirun/table --out experiments/table/table.png
    python scripts/make_figures.py summary experiments/table/table.csv --out experiments/table/table.png

``fig1`` (the paper's Fig. 1 design): one panel per aggregator, a metric (``--metric``, default
``id/acc``) against an override (``--x``, default ``train.epochs``), one line per value of another
(``--line``, default ``data.shards.num_shards``, dark to light) and one line style per aggregator
setting (e.g. its lr); the mean over seeds with a band for the 95 % confidence interval when there
are several seeds. The plotted numbers also go to a Markdown table beside the PNG (``.md``), and
that table can be plotted again (``fig1 experiments/fig1/fig1_cifar10_shards.md``).

``summary``: one panel per setting, the rows of ``make_tables.py`` (base, experts, ensemble, soup,
each aggregator) as points with 95 % confidence intervals over seeds, for ID and OOD accuracy,
each panel on its own axis range; from results trees or from the CSV ``make_tables.py --out`` writes.

``deltas``: the paired differences that carry a comparison: per setting, one panel per column of
ID and OOD accuracy minus the soup's and minus the base's (expert set by expert set), each row's
mean with its 95 % confidence interval, a line at 0, and one axis range per panel:

    python scripts/make_figures.py deltas multirun/verdict --out experiments/verdict/deltas.png Rows, labels and order come
from :mod:`ame.analysis`; the same inputs give the same bytes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from ame.analysis import (BY_KEY, NAMES, PAIRED_COLUMNS, Row, Stat, value_order, axis_label, load, pretty_setting, read, read_series_table,  # noqa: E402
                          readable, references, series, series_table, settings, value_text)
from ame.errors import one_line  # noqa: E402

SAVE = {"dpi": 150, "metadata": {"Software": None}}  # no version stamp: deterministic bytes
STYLES = ["-", "--", ":", "-."]
PAPER_PANELS = ["soup", "ame_sgd", "ame_adagrad", "ame_adamw", "ame_adadelta"]  # the paper's order: GD first


def _level_label(line: str, v) -> str:
    return pretty_setting(f"{line}={value_text(v)}")


def fig1(data: dict, refs: dict, out: Path, x: str, line: str, metric: str, title: str = "",
         ylim: tuple[float, float] | None = None) -> None:
    """``data``/``refs``: :func:`ame.analysis.series` of the aggregators and of the reference networks."""
    if not data:
        raise SystemExit(f"no runs with the overrides {x} and {line} and the metric {metric}")
    panels = sorted(data, key=lambda p: PAPER_PANELS.index(p) if p in PAPER_PANELS else len(PAPER_PANELS))
    levels = sorted({k[0] for lines in data.values() for k in lines}, key=value_order)
    colours = dict(zip(levels, plt.cm.viridis([0.85 * i / max(1, len(levels) - 1) for i in range(len(levels))])))
    seeds = sorted({s.n for lines in data.values() for pts in lines.values() for _, s in pts})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        variants = list(dict.fromkeys(k[1] for k in data[panel]))
        for (level, variant), pts in data[panel].items():
            xs, ys = [p[0] for p in pts], [100 * p[1].mean for p in pts]
            style = STYLES[variants.index(variant) % len(STYLES)]
            ax.plot(xs, ys, style, color=colours[level], marker="o", markersize=3)
            ci = [p[1].ci95() for p in pts]
            if all(c is not None for c in ci):  # seed band: the 95 % confidence interval of the mean
                ax.fill_between(xs, [y - 100 * c for y, c in zip(ys, ci)], [y + 100 * c for y, c in zip(ys, ci)],
                                color=colours[level], alpha=0.15, linewidth=0)
        if any(variants):  # line styles: this panel's settings
            ax.legend(handles=[Line2D([], [], color="black", linestyle=STYLES[i % len(STYLES)],
                                      label=pretty_setting(v) if "=" in v else v) for i, v in enumerate(variants)],
                      fontsize=7, loc="lower left")
        ax.set_title(NAMES.get(panel, panel), fontsize=10)
        ax.set_xlabel(axis_label(x))
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for pts in data[panel].values() for p in pts}, key=value_order)
        ax.set_xticks(ticks, [value_text(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    base = [s.mean for pts in refs.get("base (warm start)", {}).values() for _, s in pts]
    if base:  # one shared warm start: a horizontal reference in every panel
        for ax in axes[0]:
            ax.axhline(100 * sum(base) / len(base), color="grey", linestyle="--", linewidth=0.8)
        axes[0][-1].text(1.0, 100 * sum(base) / len(base), " warm-start\n base", color="grey", fontsize=7,
                         va="center", transform=axes[0][-1].get_yaxis_transform())
    axes[0][0].set_ylabel(axis_label(metric))
    if ylim:  # a zoom: lines below the window leave it (the .md table keeps every number)
        axes[0][0].set_ylim(*ylim)
    spread = ("mean and 95 % CI over " + "/".join(map(str, seeds)) + " seeds") if seeds != [1] else "one seed"
    fig.suptitle(f"{title}{': ' if title else ''}{axis_label(metric).replace(' (%)', '')} of the merged network "
                 f"({spread})", fontsize=10)
    fig.legend(handles=[Line2D([], [], color=colours[v], marker="o", markersize=3, label=_level_label(line, v))
                        for v in levels], loc="lower center", ncol=len(levels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(out, **SAVE)
    plt.close(fig)


def summary(rows: list[Row], out: Path, metrics=("id/acc", "ood/acc"), title: str = "") -> None:
    """One panel per setting: each row's accuracies as points with 95 % confidence intervals."""
    groups = settings(rows)
    metrics = [m for m in metrics if any(m in r.stats for r in rows)]
    cols = 2 if len(groups) > 2 else 1
    grid = [groups[i:i + cols] for i in range(0, len(groups), cols)]
    height = [max(len([r for r in rows if r.setting == s]) for s in line) for line in grid]
    fig, axes = plt.subplots(len(grid), cols, figsize=(6.5 * cols, sum(0.26 * h + 1.0 for h in height)),
                             squeeze=False, gridspec_kw={"height_ratios": [h + 3 for h in height]})
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    colours, markers = ["tab:blue", "tab:orange", "tab:green"], ["o", "s", "^"]
    seeds = sorted({r.runs for r in rows if r.runs})
    for ax, setting in zip(axes.flat, groups):
        mine = [r for r in rows if r.setting == setting]
        ys = list(range(len(mine)))[::-1]
        for j, m in enumerate(metrics):
            off = (j - (len(metrics) - 1) / 2) * 0.22
            pts = [(y + off, r.stats[m]) for y, r in zip(ys, mine) if m in r.stats]
            ax.errorbar([100 * s.mean for _, s in pts], [y for y, _ in pts],
                        xerr=[100 * (s.ci95() or 0) for _, s in pts], fmt=markers[j], color=colours[j], markersize=4,
                        capsize=2, elinewidth=1, label=BY_KEY[m].long.replace(" (%)", ""))
        refs = sum(r.aggregator is None for r in mine)
        if 0 < refs < len(mine):  # reference networks above, aggregates below
            ax.axhline(ys[refs - 1] - 0.5, color="grey", linewidth=0.6)
        ax.set_yticks(ys, [r.label for r in mine], fontsize=8)
        ax.set_xlim(*_window([r.stats[m] for r in mine for m in metrics if m in r.stats]))  # this panel's own range
        ax.set_title(pretty_setting(setting, default="default settings"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    spread = ("mean and 95 % CI over " + "/".join(map(str, seeds)) + " seeds") if seeds != [1] else "one seed"
    for ax in axes[-1]:
        ax.set_xlabel(f"accuracy (%), {spread}")
    axes[0][0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, **SAVE)
    plt.close(fig)


def _window(stats: list, least: float = 1.0) -> tuple[float, float]:
    """An axis range (points) holding every mean and its 95 % CI, with a 5 % margin; at least ``least`` wide."""
    lo = min(100 * (s.mean - (s.ci95() or 0)) for s in stats)
    hi = max(100 * (s.mean + (s.ci95() or 0)) for s in stats)
    pad = max(0.05 * (hi - lo), (least - (hi - lo)) / 2)
    return lo - pad, hi + pad


DELTAS = [c for c in PAIRED_COLUMNS if c.key.split("/", 1)[1] in ("id/acc", "ood/acc")]


def deltas(rows: list[Row], out: Path, title: str = "") -> None:
    """:func:`deltas_figure`, saved to ``out``."""
    fig = deltas_figure(rows, title)
    fig.savefig(out, **SAVE)
    plt.close(fig)


def deltas_figure(rows: list[Row], title: str = ""):
    """Per setting (a row of panels), per paired column (ID / OOD minus the soup's / the base's):
    each network's mean difference with its 95 % CI, a line at 0, each panel on its own range. The
    range is the merged networks' (and the ensemble's): the single experts, often many points below,
    would squeeze the differences that matter, so they are drawn at the panel's edge, marked ◀ or ▶
    with their value. From results trees, each expert set's own difference is a small open circle
    under its mean (:attr:`Row.per_set`): whether the mean holds in every set or comes from a few."""
    groups = settings(rows)
    keys = [c for c in DELTAS if any(c.key in r.stats for r in rows)]
    if not keys:
        raise SystemExit("error: no paired differences (vs_soup/…, vs_base/…) in these rows; give results trees "
                         "or a CSV written by this version of make_tables.py --out")
    mine = {g: [r for r in rows if r.setting == g and any(c.key in r.stats for c in keys)] for g in groups}
    height = max(len(v) for v in mine.values())
    fig, axes = plt.subplots(len(groups), len(keys), figsize=(3.3 * len(keys) + 2.2, len(groups) * (0.24 * height + 1.1)),
                             squeeze=False, sharey="row")
    for i, g in enumerate(groups):
        ys = list(range(len(mine[g])))[::-1]
        for j, c in enumerate(keys):
            ax = axes[i][j]
            pts = [(y, r.stats[c.key], r.label.startswith("experts"))
                   for y, r in zip(ys, mine[g]) if c.key in r.stats]
            tuned = [y for y, r in zip(ys, mine[g]) if "tuned on validation" in r.label or "validation" in r.label]
            each = {y: [100 * d[c.key] for d in r.per_set.values() if c.key in d] if not r.label.startswith("experts")
                    else [] for y, r in zip(ys, mine[g])}
            lo, hi = _window([s for _, s, expert in pts if not expert] + [Stat(0.0, None, 1)]  # 0 always in view
                             + [Stat(v / 100, None, 1) for y, _, expert in pts if not expert for v in each[y]])
            for y, s, expert in pts:
                colour = "tab:red" if y in tuned else "tab:blue"
                m = 100 * s.mean
                if expert and not lo <= m <= hi:  # off the merges' range: at the edge, with its value
                    edge = lo if m < lo else hi
                    ax.plot([edge], [y], marker="<" if m < lo else ">", color=colour, markersize=5, clip_on=False)
                    ax.annotate(f"{m:+.1f}", (edge, y), xytext=(6 if m < lo else -6, 0), textcoords="offset points",
                                ha="left" if m < lo else "right", va="center", fontsize=6, color=colour)
                    continue
                ax.errorbar([m], [y], xerr=[100 * (s.ci95() or 0)], fmt="o", color=colour, markersize=3.5,
                            capsize=2, elinewidth=1)
                if each[y]:  # every expert set, a little below the mean (the experts' rows: off the window)
                    ax.plot(each[y], [y - 0.3] * len(each[y]), linestyle="none", marker="o", markersize=2.5,
                            markerfacecolor="none", markeredgewidth=0.6, color=colour, alpha=0.7)
            ax.axvline(0, color="grey", linewidth=0.8)
            ax.set_xlim(lo, hi)
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(labelsize=7)
            if i == 0 or len(groups) > 1:
                ax.set_title(c.short + (f"\n{pretty_setting(g)}" if len(groups) > 1 else ""), fontsize=8)
            if i == len(groups) - 1:
                ax.set_xlabel("points (mean, 95 % CI)", fontsize=7)
        axes[i][0].set_yticks(ys, [r.label for r in mine[g]], fontsize=7)
    sets = any(r.per_set for r in rows)
    fig.suptitle((title + "\n" if title else "") + "paired differences, expert set by expert set "
                 "(red: uses the validation split" + ("; open circles: each expert set" if sets else "") + ")",
                 fontsize=9)
    fig.tight_layout()
    return fig


@one_line  # an AMEError (e.g. from ame.analysis): one error: line
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["fig1", "summary", "deltas", "bars"], help="bars: an older name of summary")
    ap.add_argument("dirs", nargs="+", type=Path,
                    help="run or multirun directories (or results.json files); or the .md (fig1) / .csv (summary) "
                    "this script or make_tables.py wrote")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--x", default="train.epochs", help="fig1: the override on the x axis")
    ap.add_argument("--line", default="data.shards.num_shards", help="fig1: one line per value of this override")
    ap.add_argument("--metric", default="id/acc", help="fig1: the metric on the y axis")
    ap.add_argument("--title", default="", help="what the figure shows, e.g. the regime (above the panels)")
    ap.add_argument("--ylim", type=float, nargs=2, metavar=("LOW", "HIGH"), help="fig1: the y window (a zoom)")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.kind == "fig1":
        if len(args.dirs) == 1 and args.dirs[0].suffix == ".md":
            data, refs = readable(read_series_table, args.dirs[0], "a fig1 table written by this script",
                                  args.x, args.line)
        else:
            results = load(args.dirs)
            data, refs = series(results, args.x, args.line, args.metric), references(results, args.x, args.line,
                                                                                     args.metric)
        fig1(data, refs, args.out, args.x, args.line, args.metric, args.title, args.ylim)
        table = series_table({**refs, **data}, [*refs, *data], args.x, args.line, args.metric)
        if args.out.with_suffix(".md") not in args.dirs:
            args.out.with_suffix(".md").write_text(table)
    elif args.kind == "deltas":
        deltas(read(args.dirs), args.out, title=args.title)
    else:
        summary(read(args.dirs), args.out, title=args.title)
    print(args.out)


if __name__ == "__main__":
    main()
