"""What every test folder shares, as fixtures (a test asks for one by naming it as an argument):
the repository ``root``, the ``fast`` overrides, Hydra-composed configs (``compose_cfg``), the
pipeline in process (``run_pipeline``), ``run.py`` in a subprocess (``run_cli``, ``read_results``,
and ``default_run``, one such run shared by the session), tiny state dicts (``tiny_experts``,
``buffers``) and a tiny ImageFolder tree (``make_image_folder``). Tests that need what the machine
lacks (markers in pyproject.toml) skip with the reason."""
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
FAST = ("debug=fast", "logger=none")
BUFFERS = ("norm.running_mean", "norm.num_batches_tracked")


@pytest.fixture(scope="session")
def root() -> Path:
    """The repository (conf/, run.py, scripts/)."""
    return ROOT


@pytest.fixture(scope="session")
def fast() -> list[str]:
    """``debug=fast logger=none``: the overrides every end-to-end test starts from."""
    return list(FAST)


def _compose_cfg(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path / 'out'}",
                                            f"paths.cache_dir={tmp_path / 'cache'}", *overrides])


@pytest.fixture(scope="session")
def compose_cfg():
    """``compose_cfg(overrides, tmp_path)``: conf/config.yaml composed with ``overrides`` as run.py
    composes it, outputs under ``tmp_path/out`` and the cache under ``tmp_path/cache``."""
    return _compose_cfg


@pytest.fixture(scope="session")
def run_pipeline():
    """``run_pipeline(args, tmp_path, out="out", cache=None)``: ``ame.pipeline.run`` in this process
    on ``args`` composed as ``run.py`` composes them (no interpreter or torch start-up): outputs
    under ``tmp_path/out``, cache under ``cache`` (default ``tmp_path/cache``); returns the results."""
    def run_pipeline(args: list[str], tmp_path: Path, out: str = "out", cache: Path | None = None) -> dict:
        from ame.pipeline import run

        return run(_compose_cfg([*args, f"paths.output_dir={tmp_path / out}",
                                 f"paths.cache_dir={cache or tmp_path / 'cache'}"], tmp_path))
    return run_pipeline


def _run_cli(args: list[str], tmp_path: Path, out: str = "out", check: bool = True, env: dict | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
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


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(args, tmp_path, out="out", check=True, env=None)``: ``python run.py ARGS`` in a
    subprocess (seconds of start-up: for what only the command line does), outputs under
    ``tmp_path/out``, cache under ``tmp_path/cache``; with ``check``, a failure raises."""
    return _run_cli


def _read_results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


@pytest.fixture(scope="session")
def read_results():
    """``read_results(folder)``: the ``results.json`` in ``folder``."""
    return _read_results


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The bare ``python run.py`` (W&B logger, offline), shrunk only in eval and epochs: one run.py
    process whose outputs and cache many end-to-end tests read (none changes them)."""
    tmp = tmp_path_factory.mktemp("default")
    proc = _run_cli([a for a in FAST if a != "logger=none"], tmp)
    return tmp, proc


def _tiny_experts(n: int = 4, seed: int = 0, buffers: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        sd = {"layer.weight": torch.randn(5, 3, generator=g), "layer.bias": torch.randn(5, generator=g)}
        if buffers:
            sd["norm.running_mean"] = torch.randn(5, generator=g)
            sd["norm.num_batches_tracked"] = torch.tensor(10 + i)
        out.append(sd)
    return out


@pytest.fixture(scope="session")
def tiny_experts():
    """``tiny_experts(n=4, seed=0, buffers=True)``: random state dicts with a weight, a bias, a float
    buffer and an integer buffer (their names: the ``buffers`` fixture)."""
    return _tiny_experts


@pytest.fixture(scope="session")
def buffers() -> tuple[str, ...]:
    """The buffer names of ``tiny_experts``."""
    return BUFFERS


@pytest.fixture(scope="session")
def make_image_folder():
    """``make_image_folder(root, classes=("cat", "dog", "frog"), per_class=(4, 2))``: an ImageFolder
    tree of random 32×32 JPEGs, ``per_class`` images per class in train/ and test/; returns ``root``."""
    def make_image_folder(root: Path, classes=("cat", "dog", "frog"), per_class=(4, 2)) -> Path:
        from torchvision.io import encode_jpeg, write_file

        g = torch.Generator().manual_seed(0)
        for split, n in zip(("train", "test"), per_class):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                for i in range(n):
                    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
                    write_file(str(root / split / c / f"{i:04d}.jpg"), encode_jpeg(img, quality=95))
        return root
    return make_image_folder
