"""Stage 5: evaluation. :mod:`ame.eval.evaluate` (the :class:`Evaluator`: ID accuracy and NLL,
the shard view, the OOD metrics), :mod:`ame.eval.ood` (the out-of-distribution sets: generated
and cached, or the published CIFAR-10-C / CIFAR-100-C arrays) and :mod:`ame.eval.corruptions`
(the corruptions, after Hendrycks & Dietterich)."""
from ame.eval.evaluate import Evaluator, accuracy

__all__ = ["Evaluator", "accuracy"]
