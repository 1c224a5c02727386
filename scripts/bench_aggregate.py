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

At scale (``--scale``): N synthetic bf16 experts of a ~1B-parameter transformer-shaped network
in sharded Hugging Face layout (``model-0000k-of-0000m.safetensors`` + index + config.json) are
written under ``--dir``, then, with those files dropped from the page cache before each
measurement (``posix_fadvise(DONTNEED)``, these files only):

- ``read_s``: the time to read every expert file once (cold), and
- ``merge_s``: ``python -m ame.merge aggregator=ame_adam`` over them (pivot = soup, as with no init)
  in a subprocess writing the sharded aggregate, and its peak resident memory (``ru_maxrss``),

and their ratio::

    python scripts/bench_aggregate.py --scale 1e9 --experts 4 --dir /work/tmp-bench
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ame.io.readahead import drop_from_page_cache


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


def transformer_shapes(params: float) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a decoder-only transformer (d = 2048, vocabulary 32,000) with about ``params`` parameters."""
    d, vocab = 2048, 32000
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d)}
    per_layer = 3 * d * d + d * d + 2 * 4 * d * d + 2 * d
    for i in range(max(1, math.ceil((params - 2 * vocab * d) / per_layer))):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.qkv_proj.weight": (3 * d, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.up_proj.weight": (4 * d, d), p + "mlp.down_proj.weight": (d, 4 * d),
                   p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
    shapes |= {"model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    return shapes


def make_sharded(root: Path, shapes: dict, seed: int, shard_bytes: int = 500 << 20) -> Path:
    """One synthetic bf16 expert in sharded Hugging Face layout."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    groups, size = [[]], 0
    for k, shape in shapes.items():
        nbytes = 2 * int(torch.tensor(shape).prod())
        if size + nbytes > shard_bytes and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for j, keys in enumerate(groups):
        name = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) for k in keys},
                  str(root / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in keys}
    total = sum(2 * int(torch.tensor(s).prod()) for s in shapes.values())
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "synthetic", "torch_dtype": "bfloat16"}))
    return root


def read_all(paths: list[Path]) -> float:
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    for folder in paths:
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - t0


def scale(params: float, n: int, root: Path, keep: bool) -> None:
    import shutil

    shapes = transformer_shapes(params)
    total = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{n} experts × {total / 1e9:.3f}B parameters, bf16, sharded HF layout, under {root}", flush=True)
    t0 = time.perf_counter()
    paths = [p if (p / "config.json").is_file() else make_sharded(p, shapes, i)
             for i, p in enumerate(root / f"expert{i}" for i in range(n))]
    print(f"made in {time.perf_counter() - t0:.0f} s: {sum(f.stat().st_size for p in paths for f in p.iterdir()) / 1e9:.2f} GB",
          flush=True)
    out = root / "merged"
    rows = []
    for rep in range(2):
        drop_from_page_cache([f for folder in paths for f in folder.glob("*.safetensors")])
        t_read = read_all(paths)
        drop_from_page_cache([f for folder in paths for f in folder.glob("*.safetensors")])
        shutil.rmtree(out, ignore_errors=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ame.merge", "aggregator=ame_adam",
                               f"experts.paths=[{','.join(map(str, paths))}]", f"out={out}"],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        t_merge = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        row = {"params": total, "experts": n, "read_s": t_read, "merge_s": t_merge, "ratio": t_merge / t_read,
               "peak_rss_gb": max(peak, before) * 1024 / 1e9, "read_gbps": 2 * total * n / t_read / 1e9}
        rows.append(row)
        print(f"run {rep + 1}: read every expert file once {t_read:.1f} s ({row['read_gbps']:.2f} GB/s), "
              f"merge {t_merge:.1f} s, ratio {row['ratio']:.2f}, peak RSS {row['peak_rss_gb']:.2f} GB", flush=True)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, nargs="+", default=[1e6, 11e6, 22e6])
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=float, help="the at-scale benchmark: parameters per synthetic bf16 expert (e.g. 1e9)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ame-bench"), help="where --scale writes its experts")
    ap.add_argument("--keep", action="store_true", help="keep --scale's files (else deleted at the end)")
    args = ap.parse_args()
    if args.scale:
        scale(args.scale, max(args.experts) if args.experts != [2, 8, 32] else 4, args.dir, args.keep)
        return
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
