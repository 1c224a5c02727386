"""The cluster path, run: sweeps through Hydra's submitit launcher (hydra-submitit-launcher), the
README's way to SLURM. ``submitit_local`` runs every job as its own process through the same code as
``submitit_slurm`` (the job pickled into a submitit folder, run by ``python -m submitit.core._submit``,
its result pickled back, logs beside it); the same sweep is submitted to a SLURM cluster with ``sbatch``
where one answers (``needs_slurm``, tests/conftest.py). Both are slow tests (CI runs them).

The sweep has three jobs: two aggregators over the same experts, which share one cache (the experts
are trained once, under the cache's lock, and read by the other job), and one job that fails its
config check, so that the end-of-sweep summary (``ame.callbacks.SweepFailures``: the multirun exits 1
and names the failed job) is checked on jobs that ran in other processes.

On a cluster of more than one node, run the SLURM test with ``--basetemp`` on a filesystem every node
mounts (the jobs write under it and read the cache there), from a virtual environment there too.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
from pathlib import Path

import pytest

from ame.cache import Entry
from ame.errors import AMEError

# Two data-free aggregators over the same experts, and greedy_soup, which stops at its config check
# (it needs a validation split); one epoch each for the base and the experts: the launcher is tested.
SWEEP = ["train.epochs=1", "train.warm_epochs=1", "aggregator=soup,ame_sgd,greedy_soup"]  # after -m and `fast`
LAUNCHER = ["hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1", "hydra.launcher.tasks_per_node=1"]


def check_sweep(tmp_path: Path, proc, read_results) -> None:
    sweep = tmp_path / "sweep"
    # the summary at the end of the sweep: exit code 1, one line naming the failed job and why
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: 1 job(s) of this sweep failed (the others wrote their results):" in proc.stderr
    assert "job 2 (debug=fast logger=none train.epochs=1 train.warm_epochs=1 aggregator=greedy_soup): " \
           "aggregator=greedy_soup is not data-free" in proc.stderr
    failure = json.loads((sweep / "2" / "error.json").read_text())  # written by the job, in its own process
    assert failure["status"] == "failed" and failure["job"] == 2
    assert failure["sweep_id"] == (sweep / ".ame_sweep_id").read_text().strip()
    assert not (sweep / "2" / "results.json").exists()
    assert "aggregator=soup,ame_sgd,greedy_soup" in (sweep / "multirun.yaml").read_text()  # Hydra's record

    # both good jobs wrote their results; one trained the experts, the other read them from the cache
    results = [read_results(sweep / str(i)) for i in range(2)]
    assert [r["aggregator"] for r in results] == ["soup", "ame_sgd"]
    assert sorted(r["experts_cached"] for r in results) == [False, True]
    assert [e["path"] for e in results[0]["experts"]] == [e["path"] for e in results[1]["experts"]]
    assert len([p for p in (tmp_path / "cache" / "experts").iterdir() if p.is_dir()]) == 1
    assert all((sweep / str(i) / "aggregate.safetensors").is_file() for i in range(2))
    # GD with lr 1/k from the warm-start pivot lands on the soup, in the other process too
    assert results[1]["metrics"]["dist/soup"] < 1e-5

    # submitit's record of each job: the pickled job, its result and its logs, one folder per job
    submitted = sorted(sweep.glob(".submitit/*/*_submitted.pkl"))
    assert len(submitted) == 3
    logs = []
    for pkl in submitted:
        folder, job_id = pkl.parent, pkl.name.removesuffix("_submitted.pkl")
        out, err = folder / f"{job_id}_0_log.out", folder / f"{job_id}_0_log.err"
        assert "Starting with JobEnvironment" in out.read_text()
        with open(folder / f"{job_id}_0_result.pkl", "rb") as f:
            status, _ = pickle.load(f)
        assert status == "success"  # a failed run is recorded (error.json), not raised to the launcher
        logs.append(out.read_text() + err.read_text())
    assert sum("aggregate done in" in log for log in logs) == 2
    assert sum("error: job 2" in log for log in logs) == 1


@pytest.mark.slow  # four processes (the sweep, and one per job) each importing torch: 67 CPU-s, 2.5 min at load 10
def test_submitit_local_sweep_shares_the_cache_and_summarises_the_sweep(tmp_path, fast, read_results, run_cli):
    proc = run_cli(["-m", *fast, *SWEEP, "hydra/launcher=submitit_local", *LAUNCHER], tmp_path, out="sweep", check=False,
                   timeout=420)
    check_sweep(tmp_path, proc, read_results)


@pytest.mark.slow
@pytest.mark.needs_slurm
def test_submitit_slurm_sweep_runs_on_a_slurm_cluster(tmp_path, fast, read_results, run_cli):
    proc = run_cli(["-m", *fast, *SWEEP, "hydra/launcher=submitit_slurm", *LAUNCHER], tmp_path, out="sweep", check=False,
                   timeout=900)
    check_sweep(tmp_path, proc, read_results)
    # SLURM ran them: an array job, one folder per task (<array id>_<index>), and its sbatch script
    assert len(list(tmp_path.glob("sweep/.submitit/*/*_submission.sh"))) == 1
    assert sorted(p.name.split("_")[1] for p in tmp_path.glob("sweep/.submitit/*_*") if p.is_dir()) == ["0", "1", "2"]


# -- the cache's lock on filesystems that do not give flock locks (README: the cache on a shared filesystem) -----
@pytest.mark.parametrize("err", [errno.ENOLCK, errno.EOPNOTSUPP], ids=["ENOLCK", "EOPNOTSUPP"])
def test_a_cache_on_a_filesystem_without_locks_stops_with_one_line(tmp_path, monkeypatch, err):
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(err, os.strerror(err))))
    with pytest.raises(AMEError, match=r"^cannot lock .*k\.lock \(.+\): the filesystem of the cache gives no file "
                                       r"locks; put paths.cache_dir .* on one that does") as e:
        with Entry(tmp_path / "cache", "experts", "k").lock():
            pass
    assert "\n" not in str(e.value)


def test_where_flock_is_not_implemented_the_lock_is_a_lock_file(tmp_path, monkeypatch):
    """filelock falls back to a lock file (created exclusively; it names its holder): it excludes another
    job on any filesystem with atomic exclusive creation, and goes with its release."""
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no flock")))
    monkeypatch.setenv("AME_CACHE_LOCK_TIMEOUT", "0.2")
    lock_file = tmp_path / "cache" / "experts" / "k.lock"
    with pytest.warns(UserWarning, match="falling back to SoftFileLock"):
        with Entry(tmp_path / "cache", "experts", "k").lock():
            assert str(os.getpid()) in lock_file.read_text()
            with pytest.raises(AMEError, match="gave up after .* delete that lock file and rerun"):
                with Entry(tmp_path / "cache", "experts", "k").lock():
                    pass
        assert not lock_file.exists()
        with Entry(tmp_path / "cache", "experts", "k").lock():  # free again
            pass
