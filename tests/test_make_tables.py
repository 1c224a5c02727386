"""scripts/make_tables.py on a synthetic multirun tree: grouping by overrides, mean ± std over seeds."""
from __future__ import annotations

import json
import subprocess
import sys

from omegaconf import OmegaConf

from tests.conftest import ROOT


def write_run(d, aggregator, seed, acc, overrides, experts=("a", "b")):
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    m = {"id/acc": acc, "id/nll": 1.0, "ood/acc": acc / 2, "shard/min_acc": acc / 4, "dist/pivot": 0.5, "dist/soup": 0.25}
    ex = [{"path": f"{seed}/{p}", "shard_size": 10, "id/acc": 0.1 * (i + 1), "id/nll": 2.0} for i, p in enumerate(experts)]
    (d / "results.json").write_text(json.dumps({"aggregator": aggregator, "metrics": m, "soup": m, "base": None,
                                                "experts": ex}))


def test_tables_group_by_setting_and_average_over_seeds(tmp_path):
    n = 0
    for alpha in ("0.1", "0.5"):
        for seed, acc in ((0, 0.5), (1, 0.7)):
            for agg in ("soup", "ame_adam"):
                write_run(tmp_path / str(n), agg, seed, acc if agg == "soup" else acc + 0.1,
                          [f"data.shards.alpha={alpha}", f"seed={seed}", f"aggregator={agg}"])
                n += 1
    write_run(tmp_path / str(n), "ame_adam", 0, 0.9, ["data.shards.alpha=0.1", "seed=0", "aggregator=ame_adam",
                                                     "aggregator.optimizer.lr=0.1"])
    out = subprocess.run([sys.executable, str(ROOT / "scripts/make_tables.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("### data.shards.alpha=") == 2
    first = out.split("### data.shards.alpha=0.5")[0]
    assert "| soup (aggregate) | 60.00 ± 14.14 |" in first
    assert "| ame_adam (aggregate) | 70.00 ± 14.14 |" in first
    assert "| ame_adam (aggregate, aggregator.optimizer.lr=0.1) | 90.00 |" in first
    assert "| experts (best ID) | 20.00 ± 0.00 |" in first
    again = subprocess.run([sys.executable, str(ROOT / "scripts/make_tables.py"), str(tmp_path)],
                           capture_output=True, text=True, check=True).stdout
    assert again == out


def test_out_writes_markdown_latex_and_csv_with_the_same_numbers(tmp_path):
    import csv

    for seed, acc in ((0, 0.5), (1, 0.7)):
        write_run(tmp_path / "runs" / str(seed), "soup", seed, acc, [f"seed={seed}", "aggregator=soup"])
    subprocess.run([sys.executable, str(ROOT / "scripts/make_tables.py"), str(tmp_path / "runs"),
                    "--out", str(tmp_path / "t.md")], check=True)
    assert "| soup (aggregate) | 60.00 ± 14.14 |" in (tmp_path / "t.md").read_text()
    assert "soup (aggregate) & 60.00 $\\pm$ 14.14 &" in (tmp_path / "t.tex").read_text().replace("\\_", "_")
    rows = {r["network"]: r for r in csv.DictReader(open(tmp_path / "t.csv"))}
    assert float(rows["soup (aggregate)"]["id/acc_mean"]) == 0.6 and rows["soup (aggregate)"]["runs"] == "2"
