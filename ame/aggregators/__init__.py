"""Stage 4: aggregation, one module per family (mirroring ``conf/aggregator/``). Every aggregator
follows :class:`~ame.aggregators.base.Aggregator` and reads the experts through an
:class:`~ame.pool.ExpertPool`, chunk by chunk; none of them sees data but ``greedy_soup``."""
from ame.aggregators.ame import AME, LR_SCHEDULES, ORDERS, PIVOTS, PSEUDOGRADIENTS, Soup, average
from ame.aggregators.base import Aggregator
from ame.aggregators.ensemble import OutputEnsemble
from ame.aggregators.greedy_soup import GreedySoup
from ame.aggregators.task_vectors import TaskVectors
from ame.pool import ExpertPool

__all__ = ["AME", "Aggregator", "ExpertPool", "GreedySoup", "LR_SCHEDULES", "ORDERS", "OutputEnsemble", "PIVOTS",
           "PSEUDOGRADIENTS", "Soup", "TaskVectors", "average"]
