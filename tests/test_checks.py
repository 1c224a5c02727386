"""A probe of hostile inputs: each one stops with one clear AMEError line naming the key (or file
and field) before any work, never a traceback, a silent wrong result or NaN in results.json."""
from __future__ import annotations

import json

import pytest
import torch

from ame.errors import AMEError
from ame.io import finite_json, save_state_dict, write_json

CONFIG_VALUES = [
    ("seed=-1", "seed must be an integer ≥ 0"),
    ("seed=abc", "seed must be an integer ≥ 0"),
    ("eval.seed=-3", "eval.seed must be an integer ≥ 0"),
    ("eval.batch_size=0", "eval.batch_size must be an integer ≥ 1"),
    ("train.batch_size=-8", "train.batch_size must be an integer ≥ 1"),
    ("eval.ood_subsample=-5", "eval.ood_subsample must be an integer ≥ 1"),
    ("eval.ood_subsample=0", "eval.ood_subsample must be an integer ≥ 1"),
    ("eval.ood_subsample=1.5", "eval.ood_subsample must be an integer ≥ 1"),
    ("eval.severities=[0]", "eval.severities must be a list of integers in 1..5"),
    ("eval.corruptions=[fog_of_war]", "eval.corruptions: unknown ['fog_of_war']"),
    ("train.optimizer.lr=-1", "train.optimizer: SGD cannot train here (Invalid learning rate: -1"),
    ("train.optimizer.momentum=-0.5", "train.optimizer: SGD cannot train here (Invalid momentum value"),
    ("train.optimizer._target_=torch.optim.LBFGS", "train.optimizer: LBFGS cannot train here"),
    ("train.optimizer._target_=torch.nn.Linear", "train.optimizer: Linear cannot train here"),
    ("train.optimizer._target_=no.such.Optimizer", "train.optimizer: Error loading 'no.such.Optimizer': Module"),
    ("train.warm_lr=-0.1", "train.warm_lr must be a number > 0"),
    ("train.label_smoothing=1.5", "train.label_smoothing must be a number in [0, 1)"),
    ("train.label_smoothing=-0.1", "train.label_smoothing must be a number in [0, 1)"),
    ("train.lr_schedule=linear", "train.lr_schedule must be cosine or constant"),
    ("train.augment.crop_padding=-2", "train.augment.crop_padding must be an integer ≥ 0"),
    ("data.public_size=-1", "data.public_size must be an integer ≥ 0"),
    ("data.val_size=-10", "data.val_size must be an integer ≥ 0"),
    ("+data.dataset.split_seed=-1", "data.dataset.split_seed must be an integer ≥ 0"),
    ("logger=wandb logger.mode=banana", "logger.mode (or $WANDB_MODE) must be one of"),
    ("logger=wandb logger.init_timeout=-1", "logger.init_timeout must be a number > 0"),
    ("optimized_metric=accuracy", "optimized_metric must name a metric such as id/acc"),
    ("optimized_metric=id/accc", "optimized_metric=id/accc is not a metric of this project"),
    ("optimized_metric=ood/acc eval.corruptions=[]", "but eval.corruptions is empty"),
    ("aggregator.optimizer.lr=-1", "aggregator.optimizer: Invalid learning rate"),
    ("aggregator.optimizer._target_=torch.optim.SparseAdam", "SparseAdam.step() cannot take a dense pseudogradient"),
    ("aggregator.optimizer._target_=torch.optim.LBFGS", "LBFGS.step() cannot take a dense pseudogradient"),
    ("aggregator.optimizer._target_=torch.nn.Linear", "aggregator.optimizer: "),
]


@pytest.mark.parametrize("override, message", CONFIG_VALUES, ids=[o for o, _ in CONFIG_VALUES])
def test_bad_config_value_is_one_line_before_any_work(override, message, tmp_path, compose_cfg, fast):
    from ame.pipeline import check

    cfg = compose_cfg([*fast, *override.split()], tmp_path)
    with pytest.raises(AMEError) as err:
        check(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing written


# run.py prints any AMEError as one ``error:`` line and exits 1 (a run.py process:
# tests/test_reliability.py, a failed run in a used output directory).


@pytest.mark.slow  # the in-process check is in CONFIG_VALUES above; this one runs the command line
@pytest.mark.parametrize("target", ["torch.optim.SparseAdam", "torch.optim.LBFGS"])
def test_an_optimizer_that_cannot_step_on_pseudogradients_stops_ame_merge_in_one_line(target, tmp_path):
    import subprocess
    import sys

    for i in range(2):
        save_state_dict({"w": torch.ones(2) * i}, tmp_path / f"e{i}.safetensors")
    proc = subprocess.run([sys.executable, "-m", "ame.merge", "aggregator=ame_adam", f"aggregator.optimizer._target_={target}",
                           "experts.paths=[e0.safetensors,e1.safetensors]", "out=m.safetensors"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and "cannot take a dense pseudogradient" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.safetensors").exists()


def _expert_files(tmp_path, metadata: list[dict]):
    for i, meta in enumerate(metadata):
        save_state_dict({"w": torch.ones(2) * i}, tmp_path / f"e{i}.safetensors", meta)
    return tmp_path / "e*.safetensors"


@pytest.mark.parametrize("field, values, message", [
    ("shard_size", ["abc", "10"], "e0.safetensors: metadata field 'shard_size' must be a positive integer"),
    ("shard_size", ["10", "-4"], "e1.safetensors: metadata field 'shard_size' must be a positive integer"),
    ("shard_size", ["0", "4"], "e0.safetensors: metadata field 'shard_size' must be a positive integer"),
    ("class_counts", ["[0, 0, 0]", "[1, 2, 3]"], "e0.safetensors: metadata field 'class_counts' must be a list of "
                                                  "non-negative integer counts, not all zero"),
    ("class_counts", ["[5, -3, 1]", "[1, 2, 3]"], "e0.safetensors: metadata field 'class_counts'"),
    ("class_counts", ["[1, 2]", "nonsense"], "e1.safetensors: metadata field 'class_counts'"),
    ("class_counts", ["[1, 2]", "[1, 2, 3]"], "different lengths across the expert files"),
])
def test_bad_metadata_in_users_files_names_the_file_and_field(field, values, message, tmp_path):
    from ame.experts import FileExperts

    pattern = _expert_files(tmp_path, [{field: v} for v in values])
    with pytest.raises(AMEError) as err:
        FileExperts(str(pattern), None, None, None).experts()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_results_are_always_valid_json(tmp_path):
    results = finite_json({"metrics": {"id/acc": 0.5, "id/nll": float("inf")}, "experts": [{"x": float("nan")}]})
    assert results["metrics"]["id/nll"] is None and results["experts"][0]["x"] is None
    assert results["non_finite"] == ["metrics/id/nll: inf", "experts[0]/x: nan"]
    write_json(results, tmp_path / "r.json")
    json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    with pytest.raises(AMEError, match="NaN/Inf are not JSON"):
        write_json({"a": float("nan")}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
