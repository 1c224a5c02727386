"""Stage 4: data-free aggregation. Aggregators see expert weights (and shard sizes) only.

The model soup and every AME variant are one family, :class:`AME`: an ordinary ``torch.optim``
optimizer run over the experts with the pseudogradient of f_i(w) = ½‖w − x_i‖². Plain gradient
descent with step 1/k over one epoch is the soup, from any pivot.

Contract::

    aggregator(experts: Sequence[StateDict], sizes: Sequence[int], init: StateDict | None,
               buffers: Collection[str]) -> StateDict

``experts`` may be lazy (``Experts`` loads each file on access), so an expert is held only while
it is used. ``buffers`` names non-parameter entries (BatchNorm statistics): float buffers are
averaged, integer buffers are taken from the first expert.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Collection

import torch
from torch import Tensor

from ame.device import resolve_device
from ame.errors import AMEError, require
from ame.io import StateDict
from ame.progress import progress

PIVOTS = ("init", "soup", "zero", "first")
PSEUDOGRADIENTS = ("iterate", "pivot")
ORDERS = ("fixed", "shuffle")
LR_SCHEDULES = ("constant", "harmonic")


def _name(experts: Sequence, i: int) -> str:
    names = getattr(experts, "names", None)
    return f"expert {i}" + (f" ({names[i]})" if names else "")


@dataclass
class FlatSpec:
    """Where each state-dict entry lives in one flat float32 vector of the *parameters*.

    ``params``: float entries that are not buffers (optimised); ``averaged``: float buffers;
    ``copied``: integer entries (taken from the first expert)."""

    reference: StateDict  # shapes and dtypes only (meta tensors)
    params: list[str]
    averaged: list[str]
    copied: list[str]

    @classmethod
    def of(cls, sd: StateDict, buffers: Collection[str] = ()) -> "FlatSpec":
        floats = [k for k, v in sd.items() if v.is_floating_point()]
        meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}  # no data held
        return cls(meta, [k for k in floats if k not in buffers],
                   [k for k in floats if k in buffers], [k for k, v in sd.items() if not v.is_floating_point()])

    def check(self, sd: StateDict, name: str, against: str = "the first expert", finite: bool = True) -> StateDict:
        """One clear error if ``sd`` does not match the reference architecture or (``finite``) has
        NaN/Inf values."""
        if sd.keys() != self.reference.keys():
            missing, extra = sorted(self.reference.keys() - sd.keys()), sorted(sd.keys() - self.reference.keys())
            raise AMEError(f"{name} does not match {against}: missing keys {missing[:3]}, unexpected keys "
                           f"{extra[:3]}; experts, init and model= must share one architecture")
        for k, ref in self.reference.items():
            v = sd[k]
            if v.shape != ref.shape or v.dtype != ref.dtype:
                raise AMEError(f"{name} does not match {against} at '{k}': {tuple(v.shape)} {v.dtype} vs "
                               f"{tuple(ref.shape)} {ref.dtype}; experts, init and model= must share one architecture")
            if finite and v.is_floating_point() and not torch.isfinite(v).all():
                raise AMEError(f"{name} has NaN/Inf values in '{k}'; retrain that expert or leave it out")
        return sd

    def subtract(self, ref: Tensor, sd: StateDict, out: Tensor) -> Tensor:
        """``out = ref − flatten(sd)`` in one pass per tensor (no flattened copy of ``sd``)."""
        offset = 0
        for k in self.params:
            t = sd[k].detach().reshape(-1)
            torch.sub(ref[offset:offset + t.numel()], t, out=out[offset:offset + t.numel()])
            offset += t.numel()
        return out

    def flatten(self, sd: StateDict, keys: list[str] | None = None, out: Tensor | None = None) -> Tensor:
        """The ``keys`` entries of ``sd`` as one float32 vector, written into ``out`` when given
        (no allocation: the hot path of an AME step)."""
        keys = self.params if keys is None else keys
        if out is None:
            out = torch.empty(sum(self.reference[k].numel() for k in keys), dtype=torch.float32)
        offset = 0
        for k in keys:
            n = sd[k].numel()
            out[offset:offset + n].copy_(sd[k].detach().reshape(-1))
            offset += n
        return out

    def unflatten(self, vec: Tensor, keys: list[str] | None = None) -> StateDict:
        keys = self.params if keys is None else keys
        out, offset = {}, 0
        for k in keys:
            ref = self.reference[k]
            out[k] = vec[offset:offset + ref.numel()].reshape(ref.shape).to(ref.dtype).clone()
            offset += ref.numel()
        return out


def average(experts: Sequence[StateDict], weights: Sequence[float] | None = None,
            buffers: Collection[str] = ()) -> StateDict:
    """The (weighted) model soup, accumulated in float64 one expert at a time."""
    n = len(experts)
    require(n > 0, "no experts to aggregate; check experts.paths or data.shards.num_shards")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    require(len(weights) == n and all(w >= 0 for w in weights) and sum(weights) > 0,
            f"need {n} non-negative weights with a positive sum, got {weights}")
    first = experts[0]
    spec = FlatSpec.of(first, buffers)
    copied = {k: first[k].clone() for k in spec.copied}
    del first  # experts stream: one is held at a time
    keys = spec.params + spec.averaged
    total = torch.zeros(sum(spec.reference[k].numel() for k in keys), dtype=torch.float64)
    for i in range(n):
        sd = spec.check(experts[i], _name(experts, i))
        total += (weights[i] / sum(weights)) * spec.flatten(sd, keys).double()
        del sd
    out = {**spec.unflatten(total, keys), **copied}
    return {k: out[k] for k in spec.reference}


def distance(a: StateDict, b: StateDict, keys: Sequence[str]) -> float:
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys))


def _step(opt: torch.optim.Optimizer) -> None:
    try:
        opt.step()
    except TypeError as e:  # e.g. LBFGS: its step needs a closure that evaluates a loss on data
        raise AMEError(f"aggregator.optimizer: {type(opt).__name__}.step() failed ({e}); AME needs an "
                       f"optimizer that steps on a given gradient, such as SGD, Adam or Adagrad") from None


class AME:
    """Amortized Model Ensembling: feed per-expert pseudogradients to a torch.optim optimizer.

    Args:
        optimizer: a ``torch.optim.Optimizer`` class with its hyperparameters bound
            (Hydra ``_partial_: true``), called as ``optimizer([w])``.
        epochs: ensembling epochs (passes over the experts).
        pivot: starting point and reference: the shared ``init``, the ``soup``, ``zero`` or the
            ``first`` expert.
        pseudogradient: ``iterate`` g_i = ζ_i (w − x_i); ``pivot`` g_i = ζ_i (x_pivot − x_i) / N.
        amplification: ζ, a number, or ``shard_size`` for ζ_i = N n_i / Σ n (weights by shard size).
        order: ``fixed`` (expert 0, 1, ...) or ``shuffle`` (a new seeded permutation each epoch).
        lr_schedule: ``constant``, or ``harmonic``: step k (counted over all epochs) uses lr / k.
        seed: seeds ``order=shuffle``.
        name: the variant's name in results (``soup``, ``ame_adam``, ...).
        device: where the flat buffers and the optimizer state live (``cpu``, ``cuda``, ``auto``).

    Optional per-step hook (for watching a run, e.g. distance curves in W&B): set ``on_step`` to a
    function ``on_step(step, w)``; it is called with step 0 (``w`` = the pivot) and then every
    ``on_step_every`` steps with the flat float32 iterate ``w`` (read-only, on ``device``; the
    parameters in the first expert's key order). Unset (the default), it costs nothing.
    """

    on_step: Callable[[int, Tensor], None] | None = None
    on_step_every: int = 1

    data_free = True

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer], epochs: int = 1, pivot: str = "init",
                 pseudogradient: str = "iterate", amplification: float | str = 1.0, order: str = "fixed",
                 lr_schedule: str = "constant", seed: int = 0, name: str = "ame", device: str = "cpu"):
        require(pivot in PIVOTS, f"aggregator.pivot must be one of {PIVOTS}, got {pivot!r}")
        require(pseudogradient in PSEUDOGRADIENTS,
                f"aggregator.pseudogradient must be one of {PSEUDOGRADIENTS}, got {pseudogradient!r}")
        require(order in ORDERS, f"aggregator.order must be one of {ORDERS}, got {order!r}")
        require(lr_schedule in LR_SCHEDULES, f"aggregator.lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        require(isinstance(epochs, int) and epochs >= 1, f"aggregator.epochs must be an integer ≥ 1, got {epochs!r}")
        require(amplification == "shard_size" or (isinstance(amplification, (int, float))
                                                  and math.isfinite(amplification) and amplification > 0),
                f"aggregator.amplification must be a positive number or 'shard_size', got {amplification!r}")
        self.optimizer, self.epochs, self.pivot_kind = optimizer, epochs, pivot
        self.pseudogradient, self.amplification, self.order = pseudogradient, amplification, order
        self.lr_schedule, self.seed, self.name, self.device = lr_schedule, seed, name, device

    def pivot(self, experts: Sequence[StateDict], init: StateDict | None, buffers: Collection[str] = ()) -> StateDict:
        if self.pivot_kind == "init":
            require(init is not None, "aggregator.pivot=init needs the experts' shared initialisation "
                    "(train.init=shared|warm, or experts.init=<file>); else use aggregator.pivot=soup|first|zero")
            return FlatSpec.of(experts[0], buffers).check(init, "the initialisation")
        if self.pivot_kind == "soup":
            return average(experts, buffers=buffers)
        if self.pivot_kind == "first":
            return experts[0]
        return {k: torch.zeros_like(v) for k, v in experts[0].items()}

    def check(self) -> None:
        """Fail now, before any expert is trained, if the optimizer or the device cannot work:
        one step of the optimizer on a dummy parameter."""
        resolve_device(self.device, "aggregator.device")
        w = torch.nn.Parameter(torch.zeros(1))
        w.grad = torch.zeros(1)
        _step(self._optimizer(w))

    def _optimizer(self, w: torch.nn.Parameter) -> torch.optim.Optimizer:
        """``optimizer([w])`` on its fastest implementation: fused where torch has it (SGD, Adam,
        AdamW, Adagrad), else foreach; an explicit ``fused``/``foreach`` setting is kept."""
        chosen = getattr(self.optimizer, "keywords", {}) or {}
        tries = [{}] if {"fused", "foreach"} & set(chosen) else [{"fused": True}, {"foreach": True}, {}]
        for i, kwargs in enumerate(tries):
            try:
                return self.optimizer([w], **kwargs)
            except (TypeError, ValueError, RuntimeError) as e:
                if i == len(tries) - 1:
                    raise AMEError(f"aggregator.optimizer: {e}") from None
        raise AssertionError("unreachable")

    def _zeta(self, sizes: Sequence[int], n: int) -> list[float]:
        if self.amplification == "shard_size":
            return [n * s / sum(sizes) for s in sizes]
        return [float(self.amplification)] * n

    def __call__(self, experts: Sequence[StateDict], sizes: Sequence[int], init: StateDict | None = None,
                 buffers: Collection[str] = ()) -> StateDict:
        n = len(experts)
        require(n > 0, "no experts to aggregate; check experts.paths or data.shards.num_shards")
        require(len(sizes) == n and all(s > 0 for s in sizes),
                f"need one positive shard size per expert ({n}), got {list(sizes)}")
        first = experts[0]
        spec = FlatSpec.of(first, buffers)
        copied = {k: first[k].clone() for k in spec.copied}
        del first  # experts stream: one is held at a time
        device = resolve_device(self.device, "aggregator.device")
        # Flat float32 buffers for the iterate and the pseudogradient: an AME step is one pass that
        # writes g = w − x_i (or x_pivot − x_i) straight from the expert's tensors, and one fused
        # optimizer kernel. On CUDA the expert is staged through pinned memory and copied once.
        pivot = spec.flatten(self.pivot(experts, init, buffers)).to(device)
        w = torch.nn.Parameter(pivot.clone())
        g = torch.empty_like(pivot)
        on_gpu = device.type == "cuda"
        staging, x = (torch.empty(pivot.shape, pin_memory=True), torch.empty_like(pivot)) if on_gpu else (None, None)
        w.grad = g
        opt = self._optimizer(w)
        base_lr = [group["lr"] for group in opt.param_groups]
        zeta = self._zeta(sizes, n)
        averaged = torch.zeros(sum(spec.reference[k].numel() for k in spec.averaged), dtype=torch.float64)
        gen = torch.Generator().manual_seed(self.seed)
        step = 0
        hook, every = self.on_step, max(1, int(self.on_step_every))
        if hook is not None:
            hook(0, w.detach())
        for epoch in progress(range(self.epochs), f"{self.name}: ensembling epochs"):
            order = torch.randperm(n, generator=gen).tolist() if self.order == "shuffle" else range(n)
            for i in order:
                sd = spec.check(experts[i], _name(experts, i), finite=False)
                ref = w.detach() if self.pseudogradient == "iterate" else pivot
                if on_gpu:
                    x.copy_(spec.flatten(sd, out=staging), non_blocking=True)
                    torch.sub(ref, x, out=g)
                else:
                    spec.subtract(ref, sd, out=g)
                if epoch == 0:  # buffers: the ζ-weighted mean (uniform, or by shard size)
                    averaged += spec.flatten(sd, spec.averaged).double() * (zeta[i] / sum(zeta))
                del sd  # a lazily loaded expert is released before the next one is read
                if self.pseudogradient == "pivot":
                    g.div_(n)
                if zeta[i] != 1.0:
                    g.mul_(zeta[i])
                step += 1
                if self.lr_schedule == "harmonic":
                    for group, lr in zip(opt.param_groups, base_lr):
                        group["lr"] = lr / step
                _step(opt)
                if on_gpu:
                    torch.cuda.current_stream().synchronize()  # before the staging buffer is refilled
                if hook is not None and (step % every == 0 or step == self.epochs * n):
                    hook(step, w.detach())
        if not (torch.isfinite(w).all() and torch.isfinite(averaged).all()):
            # NaN/Inf propagate through every optimizer step, so one check at the end suffices; only
            # then are the experts scanned, to name one with NaN/Inf values if there is one
            for i in range(n):
                spec.check(experts[i], _name(experts, i))
            raise AMEError("the aggregate has NaN/Inf weights: the AME optimizer diverged; lower aggregator.optimizer.lr")
        out = {**spec.unflatten(w.detach().cpu()), **spec.unflatten(averaged, spec.averaged), **copied}
        return {k: out[k] for k in spec.reference}


class _Subset(Sequence):
    """Some of the experts, still loaded lazily, with their names."""

    def __init__(self, experts: Sequence[StateDict], idx: Sequence[int]):
        self.experts, self.idx = experts, list(idx)
        names = getattr(experts, "names", None)
        self.names = [names[i] for i in self.idx] if names else None

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> StateDict:
        return self.experts[self.idx[i]]


class GreedySoup:
    """Greedy soup (Wortsman et al. 2022): rank the experts by validation accuracy, start from
    the best, and add each next one only if the soup's validation accuracy does not drop.

    **Not data-free**: it is called with ``score``, a function of a state dict that returns its
    accuracy on a held-out validation split (``data.val_size``), and its results say
    ``data_free: false``."""

    data_free = False
    pivot_kind = "soup"

    def __init__(self, name: str = "greedy_soup"):
        self.name, self.info = name, {}

    def __call__(self, experts: Sequence[StateDict], sizes: Sequence[int], init: StateDict | None = None,
                 buffers: Collection[str] = (), score: Callable[[StateDict], float] | None = None) -> StateDict:
        require(score is not None, "greedy_soup needs held-out data: set data.val_size (e.g. data.val_size=1000)")
        require(len(experts) > 0, "no experts to aggregate; check experts.paths or data.shards.num_shards")
        alone = [score(experts[i]) for i in range(len(experts))]
        ranked = sorted(range(len(experts)), key=lambda i: -alone[i])
        chosen, best = [ranked[0]], alone[ranked[0]]
        history = [(ranked[0], best, True)]
        for i in ranked[1:]:
            s = score(average(_Subset(experts, chosen + [i]), buffers=buffers))
            history.append((i, s, s >= best))
            if s >= best:
                chosen, best = chosen + [i], s
        self.info = {"chosen": sorted(chosen), "val_acc": best,
                     "tried": [{"expert": i, "val_acc": s, "added": a} for i, s, a in history]}
        return average(_Subset(experts, sorted(chosen)), buffers=buffers)


class OutputEnsemble:
    """The output ensemble: the mean of the experts' softmax outputs. It is N networks, not one,
    so it returns no weights (``single_network = False``): it is the reference that a single merged
    network tries to reach. The pipeline evaluates it in every run (``results["ensemble"]``, from
    :meth:`ame.evaluate.Evaluator.ensemble_probabilities`); with ``aggregator=ensemble`` those are
    the run's metrics and no aggregate file is written."""

    data_free = True
    single_network = False

    def __init__(self, name: str = "ensemble"):
        self.name = name
