"""scripts/probe_bn_reset.py end to end on a tiny base: without a cached base it stops with one
line; with --train it trains and caches it, then prints one row per way of recomputing the
statistics, the same again from the cache."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["debug=fast", "model=cnn", "model.norm=batch", "model.widths=[4]", "train.warm_epochs=1", "data.val_size=100",
        "train.augment.crop_padding=2", "train.augment.flip=true"]


def probe(tmp_path, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AME_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_bn_reset.py"), *ARGS, *extra],
                          capture_output=True, text=True, env=env, timeout=300)


def test_probe_refuses_without_a_cached_base_then_trains_it_and_prints_every_way(tmp_path):
    missing = probe(tmp_path)
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: no cached base"), missing.stderr
    out = probe(tmp_path, "--train", "--test-size", "0")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| statistics")]
    names = [r.split(" | ")[0][2:] for r in rows]
    assert len(rows) == 10 and names[0].startswith("as trained") and "(bn_reset=true now)" in names[2]
    assert all(0.0 <= float(r.rstrip(" |").rsplit("| ", 1)[1]) <= 100.0 for r in rows)
    again = probe(tmp_path, "--test-size", "0")  # the cached base, deterministic
    assert again.returncode == 0 and again.stdout == out.stdout
    typo = probe(tmp_path, "train.warm_epoch=1")  # an override Hydra cannot compose: one line, like run.py's
    lines = typo.stderr.strip().splitlines()
    assert typo.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: Could not override "
                                                                            "'train.warm_epoch'"), typo.stderr
