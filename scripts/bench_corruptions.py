"""Time building the corrupted test sets: the 15 standard corruptions × 5 severities (the suite
``ood/acc`` averages over) on the CIFAR-10 test set, uncached.

    python scripts/bench_corruptions.py [--root /path/to/cifar10-jpeg] [--n 10000] [--workers 2] [--breakdown]

Builds the 75 sets as a run does (``ame.eval.ood.generated_sets``, ``--workers`` threads of one
torch thread each, no cache) and prints wall and CPU seconds; ``--breakdown`` then times each
corruption alone. The last line is one JSON object with the figures. Images: the CIFAR-10 test set from ``--root`` (an ImageFolder tree), or
random smooth images of CIFAR's shape when it is missing (the timing does not depend on content).
The target is ≤ 60 s for 10,000 images on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch



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
    ap.add_argument("--workers", type=int, default=2, help="threads building sets (eval.workers)")
    ap.add_argument("--breakdown", action="store_true", help="then time each corruption alone (one thread)")
    ap.add_argument("--extras", action="store_true", help="with --breakdown: also the 4 extras")
    args = ap.parse_args()

    from ame.eval.corruptions import EXTRAS, STANDARD, corrupt
    from ame.eval.ood import generated_sets
    x, what = images(Path(args.root), args.n)
    y = torch.zeros(len(x), dtype=torch.long)
    print(f"{what}; {args.workers} worker threads; {platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"load average {os.getloadavg()[0]:.1f} (a shared machine: other jobs may be running)")
    t, c = time.perf_counter(), time.process_time()
    generated_sets(x, y, list(STANDARD), [1, 2, 3, 4, 5], seed=0, cache_dir=None, workers=args.workers)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(f"15 corruptions × 5 severities, uncached: {wall:.1f} s wall, {cpu:.1f} s CPU "
          f"(load average after: {os.getloadavg()[0]:.1f})", flush=True)
    per = {}
    if args.breakdown:
        torch.set_num_threads(1)
        for name in STANDARD + (EXTRAS if args.extras else ()):
            t = time.perf_counter()
            for s in range(1, 6):
                corrupt(x, name, s, seed=0)
            per[name] = round(time.perf_counter() - t, 2)
            print(f"  {name:18s} {per[name]:7.2f} s (5 severities, one thread)", flush=True)
    print(json.dumps({"images": len(x), "workers": args.workers, "standard_wall_s": round(wall, 1),
                      "standard_cpu_s": round(cpu, 1), "per_corruption_s": per}))


if __name__ == "__main__":
    main()
