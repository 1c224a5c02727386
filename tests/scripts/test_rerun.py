"""scripts/rerun.py end to end: two finished runs (job folders named by their overrides, as the
experiments name them) rerun with the same code are identical run by run (weights and every
metric); a changed number or weight is reported as a difference; a second call reruns nothing; bad
inputs (an --out inside the input, extras that move the reruns, a rerun made with other overrides)
are one error line before anything runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]


def rerun(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "AME_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "rerun.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def rows(proc) -> dict[str, str]:
    return {line.split(" | ")[0][2:]: line for line in proc.stdout.splitlines() if line.startswith("| aggregator=")}


def mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("run.log")}


def test_rerun_says_run_by_run_whether_weights_and_metrics_stay(tmp_path, run_cli, fast):
    run_cli(["-m", *fast, "data.shards.num_shards=2", "aggregator=soup,ame_adam",
             "hydra.sweep.subdir=${hydra.job.override_dirname}"], tmp_path, out="runs")
    runs = tmp_path / "runs"
    soup, adam = (next(d for d in runs.iterdir() if d.name.startswith(f"aggregator={a},")) for a in ("soup", "ame_adam"))
    assert "," in soup.name and "=" in soup.name  # characters Hydra's override grammar would parse

    done = rerun(tmp_path, runs, soup, "--out", tmp_path / "again")  # the soup twice (nested inputs): once
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(rows(done)) == {soup.name, adam.name} and (tmp_path / "again" / soup.name / "results.json").is_file()
    assert all(r.endswith(" | identical | 0 | cached |") for r in rows(done).values()), done.stdout
    assert "2 runs: 2 identical, 0 differ, 0 failed to rerun; 0 aggregates evaluated again" in done.stdout
    assert "warning" not in done.stdout and "this checkout: " in done.stdout.splitlines()[0]
    assert "The reruns recorded code sha256 " in done.stdout and ": 2 runs)." in done.stdout

    # a search trial's recorded config asks for a sweep (hydra.mode: MULTIRUN): rerun as one run, into
    # --out; with the aggregates' evaluations no longer cached, they are evaluated again
    trial = tmp_path / "trial" / soup.name
    shutil.copytree(soup, trial)
    (trial / ".hydra" / "overrides.yaml").write_text(
        (soup / ".hydra" / "overrides.yaml").read_text() + "- hparams_search=ame_lr\n- data.val_size=20\n")
    shutil.rmtree(tmp_path / "cache" / "aggregates")
    again = rerun(tmp_path, trial, "--out", tmp_path / "again_trial")
    assert (tmp_path / "again_trial" / soup.name / "results.json").is_file(), again.stdout + again.stderr
    assert rows(again)[soup.name].endswith(" | again |") and "1 aggregates evaluated again" in again.stdout

    # the old runs' numbers and weights changed by hand: reported; the reruns there are not run again
    old = tmp_path / "old"
    shutil.copytree(runs, old)
    results = json.loads((old / soup.name / "results.json").read_text())
    results["metrics"]["id/acc"] += 0.01
    (old / soup.name / "results.json").write_text(json.dumps(results))
    weights = load_file(str(old / adam.name / "aggregate.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-6
    save_file(weights, str(old / adam.name / "aggregate.safetensors"))
    shutil.copytree(tmp_path / "again", tmp_path / "again_old")
    before = mtimes(tmp_path / "again_old")
    differ = rerun(tmp_path, old, "--out", tmp_path / "again_old")
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert " | identical | 0.01 | " in rows(differ)[soup.name] and " | differ | 0 | " in rows(differ)[adam.name]
    assert "2 runs: 0 identical, 2 differ, 0 failed to rerun" in differ.stdout
    assert mtimes(tmp_path / "again_old") == before and len(before) == 2

    for args, words in (((runs, "--out", runs / "again"), "overlaps the input"),
                        ((runs, "--out", tmp_path / "x", "--", "hydra.run.dir=/tmp/y"), "would move the reruns"),
                        ((runs, "--out", tmp_path / "again", "--", "eval.test_subsample=10"), "with other overrides"),
                        ((tmp_path / "logger=none", "--out", tmp_path / "x"), "(overrides go after --)")):
        bad = rerun(tmp_path, *args)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
        assert words in bad.stderr and bad.stdout == ""
    assert not (runs / "again").exists() and not (tmp_path / "x").exists()


def test_differences_order_and_folders_hydra_would_misread(tmp_path):
    import importlib
    import math

    import pytest

    from ame.errors import AMEError

    rerun_py = importlib.import_module("scripts.rerun")
    assert rerun_py.difference(1.0, 1.0) == rerun_py.difference(math.nan, math.nan) == 0.0
    assert rerun_py.difference(math.nan, 0.5) == rerun_py.difference(0.5, math.inf) == math.inf
    assert rerun_py.difference(0.25, 0.5) == 0.25
    for name in ("10", "2", "soup", "0"):  # job numbers and named folders side by side
        (tmp_path / "in" / name / ".hydra").mkdir(parents=True)
        (tmp_path / "in" / name / "results.json").write_text('{"metrics": {}}')
        (tmp_path / "in" / name / ".hydra" / "overrides.yaml").write_text("[]")
    assert [d.name for d in rerun_py.runs(tmp_path / "in")] == ["0", "2", "10", "soup"]
    (tmp_path / "in" / "a\\b" / ".hydra").mkdir(parents=True)
    (tmp_path / "in" / "a\\b" / "results.json").write_text('{"metrics": {}}')
    (tmp_path / "in" / "a\\b" / ".hydra" / "overrides.yaml").write_text("[]")
    with pytest.raises(AMEError, match="a backslash"):
        rerun_py.plan([tmp_path / "in"], tmp_path / "out", [])
    with pytest.raises(AMEError, match="would move the reruns"):
        rerun_py.plan([tmp_path / "in"], tmp_path / "out", ["hydra.mode=MULTIRUN"])
