"""ame: data-free neural averaging (model soups and Amortized Model Ensembling).

``ame.merge(experts, aggregator="ame_adam", init=None, out=None, **overrides)`` merges checkpoints
from Python; ``python -m ame.merge`` from the command line (see :mod:`ame.merge`)."""
from ame.merge import merge

__all__ = ["merge"]
