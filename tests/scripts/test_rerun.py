"""scripts/rerun.py end to end: two finished runs rerun with the same code are identical run by run
(weights and every metric), a changed number or weight is reported as a difference, a second call
reruns nothing, and an --out inside the input is one error line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]


def rerun(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "AME_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "rerun.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_rerun_says_run_by_run_whether_weights_and_metrics_stay(tmp_path, run_cli, fast):
    run_cli(["-m", *fast, "data.shards.num_shards=2", "aggregator=soup,ame_adam"], tmp_path,
            out="runs")
    runs = tmp_path / "runs"
    done = rerun(tmp_path, runs, "--out", tmp_path / "again")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| 0 |", "| 1 |"))]
    assert len(rows) == 2 and all(r.endswith("| identical | 0 |") for r in rows), done.stdout
    assert "2 runs: 2 identical, 0 differ, 0 failed to rerun" in done.stdout
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("run.log")}
    assert len(logs) == 2

    # the old runs' numbers and weights changed by hand: reported, and nothing is run again
    old = tmp_path / "old"
    shutil.copytree(runs, old)
    soup, adam = (next(p.parent for p in old.rglob("results.json")
                       if f"aggregator={a}\n" in (p.parent / ".hydra" / "overrides.yaml").read_text())
                  for a in ("soup", "ame_adam"))
    results = json.loads((soup / "results.json").read_text())
    results["metrics"]["id/acc"] += 0.01
    (soup / "results.json").write_text(json.dumps(results))
    weights = load_file(str(adam / "aggregate.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-6
    save_file(weights, str(adam / "aggregate.safetensors"))
    shutil.copytree(tmp_path / "again", tmp_path / "again_old")
    differ = rerun(tmp_path, old, "--out", tmp_path / "again_old")
    assert differ.returncode == 1
    by_run = {r.split(" | ")[0][2:]: r for r in differ.stdout.splitlines() if r.startswith(("| 0 |", "| 1 |"))}
    assert by_run[soup.name].endswith("| identical | 0.01 |") and by_run[adam.name].endswith("| differ | 0 |")
    assert "2 runs: 0 identical, 2 differ, 0 failed to rerun" in differ.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("run.log")} == logs

    inside = rerun(tmp_path, runs, "--out", runs / "again")
    assert inside.returncode == 2 and inside.stderr.strip().count("\n") == 0
    assert inside.stderr.startswith("error: --out") and "overlaps the input" in inside.stderr
    assert not (runs / "again").exists()
    assert torch.equal(load_file(str(adam / "aggregate.safetensors"))[name], weights[name])
