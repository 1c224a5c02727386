"""Benchmark expert training throughput (images per second).

    python scripts/bench_train.py [--experts 16] [--shard 2048] [--epochs 1] [--devices cpu cuda]

On CIFAR-shaped random uint8 data (speed does not depend on content) with the default small
CNN and the CIFAR training settings (SGD + momentum, cosine schedule, crop + flip), measured in
one process:

- ``ame 1 expert``: this project's training loop (``ame.train.fit``) on one shard;
- ``ame N sequential``: N experts one after another (``train.parallel_experts=false``);
- ``ame N parallel``: the same N experts at once as one vmapped model (``parallel_experts=true``);
- ``plain loop``: a textbook PyTorch loop over the same tensors: ``DataLoader(TensorDataset)``,
  per-batch torchvision v2 RandomCrop/RandomHorizontalFlip, float conversion and normalisation.

The last line is one JSON object with images/s and the ratios (ame 1 expert / plain loop,
parallel / sequential) per device.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


from hydra import compose, initialize_config_dir  # noqa: E402

from ame.data import ImageData  # noqa: E402
from ame.models import build_model  # noqa: E402
from ame.train import expert_seed, fit, train_experts  # noqa: E402


def config(parallel: bool, epochs: int):
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("config", overrides=["data=cifar10_shards", f"train.epochs={epochs}",
                                            f"train.parallel_experts={str(parallel).lower()}"])


def fake_cifar(n: int) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageData("fake-cifar", x, y, x[:10], y[:10], [str(i) for i in range(10)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(cfg, data: ImageData, idx: np.ndarray, device: torch.device) -> None:
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.transforms import v2

    model = build_model(cfg.model, data, 0).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(TensorDataset(data.train_x[idx], data.train_y[idx]), batch_size=int(cfg.train.batch_size),
                        shuffle=True)
    aug = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    mean, std = data.mean.to(device)[:, None, None], data.std.to(device)[:, None, None]
    for _ in range(int(cfg.train.epochs)):
        for xb, yb in loader:
            xb = (aug(xb.to(device)).float() / 255 - mean) / std
            loss = F.cross_entropy(model(xb), yb.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()


def images_per_second(run, images: int, device: torch.device) -> float:
    run()  # warm-up (allocations, kernel selection)
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    return images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--shard", type=int, default=2048, help="images per expert")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    args = ap.parse_args()
    devices = [torch.device(d) for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    n, shard = args.experts, args.shard
    data = fake_cifar(n * shard)
    shards = [np.arange(i * shard, (i + 1) * shard) for i in range(n)]
    seeds = [expert_seed(0, i) for i in range(n)]
    seq_cfg, par_cfg = config(False, args.epochs), config(True, args.epochs)
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{n} experts × {shard} images × {args.epochs} epoch(s), model {seq_cfg.model._target_}")
    out = {}
    for device in devices:
        one = args.epochs * shard
        r = {
            "plain_loop": images_per_second(lambda: plain_loop(seq_cfg, data, shards[0], device), one, device),
            "ame_1_expert": images_per_second(
                lambda: fit(build_model(seq_cfg.model, data, 1), data, shards[0], seq_cfg.train, args.epochs, 1, device),
                one, device),
            f"ame_{n}_sequential": images_per_second(
                lambda: list(train_experts(seq_cfg.model, seq_cfg.train, data, shards, None, seeds, device)),
                n * one, device),
            f"ame_{n}_parallel": images_per_second(
                lambda: list(train_experts(par_cfg.model, par_cfg.train, data, shards, None, seeds, device)),
                n * one, device),
        }
        r["ratio_1_expert_vs_plain"] = r["ame_1_expert"] / r["plain_loop"]
        r["ratio_parallel_vs_sequential"] = r[f"ame_{n}_parallel"] / r[f"ame_{n}_sequential"]
        for k, v in r.items():
            print(f"{device.type:>5}  {k:<28} {v:>10.2f}{'' if k.startswith('ratio') else ' images/s'}")
        out[device.type] = r
    if "cuda" not in out:
        out["cuda"] = "not measured (no CUDA device)"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
