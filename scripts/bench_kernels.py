"""Why the merge arithmetic is shaped the way it is: the eager CPU kernels it chooses between, timed.

    python scripts/bench_kernels.py              # 16M float32 entries, best of 5
    python scripts/bench_kernels.py --numel 4e6

Prints milliseconds per call (the best of ``--repeat``) for the ways of computing one thing
(checked to give the same values first):

- masks: a comparison into a bool tensor vs into a float32 0/1 tensor, ``masked_fill_`` vs a
  multiplication by that float mask (TIES's trimming and sign agreement use the float forms);
- the soup's inner step for 4 bf16 experts: the whole slice converted to float32 then added, vs the
  conversion and the addition done ``ADD_BLOCK`` entries at a time (``ExpertPool.add_to``) for
  several block sizes, vs one mixed-dtype addition.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ame.pool import ADD_BLOCK  # noqa: E402


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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
