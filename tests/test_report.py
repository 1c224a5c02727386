"""ame.report: the results table, the flattened scalars for loggers, results.json, the loggers."""
from __future__ import annotations

import json
import socket
import time

import pytest

from ame.errors import AMEError
from ame.report import NullLogger, _reachable, flat_scalars, format_table, table_rows, write_results


def test_results_table_in_percent_without_a_repeated_soup_and_every_scalar_flattened():
    m = {"id/acc": 0.5, "id/nll": 1.25, "ood/acc": 0.25}
    results = {"aggregator": "soup", "metrics": m, "soup": m, "base": None, "ensemble": None, "seed": 3,
               "experts": [{"shard_size": 5, "path": "a", **m}], "timings_s": {"data": 0.5}}
    assert [name for name, _ in table_rows(results)] == ["expert 0 (n=5)", "soup (aggregate)"]
    table = format_table(results)
    assert "50.00" in table and "1.25" in table and "0.50" not in table
    flat = flat_scalars(results)
    assert flat["aggregate/id/acc"] == 0.5 and flat["expert_0/ood/acc"] == 0.25 and flat["timings_s/data"] == 0.5
    assert flat["seed"] == 3 and "base" not in flat and flat["expert_0/shard_size"] == 5


RESULTS = {"aggregator": "ame_adam", "seed": 0, "single_network": True, "align": None,
           "metrics": {"id/acc": 0.625, "id/nll": 0.75, "dist/soup": 0.5},
           "soup": {"id/acc": 0.5, "id/nll": 1.0}, "base": {"id/acc": 0.25, "id/nll": 2.0, "shard/min_acc": 0.125},
           "ensemble": {"id/acc": 0.75, "id/nll": 0.5, "single_network": False},
           "experts": [{"shard_size": 10, "path": "e0", "id/acc": 0.375, "id/nll": 1.5, "shard/own_acc": 0.875}],
           "data": {"shard_sizes": [10], "name": "digits"}, "timings_s": {"data": 0.25}}


def test_table_rows_run_from_the_base_to_the_aggregate_with_the_soup_when_it_is_not_the_aggregate():
    assert [name for name, _ in table_rows(RESULTS)] == [
        "base (warm start)", "expert 0 (n=10)", "output ensemble (N networks)", "soup", "ame_adam (aggregate)"]
    lines = format_table(RESULTS).splitlines()
    assert lines[0].split() == ["network", "ID", "acc", "ID", "NLL", "worst", "shard", "own", "shard"]
    assert lines[-1].split() == ["ame_adam", "(aggregate)", "62.50", "0.75"]  # % for accuracies, nats for NLL
    assert lines[1].split() == ["base", "(warm", "start)", "25.00", "2.00", "12.50"]
    assert lines[2].split() == ["expert", "0", "(n=10)", "37.50", "1.50", "87.50"]  # a blank where a metric is missing


def test_flat_scalars_keep_every_scalar_but_lists_other_than_the_experts():
    flat = flat_scalars(RESULTS)
    assert flat["aggregate/dist/soup"] == 0.5 and flat["ensemble/single_network"] is False
    assert flat["expert_0/path"] == "e0" and flat["single_network"] is True and flat["data/name"] == "digits"
    assert "align" not in flat and not any(k.startswith("data/shard_sizes") for k in flat)


def test_results_json_is_written_whole_and_refuses_nan(tmp_path):
    path = write_results(RESULTS, tmp_path)
    assert path == tmp_path / "results.json" and json.loads(path.read_text()) == RESULTS
    with pytest.raises(AMEError, match="NaN/Inf"):
        write_results({**RESULTS, "metrics": {"id/acc": float("nan")}}, tmp_path)
    assert json.loads(path.read_text()) == RESULTS  # the earlier file is intact: written atomically


def test_the_null_logger_asks_for_no_traces_and_the_reachability_probe_is_quick():
    logger = NullLogger(dir="x", config={}, identity={})
    assert logger.ame_every == 0  # AME's per-step distances are not computed for it
    logger.log_metrics("ame", "step", 0, {"d": 1.0}), logger.log_results(RESULTS, None), logger.finish(1)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        assert _reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    finally:
        server.close()
    t0 = time.time()
    assert not _reachable("http://127.0.0.1:9", timeout=2) and time.time() - t0 < 5
