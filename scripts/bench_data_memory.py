"""Peak resident memory of a dataset at GLD-23K scale: statistics, fingerprint and cache.

    python scripts/bench_data_memory.py [--images 4000] [--size 224] [--test 400]

Synthetic uint8 images (content does not change memory). Each phase runs in its own subprocess
and reports its peak RSS (``resource.getrusage``, ru_maxrss) over the RSS it had before the data
existed (Python, torch):

- ``decode+cache``: the images are made (as a decoder fills them), ``ImageData`` computes its
  per-channel mean/std, the fingerprint is taken and the entry is written to the cache;
- ``from cache``: the entry is read back (verified while read), ``ImageData`` and fingerprint.

Target: peak − baseline ≤ 1.5 × the uint8 training tensor (the test images are counted in the
peak, so the bound is conservative). The last line is one JSON object, with an estimate for
GLD-23K (23,080 images at 224² — train and test — measured ratio × tensor size).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def child(phase: str, images: int, size: int, test: int, cache: str) -> None:
    import torch

    from ame.data.datasets import ImageData, cached

    torch.zeros(1).sum()  # torch's own start-up memory belongs to the baseline
    base = _rss_mb()

    def build():
        g = torch.Generator().manual_seed(0)
        train_x = torch.empty(images, 3, size, size, dtype=torch.uint8)
        for i in range(0, images, 16):  # filled batch by batch, as a decoder does
            train_x[i:i + 16] = torch.randint(0, 256, train_x[i:i + 16].shape, generator=g, dtype=torch.uint8)
        test_x = torch.randint(0, 256, (test, 3, size, size), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (images,), generator=g)
        return ImageData("synthetic", train_x, y, test_x, torch.zeros(test, dtype=torch.int64), [str(i) for i in range(10)])

    data = cached("synthetic", f"bench:{images}x{size}", cache, build)
    fingerprint = data.fingerprint()
    print(json.dumps({"phase": phase, "baseline_mb": round(base, 1), "peak_mb": round(_rss_mb(), 1),
                      "train_mb": round(data.train_x.numel() / 2**20, 1), "fingerprint": fingerprint,
                      "mean": data.mean.tolist()}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--child", default=None)
    p.add_argument("--cache", default=None)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.images, a.size, a.test, a.cache)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for phase in ("decode+cache", "from cache"):
            out = subprocess.run([sys.executable, __file__, "--child", phase, "--images", str(a.images), "--size",
                                  str(a.size), "--test", str(a.test), "--cache", cache],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["ratio"] = round((r["peak_mb"] - r["baseline_mb"]) / r["train_mb"], 3)
            rows.append(r)
            print(f"{phase:>13}: peak {r['peak_mb']:.0f} MB = baseline {r['baseline_mb']:.0f} MB + "
                  f"{r['peak_mb'] - r['baseline_mb']:.0f} MB = {r['ratio']:.2f} × the uint8 training tensor "
                  f"({r['train_mb']:.0f} MB)")
    assert rows[0]["fingerprint"] == rows[1]["fingerprint"], "the cache gave back other data"
    worst = max(r["ratio"] for r in rows)
    gld_mb = 23_080 * 3 * 224 * 224 / 2**20
    print(json.dumps({"images": a.images, "size": a.size, "test_images": a.test, "phases": rows, "worst_ratio": worst,
                      "target_ratio": 1.5, "ok": worst <= 1.5,
                      "gld23k_estimate_gb": round(worst * gld_mb / 1024, 2)}))


if __name__ == "__main__":
    main()
