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


def test_fig1_series_average_seeds_per_line_and_the_png_is_deterministic(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_figures import series
    from make_tables import load

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
    assert list(s["ame_adagrad"]) == [(2.0, "lr=0.01"), (2.0, "lr=0.1"), (4.0, "lr=0.01"), (4.0, "lr=0.1")]
    xs, ys, runs = zip(*s["ame_adagrad"][(4.0, "lr=0.1")])
    assert xs == (1.0, 2.0, 4.0) and runs == (2, 2, 2)
    assert [round(y, 6) for y in ys] == [0.57, 0.58, 0.6]  # 0.4 + 0.01 e + 0.05 + 0.1 + mean seed bonus 0.01
    pngs = []
    for name in ("a.png", "b.png"):
        subprocess.run([sys.executable, str(ROOT / "scripts/make_figures.py"), "fig1", str(tmp_path / "runs"),
                        "--out", str(tmp_path / name)], check=True, capture_output=True)
        pngs.append((tmp_path / name).read_bytes())
    assert pngs[0][:8] == b"\x89PNG\r\n\x1a\n" and pngs[0] == pngs[1]
    subprocess.run([sys.executable, str(ROOT / "scripts/make_figures.py"), "bars", str(tmp_path / "runs"),
                    "--out", str(tmp_path / "bars.png")], check=True, capture_output=True)
    assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"


def test_fig1_refuses_to_average_runs_from_different_settings(tmp_path):
    for i, data in enumerate(("cifar10_shards", "gld23k")):
        write_run(tmp_path / str(i), "soup", 0, 0.5, [f"data={data}", "data.shards.num_shards=2", "train.epochs=1",
                                                      "aggregator=soup"])
    out = subprocess.run([sys.executable, str(ROOT / "scripts/make_figures.py"), "fig1", str(tmp_path),
                          "--out", str(tmp_path / "f.png")], capture_output=True, text=True)
    assert out.returncode != 0 and "several settings" in out.stderr and not (tmp_path / "f.png").exists()


def test_aggregator_rows_put_the_soups_first_whatever_the_folder_names(tmp_path):
    for name in ("ame_adagrad", "ame_adam", "weighted_soup", "soup"):  # alphabetical folders: ame_* first
        write_run(tmp_path / f"aggregator={name}", name, 0, 0.5, [f"aggregator={name}"])
    out = subprocess.run([sys.executable, str(ROOT / "scripts/make_tables.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split(" (aggregate")[0].strip("| ") for line in out.splitlines() if "(aggregate" in line]
    assert rows == ["soup", "weighted_soup", "ame_adam", "ame_adagrad"]
