"""Shared fixtures: Hydra-composed configs shrunk for speed, and a ``run.py`` subprocess helper."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]


# -- what the machine lacks: tests that need it skip with the reason (markers in pyproject.toml) --------
def _imagemagick_missing() -> str | None:
    """Why ImageMagick cannot be used here (None: it can). pip installs Wand, not ImageMagick's C
    library, which Wand loads at import; it raises ImportError (not ModuleNotFoundError) without it."""
    try:
        import wand.image  # noqa: F401
    except Exception as e:  # noqa: BLE001 — ImportError, OSError from a broken library, ...
        return f"needs ImageMagick's MagickWand library (apt install libmagickwand-dev): {str(e).splitlines()[0]}"
    return None


def _gpu_missing() -> str | None:
    return None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False)"


def _slurm_missing() -> str | None:
    """Why no job can be submitted to SLURM from here (None: ``sbatch`` is on PATH and a controller answers)."""
    if shutil.which("sbatch") is None:
        return "needs a SLURM cluster (sbatch is not on PATH)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"needs a SLURM cluster (sinfo did not answer: {e})"
    if proc.returncode != 0 or " up" not in proc.stdout:
        why = (proc.stderr.strip().splitlines() or ["no partition is up"])[0]
        return f"needs a SLURM cluster with a partition up (sinfo: {why})"
    return None


MISSING = {"needs_imagemagick": _imagemagick_missing, "gpu": _gpu_missing, "needs_slurm": _slurm_missing}


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only the tests that will run are checked for
def pytest_collection_modifyitems(config, items):
    reasons: dict[str, str | None] = {}
    for item in items:
        for name, why in MISSING.items():
            if item.get_closest_marker(name) is not None:
                if name not in reasons:
                    reasons[name] = why()
                if reasons[name]:
                    item.add_marker(pytest.mark.skip(reason=reasons[name]))

# Small and fast: conf/debug/fast.yaml (3 shards of digits, 3 epochs, two corruptions at two
# severities), without W&B (the W&B tests drop "logger=none").
FAST = ["debug=fast", "logger=none"]


def compose_cfg(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path / 'out'}",
                                            f"paths.cache_dir={tmp_path / 'cache'}", *overrides])


@pytest.fixture
def cfg_fast(tmp_path):
    return compose_cfg(FAST, tmp_path)


def run_cli(args: list[str], tmp_path: Path, out: str = "out", check: bool = True, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """``python run.py ARGS`` in a subprocess, outputs under ``tmp_path/out``, cache under ``tmp_path/cache``."""
    full_env = {**os.environ, "AME_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline",
                "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **(env or {})}
    tmp_path.mkdir(parents=True, exist_ok=True)
    multirun = "-m" in args or "--multirun" in args
    where = f"hydra.sweep.dir={tmp_path / out}" if multirun else f"hydra.run.dir={tmp_path / out}"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, where], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_pipeline(args: list[str], tmp_path: Path, out: str = "out", cache: Path | None = None) -> dict:
    """``ame.pipeline.run`` in this process on ``args`` composed as ``run.py`` composes them (no
    interpreter or torch start-up): outputs under ``tmp_path/out``, cache under ``cache`` (default
    ``tmp_path/cache``); returns the results."""
    from ame.pipeline import run

    return run(compose_cfg([*args, f"paths.output_dir={tmp_path / out}", f"paths.cache_dir={cache or tmp_path / 'cache'}"],
                           tmp_path))


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The bare ``python run.py`` (W&B logger, offline), shrunk only in eval and epochs: one run.py
    process whose outputs and cache many end-to-end tests read (none changes them)."""
    tmp = tmp_path_factory.mktemp("default")
    proc = run_cli([a for a in FAST if a != "logger=none"], tmp)
    return tmp, proc


def read_results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def tiny_experts(n: int = 4, seed: int = 0, buffers: bool = True) -> list[dict[str, torch.Tensor]]:
    """Random state dicts with a weight, a bias, a float buffer and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        sd = {"layer.weight": torch.randn(5, 3, generator=g), "layer.bias": torch.randn(5, generator=g)}
        if buffers:
            sd["norm.running_mean"] = torch.randn(5, generator=g)
            sd["norm.num_batches_tracked"] = torch.tensor(10 + i)
        out.append(sd)
    return out


BUFFERS = ("norm.running_mean", "norm.num_batches_tracked")
