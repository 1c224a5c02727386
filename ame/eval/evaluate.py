"""Stage 5: evaluate networks in distribution, under corruptions, and per shard.

An :class:`Evaluator` is built once per run: it holds the test set, the out-of-distribution sets
(the corrupted test sets, generated once and cached, or the published CIFAR-10-C / CIFAR-100-C
arrays: :mod:`ame.eval.ood`) and the shards' class mixes, and maps any state dict of the run's
architecture to a flat dict of metrics:

- ``id/acc``, ``id/nll``: test accuracy and mean negative log-likelihood;
- ``ood/acc``: the mean accuracy over the standard corruptions evaluated (the 15 of CIFAR-10-C)
  × the severities, as the literature reports it; ``ood/s<k>/acc`` the same at severity k;
  ``ood/<family>/acc`` over a family's corruptions (noise, blur, weather, digital);
  ``ood/extra_acc``: the mean over the extras evaluated (speckle_noise, gaussian_blur, spatter,
  saturate), kept out of the above; ``ood/<corruption>/acc`` (mean over severities) and
  ``ood/<corruption>/s<k>/acc`` for every corruption evaluated;
- ``shard/min_acc``: accuracy on the test set reweighted to each shard's class mix, worst shard;
  for an expert also ``shard/own_acc`` (its own shard's mix) and ``shard/other_acc`` (the
  pooled mix of the other shards); the pipeline adds ``shard/base_own_acc`` (the warm base on
  that expert's mix) and ``shard/own_gain`` (own minus base: what fine-tuning bought).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ame.checks import seed
from ame.data import ImageData
from ame.eval.corruptions import FAMILIES, STANDARD
from ame.eval.ood import check_names, check_severities, download_published, generated_sets, published_sets, subsample
from ame.errors import positive_int, require
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


def ood_metrics(acc: dict[tuple[str, int], float]) -> dict[str, float]:
    """The ``ood/*`` metrics from the accuracy on each (corruption, severity) set."""
    def mean(keys) -> float:
        return float(np.mean([acc[k] for k in keys]))

    m: dict[str, float] = {}
    standard = [k for k in acc if k[0] in STANDARD]
    extra = [k for k in acc if k[0] not in STANDARD]
    if standard:
        m["ood/acc"] = mean(standard)
        for s in dict.fromkeys(s for _, s in standard):
            m[f"ood/s{s}/acc"] = mean([k for k in standard if k[1] == s])
        for fam, members in FAMILIES.items():
            keys = [k for k in standard if k[0] in members]
            if keys:
                m[f"ood/{fam}/acc"] = mean(keys)
    if extra:
        m["ood/extra_acc"] = mean(extra)
    for c in dict.fromkeys(c for c, _ in acc):
        m[f"ood/{c}/acc"] = mean([k for k in acc if k[0] == c])
        for c2, s in acc:
            if c2 == c:
                m[f"ood/{c}/s{s}/acc"] = acc[c, s]
    return m


class Evaluator:
    @staticmethod
    def check(settings) -> None:
        """The evaluation settings (``eval``: this class's keyword arguments), before any work."""
        from ame.eval.ood import PUBLISHED

        ev = settings
        positive_int(ev.batch_size, "eval.batch_size")
        seed(ev.seed, "eval.seed")
        if ev.ood_subsample is not None:
            positive_int(ev.ood_subsample, "eval.ood_subsample", minimum=1)  # null: the whole test set
        if ev.test_subsample is not None:
            positive_int(ev.test_subsample, "eval.test_subsample", minimum=1)  # null: the whole test set
        for key, names in (("eval.corruptions", ev.corruptions), ("eval.extras", ev.extras or [])):
            require(isinstance(names, Sequence) and not isinstance(names, str),
                    f"{key} must be a list, e.g. [gaussian_noise,contrast] (or [] for none), got {names!r}")
            check_names([str(c) for c in names], key)
        positive_int(ev.workers, "eval.workers")
        require(ev.download in (None, *PUBLISHED),
                f"eval.download must be one of {sorted(PUBLISHED)} or null, got {ev.download!r}")
        require(ev.download is None or str(ev.source) != "generated",
                "eval.download needs eval.source set to the folder to hold the arrays, e.g. eval.source=~/data/CIFAR-10-C")
        require(isinstance(ev.severities, Sequence) and not isinstance(ev.severities, str),
                f"eval.severities must be a list of integers in 1..5, e.g. [1,3,5], got {ev.severities!r}")
        check_severities(ev.severities)

    def __init__(self, model: nn.Module, data: ImageData, corruptions: Sequence[str], severities: Sequence[int],
                 ood_subsample: int | None, class_counts: np.ndarray | None, seed: int = 0,
                 batch_size: int = 256, device: torch.device | str = "cpu", extras: Sequence[str] = (),
                 source: str = "generated", download: str | None = None, cache_dir: str | None = None,
                 workers: int = 2, test_subsample: int | None = None):
        names = list(dict.fromkeys([*corruptions, *(extras or ())]))
        check_names(list(corruptions), "eval.corruptions")
        check_names(list(extras or ()), "eval.extras")
        check_severities(list(severities))
        self.model, self.data, self.batch_size, self.device = model.to(device).eval(), data, batch_size, device
        self.test_x, self.test_y = data.test_x, data.test_y
        if test_subsample is not None:  # a cheaper ID score, e.g. for search trials scored on val/acc
            keep = subsample(len(self.test_y), test_subsample, seed)
            self.test_x, self.test_y = self.test_x[keep], self.test_y[keep]
        severities = list(severities) if names else []
        if str(source) == "generated":
            keep = subsample(len(data.test_y), ood_subsample, seed)  # from the whole test set
            self.ood = generated_sets(data.test_x[keep], data.test_y[keep], names, severities, seed,
                                      cache_dir, workers) if names else {}
        else:
            folder = download_published(download, source) if download else source
            self.ood = published_sets(folder, names, severities, seed, ood_subsample, data.shape,
                                      data.num_classes) if names else {}
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
        with bar(f"evaluating {name}", len(self.ood), unit="set") as pbar:
            for (c, s), (x, _) in self.ood.items():
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

    def _per_class(self, pred: torch.Tensor) -> np.ndarray:
        correct = (pred == self.test_y).double()
        return np.array([float(correct[self.test_y == c].mean()) if (self.test_y == c).any() else 0.0
                         for c in range(self.data.num_classes)])

    def shard_accs(self, probs: dict, per_class: np.ndarray | None = None) -> list[float]:
        """Test accuracy reweighted to each shard's class mix (needs the class mixes)."""
        per_class = self._per_class(probs["id"].argmax(1)) if per_class is None else per_class
        return [self._mix_acc(per_class, c) for c in self.counts]

    def metrics(self, probs: dict, shard: int | None = None) -> dict[str, float]:
        """Metrics from :meth:`probabilities` (of one network, or averaged over an ensemble)."""
        p = probs["id"]
        pred = p.argmax(1)
        m = {"id/acc": float((pred == self.test_y).float().mean()),
             "id/nll": float(-p.gather(1, self.test_y[:, None]).clamp_min(1e-12).log().mean())}
        if self.ood:
            m |= ood_metrics({k: float((probs[k].argmax(1) == y).float().mean()) for k, (_, y) in self.ood.items()})
        if self.counts is not None:
            per_class = self._per_class(pred)
            accs = self.shard_accs(probs, per_class)
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
