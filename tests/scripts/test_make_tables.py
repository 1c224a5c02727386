"""scripts/make_tables.py and make_figures.py (through ame.analysis) on synthetic multirun trees:
grouping by overrides, mean ± std over seeds, one soup row, summaries read back."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf


ROOT = Path(__file__).resolve().parents[2]  # the repository (the `root` fixture, at module level)
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's ame, as an installed package would be


def script_process(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """``python scripts/<name> ARGS`` in a subprocess: the command line itself (its start-up costs
    seconds, so most tests use :func:`script`)."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, check=check, env=ENV)


def script(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """``scripts/<name> ARGS`` in this process (:func:`run_main`), exit code checked as ``check=True`` does."""
    proc = run_main(name.removesuffix(".py"), *args)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def write_run(d, aggregator, seed, acc, overrides, experts=("a", "b"), soup_acc=None, provenance=None):
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    m = {"id/acc": acc, "id/nll": 1.0, "ood/acc": acc / 2, "shard/min_acc": acc / 4, "dist/pivot": 0.5, "dist/soup": 0.25}
    ex = [{"path": f"{seed}/{p}", "shard_size": 10, "id/acc": 0.1 * (i + 1), "id/nll": 2.0} for i, p in enumerate(experts)]
    soup = m if soup_acc is None else {**m, "id/acc": soup_acc}
    r = {"aggregator": aggregator, "metrics": m, "soup": soup, "base": None, "experts": ex, "seed": seed}
    if provenance is not None:
        r["provenance"] = provenance
    (d / "results.json").write_text(json.dumps(r))


def provenance(commit="a" * 40, torch_version="2.14.1", cpu="Xeon", threads=1, made_by=None, **extra):
    """A provenance block as ame/provenance.py writes it; ``made_by``: of the cached experts and base."""
    env = {"run_id": "r", "started": "2026-11-30T00:00:00+00:00", "version": "0.1.0", "commit": commit, "dirty": False,
           "diff_sha256": None, "python": "3.11.7", "torch": torch_version, "torchvision": "0.29.1",
           "numpy": "2.4.6", "timm": "1.0.31", "threads": threads, "deterministic": False, "host": "h",
           "device": {"cpu": cpu, "arch": "x86_64", "cpu_capability": "AVX512", "cores": 2, "cores_usable": 2,
                      "platform": "Linux", "gpu": None}, **extra}
    made = env if made_by is None else made_by
    return {**env, "experts_made_by": [made, made], "base_made_by": made, "reference_metrics_made_by": made}


def test_tables_group_by_setting_and_average_over_seeds(tmp_path):
    n = 0
    for alpha in ("0.1", "0.5"):
        for seed, acc in ((0, 0.5), (1, 0.7)):
            for agg in ("soup", "ame_adam"):
                write_run(tmp_path / str(n), agg, seed, acc if agg == "soup" else acc + 0.1,
                          [f"data.shards.alpha={alpha}", f"seed={seed}", f"aggregator={agg}"], soup_acc=acc)
                n += 1
    write_run(tmp_path / str(n), "ame_adam", 0, 0.9, ["data.shards.alpha=0.1", "seed=0", "aggregator=ame_adam",
                                                     "aggregator.optimizer.lr=0.1"], soup_acc=0.5)
    out = script("make_tables.py", tmp_path).stdout
    assert out.count("### α = ") == 2 and "(`data.shards.alpha=0.1`)" in out
    first = out.split("### α = 0.5")[0]
    assert "| soup | 60.00 ± 14.14 |" in first and "soup (aggregate)" not in first  # one soup row
    assert "| AME-Adam | 70.00 ± 14.14 |" in first
    assert "| AME-Adam (lr 0.1) | 90.00 |" in first
    paired = first.split("Paired with the soup")[1]  # the same seed's soup subtracted: the seed swing (±14) cancels
    assert "| AME-Adam | 10.00 ± 0.00 | 0.00 ± 0.00 | 0.00 ± 0.00 | 0.50 ± 0.00 | 0.25 ± 0.00 |" in paired
    assert "| experts (best ID) | 20.00 ± 0.00 |" in first
    assert "mean ± std over 1–2 seeds" in first  # what ± means, and over how many
    assert script_process("make_tables.py", tmp_path).stdout == out  # the command line prints the same


def test_out_writes_markdown_latex_and_csv_with_the_same_numbers(tmp_path):
    import csv

    for seed, acc in ((0, 0.5), (1, 0.7)):
        for agg in ("soup", "ame_adam"):
            write_run(tmp_path / "runs" / f"{agg}{seed}", agg, seed, acc + (agg != "soup") / 10,
                      [f"seed={seed}", f"aggregator={agg}"])
    out = tmp_path / "new" / "folder" / "t.md"  # created
    script("make_tables.py", tmp_path / "runs", "--out", out)
    md = out.read_text()
    assert "| soup | 60.00 ± 14.14 |" in md and "| AME-Adam | 70.00 ± 14.14 |" in md
    tex = out.with_suffix(".tex").read_text()
    assert "soup & 60.00 $\\pm$ 14.14 &" in tex and "mean $\\pm$ std over 2 seeds" in tex
    rows = {r["network"]: r for r in csv.DictReader(open(out.with_suffix(".csv")))}
    assert float(rows["soup"]["id/acc_mean"]) == 0.6 and rows["soup"]["runs"] == "2"
    assert rows["AME-Adam"]["aggregator"] == "ame_adam"
    # the CSV is a summary the scripts read back: the same table, and a figure
    again = tmp_path / "again.md"
    script("make_tables.py", out.with_suffix(".csv"), "--out", again)
    assert again.read_text() == md and again.with_suffix(".csv").read_text() == out.with_suffix(".csv").read_text()
    script("make_figures.py", "summary", out.with_suffix(".csv"), "--out", tmp_path / "figs" / "s.png")
    assert (tmp_path / "figs" / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_an_older_csv_with_a_repeated_soup_row_reads_as_one_soup_row(tmp_path):
    head = "setting,network,runs,id/acc_mean,id/acc_std,dist/soup_mean,dist/soup_std\n"
    (tmp_path / "old.csv").write_text(head + ",soup,3,0.5,0.01,,\n,soup (aggregate),3,0.5,0.01,0.0,0.0\n"
                                      ',"ame_adam (aggregate, aggregator.optimizer.lr=0.01)",3,0.6,0.02,0.4,0.1\n')
    out = script("make_tables.py", tmp_path / "old.csv").stdout
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line] \
        == ["network", "soup", "AME-Adam (lr 0.01)"]
    assert "| soup | 50.00 ± 1.00 | 0.00 ± 0.00 |" in out


@pytest.mark.slow
def test_fig1_series_average_seeds_per_line_and_the_png_is_deterministic(tmp_path):
    from ame.analysis import load, series

    n = 0
    for agg, lrs in (("soup", [None]), ("ame_adagrad", ["0.01", "0.1"])):
        for lr in lrs:
            for shards in (2, 4):
                for epochs in (1, 2, 4):
                    for seed in (0, 1):
                        acc = 0.4 + 0.01 * epochs + 0.05 * (shards == 4) + 0.02 * seed + (0.1 if lr == "0.1" else 0)
                        o = [f"data.shards.num_shards={shards}", f"train.epochs={epochs}", f"seed={seed}",
                             f"aggregator={agg}"] + ([f"aggregator.optimizer.lr={lr}"] if lr else [])
                        write_run(tmp_path / "runs" / agg / str(n), agg, seed, acc, o)
                        n += 1
    s = series(load([tmp_path / "runs"]), "train.epochs", "data.shards.num_shards", "id/acc")
    assert set(s) == {"soup", "ame_adagrad"}
    lr = "aggregator.optimizer.lr"
    assert list(s["ame_adagrad"]) == [(2.0, f"{lr}=0.01"), (2.0, f"{lr}=0.1"), (4.0, f"{lr}=0.01"), (4.0, f"{lr}=0.1")]
    xs, stats = zip(*s["ame_adagrad"][(4.0, f"{lr}=0.1")])
    assert xs == (1.0, 2.0, 4.0) and [st.n for st in stats] == [2, 2, 2]
    assert [round(st.mean, 6) for st in stats] == [0.57, 0.58, 0.6]  # 0.4 + 0.01 e + 0.05 + 0.1 + mean seed bonus 0.01
    assert all(abs(st.std - 0.02 / 2 ** 0.5) < 1e-9 for st in stats)  # seeds differ by 0.02
    from scipy.stats import t

    assert abs(stats[0].ci95() - t.ppf(0.975, 1) * stats[0].std / 2 ** 0.5) < 1e-12  # the band: Student t, n = 2
    pngs = []
    for name in ("a.png", "b.png"):
        script("make_figures.py", "fig1", tmp_path / "runs", "--out", tmp_path / "figs" / name)
        pngs.append((tmp_path / "figs" / name).read_bytes())
    assert pngs[0][:8] == b"\x89PNG\r\n\x1a\n" and pngs[0] == pngs[1]
    table = (tmp_path / "figs" / "a.md").read_text()
    assert "mean ± std over 2 seeds" in table and "| ame_adagrad | aggregator.optimizer.lr=0.1 | 4 | 57.00 ± 1.41 |" in table
    script("make_figures.py", "fig1", tmp_path / "figs" / "a.md", "--out", tmp_path / "figs" / "again.png")  # replot
    assert (tmp_path / "figs" / "again.png").read_bytes()[:4] == b"\x89PNG"
    script("make_figures.py", "summary", tmp_path / "runs", "--out", tmp_path / "summary.png")
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_fig1_refuses_to_average_runs_from_different_settings(tmp_path):
    for i, data in enumerate(("cifar10_shards", "gld23k")):
        write_run(tmp_path / str(i), "soup", 0, 0.5, [f"data={data}", "data.shards.num_shards=2", "train.epochs=1",
                                                      "aggregator=soup"])
    out = script("make_figures.py", "fig1", tmp_path, "--out", tmp_path / "f.png", check=False)
    assert out.returncode != 0 and "several settings" in out.stderr and not (tmp_path / "f.png").exists()


def test_aggregator_rows_put_the_soups_first_whatever_the_folder_names(tmp_path):
    for name in ("ame_adagrad", "ame_adam", "weighted_soup", "soup"):  # alphabetical folders: ame_* first
        write_run(tmp_path / f"aggregator={name}", name, 0, 0.5, [f"aggregator={name}"])
    out = script("make_tables.py", tmp_path).stdout.split("Paired with the soup")[0]  # the first table
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[rows.index("soup"):] == ["soup", "weighted soup", "AME-Adam", "AME-Adagrad"]


def test_tuned_runs_make_their_own_row_and_experts_are_compared_with_the_base_on_their_shard(tmp_path):
    for seed in (0, 1):
        for agg, tuned, acc in (("ame_adam", False, 0.6), ("ame_adam", True, 0.8)):
            d = tmp_path / f"{agg}{seed}{tuned}"
            over = [f"seed={seed}", f"aggregator={agg}"] + (["aggregator.optimizer.lr=0.001",
                                                             "optimized_metric=val/acc"] if tuned else [])
            write_run(d, agg, seed, acc, over)
            r = json.loads((d / "results.json").read_text())
            r["tuned_on_validation"] = tuned
            r["base"] = {"id/acc": 0.7}
            gains = (0.2, -0.1) if seed == 0 else (0.3, 0.1)  # expert 1 of seed 0 lost on its own shard
            r["experts"] = [e | {"shard/own_acc": 0.5 + g, "shard/base_own_acc": 0.5, "shard/own_gain": g}
                            for e, g in zip(r["experts"], gains)]
            (d / "results.json").write_text(json.dumps(r))
    out = script("make_tables.py", tmp_path).stdout
    assert "###" not in out  # optimized_metric is not a setting: one table
    assert "| AME-Adam | 60.00 ± 0.00 |" in out
    assert "| AME-Adam (lr 0.001, tuned on validation) | 80.00 ± 0.00 |" in out
    header = next(line for line in out.splitlines() if line.startswith("| network"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    experts = next(line for line in out.splitlines() if line.startswith("| experts (mean)"))
    base = next(line for line in out.splitlines() if line.startswith("| base (warm start)"))
    cell = lambda line, name: [c.strip() for c in line.strip("|").split("|")][cols.index(name)]  # noqa: E731
    assert cell(experts, "gain on own shard") == "12.50 ± 10.61"  # (5, 20) points over the two seeds
    assert cell(experts, "min gain") == "0.00 ± 14.14"  # -10 and +10
    assert cell(experts, "beat base") == "75.00 ± 35.36"  # 1 of 2, then 2 of 2
    assert cell(base, "own shard") == "50.00 ± 0.00" and cell(experts, "own shard") == "62.50 ± 10.61"


def test_best_trial_takes_the_top_score_and_breaks_ties_towards_the_smaller_value(tmp_path):
    for i, (lr, acc) in enumerate([(1e-3, 0.70), (1e-4, 0.75), (3e-4, 0.75), (1e-5, 0.60)]):  # a tie, visited larger first
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"aggregator.optimizer.lr={lr}", "seed=0"]), d / ".hydra" / "overrides.yaml")
        (d / "results.json").write_text(json.dumps({"metrics": {"val/acc": acc}}))
    proc = script("best_trial.py", tmp_path)
    assert proc.stdout.strip() == "0.0001" and not proc.stderr
    (tmp_path / "1" / "results.json").write_text(json.dumps({"metrics": {"val/acc": 0.5}}))
    (tmp_path / "2" / "results.json").write_text(json.dumps({"metrics": {"val/acc": 0.5}}))
    proc = script("best_trial.py", tmp_path)
    assert proc.stdout.strip() == "0.001" and "edge of the values tried" in proc.stderr
    assert "no finished trial" in script("best_trial.py", tmp_path / "0" / ".hydra", check=False).stderr


def run_main(name: str, *args) -> subprocess.CompletedProcess:
    """``scripts/<name>.py ARGS`` run in this process, as :func:`script` runs it (exit code, stdout,
    stderr), without an interpreter's start-up each time."""
    module = importlib.import_module(f"scripts.{name}")
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv, code = [name, *map(str, args)], 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_tables_say_where_their_numbers_came_from_and_warn_when_commits_differ(tmp_path):
    old = provenance(commit="b" * 40, torch_version="2.13.0", cpu="EPYC", threads=2)
    for alpha, mixed in (("0.1", False), ("0.5", True)):
        for seed in (0, 1):
            for agg in ("soup", "ame_adam"):
                # α = 0.5: seed 1's AME run comes from another commit, torch and machine
                p = provenance(made_by=provenance()) if not (mixed and seed == 1 and agg == "ame_adam") else old
                write_run(tmp_path / "runs" / f"{alpha}{seed}{agg}", agg, seed, 0.5, [f"data.shards.alpha={alpha}",
                          f"seed={seed}", f"aggregator={agg}"], provenance=p)
    proc = run_main("make_tables", tmp_path / "runs", "--out", tmp_path / "t.md")
    md = (tmp_path / "t.md").read_text()
    same, other = md.split("### α = 0.5")
    line = ("- commit aaaaaaaaaaaa; ame 0.1.0, Python 3.11.7, torch 2.14.1, torchvision 0.29.1, numpy 2.4.6, "
            "timm 1.0.31; Xeon (AVX512), 2 cores; 1 thread: runs, experts, reference metrics")  # no base row: no base
    envs = lambda text: [x for x in text.splitlines() if x.startswith("- ")]  # noqa: E731
    assert envs(same) == [line] and "Where the numbers came from" in same
    assert envs(other) == [line, "- commit bbbbbbbbbbbb; ame 0.1.0, Python 3.11.7, torch 2.13.0, torchvision 0.29.1, "
                           "numpy 2.4.6, timm 1.0.31; EPYC (AVX512), 2 cores; 2 threads: runs, experts, "
                           "reference metrics"]
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("warning: ")]
    assert len(warnings) == 2 and all(w.startswith("warning: α = 0.5: numbers from ") for w in warnings), proc.stderr
    assert "2 different versions of the code" in warnings[0] and "different torch versions (2.14.1, 2.13.0)" in warnings[1]
    assert "% environment: commit bbbbbbbbbbbb;" in (tmp_path / "t.tex").read_text()
    # the CSV carries them: a table redrawn from it says the same, and warns the same
    again = run_main("make_tables", tmp_path / "t.csv", "--out", tmp_path / "again.md")
    assert (tmp_path / "again.md").read_text() == md and again.stderr == proc.stderr


def test_commits_that_ran_the_same_code_are_one_environment(tmp_path):
    """code_sha256: runs from commits that only added results share one line and raise no warning;
    another code is its own line and is warned about."""
    for i, (commit, code) in enumerate((("a" * 40, "c" * 64), ("b" * 40, "c" * 64), ("d" * 40, "e" * 64))):
        p = provenance(commit=commit, code_sha256=code)
        write_run(tmp_path / "runs" / str(i), "soup", i, 0.5, [f"seed={i}", "aggregator=soup"],
                  provenance={**p, "experts_made_by": [provenance(code_sha256="c" * 64)] * 2})
    same = run_main("make_tables", *[tmp_path / "runs" / str(i) for i in (0, 1)])
    envs = [x for x in same.stdout.splitlines() if x.startswith("- ")]
    assert envs == ["- 2 commits (commit aaaaaaaaaaaa, commit bbbbbbbbbbbb), code sha256 cccccccccccc; ame 0.1.0, "
                    "Python 3.11.7, torch 2.14.1, torchvision 0.29.1, numpy 2.4.6, timm 1.0.31; Xeon (AVX512), 2 cores; "
                    "1 thread: runs, experts, reference metrics"] and "warning" not in same.stderr
    other = run_main("make_tables", tmp_path / "runs")
    assert [x for x in other.stdout.splitlines() if x.startswith("- ")][1].startswith(
        "- commit dddddddddddd, code sha256 eeeeeeeeeeee;")
    assert "numbers from 2 different versions of the code (commit aaaaaaaaaaaa, commit bbbbbbbbbbbb; commit " \
           "dddddddddddd)" in other.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_runs_from_commits_this_checkout_has_are_grouped_by_their_code_read_from_git(tmp_path, monkeypatch):
    """A result that recorded no code_sha256 (older), or one under its first definition, from a
    commit without uncommitted changes gets the commit's code from git: commits that only added
    results are one version of the code; a commit that changed it is another; a recorded hash that
    is neither (untracked files, say) is kept."""
    from ame import analysis, provenance as prov

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "pkg" / "m.py").write_text("x = 1\n")
    git("init", "-q")
    commits = []
    for i, change in enumerate(("results", "results again", "code")):
        (repo / ("pkg/m.py" if change == "code" else f"r{i}.md")).write_text(f"{change}\n")
        git("add", ".")
        git("commit", "-qm", change)
        commits.append(git("rev-parse", "HEAD"))
    monkeypatch.setattr(prov, "SOURCE", repo / "pkg")
    analysis._code_at.cache_clear()
    recorded = ({}, {"code_sha256": prov.code_sha256_at(commits[1], first_definition=True)}, {})
    for i, (commit, extra) in enumerate(zip(commits, recorded)):  # none; the first definition's; none
        write_run(tmp_path / "runs" / str(i), "soup", i, 0.5, [f"seed={i}", "aggregator=soup"],
                  provenance=provenance(commit=commit, **extra))
    write_run(tmp_path / "untracked" / "0", "soup", 3, 0.5, ["seed=3", "aggregator=soup"],
              provenance=provenance(commit=commits[0], code_sha256="f" * 64))
    out = run_main("make_tables", tmp_path / "runs")
    analysis._code_at.cache_clear()
    first, third = prov.code_sha256_at(commits[0]), prov.code_sha256_at(commits[2])
    lines = [x for x in out.stdout.splitlines() if x.startswith("- ")]
    assert lines[0].startswith(f"- 2 commits (commit {commits[0][:12]}, commit {commits[1][:12]}), code sha256 "
                               f"{first[:12]};") and lines[1].startswith(f"- commit {commits[2][:12]}, code sha256 "
                                                                          f"{third[:12]};") and len(lines) == 2
    assert f"numbers from 2 different versions of the code (commit {commits[0][:12]}, commit {commits[1][:12]}; " \
           f"commit {commits[2][:12]})" in out.stderr
    kept = run_main("make_tables", tmp_path / "runs" / "0", tmp_path / "untracked")
    assert "code sha256 ffffffffffff" in kept.stdout and "numbers from 2 different versions" in kept.stderr


def test_the_warning_counts_versions_of_the_code_not_environments():
    from ame.analysis import mismatches

    def env(commit, code, torch_version="2.14.1"):
        e = {k: v for k, v in provenance(commit=commit * 40, torch_version=torch_version, code_sha256=code).items()
             if not k.endswith("made_by")}
        return {"environment": e, "roles": ["runs"], "codes": [f"commit {commit * 12}"]}

    same_code_other_torch = [env("a", "c" * 64), env("b", "c" * 64, "2.13.0"), env("d", "e" * 64)]
    assert mismatches(same_code_other_torch) == [
        "numbers from 2 different versions of the code (commit aaaaaaaaaaaa, commit bbbbbbbbbbbb; commit dddddddddddd)",
        "numbers from different torch versions (2.14.1, 2.13.0)"]
    assert mismatches([env("a", "c" * 64), env("a", None)]) == []  # the hash unreadable once: the commit tells


def test_numbers_without_provenance_say_so(tmp_path):
    write_run(tmp_path / "old", "soup", 0, 0.5, ["seed=0", "aggregator=soup"])  # results from before provenance
    out = run_main("make_tables", tmp_path)
    assert "- not recorded (made before results recorded their provenance): runs" in out.stdout
    assert "warning" not in out.stderr  # all alike: nothing to tell apart
    # experts from an older cache, a run that records its own environment: cannot tell, says so
    p = provenance()
    p["experts_made_by"], p["base_made_by"] = [None, None], None
    write_run(tmp_path / "new", "ame_adam", 0, 0.6, ["seed=0", "aggregator=ame_adam"], provenance=p)
    out = run_main("make_tables", tmp_path / "new")
    assert out.stdout.count("\n- ") == 2 and "- not recorded (made before results recorded their provenance): " \
        "experts" in out.stdout
    assert "warning: default settings: some numbers record no provenance (experts: older results or cache " \
           "entries); cannot tell whether they match" in out.stderr
    plain = tmp_path / "plain.csv"  # a CSV from before environments were recorded: no lines, no warning
    plain.write_text("setting,network,runs,id/acc_mean,id/acc_std\n,soup,1,0.5,\n")
    out = run_main("make_tables", plain)
    assert "came from" not in out.stdout and not out.stderr


def seeds_tree(root, accs, agg="ame_adam", p=None):
    """Runs of the soup and one aggregator per seed: ``accs`` the aggregator's accuracy per seed."""
    for seed, acc in enumerate(accs):
        for name, a in (("soup", 0.5 + 0.01 * seed), (agg, acc)):
            write_run(root / f"{name}{seed}", name, seed, a, [f"seed={seed}", f"aggregator={name}"],
                      provenance=p or provenance())


def test_compare_results_flags_differences_larger_than_the_seed_spread(tmp_path):
    seeds_tree(tmp_path / "a", [0.60, 0.62, 0.64])  # AME's seed std: 2 points
    seeds_tree(tmp_path / "same", [0.60, 0.62, 0.64])
    same = run_main("compare_results", tmp_path / "a", tmp_path / "same")
    assert same.returncode == 0 and "48 values compared over 4 rows × 3 seeds: 48 identical, 0 differ" in same.stdout
    assert same.stdout.startswith("A: results tree") and "seeds 0, 1, 2" in same.stdout
    # seed 0 moved by 0.5 points; the yardstick pools both sides' stds: √((2² + 1.756²)/2) = 1.88 points
    seeds_tree(tmp_path / "near", [0.605, 0.62, 0.64], p=provenance(cpu="EPYC"))
    near = run_main("compare_results", tmp_path / "a", tmp_path / "near")
    assert near.returncode == 0 and "EPYC (AVX512)" in near.stdout
    diffs = [x.strip() for x in near.stdout.splitlines() if "Δ" in x]
    assert diffs == ["AME-Adam, seed 0, ID acc: 60.00 → 60.50 (Δ +0.500; seed std 1.88): within the seed spread",
                     "AME-Adam, seed 0, OOD acc: 30.00 → 30.25 (Δ +0.250; seed std 0.94): within the seed spread",
                     "AME-Adam, seed 0, worst shard: 15.00 → 15.12 (Δ +0.125; seed std 0.47): within the seed spread"]
    seeds_tree(tmp_path / "far", [0.60, 0.62, 0.70])  # seed 2 moved by 6 points; the spread: √((2² + 5.29²)/2) = 4
    far = run_main("compare_results", tmp_path / "a", tmp_path / "far")
    assert far.returncode == 1
    line = next(x for x in far.stdout.splitlines() if "seed 2, ID acc" in x)
    assert line.strip() == "AME-Adam, seed 2, ID acc: 64.00 → 70.00 (Δ +6.000; seed std 4.00): LARGER than the seed spread"
    assert "differ (3 by more than the seed spread, 0 with no spread to judge by)" in far.stdout


def test_compare_results_takes_a_summary_csv_and_names_rows_on_one_side_only(tmp_path):
    seeds_tree(tmp_path / "a", [0.60, 0.62, 0.64])
    run_main("make_tables", tmp_path / "a", "--out", tmp_path / "t.md")
    seeds_tree(tmp_path / "b", [0.61], agg="ame_adagrad")  # one seed, and another aggregator
    write_run(tmp_path / "b" / "adam0", "ame_adam", 0, 0.55, ["seed=0", "aggregator=ame_adam"], provenance=provenance())
    out = run_main("compare_results", tmp_path / "t.csv", tmp_path / "b")
    assert out.returncode == 1 and out.stdout.startswith("A: summary CSV")
    assert "AME-Adam, mean of 3/1 runs, ID acc: 62.00 → 55.00 (Δ -7.000; seed std 2.00): LARGER than the seed " \
           "spread" in out.stdout
    assert "soup, mean of 3/1 runs, ID acc: 51.00 → 50.00 (Δ -1.000; seed std 1.00): within" in out.stdout
    assert "only in B: default settings: AME-Adagrad" in out.stdout
    bad = script_process("compare_results.py", tmp_path / "t.csv", tmp_path / "nowhere", check=False)  # the command line
    errors = [x for x in bad.stderr.splitlines() if x.startswith("error: ")]
    assert bad.returncode == 2 and len(errors) == 1 and "no results.json under" in errors[0], bad.stderr


def test_nested_stat_is_the_mean_of_base_means_with_the_within_base_t_interval():
    from scipy.stats import t

    from ame.analysis import Stat

    s = Stat.nested([[1.0, 3.0], [10.0, 12.0, 14.0]])  # base means 2 and 12; within-base deviations ±1, ±2, 0
    assert s.mean == 7.0 and s.n == 5
    sw = ((1 + 1 + 4 + 0 + 4) / 3) ** 0.5  # pooled over n − B = 3 degrees of freedom
    assert abs(s.std - sw) < 1e-12
    assert abs(s.ci95() - t.ppf(0.975, 3) * sw * (1 / 2 + 1 / 3) ** 0.5 / 2) < 1e-12
    assert Stat.nested([[1.0, 3.0]]) == Stat.of([1.0, 3.0])  # one base: the ordinary t interval
    assert Stat.nested([[1.0], [3.0]]).ci95() is None  # no within-base spread to measure


def two_bases_tree(root, seeds=(0, 1)):
    """Two bases (ID 80 %, 90 %) × expert seeds: the soup 2 points below its base for seed 0, at it
    otherwise; task arithmetic 1 + seed points above the soup."""
    n = 0
    for b, base_acc in (("0", 0.80), ("1", 0.90)):
        for seed in seeds:
            dsoup = -0.02 if seed == 0 else 0.0
            for agg, dm in (("soup", 0.0), ("task_arithmetic", 0.01 + 0.01 * seed)):
                d = root / str(n)
                n += 1
                write_run(d, agg, seed, base_acc + dsoup + dm, [f"base_seed={b}", f"seed={seed}", f"aggregator={agg}"],
                          experts=(f"{b}a{seed}", f"{b}b{seed}"), soup_acc=base_acc + dsoup)
                r = json.loads((d / "results.json").read_text())
                r["base"] = {**r["soup"], "id/acc": base_acc}
                if agg == "task_arithmetic":
                    r["metrics"]["dist/pivot"] = 0.1 + 0.1 * seed + (0.5 if b == "1" else 0.0)  # base 1's move longer
                (d / "results.json").write_text(json.dumps(r))


def test_paired_with_the_soup_and_the_base_over_two_bases(tmp_path):
    """Two bases × two expert sets: Δ vs the base and vs the soup, the base a factor (not a setting)."""
    import csv

    from ame.analysis import Stat

    two_bases_tree(tmp_path / "runs")
    out = tmp_path / "t.md"
    script("make_tables.py", tmp_path / "runs", "--out", out)
    md = out.read_text()
    assert "###" not in md  # base_seed is not a setting
    assert "mean ± std over 4 expert sets on 2 bases" in md  # not "4 seeds": two seeds on each base
    paired = md.split("Paired with the soup")[1]
    want = Stat.nested([[1.0, 2.0], [1.0, 2.0]])  # TA − soup in points: 1, 2 per base
    assert f"| task arithmetic | {100 * want.mean / 100:.2f} ± {want.ci95():.2f} |" in paired
    # TA − base: (−2 + 1, 0 + 2) per base = (−1, 2): mean 0.5; soup − base: (−2, 0)
    ta = next(line for line in paired.splitlines() if line.startswith("| task arithmetic"))
    soup = next(line for line in paired.splitlines() if line.startswith("| soup |"))
    base = next(line for line in paired.splitlines() if line.startswith("| base (warm start)"))
    header = [c.strip() for c in next(ln for ln in paired.splitlines() if ln.startswith("| network")).strip("|").split("|")]
    cell = lambda line, name: [c.strip() for c in line.strip("|").split("|")][header.index(name)]  # noqa: E731
    assert cell(ta, "Δ ID vs base").startswith("0.50 ± ") and cell(soup, "Δ ID vs base").startswith("-1.00 ± ")
    assert cell(soup, "Δ ID vs soup") == "" and cell(base, "Δ ID vs base") == "" and cell(base, "Δ ID vs soup").startswith("1.00")
    dist = Stat.nested([[0.1, 0.2], [0.6, 0.7]])  # like the Δs: the within-base spread (0.07), not all four's (0.29)
    assert cell(ta, "dist. to pivot") == f"{dist.mean:.2f} ± {dist.std:.2f}" == "0.40 ± 0.07"
    rows = {r["network"]: r for r in csv.DictReader(open(out.with_suffix(".csv")))}
    assert abs(float(rows["task arithmetic"]["vs_soup/id/acc_ci95"]) - want.ci95() / 100) < 1e-12
    again = tmp_path / "again.md"  # read back from the CSV: the same table, intervals included
    script("make_tables.py", out.with_suffix(".csv"), "--out", again)
    assert again.read_text() == md
    png, each = tmp_path / "d.png", tmp_path / "each.png"
    script("make_figures.py", "deltas", out.with_suffix(".csv"), "--out", png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    script("make_figures.py", "deltas", tmp_path / "runs", "--out", each)  # results trees: each set's circles too
    assert each.read_bytes()[:4] == b"\x89PNG"
    from ame.analysis import load, summarize

    fig = importlib.import_module("scripts.make_figures").deltas_figure(summarize(load([tmp_path / "runs"])))
    ax = fig.axes[2]  # Δ ID vs base
    assert ax.get_title() == "Δ ID vs base"
    circles = sorted(round(float(x), 6) for line in ax.get_lines() if line.get_markerfacecolor() == "none"
                     for x in line.get_xdata())
    assert circles == sorted([-2.0, 0.0, -2.0, 0.0] + [-1.0, 2.0, -1.0, 2.0])  # the soup's and TA's four sets, in points


def test_each_set_shows_every_expert_sets_delta_against_the_base(tmp_path):
    """--each-set: one column per expert set (bases, then seeds in numeric order), the Δs in points."""
    two_bases_tree(tmp_path, seeds=(0, 2, 10))
    md = script("make_tables.py", tmp_path, "--each-set").stdout
    plain = script("make_tables.py", tmp_path).stdout
    assert "Each expert set" not in plain and md.startswith(plain.split("Where the numbers")[0])
    ids = md.split("Each expert set (b = base_seed, s = seed), Δ ID vs base")[1].split("\n\n")[1].splitlines()
    assert ids[0] == "| network | b0 s0 | b0 s2 | b0 s10 | b1 s0 | b1 s2 | b1 s10 |"
    row = lambda name: next(ln for ln in ids if ln.startswith(f"| {name} |"))  # noqa: E731
    assert row("soup") == "| soup | -2.00 | 0.00 | 0.00 | -2.00 | 0.00 | 0.00 |"  # 0.00: exactly the base's
    assert row("task arithmetic") == "| task arithmetic | -1.00 | +3.00 | +11.00 | -1.00 | +3.00 | +11.00 |"
    assert not any(ln.startswith("| base (warm start)") for ln in ids)  # not against itself
    assert "Δ OOD vs base" in md.split("Δ ID vs base")[-1]
    script("make_tables.py", tmp_path, "--out", tmp_path / "t.md")
    err = script("make_tables.py", tmp_path / "t.csv", "--each-set", check=False)
    assert err.returncode != 0 and err.stderr.strip().startswith("error: --each-set needs results trees")


def test_contrast_pairs_two_rows_expert_set_by_expert_set(tmp_path):
    """--contrast ROWS COLUMNS: row minus column per expert set (the base cancels), pooled by base
    like the paired Δs; a pattern matching no row, or a summary CSV, is one error line."""
    from scipy.stats import t

    from ame.analysis import Stat

    two_bases_tree(tmp_path, seeds=(0, 2, 10))  # TA − soup: 1 + seed points in every set, on both bases
    md = script("make_tables.py", tmp_path, "--contrast", "^task", "^soup$").stdout
    assert "Δ ID, row minus column, paired over the expert sets both rows have (the base cancels); mean ± " \
        "half-width of the 95 % CI (Student t) over 6 expert sets on 2 bases." in md
    table = md.split("Δ ID, row minus column")[1].split("\n\n")[1].splitlines()
    want = Stat.nested([[1.0, 3.0, 11.0], [1.0, 3.0, 11.0]])
    sw = (2 * ((1 - 5) ** 2 + (3 - 5) ** 2 + (11 - 5) ** 2) / 4) ** 0.5  # within-base spread, 6 − 2 df
    assert abs(want.ci95() - t.ppf(0.975, 4) * sw * (2 / 3) ** 0.5 / 2) < 1e-12
    assert table == ["| row − column | soup |", "|---|---:|", f"| task arithmetic | 5.00 ± {want.ci95():.2f} |"]
    assert "Δ OOD, row minus column" in md and md.startswith(script("make_tables.py", tmp_path).stdout.split(
        "Where the numbers")[0])
    none = script("make_tables.py", tmp_path, "--contrast", "^AME", "soup", check=False)
    assert none.returncode == 1 and none.stderr.strip().startswith("error: --contrast '^AME' matches no row that "
                                                                   "has paired numbers; the rows are: base (warm start);")
    same = script("make_tables.py", tmp_path, "--contrast", "soup", "^soup$", check=False)
    assert same.returncode == 1 and "nothing to compare against" in same.stderr
    bad = script("make_tables.py", tmp_path, "--contrast", "(", "soup", check=False)
    assert bad.returncode == 1 and "is not a regular expression" in bad.stderr and bad.stderr.count("\n") == 1
    script("make_tables.py", tmp_path, "--out", tmp_path / "t.md")
    csv = script("make_tables.py", tmp_path / "t.csv", "--contrast", "^task", "soup", check=False)
    assert csv.returncode == 1 and csv.stderr.startswith("error: --contrast needs results trees")


def test_two_expert_sets_with_one_name_stay_apart_in_every_row(tmp_path):
    """Two expert sets both named s0 (two sweeps, no base_seed): each keeps its own column in every
    row, whatever order the runs come in and whichever rows lack a set."""
    for i, (experts, agg, soup, acc) in enumerate([(("a", "b"), "soup", 0.40, 0.40), (("c", "d"), "ties", 0.30, 0.15),
                                                   (("c", "d"), "soup", 0.30, 0.30), (("a", "b"), "ties", 0.40, 0.31),
                                                   (("c", "d"), "dare", 0.30, 0.32)]):  # dare: on the second set only
        write_run(tmp_path / str(i), agg, 0, acc, ["seed=0", f"aggregator={agg}"], experts=experts, soup_acc=soup)
    md = script("make_tables.py", tmp_path, "--each-set").stdout
    table = md.split("Each expert set (s = seed), Δ ID vs soup")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| network | s0 | s0 #2 |"  # the same base and seed: in the order the runs are read
    assert "| TIES | -9.00 | -15.00 |" in table and "| DARE |  | +2.00 |" in table


def test_best_trial_over_a_two_knob_grid_and_among_a_subset(tmp_path):
    grid = [(0.2, 1.0, 0.70), (0.5, 0.5, 0.80), (0.2, 0.5, 0.80), (0.5, 1.0, 0.60)]  # a tie: the smaller density
    for i, (density, scaling, acc) in enumerate(grid):
        d = tmp_path / str(i)
        (d / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"aggregator.density={density}", f"aggregator.scaling={scaling}"]),
                       d / ".hydra" / "overrides.yaml")
        (d / "results.json").write_text(json.dumps({"metrics": {"val/acc": acc}}))
    two = ["--param", "aggregator.density", "--param", "aggregator.scaling"]
    assert script("best_trial.py", tmp_path, *two).stdout.strip() == "aggregator.density=0.2 aggregator.scaling=0.5"
    # "the base or the soup": only the trials at these values of the first knob compete
    assert script("best_trial.py", tmp_path, "--param", "aggregator.scaling", "--among", "1").stdout.strip() == "1"
    assert "give comma-separated numbers" in script("best_trial.py", tmp_path, "--param", "aggregator.scaling",
                                                    "--among", "soup", check=False).stderr


def test_a_labelled_row_pools_runs_whose_chosen_values_differ(tmp_path):
    """Each expert set's own validation choice (+label=...): one row, not one per chosen value."""
    for seed, lam in ((0, "0.25"), (1, "0.5")):
        for agg, over, acc in (("soup", [], 0.5), ("task_arithmetic", [f"aggregator.scaling={lam}",
                                                                       "+label=task arithmetic (λ tuned)"], 0.6)):
            d = tmp_path / f"{agg}{seed}"
            write_run(d, agg, seed, acc + seed / 10, [f"seed={seed}", f"aggregator={agg}", *over],
                      soup_acc=0.5 + seed / 10)
    out = script("make_tables.py", tmp_path).stdout
    assert "| task arithmetic (λ tuned) | 65.00 ± 7.07 |" in out and "scaling" not in out
