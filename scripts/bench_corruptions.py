"""Time building the corrupted test sets: the 15 standard corruptions × 5 severities (the suite
``ood/acc`` averages over) on the CIFAR-10 test set, uncached.

    python scripts/bench_corruptions.py [--root /path/to/cifar10-jpeg] [--n 10000] [--threads 2] [--extras]

Prints seconds per corruption (all five severities) and the total; the last line is one JSON
object with the figures. Images: the CIFAR-10 test set from ``--root`` (an ImageFolder tree), or
random smooth images of CIFAR's shape when it is missing (the timing does not depend on content).
The target is ≤ 60 s for 10,000 images on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def images(root: Path, n: int) -> tuple[torch.Tensor, str]:
    if (root / "test").is_dir():
        import numpy as np
        from PIL import Image
        files = sorted((root / "test").glob("*/*.jpg"))[:n]
        return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(
            0, 3, 1, 2).contiguous(), f"{len(files)} CIFAR-10 test images"
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8), f"{n} random smooth 32×32 images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.environ.get("AME_DATA_ROOT", "/work/data/cifar10-jpeg"))
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extras", action="store_true", help="also time the 4 extras")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ame.data.corruptions import EXTRAS, STANDARD, corrupt
    x, what = images(Path(args.root), args.n)
    print(f"{what}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible (a shared machine: other jobs may be running)")
    per, cpu = {}, {}
    print(f"{'corruption':18s} {'wall':>8s} {'CPU':>8s}")
    for name in STANDARD + (EXTRAS if args.extras else ()):
        t, c = time.perf_counter(), time.process_time()
        for s in range(1, 6):
            corrupt(x, name, s, seed=0)
        per[name], cpu[name] = round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)
        print(f"{name:18s} {per[name]:7.2f}s {cpu[name]:7.2f}s", flush=True)
    total, total_cpu = sum(per[n] for n in STANDARD), sum(cpu[n] for n in STANDARD)
    print(f"{'15 × 5 standard':18s} {total:7.2f}s {total_cpu:7.2f}s   (CPU: seconds of CPU time over all threads)")
    print(json.dumps({"images": len(x), "threads": args.threads, "standard_wall_s": round(total, 1),
                      "standard_cpu_s": round(total_cpu, 1), "per_corruption_wall_s": per}))


if __name__ == "__main__":
    main()
