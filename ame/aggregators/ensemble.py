"""The output ensemble: N networks, the reference a single merged network tries to reach."""
from __future__ import annotations

from ame.aggregators.base import Aggregator
from ame.errors import AMEError
from ame.pool import ExpertPool


class OutputEnsemble(Aggregator):
    """The mean of the experts' softmax outputs. It is N networks, not one (``single_network =
    False``, which the contract declares): there are no weights to merge, so ``run`` is never called
    and refuses in one line. The pipeline evaluates the ensemble in every run (``results["ensemble"]``,
    from :meth:`ame.eval.evaluate.Evaluator.ensemble_probabilities`); with ``aggregator=ensemble`` those
    are the run's metrics and no aggregate file is written."""

    single_network = False

    def __init__(self, name: str = "ensemble"):
        super().__init__()
        self.name = name

    def run(self, pool: ExpertPool, out=None, callbacks=(), score=None):
        raise AMEError(f"aggregator={self.name} is N networks (the mean of their outputs), not one set of weights; "
                       "there is nothing to merge: choose another aggregator")
