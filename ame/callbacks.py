"""Hydra callbacks and the record of failed jobs: checks before Hydra creates an output directory,
no stale results in a reused one, and sweeps that survive a bad job.

A job that fails in a multirun writes ``error.json`` (its one-line error, overrides and, for an
unexpected error, the traceback) into its own directory and hands the sweeper NaN (Optuna records
a failed trial), so every other job still runs, with the basic, joblib and SLURM (submitit)
launchers alike: the record is a file in the job's directory, wherever the job ran.
:class:`SweepFailures` then lists this sweep's failed jobs and ends the multirun with exit code 1.
"""
from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

ERROR_FILE = "error.json"
SWEEP_ID_FILE = ".ame_sweep_id"
OUTPUTS = ("results.json", "aggregate.safetensors")  # what a finished run leaves; earlier ones are retired


def job_dirname(overrides: str) -> str:
    """A job folder's name from its overrides (``${ame.dirname:${hydra.job.override_dirname}}`` in the
    experiments' ``hydra.sweep.subdir``) that stays one folder: a config group's slash becomes a dot
    (``data/shards=iid`` → ``data.shards=iid``). Path-valued keys never get here (``dirname_exclude``);
    ``.hydra/overrides.yaml`` keeps the overrides as given."""
    return overrides.replace("/", ".")


# registered where Hydra's callbacks are loaded (conf/hydra/default.yaml), so in every launcher's job
# process too: the job folder is named there
if not OmegaConf.has_resolver("ame.dirname"):
    OmegaConf.register_new_resolver("ame.dirname", job_dirname)


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


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(error: str, trace: str | None = None) -> float:
    """Record this job as failed (``error.json`` in its output directory), say so in one line, and
    return the sweeper's value for a failed job (NaN)."""
    from ame.io import write_json

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    sweep_id = Path(hc.sweep.dir, SWEEP_ID_FILE)
    record = {"status": "failed", "error": error, "job": hc.job.num, "overrides": list(hc.overrides.task),
              "sweep_id": sweep_id.read_text().strip() if sweep_id.is_file() else None}
    if trace:
        record["traceback"] = trace
    try:
        write_json(record, out / ERROR_FILE)
    except Exception as e:  # noqa: BLE001 — even an unwritable directory must not stop the sweep
        print(f"error: job {hc.job.num}: cannot record its failure in {out} ({e})", file=sys.stderr)
    print(f"error: job {hc.job.num} ({' '.join(hc.overrides.task) or 'no overrides'}) failed: {error}",
          file=sys.stderr, flush=True)
    return math.nan


def retire_outputs(out_dir: str | Path) -> None:
    """Move an earlier run's results out of the way (``results.previous.json``, ...) and drop its
    failure record, so nothing in ``out_dir`` can pass for this run's output unless this run wrote it."""
    out_dir = Path(out_dir)
    for name in OUTPUTS:
        p = out_dir / name
        if p.is_file():
            os.replace(p, p.with_name(f"{p.stem}.previous{p.suffix}"))
    (out_dir / ERROR_FILE).unlink(missing_ok=True)


class CheckOutputDir(Callback):
    """Stop with one line, before anything is written, when the run or sweep directory is unusable;
    retire an earlier run's outputs in a reused job directory."""

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

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        try:
            retire_outputs(config.hydra.runtime.output_dir)
        except OSError as e:
            print(f"warning: cannot move earlier results out of {config.hydra.runtime.output_dir} ({e.strerror})",
                  file=sys.stderr)


class SweepFailures(Callback):
    """A multirun ends with exit code 1 and one line per failed job when any job failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.sweep_id = uuid.uuid4().hex
        try:
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            (self.sweep_dir / SWEEP_ID_FILE).write_text(self.sweep_id + "\n")
        except OSError:
            self.sweep_id = None  # CheckOutputDir reports the unusable directory

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if getattr(self, "sweep_id", None) is None:
            return
        failed = []
        for path in self.sweep_dir.rglob(ERROR_FILE):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("sweep_id") == self.sweep_id:
                failed.append((record.get("job", -1), path.parent, record))
        if not failed:
            return
        failed.sort(key=lambda f: (f[0] if isinstance(f[0], int) else -1, str(f[1])))
        lines = [f"  job {job} ({' '.join(r.get('overrides') or []) or 'no overrides'}): {r.get('error')}  [{where}]"
                 for job, where, r in failed]
        print(f"error: {len(failed)} job(s) of this sweep failed (the others wrote their results):\n"
              + "\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(1)
