"""ame.eval.evaluate: the output ensemble's probabilities and metrics, and the test subsample."""
from __future__ import annotations

import torch


def test_output_ensemble_is_the_mean_of_the_experts_softmax(tmp_path):
    from ame.data import load_digits
    from ame.eval.evaluate import Evaluator
    from ame.models import MLP

    data = load_digits()
    nets = [MLP(1, 8, 10, hidden=[16]) for _ in range(3)]
    ev = Evaluator(MLP(1, 8, 10, hidden=[16]), data, ["contrast"], [3], None, None)
    mean = ev.ensemble_probabilities([n.state_dict() for n in nets])
    with torch.no_grad():
        manual = sum(n(data.normalize(data.test_x)).softmax(1) for n in nets) / 3
    assert torch.allclose(mean["id"], manual, atol=1e-6)
    m = ev.metrics(mean)
    assert m["id/acc"] == float((manual.argmax(1) == data.test_y).float().mean())
    assert abs(m["id/nll"] + float(manual.gather(1, data.test_y[:, None]).log().mean())) < 1e-5


def test_test_subsample_scores_a_fixed_subset_and_leaves_the_corrupted_sets_alone(tmp_path):
    from ame.data import load_digits
    from ame.eval.ood import subsample
    from ame.eval.evaluate import Evaluator
    from ame.models import MLP

    data, net = load_digits(), MLP(1, 8, 10, hidden=[16])
    full = Evaluator(net, data, ["contrast"], [3], 50, None)
    some = Evaluator(net, data, ["contrast"], [3], 50, None, test_subsample=100)
    keep = subsample(len(data.test_y), 100, 0)
    assert len(some.test_y) == 100 and torch.equal(some.test_y, data.test_y[keep])
    with torch.no_grad():
        want = float((net(data.normalize(data.test_x[keep])).argmax(1) == data.test_y[keep]).float().mean())
    m = some(net.state_dict())
    assert m["id/acc"] == want and m["ood/acc"] == full(net.state_dict())["ood/acc"]  # the same corrupted sets
