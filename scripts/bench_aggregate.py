"""Benchmark the AME aggregation engine: time per step, effective bandwidth, peak memory.

    python scripts/bench_aggregate.py [--params 1e6 11e6 22e6] [--experts 2 8 32] [--devices cpu cuda]

For each parameter count P and number of experts N, N expert files (safetensors, ~100 tensors
each, like a real network) are aggregated with AME-Adam in a fresh subprocess, streaming from
disk. Reported per configuration:

- ms/step: wall time of an AME aggregation over N experts divided by N (read the next expert,
  pseudogradient, optimizer step; the one-off set-up amortised), in a warm second run;
- GB/s: the step's essential memory traffic, read x_i + read/write w, m, v = 28·P bytes, over
  its time; ``of copy``: that as a fraction of a device copy of a P-float buffer (8·P bytes
  read + written) measured in the same process;
- peak MB: the first run's peak resident memory above the process's state before it (CPU), or
  its peak CUDA allocation (GPU). Flat in N means experts stream.

The last line is one JSON object with the headline figures.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_experts(root: Path, params: int, n: int, tensors: int = 100) -> list[Path]:
    from ame.io import save_state_dict

    sizes = [params // tensors] * tensors
    sizes[-1] += params - sum(sizes)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        sd = {f"layer{j}.weight": torch.randn(s, generator=g) * 0.01 for j, s in enumerate(sizes)}
        paths.append(root / f"expert_{i:03d}.safetensors")
        save_state_dict(sd, paths[-1])
    os.sync()  # no write-back of the new files while timing
    return paths


def copy_seconds(params: int, device: torch.device, repeats: int = 20) -> float:
    src, dst = torch.randn(params, device=device), torch.empty(params, device=device)
    dst.copy_(src)  # first touch
    dst.copy_(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync()
    return (time.perf_counter() - t0) / repeats


def worker(paths: list[Path], device: str) -> dict:
    """One aggregation in this process: returns timings and peak memory."""
    from ame.aggregators import AME
    from ame.experts import Experts

    experts = Experts(paths)
    dev = torch.device(device)
    params = experts.pool().numel()
    t_copy = copy_seconds(params, dev)
    agg = AME(functools.partial(torch.optim.Adam, lr=1e-3), pivot="first", device=device, name="bench")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    agg.run(experts.pool())  # first run in this fresh process: peak memory
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    t0 = time.perf_counter()
    agg.run(experts.pool())  # second run, warm: time (setup amortised over the N steps)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / len(paths)
    gbps = 28 * params / seconds / 1e9
    copy_gbps = 8 * params / t_copy / 1e9
    return {"params": params, "experts": len(paths), "device": device, "ms_per_step": seconds * 1e3,
            "gbps": gbps, "copy_gbps": copy_gbps, "of_copy": gbps / copy_gbps, "peak_mb": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, nargs="+", default=[1e6, 11e6, 22e6])
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        device, *paths = args.worker
        print(json.dumps(worker([Path(p) for p in paths], device)))
        return
    devices = [d for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ', no CUDA device'}")
    print(f"{'device':>6} {'params':>8} {'N':>3} {'ms/step':>9} {'GB/s':>7} {'copy GB/s':>9} {'of copy':>8} {'peak MB':>8}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.params:
            paths = make_experts(Path(tmp) / f"p{int(p)}", int(p), max(args.experts))
            for device in devices:
                for n in args.experts:
                    out = subprocess.run([sys.executable, __file__, "--worker", device, *map(str, paths[:n])],
                                         capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(r)
                    print(f"{device:>6} {r['params'] / 1e6:>7.0f}M {n:>3} {r['ms_per_step']:>9.2f} {r['gbps']:>7.1f} "
                          f"{r['copy_gbps']:>9.1f} {r['of_copy']:>8.0%} {r['peak_mb']:>8.0f}", flush=True)
            for f in paths:
                f.unlink()
    top = max(r["params"] for r in rows)
    headline = {d: {"params": top,
                    "gbps": max(r["gbps"] for r in rows if r["device"] == d and r["params"] == top),
                    "fraction_of_copy": max(r["of_copy"] for r in rows if r["device"] == d and r["params"] == top),
                    "peak_mb_by_experts": {r["experts"]: round(r["peak_mb"]) for r in rows
                                           if r["device"] == d and r["params"] == top}}
                for d in devices}
    if "cuda" not in devices:
        headline["cuda"] = "not measured (no CUDA device)"
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
