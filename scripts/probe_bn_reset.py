"""Why does ``bn_reset=true`` lower the untouched base? Recompute its BatchNorm statistics in
several ways and measure the test accuracy of each (issue 23).

    python scripts/probe_bn_reset.py experiment=bn_stats          # the strong regime's cached base
    python scripts/probe_bn_reset.py experiment=verdict base_seed=1

Takes Hydra overrides like run.py, reads the experts' shared base from the cache (train it first,
e.g. ``python run.py experiment=bn_stats aggregator=soup``), and prints one Markdown row per way:
which images (the 1,000 validation images, or the public images the base was trained on), how
many, clean or augmented as in training (random crop with zero padding + flip), the batch size,
and the averaging (momentum None: the mean of the batch statistics, as ame.repair does; or the
exponential average of training, momentum 0.1, over several augmented passes), and statistics
measured layer by layer in eval mode. Deterministic.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

from ame.cache import Entry
from ame.config import instantiate
from ame.data import split
from ame.evaluate import accuracy
from ame.experts import base_key, base_seed
from ame.models import build_model
from ame.repair import reset_batchnorm
from ame.train import augment

ROOT = Path(__file__).resolve().parents[1]


def recompute(model, sd, data, x, batch: int, momentum, passes: int = 1, aug=None, seed: int = 0):
    """``sd`` with statistics recomputed on ``x`` (uint8): train-mode passes, optional augmentation."""
    net = copy.deepcopy(model)
    net.load_state_dict(sd)
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = momentum
    net.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(passes):
            order = torch.randperm(len(x), generator=g) if passes > 1 else torch.arange(len(x))
            for i in range(0, len(x), batch):
                b = x[order[i:i + batch]]
                if aug is not None:
                    b = augment(b, aug[0], aug[1], g)
                net(data.normalize(b))
    out = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for k in sd:
        if k.endswith("num_batches_tracked"):
            out[k] = sd[k].clone()
    return out


def eval_mode(model, sd, data, x, batch: int = 256):
    """``sd`` with each BatchNorm's statistics recomputed in turn, in network order, on the
    activations the network gives at test time: the layers before it in eval mode with their
    new statistics (not the batch statistics that train mode normalises with)."""
    net = copy.deepcopy(model)
    net.load_state_dict(sd)
    net.eval()
    with torch.no_grad():
        for m in [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            m.reset_running_stats()
            m.momentum = None
            m.train()
            for i in range(0, len(x), batch):
                net(data.normalize(x[i:i + batch]))
            m.eval()
    out = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for k in sd:
        if k.endswith("num_batches_tracked"):
            out[k] = sd[k].clone()
    return out


def main() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[*sys.argv[1:], "logger=none"])
    torch.manual_seed(0)
    data = instantiate(cfg.data.dataset, "data")
    shards = split(data.train_y.numpy(), instantiate(cfg.data.shards, "data.shards"), seed=int(cfg.seed),
                   public_size=int(cfg.data.public_size), val_size=int(cfg.data.val_size),
                   holdout_seed=cfg.get("base_seed"))
    key, spec = base_key(cfg, data)
    hit = Entry(cfg.paths.cache_dir, "bases", key, spec, what="the experts' shared base").load_tensors("init.safetensors")
    if hit is None:
        sys.exit(f"error: no cached base for these settings under {cfg.paths.cache_dir}/bases; train it first "
                 "(python run.py <the same overrides> aggregator=soup)")
    base = hit[0]
    model = build_model(cfg.model, data, base_seed(cfg))
    dev = torch.device("cpu")
    val, public = data.train_x[shards.val], data.train_x[shards.public]
    pad, flip = int(cfg.train.augment.crop_padding), bool(cfg.train.augment.flip)
    test = lambda sd: 100 * accuracy(model, data, sd, data.test_x, data.test_y, dev)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    pub1k = public[torch.randperm(len(public), generator=g)[:len(val)]]
    ways = [
        ("as trained (running averages of training, momentum 0.1, augmented batches)", lambda: base),
        ("ame.repair.reset_batchnorm: validation, clean, batch 256, momentum None",
         lambda: reset_batchnorm(model, base, data, val, dev)),
        ("validation, clean, one batch of all", lambda: recompute(model, base, data, val, len(val), None)),
        ("validation, augmented once, batch 256, momentum None",
         lambda: recompute(model, base, data, val, 256, None, aug=(pad, flip))),
        ("validation, augmented ×10, batch 256, momentum None",
         lambda: recompute(model, base, data, val, 256, None, passes=10, aug=(pad, flip))),
        ("validation, flip only ×10, batch 256, momentum None",
         lambda: recompute(model, base, data, val, 256, None, passes=10, aug=(0, flip))),
        ("public (training images), same count as validation, clean, batch 256, momentum None",
         lambda: recompute(model, base, data, pub1k, 256, None)),
        ("public, all, clean, batch 256, momentum None", lambda: recompute(model, base, data, public, 256, None)),
        ("public, all, augmented once, batch 256, momentum None",
         lambda: recompute(model, base, data, public, 256, None, aug=(pad, flip))),
        ("public, all, augmented, batch 128, momentum 0.1 (training's averaging), 3 passes",
         lambda: recompute(model, base, data, public, 128, 0.1, passes=3, aug=(pad, flip))),
        ("validation, clean, layer by layer in eval mode (each layer sees its inputs as at test time)",
         lambda: eval_mode(model, base, data, val)),
    ]
    print("| statistics from | test accuracy (%) |\n|---|---:|")
    for name, make in ways:
        print(f"| {name} | {test(make()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
