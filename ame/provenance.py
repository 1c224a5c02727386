"""Where a result came from: the code (version, git commit, uncommitted changes), the libraries,
the machine and torch's numerics settings, collected once per run as a plain dict.

It goes into ``results.json`` (``provenance``) and the W&B config, and into the cache entries the
run makes: experts and bases keep the provenance of the run that trained them, and a later run
that reuses them reports it as ``provenance.experts_made_by`` / ``base_made_by``. Nothing here
may fail or stall a run: every probe falls back to ``None`` (outside a git checkout, ``commit`` is
``None``), and git is asked with a timeout. When git does not answer in a checkout (missing, failing,
too slow), ``commit`` is ``None`` and ``git_problem`` says why, so that such a run is not mistaken for
one that ran from an installed copy.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Iterable

import torch

SOURCE = Path(__file__).resolve().parent  # the package's source folder: git is asked from here
GIT_TIMEOUT_S = 15.0  # once per run; a loaded machine with a cold disk took over 5 s (commit lost)


def collect(devices: Iterable[torch.device | str] = ()) -> dict:
    """This process's provenance; ``devices``: where the run computes (a CUDA one adds the GPU)."""
    (commit, dirty, diff), problem = _git_state()
    return {
        "run_id": uuid.uuid4().hex[:12],  # names this run among the ones that made cached experts and bases
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "version": _version("ame"),
        "commit": commit,
        "dirty": dirty,  # uncommitted changes to tracked files (`git diff HEAD`); untracked files do not count
        "diff_sha256": diff,  # sha256 of `git diff HEAD` when dirty
        "git_problem": problem,  # why the commit is unknown in a checkout (git missing, failing, too slow); None: no problem
        "code_sha256": code_sha256(),  # the source and configs themselves: commits that only add results share it
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "timm": _version("timm"),
        "device": device_info(devices),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "host": hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12],  # tells machines apart, names none
    }


def _code_paths(paths, package: str, configs: bool = True) -> list[str]:
    """Of ``paths`` (relative to the project, with ``/``), the ones :func:`code_sha256` hashes, in
    its order: the package's ``*.py`` and, in a checkout (``conf/config.yaml`` among them, unless
    ``configs`` is False: the first definition), ``conf/**/*.yaml`` and ``run.py``."""
    paths = set(paths)
    chosen = [p for p in paths if p.startswith(f"{package}/") and p.endswith(".py")]
    if configs and "conf/config.yaml" in paths:
        chosen += [p for p in paths if p.startswith("conf/") and p.endswith(".yaml") or p == "run.py"]
    return sorted(chosen)


def _digest(files) -> str:
    """sha256 over ``(path, bytes)`` pairs: each path, then its bytes, both length-prefixed."""
    h = hashlib.sha256()
    for rel, data in files:
        rel = rel.encode()
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def code_sha256(root: Path = SOURCE) -> str | None:
    """sha256 over the code a run runs: the package's Python source (each ``*.py`` under ``root``)
    and, in a checkout, the configs beside it (``conf/**/*.yaml``) and ``run.py``; each file's path
    (relative to ``root``'s parent), then its bytes, in path order. Two runs share it exactly when
    these files are the same, whatever the commit (uncommitted changes included, untracked files
    too); the scripts that draw tables from results are not in it. None if a file cannot be read."""
    project = root.parent
    found = [*root.rglob("*.py"), *(project / "conf").rglob("*.yaml"), project / "run.py"]
    paths = _code_paths((f.relative_to(project).as_posix() for f in found if f.is_file()), root.name)
    try:
        return _digest((rel, (project / rel).read_bytes()) for rel in paths)
    except OSError:
        return None


def code_sha256_at(commit: str, first_definition: bool = False) -> str | None:
    """:func:`code_sha256` of a commit of the checkout this package runs from, read from git's
    objects: what a run from that commit with no uncommitted (nor untracked) changes recorded, or
    would have, for results from before runs recorded it. ``first_definition``: what runs recorded
    from 789014c to 3b2da42 (the package's Python source alone, paths relative to the package).
    None outside a checkout, for a commit git does not have or
    whose tree lacks the package, or when git does not answer. (A tracked symlink is hashed as its
    link text; ``code_sha256`` reads its target.)"""
    try:
        top = _git("rev-parse", "--show-prefix").decode().strip()  # the package's folder in the repository: "ame/"
        listed = _git("ls-tree", "-r", "-z", "--full-tree", "--name-only", "--end-of-options", commit)
        package = top.rstrip("/")
        project = package.rpartition("/")[0]  # the package's parent: paths are hashed relative to it
        project = project + "/" if project else ""
        names = [n[len(project):] for n in listed.decode().split("\0") if n.startswith(project)]
        name = package.rpartition("/")[2]
        if not top or f"{name}/__init__.py" not in names:  # not this package's checkout, or not at this commit
            return None
        paths = _code_paths(names, name, configs=not first_definition)
        out = _git("cat-file", "--batch", stdin="".join(f"{commit}:{project}{p}\n" for p in paths).encode())
        files, at = [], 0
        for rel in paths:  # "<sha> blob <size>\n<bytes>\n" each, in the order asked
            head_end = out.index(b"\n", at)
            head = out[at:head_end].split()
            if len(head) != 3 or head[1] != b"blob":  # "<name> missing", "ambiguous", a submodule: not readable
                return None
            size = int(head[2])
            files.append((rel[len(name) + 1:] if first_definition else rel, out[head_end + 1:head_end + 1 + size]))
            at = head_end + 1 + size + 1
    except (_GitUnanswered, ValueError, UnicodeDecodeError):
        return None
    return _digest(files)


def _version(package: str) -> str | None:
    """An installed distribution's version, without importing it (timm's import is slow)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class _GitUnanswered(Exception):
    """git could not be asked (missing), failed, or did not answer in time."""


NOT_HERE = ("did not match any file", "not a git repository")  # git's words for "this file is not in a checkout"


def _git(*args: str, untracked_is_none: bool = False, stdin: bytes | None = None) -> bytes | None:
    """``git ARGS`` run in the package's folder: its output. A missing git, a failure or no answer
    within :data:`GIT_TIMEOUT_S` raise :class:`_GitUnanswered` with the reason; with
    ``untracked_is_none``, git saying that the file is not in a checkout gives None instead.
    ``stdin``: what git reads (nothing by default)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # never take the index lock of a checkout in use
    try:
        proc = subprocess.run(["git", *args], cwd=SOURCE, capture_output=True, timeout=GIT_TIMEOUT_S, env=env,
                              **({"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}))
    except subprocess.TimeoutExpired:
        raise _GitUnanswered(f"git {args[0]} did not answer within {GIT_TIMEOUT_S:g} s") from None
    except (OSError, subprocess.SubprocessError) as e:
        raise _GitUnanswered(f"git could not run ({type(e).__name__})") from None
    if proc.returncode == 0:
        return proc.stdout
    said = " ".join(proc.stderr.decode(errors="replace").split())
    if untracked_is_none and any(words in said for words in NOT_HERE):
        return None
    raise _GitUnanswered(f"git {args[0]} failed (exit {proc.returncode}: {said[-200:]})")


def _in_checkout() -> bool:
    """Whether a ``.git`` (a folder, or a worktree's file) lies in the package's folder or above it."""
    return any((d / ".git").exists() for d in (SOURCE, *SOURCE.parents))


def _git_state() -> tuple[tuple[str | None, bool | None, str | None], str | None]:
    """:func:`git_state` and, when git did not answer in what looks like a checkout, why."""
    if not SOURCE.is_dir():
        return (None, None, None), None
    try:
        if _git("ls-files", "--error-unmatch", "--", "__init__.py", untracked_is_none=True) is None:
            return (None, None, None), None  # not tracked here: an installed copy, not this checkout's code
        commit = _git("rev-parse", "HEAD").decode().strip()
    except _GitUnanswered as e:
        return (None, None, None), (str(e) if _in_checkout() else None)
    try:
        diff = _git("diff", "HEAD", "--binary", "--no-color", "--no-ext-diff", "--no-textconv")
    except _GitUnanswered as e:
        return (commit, None, None), str(e)
    return (commit, bool(diff), hashlib.sha256(diff).hexdigest() if diff else None), None


def git_state() -> tuple[str | None, bool | None, str | None]:
    """(commit, dirty, sha256 of ``git diff HEAD`` when dirty) of the checkout this package runs
    from, or (None, None, None) when it does not run from one: an installed copy, even one inside
    someone's repository (a virtual environment in a checkout), is not that repository's code. Also
    (None, None, None) when git does not answer (``collect`` records why: ``git_problem``)."""
    return _git_state()[0]


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def device_info(devices: Iterable[torch.device | str] = ()) -> dict:
    """The CPU (model, cores, the vector instructions torch's kernels use: what float results
    depend on across machines) and, when a device in ``devices`` is CUDA, the GPU."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    info = {"cpu": _cpu_model(), "arch": platform.machine() or None, "cpu_capability": capability,
            "cores": os.cpu_count(), "cores_usable": _usable_cores(), "platform": platform.platform(), "gpu": None}
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    if cuda:
        try:
            index = cuda[0].index if cuda[0].index is not None else torch.cuda.current_device()
            info["gpu"] = {"name": torch.cuda.get_device_name(index), "cuda": torch.version.cuda,
                           "driver": _nvidia_driver()}
        except (RuntimeError, AssertionError, AttributeError):  # CUDA gone since the devices were checked
            info["gpu"] = {"name": None, "cuda": torch.version.cuda, "driver": _nvidia_driver()}
    return info

