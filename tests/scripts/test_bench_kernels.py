"""scripts/bench_kernels.py: every pair of kernels it times computes the same values (it checks, and
stops with one error line when two ways differ), so its times compare like with like."""
from __future__ import annotations

import shutil
import subprocess
import sys


def test_the_timed_ways_agree_and_every_row_is_printed(root, tmp_path):
    """With a C compiler the fused TIES reference is compiled and its k-th value checked against
    ``top_k``'s (a difference exits 1); without one it says it skipped."""
    proc = subprocess.run([sys.executable, str(root / "scripts" / "bench_kernels.py"), "--numel", "3e5", "--repeat", "1",
                           "--ties-numel", "3e5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.endswith(" ms")]
    fused = [r for r in rows if r.startswith("fused C reference")]
    assert len(rows) == 15 + len(fused) and any("(ADD_BLOCK)" in r for r in rows)
    assert all(float(r.split()[-2]) > 0 for r in rows)
    if _compiles(tmp_path):
        assert len(fused) == 2
    else:
        assert "fused C reference: skipped (" in proc.stdout and not fused


def _compiles(tmp_path) -> bool:
    """Whether ``cc`` builds a shared library with the script's flags here."""
    if shutil.which("cc") is None:
        return False
    (tmp_path / "t.c").write_text("int f(int x) { return x + 1; }\n")
    return subprocess.run(["cc", "-O3", "-march=native", "-shared", "-fPIC", str(tmp_path / "t.c"), "-o",
                           str(tmp_path / "t.so")], capture_output=True).returncode == 0
