"""conf/ and ame/config.py: the experiment configs compose, job folders are never named by paths, and
the helpers that build components, clean the logged config and name a run."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ame.config import clean_config, instantiate, run_identity
from ame.errors import AMEError


PATH_KEYS = {"data.root", "data.dataset.root", "paths.cache_dir", "paths.output_dir", "experts.paths", "experts.init",
             "eval.source", "model.pretrained"}


@pytest.mark.parametrize("name", [None, "fig1", "table", "ablations", "align", "bn_stats", "verdict"])
def test_path_valued_keys_never_name_a_job_folder(name, root):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"] if name else [], return_hydra_config=True)
    excluded = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert PATH_KEYS | {"experiment", "logger"} <= excluded
    assert ("regime" in excluded) == (name in ("table", "verdict"))  # one regime per sweep folder


@pytest.mark.parametrize("name", ["fig1", "table", "ablations", "align", "bn_stats"])
def test_experiment_configs_compose_on_cifar(name, tmp_path, compose_cfg):
    cfg = compose_cfg([f"experiment={name}"], tmp_path)
    strong = name in ("fig1", "table", "bn_stats")  # the strong regime: one shared ResNet-20 + BN base
    assert cfg.data.dataset._target_ == "ame.data.load_cifar"
    assert cfg.model._target_ == ("ame.models.ResNet" if strong else "ame.models.CNN")
    if strong:
        assert cfg.model.norm == "batch" and cfg.base_seed == 0 and cfg.data.val_size == 1000
        assert cfg.train.warm_epochs == 30 and cfg.train.warm_lr == 0.1 and cfg.train.optimizer.lr == 0.01
        small = compose_cfg([f"experiment={name}", "regime=small_cnn"], tmp_path)
        assert small.model._target_ == "ame.models.CNN" and small.base_seed is None
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if name == "align":
        assert cfg.train.init == "independent" and cfg.aggregator.name == "soup"


class Refuses:
    def __init__(self, x: int):
        if x < 0:
            raise AMEError(f"x must be ≥ 0, got {x}")
        self.x = x


def test_instantiate_builds_passes_the_projects_error_through_and_names_any_other_failure():
    assert instantiate({"_target_": f"{__name__}.Refuses", "x": 3}, "thing").x == 3
    with pytest.raises(AMEError) as err:  # the component's own message, not Hydra's wrapping
        instantiate({"_target_": f"{__name__}.Refuses", "x": -1}, "thing")
    assert str(err.value) == "x must be ≥ 0, got -1"
    with pytest.raises(AMEError) as err:  # a TypeError from the constructor: prefixed with the config key
        instantiate({"_target_": f"{__name__}.Refuses", "y": 1}, "thing")
    assert str(err.value).startswith("thing: ") and "\n" not in str(err.value)
    with pytest.raises(AMEError, match="^thing: Error loading 'no.such.Thing'"):
        instantiate({"_target_": "no.such.Thing"}, "thing")


def test_clean_config_is_what_a_person_compares(tmp_path, compose_cfg):
    cfg = compose_cfg(["debug=fast", "logger=none", "aggregator=ame_adam"], tmp_path)
    clean = clean_config(cfg)
    assert "_target_" not in str(clean) and "_partial_" not in str(clean)
    assert "logger" not in clean and "dirname_exclude" not in clean and "output_dir" not in clean["paths"]
    assert clean["paths"]["cache_dir"] == str(tmp_path / "cache")  # resolved
    assert clean["aggregator"]["optimizer"]["lr"] == cfg.aggregator.optimizer.lr and clean["task_name"] == "debug"
    assert OmegaConf.to_container(cfg)["aggregator"]["_target_"]  # the config itself is left as it was


def test_run_identity_outside_a_hydra_app_is_empty():
    assert run_identity(OmegaConf.create({})) == {"overrides": [], "name": None, "sweep": None}
