"""Where experts come from (:mod:`ame.experts`): the cache keys of trained experts and their base
are pinned, so a refactor cannot silently orphan the experts already cached under $AME_CACHE_DIR."""
from __future__ import annotations

import pytest

from ame.data import load_digits
from ame.experts import base_key, cache_key, shared_seed

# (overrides, expert key with base sha "abc", expert key without a base, base key): computed by the
# code of main at bd0cfec, before the expert sources took sub-configs instead of the root config
PINNED = [
    ([], "d2552d54fa4be7830c16", "8a274395580ed73f15fe", "8dc7b9a7ae3094347c89"),
    (["train.init=independent"], "6c9e3273dc84a1a32867", "060596a947e8542a0e07", "ff910340283dcbea35d1"),
    (["train.init=shared", "base_seed=3", "seed=2"], "4f0e67ebd4f1f42910b0", "886aed665fce8fe58855",
     "0bac3a4040da0bb38655"),
    (["debug=fast"], "917c361f6b0eae1007f4", "86a35f1e3461cad3562b", "bea337c608f1ec4b6af1"),
]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.mark.parametrize("overrides, with_base, without_base, base", PINNED)
def test_cache_keys_are_pinned(overrides, with_base, without_base, base, digits, tmp_path, compose_cfg):
    cfg = compose_cfg(overrides, tmp_path)
    settings = cfg.train, cfg.data, cfg.model
    assert cache_key(*settings, cfg.seed, cfg.base_seed, digits, "abc")[0] == with_base
    assert cache_key(*settings, cfg.seed, cfg.base_seed, digits)[0] == without_base
    assert base_key(*settings, shared_seed(cfg.seed, cfg.base_seed), digits)[0] == base


def test_the_sources_say_what_the_pipeline_checks_before_any_work(tmp_path, compose_cfg):
    from ame.config import instantiate
    from ame.errors import AMEError
    from ame.experts import ExpertSource, FileExperts

    trained = instantiate(compose_cfg(["train.init=independent", "data.shards.num_shards=5"], tmp_path).experts,
                          "experts", ExpertSource)
    assert trained.trained_here and trained.count == 5 and trained.missing_init == "train.init=independent"
    files = instantiate(compose_cfg(["experts=files", "experts.paths=[a,b]"], tmp_path).experts, "experts",
                        ExpertSource)
    assert isinstance(files, FileExperts) and not files.trained_here and files.count is None
    assert files.missing_init == "experts.init is not set" and files.paths == ["a", "b"]
    with pytest.raises(AMEError, match="experts=files needs experts.paths"):
        FileExperts(None, None, None, None).check()
