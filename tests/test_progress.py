"""ame.progress (listeners, stage timer) and the AME per-step hook that feeds W&B's distance curves."""
from __future__ import annotations

import functools
import logging

import torch

from ame.aggregators import AME, average
from ame.aggregators.base import Callback
from ame.pipeline import _ReportDistances
from ame.progress import Timer, listening, report, wanted


def test_report_logs_a_line_and_reaches_listeners_only_inside_the_block(caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="ame"):
        assert not wanted()
        with listening(lambda *a: seen.append(a)):
            assert wanted()
            report("expert_1", "epoch", 2, {"loss": 0.5, "acc": 0.75}, of=3)
            report("ame", "step", 1, {"dist_soup": 0.1}, quiet=True)
        report("expert_1", "epoch", 3, {"loss": 0.4, "acc": 0.8}, of=3)
    assert seen == [("expert_1", "epoch", 2, {"loss": 0.5, "acc": 0.75}), ("ame", "step", 1, {"dist_soup": 0.1})]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["expert 1 epoch 2/3: loss 0.5  acc 75.00%", "expert 1 epoch 3/3: loss 0.4  acc 80.00%"]


def test_timer_sums_stages_and_logs_a_summary_only_when_the_stage_succeeds(caplog):
    timer = Timer()
    with caplog.at_level(logging.INFO, logger="ame"):
        with timer("data", lambda: "10 images"):
            pass
        try:
            with timer("experts"):
                raise RuntimeError
        except RuntimeError:
            pass
    assert set(timer.seconds) == {"data", "experts"}
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == ["data done"]
    assert caplog.records[0].getMessage().endswith(": 10 images")


def _flat(sd):
    return torch.cat([v.reshape(-1).float() for v in sd.values()])


def test_ame_step_hook_sees_the_pivot_then_the_iterates_and_changes_nothing(tiny_experts):
    experts, init = tiny_experts(4, buffers=False), tiny_experts(1, seed=9, buffers=False)[0]
    make = functools.partial(AME, functools.partial(torch.optim.Adam, lr=0.1), epochs=2, pivot="init")
    plain = make()(experts, [1] * 4, init)
    seen = []

    class Every3(Callback):
        every = 3

        def on_step(self, aggregator, step, metrics):
            seen.append((step, metrics))

    agg = make(chunk_mb=40 / 2**20)  # streamed in chunks of 10 floats: the distances are sums over chunks
    hooked = agg(experts, [1] * 4, init, callbacks=[Every3()])
    assert all(torch.allclose(plain[k], hooked[k], atol=1e-6) for k in plain)
    assert [s for s, _ in seen] == [0, 3, 6, 8]  # every 3 steps, and the last of 2 epochs × 4 experts
    soup = _flat(average(experts))
    assert seen[0][1]["dist_pivot_l2"] == 0 and abs(seen[0][1]["dist_soup_l2"] - float((_flat(init) - soup).norm())) < 1e-5
    assert abs(seen[-1][1]["dist_pivot_l2"] - float((_flat(hooked) - _flat(init)).norm())) < 1e-5
    assert abs(seen[-1][1]["dist_soup_l2"] - float((_flat(hooked) - soup).norm())) < 1e-5


def test_distance_trace_matches_a_direct_computation(tiny_experts):
    experts, init = tiny_experts(3, buffers=False), tiny_experts(1, seed=5, buffers=False)[0]
    soup = _flat(average(experts))
    out = []
    with listening(lambda stage, x_name, x, m: out.append((stage, x_name, x, m))):
        agg = AME(functools.partial(torch.optim.SGD, lr=1.0), pivot="init", lr_schedule="harmonic")
        result = agg(experts, [1] * 3, init, callbacks=[_ReportDistances(1)])
    scale = float((_flat(init) - soup).norm())
    assert [x for _, _, x, _ in out] == [0, 1, 2, 3] and {s for s, *_ in out} == {"ame"}
    assert out[0][3]["dist_pivot"] == 0 and abs(out[0][3]["dist_soup"] - 1) < 1e-6
    last = out[-1][3]  # GD with lr 1/k over one epoch is the soup
    assert last["dist_soup"] < 1e-5 and abs(last["dist_pivot_l2"] - scale) < 1e-4
    assert abs(last["dist_pivot"] - float((_flat(result) - _flat(init)).norm()) / scale) < 1e-5


def test_meter_logs_rate_and_eta_off_a_terminal_and_is_silent_when_quiet(caplog):
    import logging

    from ame.progress import Meter, quiet

    with caplog.at_level(logging.INFO, logger="ame"):
        m = Meter("ties → out", 4e9, every=0.0)
        m.update(1e9)
        m.close()
        with quiet():
            q = Meter("quiet", 10, unit="chunks", every=0.0)
            q.update(5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("ties → out: 25% (1.0 GB of 4.0 GB,") and "ETA" in lines[0]
