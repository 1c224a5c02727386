"""scripts/bench_kernels.py: every pair of kernels it times computes the same values (it checks, and
stops with one error line when two ways differ), so its times compare like with like."""
from __future__ import annotations

import subprocess
import sys


def test_the_timed_ways_agree_and_every_row_is_printed(root):
    proc = subprocess.run([sys.executable, str(root / "scripts" / "bench_kernels.py"), "--numel", "3e5", "--repeat", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.endswith(" ms")]
    assert len(rows) == 13 and any("(ADD_BLOCK)" in r for r in rows)
    assert all(float(r.split()[-2]) > 0 for r in rows)
