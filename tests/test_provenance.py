"""ame/provenance.py: what a run records about where it ran; git asked safely (never a failure,
never a hang), and only about the checkout the package runs from."""
from __future__ import annotations

import datetime
import hashlib
import shutil
import subprocess
import time

import pytest
import torch

from ame import provenance

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(cwd, *args) -> bytes:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True).stdout


def checkout(root):
    """A git repository holding a package folder ``pkg/`` with a tracked ``__init__.py``."""
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "first")
    return root / "pkg"


@needs_git
def test_git_state_names_the_commit_and_hashes_uncommitted_changes(tmp_path, monkeypatch):
    pkg = checkout(tmp_path)
    monkeypatch.setattr(provenance, "SOURCE", pkg)
    head = git(tmp_path, "rev-parse", "HEAD").decode().strip()
    assert provenance.git_state() == (head, False, None)
    (pkg / "__init__.py").write_text("x = 2\n")
    commit, dirty, digest = provenance.git_state()
    diff = git(tmp_path, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff", "--no-textconv")
    assert (commit, dirty) == (head, True) and digest == hashlib.sha256(diff).hexdigest()
    (pkg / "__init__.py").write_text("x = 3\n")
    assert provenance.git_state()[2] != digest  # another change, another hash
    (pkg / "notes.txt").write_text("untracked")  # untracked files do not count
    (pkg / "__init__.py").write_text("x = 1\n")
    assert provenance.git_state() == (head, False, None)


@needs_git
def test_an_installed_copy_is_not_the_repository_around_it(tmp_path, monkeypatch):
    """A package installed into a virtual environment inside someone's checkout is not that checkout's code."""
    checkout(tmp_path)
    site = tmp_path / ".venv" / "site-packages" / "ame"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    monkeypatch.setattr(provenance, "SOURCE", site)
    assert provenance.git_state() == (None, None, None)
    monkeypatch.setattr(provenance, "SOURCE", tmp_path.parent / "elsewhere")  # not even a folder
    assert provenance.git_state() == (None, None, None)


def test_git_missing_or_hanging_gives_no_commit_quickly_and_says_why(tmp_path, monkeypatch):
    sleep = shutil.which("sleep")
    (tmp_path / "repo" / ".git").mkdir(parents=True)  # what a checkout looks like without git to ask
    (tmp_path / "repo" / "pkg").mkdir()
    monkeypatch.setattr(provenance, "SOURCE", tmp_path / "repo" / "pkg")
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert provenance.git_state() == (None, None, None)
    assert provenance.collect()["git_problem"] == "git could not run (FileNotFoundError)"
    fake = tmp_path / "git"
    fake.write_text(f"#!/bin/sh\nexec {sleep} 30\n")  # exec: the timeout kills the sleep itself
    fake.chmod(0o755)
    monkeypatch.setattr(provenance, "GIT_TIMEOUT_S", 0.3)
    t0 = time.monotonic()
    assert provenance.git_state() == (None, None, None)
    assert time.monotonic() - t0 < 5
    p = provenance.collect()
    assert p["commit"] is None and p["git_problem"] == "git ls-files did not answer within 0.3 s"
    fake.write_text("#!/bin/sh\necho 'fatal: detected dubious ownership in repository' >&2\nexit 128\n")
    assert provenance.collect()["git_problem"] == "git ls-files failed (exit 128: fatal: detected dubious ownership " \
                                                  "in repository)"
    monkeypatch.setattr(provenance, "SOURCE", tmp_path / "pkg")  # no .git above: not a checkout, no problem
    (tmp_path / "pkg").mkdir()
    assert not any((d / ".git").exists() for d in (tmp_path, *tmp_path.parents))  # (the test's own premise)
    assert provenance.collect()["git_problem"] is None


def test_a_run_whose_git_did_not_answer_is_not_called_an_installed_copy():
    """A loaded machine once took over 5 s to answer git: the table said "not run from a git checkout"."""
    from ame.analysis import environment_line

    env = dict(version="0.1.0", commit=None, dirty=None, diff_sha256=None, python="3.11.7", torch="2.14.1",
               device={"cpu": "x", "cores": 2}, threads=2)
    slow = environment_line({"environment": env | {"git_problem": "git ls-files did not answer within 15 s"},
                             "roles": ["base"]})
    assert slow.startswith("commit unknown (git ls-files did not answer within 15 s);")
    assert environment_line({"environment": env, "roles": ["base"]}).startswith(
        "commit unknown (not run from a git checkout);")


def test_collect_gives_the_environment_as_plain_typed_values(monkeypatch):
    p = provenance.collect(["cpu"])
    assert set(p) == {"run_id", "started", "version", "commit", "dirty", "diff_sha256", "git_problem", "code_sha256",
                      "python", "torch", "torchvision", "numpy", "timm", "device", "threads", "deterministic", "host"}
    assert p["code_sha256"] == provenance.code_sha256() and len(p["code_sha256"]) == 64
    started = datetime.datetime.fromisoformat(p["started"])
    assert started.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()) < 60
    assert p["torch"] == torch.__version__ and p["threads"] == torch.get_num_threads() >= 1
    assert p["deterministic"] is torch.are_deterministic_algorithms_enabled()
    assert all(isinstance(p[k], str) for k in ("run_id", "python", "numpy", "torchvision", "host"))
    assert len(p["host"]) == 12 and int(p["host"], 16) >= 0  # hashed, never the name
    assert p["commit"] is None or (len(p["commit"]) == 40 and isinstance(p["dirty"], bool))
    assert p["git_problem"] is None  # this checkout's git answers
    assert (p["diff_sha256"] is not None) == bool(p["dirty"])
    d = p["device"]
    assert d["gpu"] is None and isinstance(d["cores"], int) and d["cores"] >= 1 and d["cpu"]
    assert provenance.collect()["run_id"] != p["run_id"]


def test_code_sha256_names_the_code_whatever_its_place_and_changes_with_any_source_or_config(tmp_path):
    import hashlib
    import shutil

    project = provenance.SOURCE.parent
    a, b = tmp_path / "a", tmp_path / "b"
    for copy in (a, b):  # a checkout's package, configs and entry point, elsewhere
        shutil.copytree(provenance.SOURCE, copy / "ame", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(project / "conf", copy / "conf")
        shutil.copy(project / "run.py", copy / "run.py")
    (b / "ame" / "notes.txt").write_text("not code")  # neither are other files
    (b / "experiments").mkdir()
    (b / "experiments" / "results.md").write_text("results")
    assert provenance.code_sha256(a / "ame") == provenance.code_sha256(b / "ame") == provenance.code_sha256()
    for changed in (b / "ame" / "aggregators" / "base.py", b / "conf" / "regime" / "verdict.yaml", b / "run.py"):
        before = changed.read_text()
        changed.write_text(before + "\n")
        assert provenance.code_sha256(b / "ame") != provenance.code_sha256(a / "ame"), changed
        changed.write_text(before)
    c = tmp_path / "c" / "pkg"  # by hand: each file's path and bytes, length-prefixed, in path order
    (c / "sub").mkdir(parents=True)
    (c / "sub" / "x.py").write_bytes(b"x = 1\n")
    (c / "a.py").write_bytes(b"")
    h = hashlib.sha256()
    for rel, data in ((b"pkg/a.py", b""), (b"pkg/sub/x.py", b"x = 1\n")):
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    assert provenance.code_sha256(c) == h.hexdigest()  # no conf/config.yaml beside it: the package alone


@needs_git
def test_code_sha256_at_a_commit_is_what_a_run_from_it_recorded(tmp_path, monkeypatch):
    """Read from git's objects, a commit's code hash equals code_sha256 of that commit checked out
    (package, configs, entry point; nothing else, not even another folder's .py files)."""
    root = tmp_path / "repo"
    for rel, text in (("pkg/__init__.py", "x = 1\n"), ("pkg/sub/m.py", "y = 2\n"), ("pkg/data.txt", "not code"),
                      ("conf/config.yaml", "a: 1\n"), ("conf/g/o.yaml", "b: 2\n"), ("run.py", "print(1)\n"),
                      ("scripts/s.py", "z = 3\n"), ("README.md", "hi\n")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "first")
    first, h1 = git(root, "rev-parse", "HEAD").decode().strip(), provenance.code_sha256(root / "pkg")
    (root / "scripts" / "s.py").write_text("z = 4\n")  # not the run's code: same hash
    git(root, "commit", "-qam", "scripts")
    same = git(root, "rev-parse", "HEAD").decode().strip()
    (root / "conf" / "g" / "o.yaml").write_text("b: 3\n")
    git(root, "commit", "-qam", "config")
    third, h3 = git(root, "rev-parse", "HEAD").decode().strip(), provenance.code_sha256(root / "pkg")
    monkeypatch.setattr(provenance, "SOURCE", root / "pkg")
    assert h1 != h3
    assert provenance.code_sha256_at(first) == provenance.code_sha256_at(same) == h1
    assert provenance.code_sha256_at(third) == h3
    assert provenance.code_sha256_at("0" * 40) is None  # a commit this checkout does not have
    h = hashlib.sha256()  # the first definition (789014c..3b2da42): the package's .py, paths relative to it
    for rel, data in ((b"__init__.py", b"x = 1\n"), (b"sub/m.py", b"y = 2\n")):
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    assert provenance.code_sha256_at(first, first_definition=True) == provenance.code_sha256_at(
        third, first_definition=True) == h.hexdigest()  # a config change: not in the first definition
    (root / "run.py").write_text("print(2)\n")
    git(root, "commit", "-qam", "entry point")
    assert provenance.code_sha256_at(git(root, "rev-parse", "HEAD").decode().strip()) == \
        provenance.code_sha256(root / "pkg") != h3
    (root / "copy").mkdir()  # an untracked package folder inside the checkout (e.g. an installed copy)
    shutil.copytree(root / "pkg", root / "copy" / "pkg")
    monkeypatch.setattr(provenance, "SOURCE", root / "copy" / "pkg")
    assert provenance.code_sha256_at(first) is None  # not the hash of nothing
    monkeypatch.setattr(provenance, "SOURCE", tmp_path / "elsewhere")  # not a checkout
    (tmp_path / "elsewhere").mkdir()
    assert provenance.code_sha256_at(first) is None


@needs_git
def test_code_sha256_at_a_package_below_the_repository_root(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    for rel, text in (("proj/pkg/__init__.py", "x = 1\n"), ("proj/conf/config.yaml", "a: 1\n"),
                      ("proj/run.py", "print(1)\n"), ("other/pkg/__init__.py", "not ours\n")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "first")
    monkeypatch.setattr(provenance, "SOURCE", root / "proj" / "pkg")
    assert provenance.code_sha256_at(git(root, "rev-parse", "HEAD").decode().strip()) == \
        provenance.code_sha256(root / "proj" / "pkg") is not None


def test_a_cuda_run_records_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(provenance, "_nvidia_driver", lambda: "570.86")
    info = provenance.device_info(["cpu", torch.device("cuda:1")])
    assert info["gpu"] == {"name": "Fake GPU 1", "cuda": "12.8", "driver": "570.86"} and info["cpu"]
    assert provenance.device_info(["cpu"])["gpu"] is None
