"""Stage 3: train the experts (one per shard) from a shared, warm or independent initialisation.

Data stays a uint8 tensor; each step indexes a batch, augments it batched (random crop with
padding, horizontal flip) and normalises it. No DataLoader, no per-image Python work.
"""
from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from ame.data import ImageData
from ame.errors import AMEError, instantiate, require
from ame.report import progress

INITS = ("shared", "warm", "independent")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(name == "cpu" or torch.cuda.is_available(), f"device={name!r} but CUDA is not available; use cpu or auto")
    return torch.device(name)


def build_model(model_cfg: DictConfig, data: ImageData, seed: int) -> nn.Module:
    """Instantiate ``model_cfg`` for ``data``'s image shape and classes, initialised from ``seed``."""
    torch.manual_seed(seed)
    c, h, w = data.shape
    require(h == w, f"{data.name}: only square images are supported, got {h}×{w}")
    model = instantiate(model_cfg, "model", in_channels=c, image_size=h, num_classes=data.num_classes)
    return model.to(memory_format=torch.channels_last)  # matches ImageData.normalize's layout


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


def fit(model: nn.Module, data: ImageData, idx: np.ndarray, train_cfg: DictConfig, epochs: int, seed: int,
        device: torch.device, lr: float | None = None) -> nn.Module:
    """Train ``model`` on ``data.train_x[idx]`` for ``epochs`` with ``train_cfg``'s optimizer
    (its learning rate replaced by ``lr`` if given) and schedule."""
    require(len(idx) > 0, "cannot train on an empty shard")
    model.to(device).train()
    x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
    bs = int(train_cfg.batch_size)
    steps = epochs * math.ceil(len(idx) / bs)
    opt = instantiate(train_cfg.optimizer, "train.optimizer", **({"lr": lr} if lr is not None else {}))(model.parameters())
    if train_cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(1, steps))))
    else:
        require(train_cfg.lr_schedule == "constant", f"train.lr_schedule must be cosine or constant, "
                f"got {train_cfg.lr_schedule!r}")
        sched = None
    g = torch.Generator().manual_seed(seed)
    aug = train_cfg.augment
    for _ in progress(range(epochs), "epochs"):
        perm = torch.randperm(len(idx), generator=g).to(device)
        for start in range(0, len(idx), bs):
            b = perm[start:start + bs]
            xb = augment(x[b], int(aug.crop_padding), bool(aug.flip), g)
            loss = F.cross_entropy(model(data.normalize(xb)), y[b], label_smoothing=float(train_cfg.label_smoothing))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched:
                sched.step()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise AMEError("training diverged (NaN/Inf weights); lower train.optimizer.lr")
    return model.eval()


def _positive_int(value, key: str) -> int:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"{key} must be an integer ≥ 1, got {value!r}")
    return value


def check_train_cfg(train_cfg: DictConfig, public_size) -> None:
    require(train_cfg.init in INITS, f"train.init must be one of {INITS}, got {train_cfg.init!r}")
    _positive_int(train_cfg.epochs, "train.epochs")
    _positive_int(train_cfg.batch_size, "train.batch_size")
    require(isinstance(public_size, int) and public_size >= 0,
            f"data.public_size must be an integer ≥ 0, got {public_size!r}")
    if train_cfg.init == "warm":
        require(public_size > 0, "train.init=warm trains a shared base on the public split, but data.public_size=0; "
                "set data.public_size (e.g. 10000) or use train.init=shared")
        _positive_int(train_cfg.warm_epochs, "train.warm_epochs")


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
        fit(model, data, public, train_cfg, int(train_cfg.warm_epochs), seed, device, lr=train_cfg.get("warm_lr"))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_expert(model_cfg: DictConfig, train_cfg: DictConfig, data: ImageData, shard: np.ndarray,
                 init: dict[str, torch.Tensor] | None, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    model = build_model(model_cfg, data, seed)
    if init is not None:
        model.load_state_dict(init)
    fit(model, data, shard, train_cfg, int(train_cfg.epochs), seed, device)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def buffer_names(model: nn.Module) -> list[str]:
    return [k for k, _ in model.named_buffers()]

