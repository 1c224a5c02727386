"""Why the merge arithmetic is shaped the way it is: the eager CPU kernels it chooses between, timed.

    python scripts/bench_kernels.py              # 16M float32 entries, best of 5
    python scripts/bench_kernels.py --numel 4e6

Prints milliseconds per call (the best of ``--repeat``) for the ways of computing one thing
(checked to give the same values first):

- masks: a comparison into a bool tensor vs into a float32 0/1 tensor, ``masked_fill_`` vs a
  multiplication by that float mask (TIES's trimming and sign agreement use the float forms);
- the soup's inner step for 4 bf16 experts: the whole slice converted to float32 then added, vs the
  conversion and the addition done ``ADD_BLOCK`` entries at a time (``ExpertPool.add_to``) for
  several block sizes, vs one mixed-dtype addition;
- TIES's exact k-th |τ| (mergekit's rule: per tensor, density 0.2) on τ = x − base of bf16 weights:
  ours in eager torch (subtract, |·|, ``top_k``: a sampled bracket, one exact pass, ``kthvalue`` on
  the few inside), vs a fused C reference of the same pass (subtract, |·|, count below the bracket,
  collect what is inside: one loop, compiled here with ``cc -O3 -march=native`` when a C compiler
  is installed) on 1 and 2 threads, then the same ``kthvalue``: how much a compiled kernel would
  save (the threshold is checked equal).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ame.aggregators.task_vectors import sample_bracket, sample_index, top_k  # noqa: E402
from ame.pool import ADD_BLOCK  # noqa: E402

# the fused reference pass over entries [s, e): tau = x - base in place, count |tau| below lo, collect
# |tau| in [lo, hi] with its position (lo, hi: bit patterns of non-negative floats, ordered as the values)
FUSED_C = r"""
#include <stdint.h>
#include <string.h>
int64_t bracket(float *x, const float *base, int64_t s, int64_t e, uint32_t lo, uint32_t hi,
                float *vals, int64_t *pos, int64_t *cnt) {
  int64_t below = 0, c = s;
  const uint32_t span = hi - lo;
  for (int64_t j = s; j < e; j++) {
    float v = x[j] - base[j];
    uint32_t u;
    x[j] = v;
    memcpy(&u, &v, 4);
    u &= 0x7fffffffu;
    below += u < lo;
    if (u - lo <= span) { memcpy(&vals[c], &u, 4); pos[c] = j; c++; }
  }
  *cnt = c - s;
  return below;
}
"""


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def same(what: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if not torch.equal(x, y):
        raise SystemExit(f"error: {what}: the two ways differ, so their times cannot be compared")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=float, default=16 * 2**20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ties-numel", type=float, default=5632 * 2048,
                    help="entries of the TIES tensor (default: the 1.1B bench model's 5632 × 2048 MLP matrix)")
    args = ap.parse_args()
    if args.numel < 1 or args.ties_numel < 1 or args.repeat < 1:
        ap.error("--numel, --ties-numel and --repeat must be at least 1")
    n = int(args.numel)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    f, m, out = torch.empty(n), torch.empty(n, dtype=torch.bool), torch.empty(n)
    rows: list[tuple[str, float]] = []

    def row(name: str, fn) -> None:
        rows.append((name, best(fn, args.repeat)))
        print(f"{name:58s} {rows[-1][1]:8.2f} ms", flush=True)

    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{n:,} float32 entries, load average {os.getloadavg()[0]:.1f}")
    row("copy (reference)", lambda: out.copy_(a))
    row("a < 0.5 into bool", lambda: torch.lt(a, 0.5, out=m))
    row("a < 0.5 into float32 0/1", lambda: torch.lt(a, 0.5, out=f))
    row("out.masked_fill_(bool mask, 0)", lambda: out.masked_fill_(m, 0.0))
    row("out.mul_(float mask)", lambda: out.mul_(f))
    # each pair computes the same values (checked): only the kernels differ
    same("a where a >= 0.5 else 0: bool vs float mask", a.masked_fill(a < 0.5, 0.0), a * (a >= 0.5).float())
    row("sign agreement, bool: eq(sign) & ne(0), masked_fill", lambda: out.masked_fill_(
        torch.eq(torch.sign(a), torch.sign(b), out=m).logical_not_(), 0.0))
    row("sign agreement, float: relu(a · sign(b))", lambda: torch.mul(a, torch.sign(b), out=out).clamp_min_(0))
    same("|a| where a agrees with sign(b): bool vs float", a.abs().masked_fill(torch.sign(a) != torch.sign(b), 0.0),
         torch.mul(a, torch.sign(b)).clamp_min_(0))

    experts = [torch.randn(n, generator=g).bfloat16() for _ in range(4)]
    total, x32 = torch.empty(n), torch.empty(n)

    def whole() -> None:
        total.copy_(experts[0])
        for x in experts[1:]:
            total.add_(x32.copy_(x))

    def mixed() -> None:
        total.copy_(experts[0])
        for x in experts[1:]:
            total.add_(x)

    def blocked(size: int):
        block = torch.empty(size)

        def run() -> None:
            total.copy_(experts[0])
            for x in experts[1:]:
                for lo in range(0, n, size):
                    hi = min(lo + size, n)
                    total[lo:hi].add_(block[:hi - lo].copy_(x[lo:hi]))
        return run

    row("soup of 4 bf16 slices: convert whole, then add", whole)
    reference = total.clone()
    row("soup of 4 bf16 slices: one mixed-dtype add each", mixed)
    same("mixed-dtype soup", total, reference)
    for size in sorted({1 << 14, 1 << 16, ADD_BLOCK, 1 << 20}):
        mark = " (ADD_BLOCK)" if size == ADD_BLOCK else ""
        row(f"soup of 4 bf16 slices: convert + add {size:,} at a time{mark}", blocked(size))
        same(f"blocked soup ({size:,})", total, reference)

    ties_kth(row, args.repeat, g, int(args.ties_numel))


def _fused(tmp: Path):
    """The fused reference kernel, compiled; None (and why) without a working C compiler."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')})"
    (tmp / "k.c").write_text(FUSED_C)
    done = subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", str(tmp / "k.c"), "-o", str(tmp / "k.so")],
                          capture_output=True, text=True)
    if done.returncode:
        return None, f"{cc} failed: {(done.stderr.strip().splitlines() or ['?'])[0]}"
    f = ctypes.CDLL(str(tmp / "k.so")).bracket
    P, I, U = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32
    f.argtypes, f.restype = [P, P, I, I, U, U, P, P, P], I
    return f, ""


def ties_kth(row, repeat: int, g: torch.Generator, n: int) -> None:
    """One tensor of ``n`` entries, bf16 weights: τ's k-th |τ| at density 0.2."""
    density = 0.2
    base = (0.02 * torch.randn(n, generator=g)).bfloat16().float()
    x0 = (base + 0.002 * torch.randn(n, generator=g)).bfloat16().float()  # bf16: many ties, as in real merges
    k = max(1, int(density * n))
    x, absb = torch.empty(n), torch.empty(n)
    scratch = (torch.empty(n), torch.empty(n, dtype=torch.bool))
    result = {}

    def ours() -> None:
        tau = torch.sub(x.copy_(x0), base, out=x)
        result["ours"] = top_k(torch.abs(tau, out=absb), k, scratch)[0]

    print(f"# TIES k-th |τ|: {n:,} entries, bf16 weights, k = {k:,}")
    row("copy (reference)", lambda: x.copy_(x0))
    row("ours (eager torch): x − base, |·|, top_k", ours)
    with tempfile.TemporaryDirectory() as tmp:
        kernel, why = _fused(Path(tmp))
        if kernel is None:
            print(f"fused C reference: skipped ({why})")
            return
        vals, pos, cnt = torch.empty(n), torch.empty(n, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        r = n - k + 1
        idx = sample_index(n)
        bits = lambda v: 0 if v <= 0 else struct.unpack("<I", struct.pack("<f", v))[0]  # noqa: E731 (|τ| ≥ 0)
        workers = ThreadPoolExecutor(2)  # ctypes calls release the GIL: two threads, two halves

        def fused(threads: int):
            def run() -> None:
                x.copy_(x0)
                lo, hi = sample_bracket((x0[idx] - base[idx]).abs_().sort().values, n, r)  # top_k's bracket
                per = -(-n // threads)
                jobs = [workers.submit(kernel, x.data_ptr(), base.data_ptr(), t * per, min(n, (t + 1) * per), bits(lo),
                                       bits(hi), vals.data_ptr(), pos.data_ptr(), cnt.data_ptr() + 8 * t)
                        for t in range(threads)]
                below = sum(j.result() for j in jobs)
                inside = torch.cat([vals[t * per: t * per + int(cnt[t])] for t in range(threads)])
                result["fused"] = float(inside.kthvalue(r - below).values)
            return run

        for threads in (1, 2):
            row(f"fused C reference, {threads} thread{'s' * (threads > 1)}: one pass, then kthvalue", fused(threads))
            if result["fused"] != result["ours"]:
                raise SystemExit("error: the fused reference's k-th value differs from top_k's")


if __name__ == "__main__":
    main()
