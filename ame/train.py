"""Stage 3: train the experts (one per shard) from a shared, warm or independent initialisation.

Data stays a uint8 tensor; each step indexes a batch, augments it batched (random crop with
padding, horizontal flip) and normalises it. No DataLoader, no per-image Python work.
"""
from __future__ import annotations

import contextlib
import math
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from ame.data import ImageData
from ame.checks import number, optimizer_works
from ame.config import instantiate
from ame.errors import AMEError, positive_int, require
from ame.models import build_model
from ame.progress import bar, report

INITS = ("shared", "warm", "independent")


def augment(x: torch.Tensor, crop_padding: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Per-image random crop (zero padding) and horizontal flip of a whole batch at once."""
    b, c, h, w = x.shape
    if crop_padding > 0:
        p = crop_padding
        xp = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = xp[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
               rows, cols]
    if flip:
        mask = (torch.rand(b, generator=g) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(mask, x.flip(-1), x)
    return x


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int, aug: DictConfig, g: torch.Generator):
    """One expert's training batches, in order: a seeded permutation per epoch, each batch
    augmented on the tensors' device. Sequential and parallel training draw from this same stream."""
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g).to(x.device)
        for start in range(0, len(y), batch_size):
            b = perm[start:start + batch_size]
            yield augment(x[b], int(aug.crop_padding), bool(aug.flip), g), y[b]


def _lr_lambda(kind: str, steps: int):
    require(kind in ("cosine", "constant"), f"train.lr_schedule must be cosine or constant, got {kind!r}")
    if kind == "constant":
        return lambda k: 1.0
    return lambda k: 0.5 * (1 + math.cos(math.pi * k / max(1, steps)))


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (tensor cores); full fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class _EpochMeter:
    """Running training loss and accuracy of one or several networks (a leading dimension), kept on
    the device: read (one synchronisation) once per epoch, or every few steps for a terminal bar."""

    def __init__(self, n: int, device: torch.device):
        self.loss = torch.zeros(n, device=device, dtype=torch.float64)
        self.correct = torch.zeros(n, device=device, dtype=torch.float64)
        self.seen = torch.zeros(n, device=device, dtype=torch.float64)

    @torch.no_grad()
    def add(self, mean_loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
        """Shapes: batch-mean losses (n,), logits (n, b, classes), labels (n, b) and a 0/1 mask of
        real examples (n, b)."""
        count = mask.sum(-1)
        self.loss += mean_loss.double() * count
        self.correct += ((logits.argmax(-1) == y).double() * mask).sum(-1)
        self.seen += count

    def read(self, i: int = 0, reset: bool = True) -> dict[str, float]:
        seen = max(1.0, float(self.seen[i]))
        out = {"loss": float(self.loss[i]) / seen, "acc": float(self.correct[i]) / seen}
        if reset:
            self.loss[i], self.correct[i], self.seen[i] = 0, 0, 0
        return out


def fit(model: nn.Module, data: ImageData, idx: np.ndarray, train_cfg: DictConfig, epochs: int, seed: int,
        device: torch.device, lr: float | None = None, name: str = "training", label: str | None = None) -> nn.Module:
    """Train ``model`` on ``data.train_x[idx]`` for ``epochs`` with ``train_cfg``'s optimizer
    (its learning rate replaced by ``lr`` if given) and schedule. ``name`` (e.g. ``warm_base``,
    ``expert_2``) labels the terminal bar and the per-epoch training loss and accuracy, which go
    to the log and to :mod:`ame.progress` listeners."""
    require(len(idx) > 0, "cannot train on an empty shard")
    model.to(device).train()
    x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
    bs = int(train_cfg.batch_size)
    opt = instantiate(train_cfg.optimizer, "train.optimizer", **({"lr": lr} if lr is not None else {}))(model.parameters())
    per_epoch = math.ceil(len(idx) / bs)
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(train_cfg.lr_schedule, steps))
    g = torch.Generator().manual_seed(seed)
    batches = _batches(x, y, bs, epochs, train_cfg.augment, g)
    meter = _EpochMeter(1, device)
    with bar(label or name.replace("_", " "), steps, unit="step") as pbar:
        for step, (xb, yb) in enumerate(batches, 1):
            with _autocast(device):
                out = model(data.normalize(xb))
                loss = F.cross_entropy(out, yb, label_smoothing=float(train_cfg.label_smoothing))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            meter.add(loss.detach()[None], out.detach()[None], yb[None], torch.ones(1, len(yb), device=device))
            epoch = (step - 1) // per_epoch + 1
            if not pbar.disable:
                pbar.update()
                if step % 10 == 0 or step % per_epoch == 0:
                    pbar.set_postfix_str(f"epoch {epoch}/{epochs} loss {meter.read(reset=False)['loss']:.3f}")
            if step % per_epoch == 0:
                report(name, "epoch", epoch, meter.read(), of=epochs)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise AMEError("training diverged (NaN/Inf weights); lower train.optimizer.lr")
    return model.eval()


def fit_parallel(models: list[nn.Module], data: ImageData, shards: list[np.ndarray], train_cfg: DictConfig,
                 seeds: list[int], device: torch.device, names: list[str] | None = None) -> list[nn.Module]:
    """Train several experts at once as one stacked model (``torch.func.vmap`` over their
    parameters), each on its own shard, data order and lr schedule: the same experts as calling
    :func:`fit` on each in turn (up to float rounding), in one pass of larger kernels.

    Each expert is its own parameter group of one torch.optim optimizer; an expert that has
    finished its (fewer) steps gets no gradient, so the optimizer leaves it untouched. Batches are
    padded to a common size and the padding masked out of the loss."""
    from torch.func import functional_call, vmap

    require(not any(len(list(m.buffers())) for m in models),
            "train.parallel_experts=true needs a model without buffers (BatchNorm statistics); use "
            "model.norm=group or none, or train.parallel_experts=false")
    bs, epochs, n = int(train_cfg.batch_size), int(train_cfg.epochs), len(models)
    names = names or [f"expert_{i}" for i in range(n)]
    per_epoch = [math.ceil(len(s) / bs) for s in shards]
    steps = [epochs * p for p in per_epoch]
    meter = _EpochMeter(n, device)
    for m in models:
        m.to(device).train()
    opt = instantiate(train_cfg.optimizer, "train.optimizer")([{"params": list(m.parameters())} for m in models])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [_lr_lambda(train_cfg.lr_schedule, s) for s in steps])
    streams = [_batches(data.train_x[s].to(device), data.train_y[s].to(device), bs, epochs, train_cfg.augment,
                        torch.Generator().manual_seed(seed)) for s, seed in zip(shards, seeds)]
    names_ = [k for k, _ in models[0].named_parameters()]
    each = [dict(m.named_parameters()) for m in models]  # the same Parameter objects on every step
    template = models[0]

    def forward(params, x):
        return functional_call(template, params, (x,))

    c, h, w = data.shape
    pbar = bar(f"{n} experts at once", max(steps), unit="step")
    for step in range(max(steps)):
        active = [step < s for s in steps]
        xs = torch.zeros(n, bs, c, h, w, dtype=torch.uint8, device=device)
        ys = torch.zeros(n, bs, dtype=torch.int64, device=device)
        mask = torch.zeros(n, bs, device=device)
        for i, stream in enumerate(streams):
            if active[i]:
                xb, yb = next(stream)
                xs[i, :len(yb)], ys[i, :len(yb)], mask[i, :len(yb)] = xb, yb, 1.0
        params = {k: torch.stack([named[k] for named in each]) for k in names_}
        with _autocast(device):
            logits = vmap(forward)(params, data.normalize(xs.flatten(0, 1)).reshape(n, bs, c, h, w))
        per = F.cross_entropy(logits.flatten(0, 1).float(), ys.flatten(), reduction="none",
                              label_smoothing=float(train_cfg.label_smoothing)).view(n, bs)
        means = (per * mask).sum(1) / mask.sum(1).clamp_min(1)  # each expert's own batch mean
        loss = means.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for m, on in zip(models, active):
            if not on:
                for p in m.parameters():
                    p.grad = None
        opt.step()
        sched.step()
        meter.add(means.detach(), logits.detach(), ys, mask)
        pbar.update()
        for i in range(n):
            if active[i] and (step + 1) % per_epoch[i] == 0:
                report(names[i], "epoch", (step + 1) // per_epoch[i], meter.read(i), of=epochs)
    pbar.close()
    for m in models:
        if not all(torch.isfinite(p).all() for p in m.parameters()):
            raise AMEError("training diverged (NaN/Inf weights); lower train.optimizer.lr")
    return [m.eval() for m in models]


def check_train(train_cfg: DictConfig, public_size) -> None:
    """The training settings (``train``), before anything is trained; ``public_size``: the public
    split a warm base trains on (``data.public_size``)."""
    require(train_cfg.init in INITS, f"train.init must be one of {INITS}, got {train_cfg.init!r}")
    positive_int(train_cfg.epochs, "train.epochs")
    positive_int(train_cfg.batch_size, "train.batch_size")
    require(isinstance(public_size, int) and public_size >= 0,
            f"data.public_size must be an integer ≥ 0, got {public_size!r}")
    if train_cfg.init == "warm":
        require(public_size > 0, "train.init=warm trains a shared base on the public split, but data.public_size=0; "
                "set data.public_size (e.g. 10000) or use train.init=shared")
        positive_int(train_cfg.warm_epochs, "train.warm_epochs")
    optimizer_works(train_cfg.optimizer, "train.optimizer")
    if train_cfg.warm_lr is not None:
        number(train_cfg.warm_lr, "train.warm_lr", 0, low_open=True, example="; or null to use train.optimizer.lr")
    number(train_cfg.label_smoothing, "train.label_smoothing", 0, 1, high_open=True, example="; e.g. 0.1 (0: none)")
    require(train_cfg.lr_schedule in ("cosine", "constant"),
            f"train.lr_schedule must be cosine or constant, got {train_cfg.lr_schedule!r}")
    aug = train_cfg.augment
    positive_int(aug.crop_padding, "train.augment.crop_padding", minimum=0)
    require(isinstance(aug.flip, bool), f"train.augment.flip must be true or false, got {aug.flip!r}")
    require(isinstance(train_cfg.parallel_experts, bool),
            f"train.parallel_experts must be true or false, got {train_cfg.parallel_experts!r}")


def expert_seed(seed: int, i: int) -> int:
    """Seed of expert ``i``'s data order (and, for ``init=independent``, its initialisation)."""
    return seed * 1000 + i + 1


def initial_state(model_cfg: DictConfig, train_cfg: DictConfig, data: ImageData, public: np.ndarray, seed: int,
                  device: torch.device) -> dict[str, torch.Tensor] | None:
    """The experts' common starting point: a seeded random init (``shared``), that init trained on
    the public split (``warm``), or None (``independent``: each expert draws its own)."""
    if train_cfg.init == "independent":
        return None
    model = build_model(model_cfg, data, seed)
    if train_cfg.init == "warm":
        fit(model, data, public, train_cfg, int(train_cfg.warm_epochs), seed, device, lr=train_cfg.get("warm_lr"),
            name="warm_base")
    return _state(model)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_experts(model_cfg: DictConfig, train_cfg: DictConfig, data: ImageData, shards: list[np.ndarray],
                  init: dict[str, torch.Tensor] | None, seeds: list[int], device: torch.device,
                  names: list[str] | None = None):
    """Yield one trained expert (state dict) per shard, in order: one after another (each yielded
    as soon as it is done, so a caller can save it), or all at once with ``train.parallel_experts``.
    ``names`` (default ``expert_<i>``) label their bars and per-epoch metrics."""
    names = names or [f"expert_{i}" for i in range(len(shards))]

    def start(seed: int) -> nn.Module:
        model = build_model(model_cfg, data, seed)
        if init is not None:
            model.load_state_dict(init)
        return model

    if train_cfg.parallel_experts and len(shards) > 1:
        models = fit_parallel([start(s) for s in seeds], data, shards, train_cfg, seeds, device, names)
        yield from (_state(m) for m in models)
        return
    for k, (shard, seed, name) in enumerate(zip(shards, seeds, names), 1):
        yield _state(fit(start(seed), data, shard, train_cfg, int(train_cfg.epochs), seed, device, name=name,
                         label=f"{name.replace('_', ' ')} ({k}/{len(shards)})"))

