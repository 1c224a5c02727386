"""Greedy soup (Wortsman et al. 2022): the one aggregator that is not data-free."""
from __future__ import annotations

from typing import Callable, Mapping

from torch import Tensor

from ame.aggregators.ame import Soup
from ame.aggregators.base import Aggregator
from ame.io import Output
from ame.errors import require
from ame.pool import ExpertPool


class GreedySoup(Aggregator):
    """Rank the experts by validation accuracy, start from the best, and add each next one only if
    the soup's validation accuracy does not drop.

    **Not data-free** (``data_free = False``): :meth:`run` is handed ``score``, a function of a state
    dict that returns its accuracy on a held-out validation split (``data.val_size``), and its
    results say ``data_free: false``."""

    data_free = False

    def __init__(self, name: str = "greedy_soup"):
        super().__init__()
        self.name = name

    def run(self, pool: ExpertPool, out: Output | None = None, callbacks=(),
            score: Callable[[dict], float] | None = None) -> Mapping[str, Tensor]:
        require(score is not None, "greedy_soup needs held-out data: set data.val_size (e.g. data.val_size=1000)")
        alone = [score(pool.whole(i)) for i in range(pool.n)]
        ranked = sorted(range(pool.n), key=lambda i: -alone[i])
        first = pool.whole(ranked[0])  # integer entries (counters) come from it, as in the soup of the chosen
        total = {k: v.double() for k, v in first.items() if v.is_floating_point()}  # running sum: N reads, not N²
        chosen, best = [ranked[0]], alone[ranked[0]]
        history = [(ranked[0], best, True)]
        for i in ranked[1:]:
            x = pool.whole(i)
            s = score({k: ((total[k] + x[k].double()) / (len(chosen) + 1)).to(v.dtype) if k in total else v
                       for k, v in first.items()})
            history.append((i, s, s >= best))
            if s >= best:
                chosen, best = chosen + [i], s
                for k in total:
                    total[k] += x[k].double()
            del x
        result = Soup().run(pool.subset(sorted(chosen)), out)
        self.info = {"chosen": sorted(chosen), "val_acc": best,
                     "tried": [{"expert": i, "val_acc": s, "added": a} for i, s, a in history]}
        return result
