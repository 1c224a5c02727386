"""Networks the experts share: an MLP, a small CNN, a CIFAR ResNet and timm models; and
:func:`build_model`, which builds the configured one for a dataset.

``norm`` chooses the normalisation layer. ``group`` (GroupNorm) keeps the experts free of data
statistics; ``batch`` stores running statistics as buffers, which aggregators average."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn

from ame.config import instantiate
from ame.errors import AMEError, require

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from ame.data import ImageData

NORMS = ("none", "batch", "group")


def build_model(model_cfg: "DictConfig", data: "ImageData", seed: int) -> nn.Module:
    """Instantiate ``model_cfg`` for ``data``'s image shape and classes, initialised from ``seed``."""
    torch.manual_seed(seed)
    c, h, w = data.shape
    require(h == w, f"{data.name}: only square images are supported, got {h}×{w}")
    model = instantiate(model_cfg, "model", in_channels=c, image_size=h, num_classes=data.num_classes)
    input_renormalizer(model, data.mean, data.std)  # a pretrained timm model sees its own input statistics
    return model.to(memory_format=torch.channels_last)  # matches ImageData.normalize's layout


def buffer_names(model: nn.Module) -> list[str]:
    """The state-dict entries that are not parameters (BatchNorm statistics): averaged, not optimised."""
    return [k for k, _ in model.named_buffers()]


def _norm(kind: str, channels: int) -> nn.Module:
    require(kind in NORMS, f"model.norm must be one of {NORMS}, got {kind!r}")
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class MLP(nn.Sequential):
    def __init__(self, in_channels: int, image_size: int, num_classes: int, hidden: Sequence[int] = (128, 128)):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class CNN(nn.Sequential):
    """Conv-norm-ReLU blocks, each halving the resolution, then global pooling and a linear head."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int,
                 widths: Sequence[int] = (32, 64, 128), norm: str = "none"):
        require(image_size >= 2 ** len(widths), f"model.widths has {len(widths)} blocks; too many for "
                f"{image_size}×{image_size} images")
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=norm == "none"), _norm(norm, w), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
        super().__init__(*layers)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out))

    def forward(self, x):
        out = self.relu(self.n1(self.conv1(x)))
        return self.relu(self.n2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, §4.2): depth = 6n + 2, widths w, 2w, 4w. depth=20 → ResNet-20."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, depth: int = 20, width: int = 16,
                 norm: str = "group"):
        super().__init__()
        require((depth - 2) % 6 == 0 and depth >= 8, f"model.depth must be 6n+2 (20, 32, 44, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), _norm(norm, width), nn.ReLU())
        blocks, c = [], width
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(c, w, 2 if stage > 0 and i == 0 else 1, norm))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def timm_model(in_channels: int, image_size: int, num_classes: int, name: str = "vit_small_patch16_224",
               pretrained: str | bool | None = None, **kwargs) -> nn.Module:
    """Any timm model by ``name`` (resnet18, convnext_tiny, vit_small_patch16_224, ...), for
    ``num_classes`` classes and ``in_channels`` channels; models that take an image size (ViTs)
    get ``image_size``. ``pretrained``: a local weights file for ``name`` (timm drops the file's
    classifier head when the classes differ and resamples a position embedding), ``true`` for
    timm's own download (online users), or null for random weights. A pretrained model keeps the
    input normalisation it was trained with: its ``pretrained_cfg`` mean/std are recorded in
    ``model.input_stats`` and :func:`build_model` maps the data's standardised inputs to them."""
    import logging

    import timm

    require(timm.is_model(name), f"model.name={name!r} is not a timm model; e.g. resnet18, convnext_tiny, "
            "vit_small_patch16_224 (timm.list_models() lists them)")
    if pretrained is True or str(pretrained).lower() == "true":
        overlay = {"pretrained": True}
    elif pretrained:
        path = Path(str(pretrained)).expanduser()
        require(path.is_file(), f"model.pretrained={pretrained} not found; give a local weights file for {name} "
                "(e.g. timm's model.safetensors), model.pretrained=true to download it, or model.pretrained=null")
        overlay = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    else:
        logging.getLogger(__name__).warning(
            "model.pretrained is not set: %s starts from random weights (the paper fine-tunes a pretrained "
            "ViT-S); set model.pretrained=/path/to/weights (or AME_VIT_WEIGHTS)", name)
        overlay = {"pretrained": False}
    def create(**sized):
        return timm.create_model(name, num_classes=num_classes, in_chans=in_channels, **sized, **overlay, **kwargs)

    try:
        try:
            model = create(img_size=image_size)  # ViTs and others built for an image size
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            model = create()  # convolutional networks take any size
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as e:
        local = bool(overlay.get("pretrained_cfg_overlay"))
        hint = f"is the file a {name} checkpoint?" if local else "is the network reachable (or give a local file)?"
        raise AMEError(f"model: cannot build {name} with model.pretrained={pretrained} "
                       f"({str(e).splitlines()[0][:120]}); {hint}") from None
    if overlay["pretrained"]:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        if "mean" in cfg and "std" in cfg and len(cfg["mean"]) == in_channels:
            model.input_stats = (tuple(cfg["mean"]), tuple(cfg["std"]))
    return model


def input_renormalizer(model: nn.Module, data_mean, data_std) -> None:
    """Make ``model`` (recorded pretrained ``input_stats``) see inputs standardised with its own
    mean/std instead of the data's: a forward pre-hook x → (x·σ_d + μ_d − μ_p) / σ_p. It keeps the
    state dict unchanged (no new entries)."""
    import torch

    stats = getattr(model, "input_stats", None)
    if stats is None:
        return
    mean_p, std_p = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in stats)
    scale = (torch.as_tensor(data_std, dtype=torch.float32)[:, None, None] / std_p)
    shift = (torch.as_tensor(data_mean, dtype=torch.float32)[:, None, None] - mean_p) / std_p

    def hook(module, args):
        x = args[0]
        return (x * scale.to(x.device, x.dtype) + shift.to(x.device, x.dtype), *args[1:])

    model.register_forward_pre_hook(hook)
