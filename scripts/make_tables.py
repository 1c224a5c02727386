"""Tables (Markdown, LaTeX, CSV) from the ``results.json`` files under run / multirun directories.

    python scripts/make_tables.py multirun/2026-11-22/12-00-00                 # Markdown on the console
    python scripts/make_tables.py multirun/table --out experiments/table/table.md   # + table.tex, table.csv
    python scripts/make_tables.py experiments/table/table.csv --out table.md   # redo from a summary CSV
    python scripts/make_tables.py multirun/verdict --each-set                  # + every expert set's Δs
    python scripts/make_tables.py multirun/verdict --contrast '^AME' validation  # + AME − each tuned control

One table per setting (the runs' overrides other than ``seed``, the aggregator's, the logger's,
paths and Hydra's), one row per network: the warm-start base, the experts (mean and best), the
output ensemble, the soup and each aggregator setting; mean ± std over the runs that differ only
in ``seed``. Under it, from results trees, the same networks paired with the soup of the same
experts and with their base: each one's ID / OOD / worst-shard accuracy minus the soup's and the
base's, expert set by expert set, mean ± the half-width of the 95 % confidence interval (with
several bases, ``base_seed=``, bases are a fixed factor: see :mod:`ame.analysis`); with
``--each-set``, also each expert set's own Δ ID and Δ OOD against the base (from results trees,
into the Markdown only: the CSV keeps no expert set's own numbers); with ``--contrast ROWS
COLUMNS``, the paired Δ ID and Δ OOD of the rows matching ROWS minus those matching COLUMNS, expert
set by expert set, with the same intervals (also Markdown only). Last, where the
numbers came from: one line per distinct environment (commit, versions, device, threads) among the
runs and the cached experts, base and reference metrics they used (commits that ran the same code,
``code_sha256``, share a line; for a run from a commit with no uncommitted changes it is read from
this checkout's git when git has the commit, so older results are grouped too); a table whose
numbers come from different code or versions gets a ``warning:`` line on stderr. Rows, columns,
their order and the environments come from :mod:`ame.analysis`. Deterministic given the inputs
(and the commits this checkout has).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ame.analysis import (PAIRED_COLUMNS, Row, cell, columns, contrast, environment_line, is_summary,
                          merge_environments, mismatches, pretty_setting, read, settings, spread_label, summary_csv)
from ame.errors import AMEError, one_line


def environment_lines(rows: list[Row]) -> list[str]:
    """Where one table's numbers came from: one line per distinct environment (none from an older CSV)."""
    return [environment_line(e) for e in merge_environments(rows)]


def _delta(v: float | None) -> str:
    """A paired Δ in points, signed (exactly 0: unsigned)."""
    return "" if v is None else "0.00" if v == 0 else f"{100 * v:+.2f}"


def set_tables(rows: list[Row]) -> list[str]:
    """Each expert set's Δ ID and Δ OOD against the base (or, without a base, the soup): one column
    per expert set, so a reader sees whether a pooled Δ holds in every set or comes from a few."""
    sets = list(dict.fromkeys(name for r in rows for name in r.per_set))  # the reference rows have every set
    ref = "base" if any("vs_base/id/acc" in d for r in rows for d in r.per_set.values()) else "soup"
    lines = []
    for key in (f"vs_{ref}/id/acc", f"vs_{ref}/ood/acc"):
        mine = [r for r in rows if any(key in d for d in r.per_set.values())]
        if not mine:
            continue
        column = next(c for c in PAIRED_COLUMNS if c.key == key)
        names = "b = base_seed, s = seed" if any(n.startswith("b") for n in sets) else "s = seed"
        lines += [f"Each expert set ({names}), {column.short}: {column.long}.\n",
                  "| network | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
        lines += [f"| {r.label} | " + " | ".join(_delta(r.per_set.get(n, {}).get(key)) for n in sets) + " |"
                  for r in mine]
        lines.append("")
    return lines


def contrast_tables(rows: list[Row], first: str, second: str) -> list[str]:
    """Rows whose label matches the regular expression ``first`` against rows matching ``second``
    (and not ``first``): each pair's paired Δ ID and Δ OOD, row minus column, expert set by expert
    set (:func:`ame.analysis.contrast`), one table per metric."""
    mine = [r for r in rows if r.per_set]
    ours = [r for r in mine if re.search(first, r.label)]
    theirs = [r for r in mine if re.search(second, r.label) and r not in ours]
    if not ours or not theirs:
        return []
    ref = "base" if any("vs_base/id/acc" in d for r in mine for d in r.per_set.values()) else "soup"
    lines = []
    for key in (f"vs_{ref}/id/acc", f"vs_{ref}/ood/acc"):
        column = next(c for c in PAIRED_COLUMNS if c.key == key)
        what = column.short.split(" vs ")[0]  # "Δ ID"
        stats = {(a.label, b.label): contrast(a, b, key) for a in ours for b in theirs}
        counts = sorted({s.n for s in stats.values() if s is not None})
        if not counts:
            continue
        bases = max(r.bases for r in mine)
        over = (f"mean ± half-width of the 95 % CI (Student t) over {counts[0] if len(counts) == 1 else f'{counts[0]}–{counts[-1]}'} "
                + ("seeds" if bases == 1 else f"expert sets on {bases} bases"))
        lines += [f"{what}, row minus column, paired over the expert sets both rows have (the {ref} cancels); "
                  f"{over}.\n",
                  "| row − column | " + " | ".join(b.label for b in theirs) + " |", "|---|" + "---:|" * len(theirs)]
        lines += [f"| {a.label} | " + " | ".join(cell(stats[a.label, b.label], column, spread="ci") for b in theirs)
                  + " |" for a in ours]
        lines.append("")
    return lines


def markdown(rows: list[Row], each_set: bool = False, contrast: tuple[str, str] | None = None) -> str:
    parts = []
    many = len(settings(rows)) > 1
    for setting in settings(rows):
        mine = [r for r in rows if r.setting == setting]
        cols = columns(mine)
        lines = [f"### {pretty_setting(setting)}" + (f" (`{setting}`)" if setting else "") + "\n"] if many else []
        lines += ["| network | " + " | ".join(c.short for c in cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [f"| {r.label} | " + " | ".join(cell(r.stats.get(c.key), c) for c in cols) + " |" for r in mine]
        lines.append(f"\nAccuracies in %, NLL in nats; {spread_label(mine)}.\n")
        paired = [r for r in mine if any(k.startswith(("vs_soup/", "vs_base/")) for k in r.stats)]
        if paired:
            cols = columns(paired, PAIRED_COLUMNS)
            lines += ["Paired with the soup of the same experts and with their base (expert set by expert set): "
                      "Δ = each network's accuracy minus the soup's / the base's, in points (the distances as above); "
                      f"{spread_label(paired, 'ci')}. With several bases (base_seed): the mean over bases of each "
                      "base's mean, the interval from the within-base spread (bases a fixed factor).\n",
                      "| network | " + " | ".join(c.short for c in cols) + " |", "|---|" + "---:|" * len(cols)]
            lines += [f"| {r.label} | " + " | ".join(cell(r.stats.get(c.key), c, spread="ci" if c.key.startswith("vs_")
                                                          else "std") for c in cols) + " |" for r in paired]
            lines.append("")
        if contrast:
            lines += contrast_tables(mine, *contrast)
        if each_set:
            lines += set_tables(mine)
        envs = environment_lines(mine)
        if envs:
            lines += ["Where the numbers came from (commit; versions; device; threads: what each environment made):\n",
                      *[f"- {e}" for e in envs], ""]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def latex(rows: list[Row]) -> str:
    """A booktabs table per setting, with the same cells as the Markdown one."""
    parts = []
    for setting in settings(rows):
        mine = [r for r in rows if r.setting == setting]
        cols = columns(mine)
        note = f"Accuracies in \\%, {spread_label(mine)}.".replace("±", "$\\pm$")
        lines = [f"% {pretty_setting(setting)}" + (f" ({setting})" if setting else ""),
                 "\\begin{tabular}{l" + "r" * len(cols) + "}", "\\toprule",
                 "network & " + " & ".join(c.short for c in cols) + " \\\\", "\\midrule"]
        for r in mine:
            cells = [cell(r.stats.get(c.key), c).replace("±", "$\\pm$") for c in cols]
            lines.append(r.label.replace("_", "\\_").replace("%", "\\%") + " & " + " & ".join(cells) + " \\\\")
        lines += ["\\bottomrule", f"\\multicolumn{{{len(cols) + 1}}}{{l}}{{\\footnotesize {note}}} \\\\",
                  "\\end{tabular}"]
        lines += [f"% environment: {e}" for e in environment_lines(mine)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


@one_line  # an AMEError (e.g. from ame.analysis): one error: line
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path,
                    help="run or multirun directories (or results.json files), or one summary .csv")
    ap.add_argument("--each-set", action="store_true", help="also, under each table, every expert set's Δ ID and "
                    "Δ OOD against the base (or the soup), one column per set")
    ap.add_argument("--contrast", nargs=2, metavar=("ROWS", "COLUMNS"), help="also the paired Δ ID and Δ OOD of "
                    "every row whose label matches the regular expression ROWS minus every row matching COLUMNS, "
                    "expert set by expert set (e.g. '^AME' 'validation': tuned AME against the tuned controls)")
    ap.add_argument("--out", type=Path, help="write the Markdown table here (and, beside it, .tex and .csv) "
                    "instead of printing it")
    args = ap.parse_args()
    for flag, on in (("--each-set", args.each_set), ("--contrast", args.contrast)):
        if on and is_summary(args.dirs):
            raise AMEError(f"{flag} needs results trees: {args.dirs[0]} is a summary CSV, which keeps no "
                           "expert set's own numbers; pass the run / multirun directories")
    for pattern in args.contrast or []:
        try:
            re.compile(pattern)
        except re.error as e:
            raise AMEError(f"--contrast {pattern!r} is not a regular expression ({e}); e.g. '^AME'") from None
    rows = read(args.dirs)
    if args.contrast:
        first, second = args.contrast
        paired = [r for r in rows if r.per_set]  # rows with each expert set's own numbers (not the base's)
        names = "; ".join(dict.fromkeys(r.label for r in paired))
        for pattern in args.contrast:
            if not any(re.search(pattern, r.label) for r in paired):
                raise AMEError(f"--contrast {pattern!r} matches no row that has paired numbers; the rows are: {names}")
        if not any(re.search(second, r.label) and not re.search(first, r.label) for r in paired):
            raise AMEError(f"--contrast: every row {second!r} matches is also matched by {first!r}, so there is "
                           "nothing to compare against; choose patterns that match different rows")
    for setting in settings(rows):  # the rows of one table are compared with each other
        for problem in mismatches(merge_environments([r for r in rows if r.setting == setting])):
            print(f"warning: {pretty_setting(setting)}: {problem}; see the environment lines under its table",
                  file=sys.stderr)
    table = markdown(rows, args.each_set, args.contrast)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tex, csv_text = latex(rows), summary_csv(rows)  # all computed before anything is written
        args.out.write_text(table)
        args.out.with_suffix(".tex").write_text(tex)
        args.out.with_suffix(".csv").write_text(csv_text)  # may be the input: it was read in full above
        print(args.out)
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
