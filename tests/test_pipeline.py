"""End to end: the results contract, cached experts across a multirun, the W&B offline run,
bring-your-own experts, and one clear line for each bad input. ``run.py`` runs in a subprocess
where the test is about the command line (the shared ``default_run``, multiruns, sweepers,
``--help``); elsewhere the pipeline runs in process (``run_pipeline``)."""
from __future__ import annotations


from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ame.errors import AMEError
from ame.io import save_state_dict

METRIC_KEYS = {"id/acc", "id/nll", "ood/acc", "ood/gaussian_noise/acc", "ood/contrast/acc"}


def test_default_run_writes_the_results_contract(default_run, read_results):
    tmp, proc = default_run
    r = read_results(tmp / "out")
    assert r["aggregator"] == "ame_adam" and r["data_free"] is True and r["experts_cached"] is False
    assert r["tuned_on_validation"] is False and r["single_network"] is True and r["align"] is None
    for block in (r["metrics"], r["soup"], r["base"], *r["experts"]):
        assert METRIC_KEYS <= block.keys()
        assert 0 <= block["id/acc"] <= 1 and block["id/nll"] > 0
    assert len(r["experts"]) == 3 and all(e["shard_size"] > 0 and e["path"].endswith(".safetensors")
                                          for e in r["experts"])
    assert {"shard/own_acc", "shard/other_acc", "shard/min_acc"} <= r["experts"][0].keys()
    # each expert against the base on its own shard's mix; the base's worst shard is the lowest of those
    assert min(e["shard/base_own_acc"] for e in r["experts"]) == pytest.approx(r["base"]["shard/min_acc"])
    assert all(e["shard/own_gain"] == pytest.approx(e["shard/own_acc"] - e["shard/base_own_acc"]) for e in r["experts"])
    assert {"dist/soup", "dist/pivot", "dist/scale"} <= r["metrics"].keys()
    assert set(r["timings_s"]) == {"data", "shards", "experts", "aggregate", "evaluate"}
    sd = load_file(str(tmp / "out" / "aggregate.safetensors"))
    assert sd.keys() == load_file(r["experts"][0]["path"]).keys()
    assert "soup" in proc.stdout and "ame_adam (aggregate)" in proc.stdout  # the printed table
    assert "it/s" not in proc.stderr + proc.stdout and "\r" not in proc.stderr  # progress bars stay quiet in logs
    assert r["metrics"]["id/acc"] > 0.5  # digits experts are far above chance (0.1) even when tiny


def test_results_say_where_they_came_from(default_run, read_results):
    tmp, _ = default_run
    r = read_results(tmp / "out")
    p = r["provenance"]
    assert {"run_id", "started", "version", "commit", "dirty", "diff_sha256", "python", "torch", "torchvision",
            "numpy", "timm", "device", "threads", "deterministic", "host"} <= p.keys()
    assert p["version"] == "0.1.0" and p["torch"] == torch.__version__ and p["python"].count(".") == 2
    assert all(isinstance(p[k], str) for k in ("run_id", "started", "torchvision", "numpy", "timm", "host"))
    assert isinstance(p["threads"], int) and p["threads"] >= 1 and isinstance(p["deterministic"], bool)
    assert p["started"].endswith("+00:00")  # ISO, UTC
    if p["commit"] is not None:  # a git checkout (the repository's own tests run from one)
        assert len(p["commit"]) == 40 and isinstance(p["dirty"], bool) and (p["diff_sha256"] is None) != p["dirty"]
    d = p["device"]
    assert isinstance(d["cpu"], str) and isinstance(d["cores"], int) and d["gpu"] is None  # debug=fast: CPU
    # this run trained its experts and base and computed the reference metrics: it made them
    own = {k: v for k, v in p.items() if not k.endswith("_made_by")}
    assert p["experts_made_by"] == [own] * 3 and p["base_made_by"] == own and p["reference_metrics_made_by"] == own
    assert p["aggregate_metrics_made_by"] == own
    assert set(r["timings_s"]) <= {"data", "shards", "experts", "align", "aggregate", "bn_reset", "evaluate"}
    assert len(r["data"]["fingerprint"]) == 16


def test_a_run_reusing_the_cache_says_which_run_made_its_experts_and_base(default_run, tmp_path, fast, read_results,
                                                                          run_pipeline):
    tmp, _ = default_run
    first = read_results(tmp / "out")
    r = run_pipeline(fast, tmp_path, cache=tmp / "cache")  # default_run's cache, in this process
    p, made = r["provenance"], {k: v for k, v in first["provenance"].items() if not k.endswith("_made_by")}
    assert r["experts_cached"] is True and p["run_id"] != made["run_id"]
    assert p["experts_made_by"] == [made] * 3 and p["base_made_by"] == made and p["reference_metrics_made_by"] == made
    assert p["aggregate_metrics_made_by"] == made  # evaluated by the first run, taken from the cache
    assert r["metrics"] == first["metrics"]


def test_a_rerun_takes_the_aggregates_evaluation_from_the_cache_keyed_by_its_weights(default_run, tmp_path, fast,
                                                                                      run_pipeline):
    """A resumed sweep evaluates nothing twice: the aggregate's metrics are cached under its weights'
    bytes. A planted value proves the rerun read them; other weights (the soup) are evaluated."""
    import shutil

    from ame.cache import Entry

    tmp, _ = default_run
    cache = tmp_path / "cache"
    shutil.copytree(tmp / "cache", cache)  # default_run's cache, unchanged for the other tests
    (root,) = [d for d in (cache / "aggregates").glob("*") if d.is_dir()]  # the default run's aggregate
    entry = Entry(cache, "aggregates", root.name)
    planted = entry.load_json("metrics.json")
    planted["metrics"]["id/acc"] = 0.125
    entry.put_json("metrics.json", planted)
    r = run_pipeline(fast, tmp_path, cache=cache)
    assert r["metrics"]["id/acc"] == 0.125 and r["metrics"]["dist/pivot"] is not None  # distances: computed
    soup = run_pipeline([*fast, "aggregator=soup"], tmp_path, out="soup", cache=cache)
    assert soup["metrics"]["id/acc"] == soup["soup"]["id/acc"] != 0.125
    assert len([d for d in (cache / "aggregates").glob("*") if d.is_dir()]) == 2


def test_the_same_config_on_the_same_machine_gives_the_same_results(default_run, tmp_path, fast, read_results,
                                                                    run_pipeline):
    """README, Reproducibility: bit-exact on one machine and set of versions. Here from an empty
    cache: the base and the experts are trained again, everything is evaluated again."""
    tmp, _ = default_run
    first = read_results(tmp / "out")
    r = run_pipeline(fast, tmp_path)  # in this process (default_run: a run.py process)
    assert r["experts_cached"] is False and r["provenance"]["run_id"] != first["provenance"]["run_id"]
    for key in ("metrics", "soup", "base", "ensemble", "data"):
        assert r[key] == first[key], key
    assert [{k: v for k, v in e.items() if k != "path"} for e in r["experts"]] == \
        [{k: v for k, v in e.items() if k != "path"} for e in first["experts"]]
    assert (tmp_path / "out" / "aggregate.safetensors").read_bytes() == (tmp / "out" / "aggregate.safetensors").read_bytes()


def test_run_log_holds_the_stages_the_epochs_and_the_table(default_run, read_results):
    tmp, proc = default_run
    text = (tmp / "out" / "run.log").read_text()
    for line in ("data done in", "shards done in", "experts done in", "aggregate done in", "evaluate done in",
                 "warm base epoch 3/3: loss", "expert 2 epoch 3/3: loss", "evaluated expert 1: ID",
                 "ID acc", "ame_adam (aggregate)"):
        assert line in text, line
    r = read_results(tmp / "out")
    row = next(line for line in text.splitlines() if line.startswith("ame_adam (aggregate)"))
    assert f"{100 * r['metrics']['id/acc']:.2f}" in row.split()  # percents, as in the tables


def wandb_records(run_dir) -> list[dict]:
    """The records of an offline W&B run, read back by wandb's own reader (no server)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_wandb_offline_run_reads_back_with_config_summary_history_and_artifacts(default_run, read_results):
    tmp, _ = default_run
    runs = list((tmp / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = wandb_records(runs[0])
    run = next(r["run"] for r in records if r["type"] == "run")
    config = {k: v for k, v in run["config"]["update"].items() if k != "_wandb"}
    assert config["aggregator"]["optimizer"]["lr"] == 0.001 and config["task_name"] == "debug"
    assert config["overrides"] == ["debug=fast"]
    assert "_target_" not in str(config) and "_partial_" not in str(config) and "output_dir" not in str(config)
    r = read_results(tmp / "out")
    assert config["provenance"]["run_id"] == r["provenance"]["run_id"] and "dirname_exclude" not in config
    assert config["provenance"]["torch"] == r["provenance"]["torch"] == torch.__version__
    assert run["job_type"] == "ame_adam" and run["run_group"] == "debug" and run["display_name"] == "debug=fast"
    summary = {}
    for rec in records:
        if rec["type"] == "summary":
            summary.update(rec["summary"].get("update", {}))
    assert summary["aggregate/id/acc"] == r["metrics"]["id/acc"] and summary["soup/ood/acc"] == r["soup"]["ood/acc"]
    assert summary["base/id/acc"] == r["base"]["id/acc"] and summary["ensemble/id/nll"] == r["ensemble"]["id/nll"]
    assert summary["expert_2/shard/own_acc"] == r["experts"][2]["shard/own_acc"]
    assert summary["timings_s/evaluate"] == r["timings_s"]["evaluate"] and summary["data_free"] is True
    history = [rec["history"]["item"] for rec in records if rec["type"] == "history"]
    base = [h for h in history if "warm_base/loss" in h]
    assert [h["warm_base/epoch"] for h in base] == [1, 2, 3] and all(0 <= h["warm_base/acc"] <= 1 for h in base)
    assert [h["expert_1/epoch"] for h in history if "expert_1/loss" in h] == [1, 2, 3]
    ame = [h for h in history if "ame/dist_soup" in h]  # one ensembling epoch over 3 experts: steps 0..3
    assert [h["ame/step"] for h in ame] == [0, 1, 2, 3] and ame[0]["ame/dist_pivot"] == 0
    assert abs(ame[-1]["ame/dist_soup"] - r["metrics"]["dist/soup"]) < 1e-5
    assert abs(ame[-1]["ame/dist_pivot"] - r["metrics"]["dist/pivot"]) < 1e-5
    artifacts = {a["artifact"]["type"]: a["artifact"] for a in records if a["type"] == "artifact"}
    assert {"results", "model"} <= artifacts.keys()
    assert [c["path"] for c in artifacts["model"]["manifest"]["contents"]] == ["aggregate.safetensors"]
    assert [c["path"] for c in artifacts["results"]["manifest"]["contents"]] == ["results.json"]
    assert next(rec for rec in records if rec["type"] == "exit")["exit"].get("exit_code", 0) == 0


@pytest.mark.slow
def test_wandb_runs_of_a_sweep_share_a_group_and_are_named_by_their_overrides(tmp_path, run_cli):
    run_cli(["-m", "debug=fast", "aggregator=soup,ame_sgd", "tags=[first,digits]", "logger.job_type=check",
             "+logger.notes=from the test"], tmp_path, out="sweep")
    runs = [next(r["run"] for r in wandb_records(next((tmp_path / "sweep" / str(i) / "wandb").glob("offline-run-*")))
                 if r["type"] == "run") for i in range(2)]
    assert {r["run_group"] for r in runs} == {"sweep"}  # the sweep directory
    assert [r["display_name"] for r in runs] == ["aggregator=soup,debug=fast", "aggregator=ame_sgd,debug=fast"]
    assert all(r["tags"] == ["first", "digits"] and r["job_type"] == "check" and r["notes"] == "from the test"
               for r in runs)


def test_an_unknown_wandb_setting_is_one_clear_line(tmp_path, monkeypatch, run_pipeline):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(AMEError, match="logger: wandb.init does not take") as err:
        run_pipeline(["debug=fast", "+logger.colour=blue"], tmp_path)
    assert "\n" not in str(err.value) and not (tmp_path / "out" / "results.json").exists()


def test_greedy_soup_uses_a_validation_split_and_says_it_is_not_data_free(tmp_path, fast, run_pipeline):
    r = run_pipeline([*fast, "aggregator=greedy_soup", "data.val_size=120"], tmp_path)
    assert r["data_free"] is False and r["data"]["val_size"] == 120
    assert r["aggregator_info"]["chosen"] and len(r["aggregator_info"]["tried"]) == 3


def test_wandb_online_without_a_server_falls_back_to_offline_within_seconds(default_run, tmp_path, monkeypatch,
                                                                            caplog, run_pipeline):
    import time

    from ame.report import _reachable

    t0 = time.time()  # the probe decides within seconds (not the whole run: its time depends on the machine's load)
    assert not _reachable("http://127.0.0.1:9") and time.time() - t0 < 10
    for key, value in {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
                       "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    run_pipeline(["debug=fast"], tmp_path, cache=default_run[0] / "cache")  # its experts: the logger is tested
    assert "logging offline instead" in caplog.text
    assert (tmp_path / "out" / "results.json").exists() and list((tmp_path / "out" / "wandb").glob("offline-run-*"))


def test_multirun_over_aggregators_trains_experts_once(tmp_path, fast, read_results, run_cli):
    run_cli(["-m", *fast, "aggregator=soup,ame_sgd,ame_adagrad"], tmp_path)
    results = [read_results(tmp_path / "out" / str(i)) for i in range(3)]
    assert [r["experts_cached"] for r in results] == [False, True, True]
    assert [r["aggregator"] for r in results] == ["soup", "ame_sgd", "ame_adagrad"]
    # GD with lr 1/k from the warm-start pivot lands on the soup: same weights, same metrics
    assert results[1]["metrics"]["id/acc"] == results[0]["soup"]["id/acc"]
    assert results[1]["metrics"]["dist/soup"] < 1e-5
    assert [e["path"] for e in results[0]["experts"]] == [e["path"] for e in results[2]["experts"]]


def test_base_seed_trains_one_base_for_every_seed(tmp_path, caplog, fast, run_pipeline):
    caplog.set_level("INFO", logger="ame")
    a = run_pipeline([*fast, "aggregator=soup", "seed=0", "base_seed=0", "train.epochs=1"], tmp_path, out="out/0")
    assert "warm base epoch" in caplog.text
    caplog.clear()
    b = run_pipeline([*fast, "aggregator=soup", "seed=1", "base_seed=0", "train.epochs=1"], tmp_path, out="out/1")
    same = [k for k in a["base"] if not k.startswith("shard/")]  # the worst shard depends on the shards
    assert [a["base"][k] for k in same] == [b["base"][k] for k in same]
    assert len([p for p in (tmp_path / "cache" / "bases").iterdir() if p.is_dir()]) == 1
    assert a["experts"][0]["path"] != b["experts"][0]["path"] and a["soup"] != b["soup"]  # other shards, other experts
    assert "warm base epoch" not in caplog.text  # the second seed read the first one's base from the cache
    # the base's public images (one split, drawn by base_seed) are in no seed's shards
    splits = [load_file(str(Path(r["experts"][0]["path"]).parent / "shards.safetensors")) for r in (a, b)]
    assert torch.equal(splits[0]["public"], splits[1]["public"])
    for sp in splits:
        sharded = torch.cat([v for k, v in sp.items() if k.startswith("shard_")])
        assert not set(sp["public"].tolist()) & set(sharded.tolist())


def test_bring_your_own_experts_reproduces_the_training_run(default_run, tmp_path, fast, read_results, run_pipeline):
    tmp, _ = default_run
    trained = read_results(tmp / "out")
    files = tmp / "cache" / "experts"
    pattern = next(p for p in files.iterdir() if p.is_dir()).as_posix() + "/expert_*.safetensors"
    init = next((tmp / "cache" / "bases").glob("*/init.safetensors"))
    r = run_pipeline([*fast, "experts=files", f"experts.paths='{pattern}'", f"experts.init={init}"], tmp_path)
    assert r["metrics"]["id/acc"] == trained["metrics"]["id/acc"]
    assert [e["shard_size"] for e in r["experts"]] == [e["shard_size"] for e in trained["experts"]]


@pytest.mark.parametrize("args, message", [
    (["data.shards.alpha=-1"], "data.shards.alpha must be > 0"),
    (["data.shards.num_shards=5000"], "more than the"),
    (["aggregator.pivot=middle"], "aggregator.pivot must be one of"),
    (["aggregator.optimizer.lr=-1"], "aggregator.optimizer: Invalid learning rate"),
    (["train.init=warm", "data.public_size=0"], "data.public_size=0"),
    (["experts=files", "experts.paths=/nonexistent/*.safetensors", "aggregator.pivot=soup"], "matches no files"),
    (["experts=files", "experts.paths=/nonexistent/*.safetensors"], "experts.init is not set"),
    (["experts=files", "experts.paths=/nonexistent/*.safetensors", "experts.init=/nonexistent/init.pt"],
     "does not exist; check experts.init"),
    (["data=cifar10_shards", "data.root=/nonexistent", "data.download=false"], "data.root=/nonexistent"),
    (["train.init=independent"], "needs the experts' shared initialisation (pivot=init), but train.init=independent"),
    (["aggregator=ties", "train.init=independent"], "give one (train.init=shared|warm for trained experts, experts.init=<file> for files, init= in Python) or use a soup"),
    (["aggregator.device=cuda"] if not torch.cuda.is_available() else ["aggregator.epochs=0"], "aggregator."),
    (["train.epochs=abc"], "train.epochs must be an integer"),
    (["aggregator=greedy_soup"], "is not data-free: it needs a validation split"),
    (["aggregator.optimizer._target_=torch.optim.LBFGS"], "needs an optimizer that steps on a given dense gradient"),
    (["model=cnn", "model.widths=[8,8,8,8]"], "model.widths has 4 blocks"),
    (["optimized_metric=val/acc"], "data.val_size=0; set data.val_size"),
    (["aggregator=ensemble", "optimized_metric=val/acc", "data.val_size=100"], "needs a single network to score"),
    (["align=weight_matching"], "permutes the experts but not their shared initialisation"),
    (["align=weight_matching", "align.reference=7", "aggregator=soup"], "align.reference=7, but there are only 3"),
    (["align=weight_matching", "align.max_iter=0"], "align.max_iter must be an integer"),
    (["align=weight_matching", "model=resnet20", "train.init=independent", "aggregator=soup"],
     "GroupNorm with 8 groups"),
    (["bn_reset=true"], "bn_reset=true recomputes BatchNorm statistics on a validation split"),
    (["bn_reset=true", "data.val_size=100"], "has no BatchNorm statistics"),
])
def test_bad_input_is_one_clear_line_and_nothing_is_written(args, message, tmp_path, compose_cfg, fast):
    """In process: the pipeline raises one AMEError line (run.py prints it as ``error: ...`` and
    exits 1: tests/test_reliability.py, a failed run in a used output directory)."""
    from ame.pipeline import run

    with pytest.raises(AMEError) as err:
        run(compose_cfg([*fast, *args], tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "out" / "results.json").exists()
    assert not (tmp_path / "out" / "aggregate.safetensors").exists()


def test_unknown_aggregator_lists_the_options(tmp_path, compose_cfg, fast):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:  # Hydra's message, as run.py prints it
        compose_cfg([*fast, "aggregator=ame_lion"], tmp_path)
    assert "Could not find 'aggregator/ame_lion'" in str(err.value) and "ame_adam" in str(err.value)


def test_experts_that_do_not_fit_the_model_are_refused(default_run, tmp_path, fast, run_pipeline):
    tmp, _ = default_run
    pattern = next(p for p in (tmp / "cache" / "experts").iterdir() if p.is_dir()).as_posix() + "/expert_*.safetensors"
    with pytest.raises(AMEError, match="does not match model=CNN") as err:
        run_pipeline([*fast, "experts=files", f"experts.paths={pattern}", "aggregator.pivot=soup", "model=cnn"], tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_bad_expert_files_are_refused(bad, default_run, tmp_path, fast, run_pipeline):
    tmp, _ = default_run
    experts = sorted((tmp / "cache" / "experts").glob("*/expert_*.safetensors"))
    for i, p in enumerate(experts):
        sd = load_file(str(p))
        if i == 1:
            key = next(iter(sd))
            if bad == "nan":
                sd[key] = sd[key].clone()
                sd[key].view(-1)[0] = float("nan")
            else:
                sd[key] = torch.zeros(3, 3)
        save_state_dict(sd, tmp_path / "mine" / f"e{i}.safetensors")
    with pytest.raises(AMEError) as err:
        run_pipeline([*fast, "experts=files", f"experts.paths={tmp_path}/mine/*.safetensors", "aggregator.pivot=soup"],
                     tmp_path)
    expected = "NaN/Inf" if bad == "nan" else "does not match the first expert"
    assert expected in str(err.value) and "e1.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_help_lists_the_config_groups(tmp_path, run_cli):
    proc = run_cli(["--help"], tmp_path)
    for group in ("aggregator:", "data:", "model:", "train:", "logger:", "experts:", "debug:", "hparams_search:"):
        assert group in proc.stdout
    assert "ame_adam" in proc.stdout and "cifar10_shards" in proc.stdout and "fast" in proc.stdout
    assert "tags=[a,b]" in proc.stdout and "task_name" in proc.stdout and "debug=fast" in proc.stdout


def test_batchnorm_statistics_follow_the_weights_in_process(tmp_path, compose_cfg, fast, monkeypatch):
    """Issue 15: AME-SGD with lr 0 from the warm base returns the base, statistics included, so it
    scores exactly as the base; with bn_reset the statistics are recomputed on the validation split."""
    from ame.pipeline import run

    args = [*fast, "model=cnn", "model.norm=batch", "model.widths=[4]", "train.epochs=1", "train.warm_epochs=1",
            "aggregator=ame_sgd",
            "aggregator.optimizer.lr=0", "aggregator.lr_schedule=constant", "data.val_size=100",
            "train.augment.crop_padding=2", "train.augment.flip=true"]
    r = run(compose_cfg(args, tmp_path))
    agg = load_file(str(tmp_path / "out" / "aggregate.safetensors"))
    base = load_file(str(next((tmp_path / "cache" / "bases").glob("*/init.safetensors"))))
    assert agg.keys() == base.keys() and all(torch.equal(agg[k], base[k]) for k in agg)
    assert r["metrics"]["id/acc"] == r["base"]["id/acc"] and r["data_free"] is True
    import ame.pipeline
    import ame.repair

    calls = []  # what the pipeline asks of reset_batchnorm: the images augmented as the experts were trained

    def spy(*a, **kw):
        calls.append(kw)
        return ame.repair.reset_batchnorm(*a, **kw)

    cfg = compose_cfg([*args, "bn_reset=true", "paths.output_dir=" + str(tmp_path / "reset")], tmp_path)
    monkeypatch.setattr(ame.pipeline, "reset_batchnorm", spy)
    reset = run(cfg)
    assert reset["data_free"] is False and reset["bn_reset"] is True
    assert calls == [reset["bn_reset_images"]] == [{"crop_padding": 2, "flip": True, "passes": 5, "seed": 0}]
    assert r["bn_reset_images"] is None
    fixed = load_file(str(tmp_path / "reset" / "aggregate.safetensors"))
    mean = next(k for k in agg if k.endswith("running_mean"))
    assert not torch.equal(fixed[mean], agg[mean])
    weight = next(k for k in agg if k.endswith("0.weight"))
    assert torch.equal(fixed[weight], agg[weight])  # only the statistics change


def test_aggregator_ensemble_reports_the_ensemble_and_writes_no_weights(default_run, tmp_path, fast, run_pipeline):
    tmp, _ = default_run
    r = run_pipeline([*fast, "aggregator=ensemble"], tmp_path, cache=tmp / "cache")  # default_run's experts
    assert r["experts_cached"] is True
    assert r["aggregator"] == "ensemble" and r["single_network"] is False and r["data_free"] is True
    assert r["metrics"] == {k: v for k, v in r["ensemble"].items() if k != "single_network"}
    assert not (tmp_path / "out" / "aggregate.safetensors").exists()


def test_optuna_search_tunes_on_validation_and_says_the_result_is_not_data_free(tmp_path, fast, read_results, run_cli):
    # out of the box on the default data: no data.val_size given
    run_cli(["-m", *fast, "hparams_search=ame_optuna", "hydra.sweeper.n_trials=3"], tmp_path, out="opt")
    runs = [read_results(tmp_path / "opt" / str(i)) for i in range(3)]
    assert all(r["data"]["val_size"] == 250 for r in runs)
    assert all(r["data_free"] is False and r["tuned_on_validation"] is True for r in runs)
    assert all(0 <= r["metrics"]["val/acc"] <= 1 and "id/acc" in r["metrics"] for r in runs)
    assert sum(r["experts_cached"] for r in runs) == 2  # one expert set for every trial
    from omegaconf import OmegaConf

    best = OmegaConf.load(tmp_path / "opt" / "optimization_results.yaml")
    assert best.best_value == max(r["metrics"]["val/acc"] for r in runs)
    assert set(best.best_params) == {"aggregator.optimizer.lr", "aggregator.pivot", "aggregator.epochs"}


def test_results_report_the_output_ensemble(default_run, read_results):
    tmp, proc = default_run
    r = read_results(tmp / "out")
    assert r["ensemble"]["single_network"] is False and METRIC_KEYS <= r["ensemble"].keys()
    assert "output ensemble (N networks)" in proc.stdout


def test_a_sweep_with_a_data_root_keeps_its_job_folders_one_level_deep(tmp_path, fast, make_image_folder,
                                                                       read_results, run_cli):
    """Issue 25: data.root=/a/path on an experiment's command line made nested job folders, and so did
    a config group's override (data/shards=dirichlet, as experiments/table/run.sh passes)."""

    root = tmp_path / "data" / "deep"
    make_image_folder(root / "cifar10-jpeg", per_class=(20, 4))
    run_cli(["-m", "experiment=table", "regime=small_cnn", *fast, f"data.root={root}", "data.download=false",
             "data.public_size=12", "data.val_size=6", "data.shards.min_size=2", "train.epochs=1", "~hydra.sweeper.params.seed",
             "~hydra.sweeper.params.aggregator", "seed=0", "aggregator=soup", "data/shards=dirichlet"], tmp_path, out="sweep")
    jobs = [p.parent for p in (tmp_path / "sweep").rglob("results.json")]
    assert [j.parent for j in jobs] == [tmp_path / "sweep"], jobs  # neither the path's nor data/shards' slash nests
    assert jobs[0].name == "aggregator=soup,data.download=False,data.public_size=12,data.shards.min_size=2," \
                           "data.val_size=6,data.shards=dirichlet,debug=fast,seed=0,train.epochs=1"
    assert read_results(jobs[0])["data"]["name"] == "cifar10"

