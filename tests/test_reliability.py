"""Guarantees for unattended sweeps: crash-safe caches, resume after SIGKILL, determinism,
concurrent jobs, launchers, and clean failures on unusable outputs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ame.data import load_cifar
from ame.errors import AMEError


@pytest.mark.slow
def test_same_command_twice_gives_identical_results_and_bytes(tmp_path, fast, read_results, run_cli):
    args = [*fast, "aggregator=ame_adagrad", "aggregator.order=shuffle"]
    run_cli(args, tmp_path / "a")
    run_cli(args, tmp_path / "b")  # its own cache: the experts are trained again
    a, b = read_results(tmp_path / "a" / "out"), read_results(tmp_path / "b" / "out")
    assert a["metrics"] == b["metrics"] and a["soup"] == b["soup"]
    assert [e["id/acc"] for e in a["experts"]] == [e["id/acc"] for e in b["experts"]]
    assert (tmp_path / "a/out/aggregate.safetensors").read_bytes() == (tmp_path / "b/out/aggregate.safetensors").read_bytes()
    # cache entries are byte-identical too, so their hashes (and the keys built on them) are the same everywhere
    assert [Path(e["path"]).read_bytes() for e in a["experts"]] == [Path(e["path"]).read_bytes() for e in b["experts"]]
    assert a["experts"][0]["path"].split("/experts/")[1] == b["experts"][0]["path"].split("/experts/")[1]


@pytest.mark.slow
def test_run_killed_while_training_experts_resumes_to_the_same_result(tmp_path, fast, read_results, root, run_cli):
    args = [*fast, "data.shards.num_shards=4", "train.epochs=20"]  # an expert takes seconds: the kill lands mid-set
    env = {**os.environ, "AME_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(root / "run.py"), *args, f"hydra.run.dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    manifests = lambda: list((tmp_path / "cache" / "experts").glob("*/manifest.json"))  # noqa: E731
    while time.time() < deadline and not any("expert_000" in m.read_text() for m in manifests()):
        assert proc.poll() is None, "the run ended before it could be killed; make the experts slower"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(manifests()[0].read_text())["files"]
    assert 1 <= sum(k.startswith("expert_") for k in done) < 4

    rerun = run_cli(args, tmp_path, out="resumed")
    assert "from the cache" in rerun.stdout and "4 of 4 from the cache" not in rerun.stdout
    assert read_results(tmp_path / "resumed")["experts_cached"] is False
    run_cli(args, tmp_path / "fresh")  # uninterrupted, its own cache
    assert read_results(tmp_path / "resumed")["metrics"] == read_results(tmp_path / "fresh" / "out")["metrics"]


@pytest.mark.slow
def test_parallel_joblib_jobs_train_shared_experts_once_and_both_succeed(tmp_path, fast, read_results, run_cli):
    run_cli(["-m", *fast, "hydra/launcher=local", "aggregator=soup,ame_adam"], tmp_path)  # the shipped config: 2 jobs
    results = [read_results(tmp_path / "out" / str(i)) for i in range(2)]
    assert sorted(r["experts_cached"] for r in results) == [False, True]
    assert results[0]["soup"] == results[1]["soup"]


def test_slurm_launcher_config_composes(root):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.partition == "gpu"


def test_truncated_dataset_cache_is_detected_and_rebuilt(tmp_path, make_image_folder):
    make_image_folder(tmp_path / "cifar10-jpeg")
    first = load_cifar("cifar10", str(tmp_path), download=False, cache_dir=str(tmp_path / "cache"))
    entry = next((tmp_path / "cache" / "datasets").glob("*/data.safetensors"))
    entry.write_bytes(entry.read_bytes()[:-100])
    again = load_cifar("cifar10", str(tmp_path), download=False, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(again.test_x, first.test_x)
    assert load_cifar("cifar10", str(tmp_path), download=False, cache_dir=str(tmp_path / "cache")).fingerprint() \
        == first.fingerprint()


def test_corrupt_image_is_one_clear_error(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "cifar10-jpeg")
    (root / "train" / "dog" / "0001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(AMEError, match="cannot decode image .*0001.jpg"):
        load_cifar("cifar10", str(tmp_path), download=False)


@pytest.mark.parametrize("key", ["hydra.run.dir", "paths.cache_dir"])
def test_unwritable_output_or_cache_is_one_clear_line(key, tmp_path, fast, root, run_pipeline):
    (tmp_path / "blocker").write_text("")
    if key == "paths.cache_dir":  # the pipeline's check, in this process (the output directory: run.py's callback)
        with pytest.raises(AMEError, match="cache_dir") as err:
            run_pipeline(fast, tmp_path, cache=tmp_path / "blocker" / "cache")
        assert "\n" not in str(err.value)
        return
    where = {"hydra.run.dir": [], "paths.cache_dir": [f"paths.cache_dir={tmp_path / 'blocker' / 'cache'}"]}[key]
    cmd = [sys.executable, str(root / "run.py"), *fast, *where,
           f"hydra.run.dir={tmp_path / ('blocker' if key == 'hydra.run.dir' else 'ok') / 'out'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AME_CACHE_DIR": str(tmp_path / "cache")})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and key.split(".")[-1] in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# -- sweeps that survive a bad job ------------------------------------------------------------------

def _sweep_outcome(tmp_path, proc, jobs):
    failed = [i for i in range(jobs) if (tmp_path / "out" / str(i) / "error.json").exists()]
    done = [i for i in range(jobs) if (tmp_path / "out" / str(i) / "results.json").exists()]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    return failed, done, errors


def test_a_bad_job_does_not_stop_the_sweep_and_the_sweep_names_it(default_run, tmp_path, fast, run_cli):
    proc = run_cli(["-m", *fast, "aggregator.optimizer.lr=0.001,-1,0.01"], tmp_path, check=False,
                   env={"AME_CACHE_DIR": str(default_run[0] / "cache")})  # its experts: the sweep is tested
    failed, done, errors = _sweep_outcome(tmp_path, proc, 3)
    assert proc.returncode == 1 and failed == [1] and done == [0, 2], proc.stderr
    assert "Traceback" not in proc.stderr
    record = json.loads((tmp_path / "out" / "1" / "error.json").read_text())
    assert record["status"] == "failed" and "Invalid learning rate" in record["error"]
    assert "aggregator.optimizer.lr=-1" in record["overrides"]
    assert errors[-1].startswith("error: 1 job(s) of this sweep failed")
    assert "job 1 (" in proc.stderr.split(errors[-1])[1] and "Invalid learning rate" in proc.stderr.split(errors[-1])[1]


@pytest.mark.slow
def test_a_bad_job_does_not_stop_the_joblib_launcher(tmp_path, fast, run_cli):
    proc = run_cli(["-m", *fast, "hydra/launcher=local", "aggregator.optimizer.lr=-1,0.001"], tmp_path, check=False)
    failed, done, _ = _sweep_outcome(tmp_path, proc, 2)
    assert proc.returncode == 1 and failed == [0] and done == [1], proc.stderr
    assert "Traceback" not in proc.stderr and "job 0 (" in proc.stderr


@pytest.mark.slow
def test_a_sweep_without_failures_ends_zero_even_after_a_failed_sweep_in_the_same_dir(tmp_path, fast, run_cli):
    run_cli(["-m", *fast, "train.epochs=1", "aggregator.optimizer.lr=-1"], tmp_path, check=False)
    assert (tmp_path / "out" / "0" / "error.json").exists()
    run_cli(["-m", *fast, "train.epochs=1", "aggregator.optimizer.lr=0.001"], tmp_path)  # check=True: exit 0
    assert not (tmp_path / "out" / "0" / "error.json").exists()


# -- damaged cache entries, end to end ----------------------------------------------------------------

@pytest.fixture
def cached_run(default_run, read_results):
    """default_run (the bare run.py with its W&B logger; these runs log nothing): its folder and results."""
    tmp, _ = default_run
    return tmp, read_results(tmp / "out")


def _flip_keeping_size_and_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the tensor data: still a readable file, different weights
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


DAMAGES = {
    "expert: one byte flipped, same size and mtime": ("experts/*/expert_001.safetensors", _flip_keeping_size_and_mtime),
    "warm base: one byte flipped, same size and mtime": ("bases/*/init.safetensors", _flip_keeping_size_and_mtime),
    "reference metrics truncated": ("metrics/*/reference.json", lambda p: p.write_text(p.read_text()[:50])),
    "reference metrics not JSON": ("metrics/*/reference.json", lambda p: p.write_text("garbage")),
    "reference metrics {}": ("metrics/*/reference.json", lambda p: p.write_text("{}")),
    "experts manifest {}": ("experts/*/manifest.json", lambda p: p.write_text("{}")),
}


FAST_DAMAGES = ("expert: one byte flipped, same size and mtime", "reference metrics {}")


@pytest.mark.parametrize("damage", [d if d in FAST_DAMAGES else pytest.param(d, marks=pytest.mark.slow) for d in DAMAGES])
def test_a_damaged_cache_entry_is_reported_rebuilt_and_never_used(damage, cached_run, tmp_path, capsys, fast,
                                                                  run_pipeline):
    import shutil

    tmp, clean = cached_run
    shutil.copytree(tmp / "cache", tmp_path / "cache")
    pattern, hurt = DAMAGES[damage]
    (path,) = (tmp_path / "cache").glob(pattern)
    hurt(path)
    r = run_pipeline(fast, tmp_path)  # no error: rebuilt, no manual deletion (in this process)
    assert r["metrics"] == clean["metrics"] and r["soup"] == clean["soup"] and r["experts"] == [
        {**e, "path": e["path"].replace(str(tmp), str(tmp_path))} for e in clean["experts"]]
    if "manifest" not in damage:
        stderr = capsys.readouterr().err
        assert "rebuilding" in stderr and str(path.name) in stderr
    if damage.startswith("expert:"):  # and the rebuilt entry serves the next run
        assert run_pipeline(fast, tmp_path, out="again")["experts_cached"] is True


# -- outputs -----------------------------------------------------------------------------------------

def test_a_failed_run_in_a_used_output_dir_leaves_no_earlier_results_looking_like_its_own(cached_run, tmp_path, fast,
                                                                                          run_cli):
    import shutil

    tmp, _ = cached_run
    shutil.copytree(tmp / "out", tmp_path / "out")
    proc = run_cli([*fast, "eval.batch_size=0"], tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # run.py: one line, exit 1
    assert proc.returncode == 1 and len(errors) == 1 and "eval.batch_size must be an integer" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out" / "aggregate.safetensors").exists()
    assert (tmp_path / "out" / "results.previous.json").exists()  # kept, under a name that says what it is


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, fast, root):
    import resource

    def limit():  # writes beyond 50 kB fail (EFBIG), as on a full disk, for this process only
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    env = {**os.environ, "AME_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(root / "run.py"), *fast, f"hydra.run.dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1 and "cannot write" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "out" / "results.json").exists()
