"""Stage 5: evaluate networks in distribution, under corruptions, and per shard.

An :class:`Evaluator` is built once per run: it holds the test set, the corrupted test sets
(generated once, deterministically) and the shards' class mixes, and maps any state dict of the
run's architecture to a flat dict of metrics:

- ``id/acc``, ``id/nll``: test accuracy and mean negative log-likelihood;
- ``ood/<corruption>/acc`` (mean over severities), ``ood/s<k>/acc`` (mean over corruptions)
  and ``ood/acc`` (mean over all);
- ``shard/min_acc``: accuracy on the test set reweighted to each shard's class mix, worst shard;
  for an expert also ``shard/own_acc`` (its own shard's mix) and ``shard/other_acc`` (the
  pooled mix of the other shards).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ame.data import ImageData
from ame.data.corruptions import CORRUPTIONS, corrupt
from ame.errors import require
from ame.io import StateDict
from ame.progress import bar


@torch.inference_mode()
def logits(model: nn.Module, data: ImageData, x: torch.Tensor, batch_size: int = 256,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """``model``'s float32 logits for uint8 images ``x``, in batches, on the CPU."""
    return torch.cat([model(data.normalize(x[i:i + batch_size].to(device))).float().cpu()
                      for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, data: ImageData, sd: StateDict, x: torch.Tensor, y: torch.Tensor,
             device: torch.device | str = "cpu") -> float:
    """Accuracy of ``model`` with weights ``sd`` on ``(x, y)``."""
    model.load_state_dict(sd)
    return float((logits(model.to(device).eval(), data, x, device=device).argmax(1) == y).float().mean())


class Evaluator:
    def __init__(self, model: nn.Module, data: ImageData, corruptions: Sequence[str], severities: Sequence[int],
                 ood_subsample: int | None, class_counts: np.ndarray | None, seed: int = 0,
                 batch_size: int = 256, device: torch.device | str = "cpu"):
        unknown = sorted(set(corruptions) - set(CORRUPTIONS))
        require(not unknown, f"eval.corruptions: unknown {unknown}; choose from {sorted(CORRUPTIONS)}")
        self.model, self.data, self.batch_size, self.device = model.to(device).eval(), data, batch_size, device
        self.test_x, self.test_y = data.test_x, data.test_y
        n = len(self.test_y)
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:ood_subsample or n].sort().values
        self.ood_y = self.test_y[keep]
        self.corrupted = {(c, s): corrupt(self.test_x[keep], c, s, seed) for c in corruptions for s in severities}
        self.counts = None if class_counts is None else np.asarray(class_counts, dtype=np.float64)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return logits(self.model, self.data, x, self.batch_size, self.device)

    def _mix_acc(self, per_class: np.ndarray, counts: np.ndarray) -> float:
        return float((counts / counts.sum()) @ per_class)

    def probabilities(self, sd: StateDict, name: str = "network") -> dict:
        """Softmax outputs of the network ``sd`` on the test set (key ``"id"``) and on each
        corrupted set (key ``(corruption, severity)``); ``name`` labels the terminal bar."""
        self.model.load_state_dict(sd)
        out = {"id": self.logits(self.test_x).softmax(1)}
        with bar(f"evaluating {name}", len(self.corrupted), unit="set") as pbar:
            for (c, s), x in self.corrupted.items():
                pbar.set_postfix_str(f"{c} s{s}", refresh=False)
                out[(c, s)] = self.logits(x).softmax(1)
                pbar.update()
        return out

    def ensemble_probabilities(self, experts: Sequence[StateDict],
                               each: Callable[[int, dict], None] | None = None) -> dict:
        """The output ensemble's :meth:`probabilities`: the mean of the experts' softmax outputs,
        one expert loaded at a time; ``each(i, probs)`` sees each expert's own outputs on the way."""
        total = None
        for i in range(len(experts)):
            probs = self.probabilities(experts[i], f"expert {i} ({i + 1}/{len(experts)})")
            if each is not None:
                each(i, probs)
            total = probs if total is None else {k: v + probs[k] for k, v in total.items()}
        return {k: v / len(experts) for k, v in total.items()}

    def metrics(self, probs: dict, shard: int | None = None) -> dict[str, float]:
        """Metrics from :meth:`probabilities` (of one network, or averaged over an ensemble)."""
        p = probs["id"]
        pred = p.argmax(1)
        m = {"id/acc": float((pred == self.test_y).float().mean()),
             "id/nll": float(-p.gather(1, self.test_y[:, None]).clamp_min(1e-12).log().mean())}
        if self.corrupted:
            by_key = {k: float((probs[k].argmax(1) == self.ood_y).float().mean()) for k in self.corrupted}
            for c in dict.fromkeys(c for c, _ in by_key):
                m[f"ood/{c}/acc"] = float(np.mean([a for (cc, _), a in by_key.items() if cc == c]))
            for s in dict.fromkeys(s for _, s in by_key):
                m[f"ood/s{s}/acc"] = float(np.mean([a for (_, ss), a in by_key.items() if ss == s]))
            m["ood/acc"] = float(np.mean(list(by_key.values())))
        if self.counts is not None:
            correct = (pred == self.test_y).double()
            per_class = np.array([float(correct[self.test_y == c].mean()) if (self.test_y == c).any() else 0.0
                                  for c in range(self.data.num_classes)])
            accs = [self._mix_acc(per_class, c) for c in self.counts]
            m["shard/min_acc"] = min(accs)
            if shard is not None:
                m["shard/own_acc"] = accs[shard]
                others = np.delete(self.counts, shard, axis=0).sum(0)
                if others.sum() > 0:
                    m["shard/other_acc"] = self._mix_acc(per_class, others)
        return m

    def __call__(self, sd: StateDict, shard: int | None = None, name: str = "network") -> dict[str, float]:
        """Metrics of the network with weights ``sd``; ``shard`` = the expert's own shard index."""
        return self.metrics(self.probabilities(sd, name), shard)
