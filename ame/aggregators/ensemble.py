"""The output ensemble: N networks, the reference a single merged network tries to reach."""
from __future__ import annotations

from ame.aggregators.base import Aggregator
from ame.pool import ExpertPool


class OutputEnsemble(Aggregator):
    """The mean of the experts' softmax outputs. It is N networks, not one, so it returns no
    weights (``single_network = False``): ``run`` gives the experts themselves. The pipeline
    evaluates it in every run (``results["ensemble"]``, from
    :meth:`ame.evaluate.Evaluator.ensemble_probabilities`); with ``aggregator=ensemble`` those are
    the run's metrics and no aggregate file is written."""

    single_network = False

    def __init__(self, name: str = "ensemble"):
        super().__init__()
        self.name = name

    def run(self, pool: ExpertPool, out=None) -> list[dict]:
        return [pool.whole(i) for i in range(pool.n)]
