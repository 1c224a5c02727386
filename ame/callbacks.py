"""Hydra callbacks: checks that must run before Hydra creates a job's output directory."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def writable_dir_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be created and written as a directory, or None if it can."""
    p = Path(path).expanduser().absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


class CheckOutputDir(Callback):
    """Stop with one line, before anything is written, when the run or sweep directory is unusable."""

    def _check(self, path: str, key: str) -> None:
        problem = writable_dir_problem(path)
        if problem:
            print(f"error: cannot write the output directory {path} ({problem}); set {key} to a writable path",
                  file=sys.stderr)
            sys.exit(1)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
