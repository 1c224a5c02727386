"""Why does ``bn_reset=true`` lower the untouched base? Recompute its BatchNorm statistics in
several ways and measure the test accuracy of each (issue 23).

    python scripts/probe_bn_reset.py experiment=bn_stats          # the strong regime's cached base
    python scripts/probe_bn_reset.py experiment=verdict base_seed=1

Takes Hydra overrides like run.py, reads the experts' shared base from the cache (``--train``:
train and cache it when it is missing, as run.py would), and prints one Markdown row per way:
which images (the 1,000 validation images, or the public images the base was trained on), how
many, clean or augmented as in training (random crop with zero padding + flip), the batch size,
and the averaging (momentum None: the mean of the batch statistics, as ame.repair does), and
statistics measured layer by layer in eval mode. Scored on a fixed subsample of the test set
(``--test-size``, default 5,000: a binomial sd of about 0.6 point). Deterministic.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

from ame.cache import Entry
from ame.config import instantiate
from ame.data import split
from ame.errors import one_line
from ame.eval.ood import subsample
from ame.eval.evaluate import accuracy
from ame.experts import _meta, base_key, shared_seed
from ame.models import build_model
from ame.repair import images_as_trained, reset_batchnorm
from ame.train import initial_state

ROOT = Path(__file__).resolve().parents[1]


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


@one_line  # a bad override, missing data: one error: line
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    ap.add_argument("--train", action="store_true", help="train and cache the base when it is missing")
    ap.add_argument("--test-size", type=int, default=5000, help="test images scored (0: all 10,000)")
    args = ap.parse_args()
    train, test_size = args.train, args.test_size or None
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=[*args.overrides, "logger=none"])
    torch.manual_seed(0)
    data = instantiate(cfg.data.dataset, "data")
    shards = split(data.train_y.numpy(), instantiate(cfg.data.shards, "data.shards"), seed=int(cfg.seed),
                   public_size=int(cfg.data.public_size), val_size=int(cfg.data.val_size),
                   holdout_seed=cfg.base_seed)
    bseed = shared_seed(cfg.seed, cfg.base_seed)
    key, spec = base_key(cfg.train, cfg.data, cfg.model, bseed, data)
    entry = Entry(cfg.paths.cache_dir, "bases", key, spec, what="the experts' shared base")
    dev = torch.device("cpu")
    with entry.lock():
        hit = entry.load_tensors("init.safetensors")
        if hit is None and not train:
            sys.exit(f"error: no cached base for these settings under {cfg.paths.cache_dir}/bases; train it first "
                     "(add --train, or python run.py <the same overrides> aggregator=soup)")
        if hit is None:  # as ame.experts.TrainedExperts does: trained once, cached for every later run
            base = initial_state(cfg.model, cfg.train, data, shards.public, bseed, dev)
            entry.put_tensors("init.safetensors", base, _meta(init=str(cfg.train.init),
                                                              public_size=str(len(shards.public))))
        else:
            base = hit[0]
    model = build_model(cfg.model, data, bseed)
    val, public = data.train_x[shards.val], data.train_x[shards.public]
    pad, flip = int(cfg.train.augment.crop_padding), bool(cfg.train.augment.flip)
    keep = subsample(len(data.test_y), test_size, 0)  # a fixed subsample (all: --test-size 0)
    test = lambda sd: 100 * accuracy(model, data, sd, data.test_x[keep], data.test_y[keep], dev)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    pub1k = public[torch.randperm(len(public), generator=g)[:len(val)]]
    reset = lambda x, **kw: reset_batchnorm(model, base, data, x, dev, seed=int(cfg.seed), **kw)  # noqa: E731
    trained = images_as_trained(pad, flip, int(cfg.seed))
    times = f"×{trained['passes']}"
    ways = [  # the most telling first: the rows print as they are measured
        ("as trained (running averages of training, momentum 0.1, augmented batches)", lambda: base),
        ("validation, clean, batch 256, momentum None (bn_reset=true before issue 23's fix)", lambda: reset(val)),
        (f"validation, augmented as in training {times}, batch 256, momentum None (bn_reset=true now)",
         lambda: reset_batchnorm(model, base, data, val, dev, **trained)),
        *([(f"validation, random crop with zero padding only {times}, batch 256, momentum None",
            lambda: reset(val, crop_padding=pad, passes=trained["passes"]))] if pad and flip else []),
        *([(f"validation, flip only {times}, batch 256, momentum None",
            lambda: reset(val, flip=flip, passes=trained["passes"]))] if pad and flip else []),  # each alone: both on
        ("public (the base's training images), all, clean, batch 256, momentum None", lambda: reset(public)),
        ("public, all, augmented once, batch 256, momentum None", lambda: reset(public, crop_padding=pad, flip=flip)),
        ("public, as many as validation, clean, batch 256, momentum None", lambda: reset(pub1k)),
        ("validation, clean, one batch of all", lambda: reset(val, batch_size=len(val))),
        ("validation, clean, layer by layer in eval mode (each layer sees its inputs as at test time)",
         lambda: eval_mode(model, base, data, val)),
    ]
    print(f"| statistics from | test accuracy (%, {len(keep)} test images) |\n|---|---:|")
    for name, make in ways:
        print(f"| {name} | {test(make()):.2f} |", flush=True)


if __name__ == "__main__":
    main()
