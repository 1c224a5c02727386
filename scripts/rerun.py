"""Run finished runs again with this checkout's code, and say, run by run, whether they stay the same.

    python scripts/rerun.py multirun/verdict --out multirun-rerun/verdict          # every run under it
    python scripts/rerun.py multirun/verdict/b0_n4/s0/soup --out /tmp/again -- logger=none

Every run folder under the given paths (a ``results.json`` beside ``.hydra/overrides.yaml``) is run
again by ``run.py`` with the overrides it recorded (and the extra ones after ``--``), into ``OUT``
at its path relative to the inputs' common folder; a rerun already there with the same overrides is
not run again (resumable). The cache is used as usual: the experts, the base and the reference
metrics a run reused are reused again (they are not re-checked); the aggregate is recomputed, and
its evaluation is reused only when its weights are byte for byte those of a cached evaluation (the
``evaluated`` column says which were evaluated again). Then, per run: whether the aggregate's
weights are identical (every tensor, ``torch.equal``), and the largest difference of its metrics
(the network's, its soup's, base's and ensemble's). This is how results made by several versions of
the code (a long sweep over many commits: the tables warn about it) are checked against one.

Exit status: 0 when every run reran to identical weights and metrics, 1 when some differ or a rerun
failed, 2 for inputs that cannot be used (one ``error:`` line, before anything runs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ame.analysis import readable  # noqa: E402
from ame.errors import AMEError  # noqa: E402

REFERENCES = ("soup", "base", "ensemble")  # the reference networks a results.json also carries
FORBIDDEN = ("-", "hydra.run", "hydra.sweep", "hydra.mode")  # extras that would move the rerun, or make it a sweep


def runs(path: Path) -> list[Path]:
    """The run folders at or under ``path`` (job 2 before job 10); results.json files without
    Hydra's ``.hydra/overrides.yaml`` beside them are not runs this can repeat (said on stderr)."""
    found = [path / "results.json"] if (path / "results.json").is_file() else path.rglob("results.json")
    found = sorted((f.parent for f in found), key=lambda d: [(0, int(p), "") if p.isdecimal() else (1, 0, p)
                                                              for p in d.parts])
    bare = [d for d in found if not (d / ".hydra" / "overrides.yaml").is_file()]
    if bare:
        print(f"note: {len(bare)} results.json under {path} without .hydra/overrides.yaml (e.g. {bare[0]}): "
              "not rerun", file=sys.stderr)
    return [d for d in found if d not in bare]


def overrides(run: Path) -> list[str]:
    from omegaconf import OmegaConf

    path = run / ".hydra" / "overrides.yaml"
    try:
        recorded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001 — any YAML or I/O problem is the same bad input
        raise AMEError(f"cannot read {path} ({type(e).__name__}): rerun needs the overrides Hydra recorded; "
                       "rerun a run folder whose .hydra/ is intact") from None
    if not isinstance(recorded, list) or not all(isinstance(o, str) for o in recorded):
        raise AMEError(f"{path} is not a list of overrides; rerun a run folder written by run.py")
    return recorded


def task(overrides: list[str]) -> list[str]:
    """The overrides Hydra records in ``.hydra/overrides.yaml``: not its own (``hydra.…``, ``hydra/…``)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def results(run: Path) -> dict:
    r = readable(lambda p: json.loads(p.read_text()), run / "results.json", "a run's results.json")
    if not isinstance(r, dict) or not isinstance(r.get("metrics"), dict):
        raise AMEError(f"{run / 'results.json'} has no metrics: not a finished run's results.json")
    return r


def metrics(r: dict) -> dict[str, float]:
    """Every number of the run's network and of its references, keyed ``<network>/<metric>``."""
    out = {}
    for who in ("metrics", *REFERENCES):
        for k, v in (r.get(who) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{who}/{k}"] = float(v)
    return out


def difference(a: float, b: float) -> float:
    """|a − b|; two equal non-finite values 0, a non-finite value against another value inf."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf


def tensors(path: Path) -> dict:
    """A safetensors file's tensors, or one line naming the file (safetensors' own error is no OSError)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 — SafetensorError and I/O errors alike
        raise AMEError(f"{path}: cannot read it as a safetensors file ({type(e).__name__}: {e})") from None


def weights_equal(a: Path, b: Path) -> bool | None:
    """Whether two safetensors files hold the same tensors byte for byte (names, dtypes, shapes and
    bytes: NaN equals NaN, −0.0 is not 0.0); None when neither run saved its aggregate."""
    if not a.is_file() and not b.is_file():
        return None
    if not (a.is_file() and b.is_file()):
        return False
    import torch

    def raw(t):
        return t.contiguous().reshape(-1).view(torch.uint8)

    x, y = tensors(a), tensors(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                                        and torch.equal(raw(x[k]), raw(y[k])) for k in x)


def hydra_value(path: Path) -> str:
    """``path`` as a quoted Hydra override value: job folders named by their overrides
    (``aggregator=soup,seed=0``) hold characters the override grammar would parse."""
    return "'" + str(path).replace("'", "\\'").replace("${", "\\${") + "'"  # plan() refuses a backslash


def rerun(run: Path, out: Path, extra: list[str]) -> str | None:
    """``run.py`` with ``run``'s overrides into ``out``; None, or its last error line."""
    args = [sys.executable, str(ROOT / "run.py"), *overrides(run), *extra, f"hydra.run.dir={hydra_value(out)}",
            "hydra.mode=RUN"]  # one run, even if a recorded config (a search trial's) asks for a sweep
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode == 0 and (out / "results.json").is_file():
        return None
    (out / "results.json").unlink(missing_ok=True)  # ours, from a failed run: not taken for a finished rerun
    return (proc.stderr.strip().splitlines() or [f"run.py exited {proc.returncode}"])[-1]


def plan(paths: list[Path], out: Path, extra: list[str]) -> list[tuple[Path, Path]]:
    """(run folder, where its rerun goes) for every run under ``paths``, each once; every input
    checked before anything runs."""
    for e in extra:
        if e.startswith(FORBIDDEN):
            raise AMEError(f"the extra override {e!r} would move the reruns or make them a sweep; reruns go to "
                           "--out, one run each: give only config overrides after --")
    given = [p.resolve() for p in paths]
    for p, original in zip(given, paths):
        if out == p or out.is_relative_to(p) or p.is_relative_to(out):
            raise AMEError(f"--out {out} overlaps the input {original}: the reruns must go elsewhere; choose "
                           "another --out")
    found = {}
    for p, original in zip(given, paths):
        mine = runs(p)
        if not mine:
            hint = " (overrides go after --)" if "=" in str(original) else ""
            raise AMEError(f"no run folder (results.json beside .hydra/overrides.yaml) at or under {original}{hint}; "
                           "give run or multirun folders written by run.py")
        found.update(dict.fromkeys(mine))
    top = Path(os.path.commonpath(given))
    top = top.parent if top in found else top  # one run folder given: its rerun keeps the folder's name
    todo = [(run, out / run.relative_to(top)) for run in found]
    for run, again in todo:
        if "\\" in str(again):
            raise AMEError(f"{again}: a backslash in the rerun's folder, which Hydra's overrides would misread; "
                           "choose another --out, or rename the input folder")
        overrides(run), results(run)  # every input readable
        if (run / "aggregate.safetensors").is_file():
            tensors(run / "aggregate.safetensors")
        if (again / "results.json").is_file():  # a rerun already there: ours, made with these overrides?
            if not (again / ".hydra" / "overrides.yaml").is_file() or \
                    task(overrides(again)) != task(overrides(run) + extra):
                raise AMEError(f"{again} holds a rerun made with other overrides than {run}'s (+ the extras now "
                               "given), or no record of them; remove it, or choose another --out")
            results(again)
    return todo


def code_line() -> tuple[str, str | None]:
    """This checkout's commit and code (ame.provenance): what reruns started now run."""
    from ame import provenance

    commit, dirty, _ = provenance.git_state()
    code = provenance.code_sha256()
    where = f"commit {commit[:12]}" if commit else "no git commit"
    return f"{where}{' + uncommitted changes' if dirty else ''}, code sha256 {(code or 'unknown')[:12]}", code


def recorded(provenances: list[dict]) -> str:
    """What the reruns recorded they ran: each version of the code, with its commits and run counts."""
    codes: dict = {}
    for p in provenances:
        commits = codes.setdefault(str(p.get("code_sha256"))[:12], {})
        commit = f"{str(p.get('commit'))[:12]}{' + uncommitted changes' if p.get('dirty') else ''}"
        commits[commit] = commits.get(commit, 0) + 1
    return "; ".join(f"code sha256 {code} (" + ", ".join(f"commit {c}: {n} run{'s' * (n > 1)}"
                                                          for c, n in commits.items()) + ")"
                     for code, commits in codes.items())


def main() -> None:
    try:
        _main()
    except AMEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", type=Path, nargs="+", help="run folders, or multirun folders holding them")
    ap.add_argument("--out", type=Path, required=True, help="where the reruns go (the runs' relative paths)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = args.out.resolve()
    todo = plan(args.paths, out, extra)
    said, code = code_line()
    print(f"Reruns into {args.out}{' with ' + ' '.join(extra) if extra else ''}; this checkout: {said}.\n")
    print("| run | weights | largest metric Δ | evaluated |\n|---|---|---:|---|")
    same = failed = evaluated = 0
    provenances: list[dict] = []
    for run, again in todo:
        name = again.relative_to(out).as_posix()
        if not (again / "results.json").is_file():
            if (problem := rerun(run, again, extra)) is not None:
                failed += 1
                print(f"| {name} | rerun failed: {problem.replace('|', '/')} | | |", flush=True)
                continue
        old, new = results(run), results(again)
        a, b = metrics(old), metrics(new)
        delta = max((difference(a[k], b[k]) for k in a.keys() & b.keys()), default=0.0)
        lacking = sorted(a.keys() ^ b.keys())
        weights = weights_equal(run / "aggregate.safetensors", again / "aggregate.safetensors")
        p = new.get("provenance") or {}
        provenances.append(p)
        fresh = (p.get("aggregate_metrics_made_by") or {}).get("run_id") == p.get("run_id") is not None
        evaluated += fresh
        identical = weights is not False and delta == 0.0 and not lacking
        same += identical
        said = {True: "identical", False: "differ", None: "not saved"}[weights]
        extra_note = f" ({', '.join(lacking)} on one side only)" if lacking else ""
        print(f"| {name} | {said} | {delta:.2g}{extra_note} | {'again' if fresh else 'cached'} |", flush=True)
    print(f"\n{len(todo)} runs: {same} identical, {len(todo) - same - failed} differ, {failed} failed to rerun; "
          f"{evaluated} aggregates evaluated again (the others' weights matched a cached evaluation).")
    if provenances:
        print(f"The reruns recorded {recorded(provenances)}.")
    versions = {p.get("code_sha256") for p in provenances}
    if len(versions) > 1:
        print(f"warning: the reruns ran {len(versions)} versions of the code (it changed while they ran): rerun "
              "into a new --out for one version")
    elif versions - {code}:
        print("note: the reruns ran another version of the code than this checkout's (they were made before it "
              "changed); rerun into a new --out to check this one")
    sys.exit(0 if same == len(todo) else 1)


if __name__ == "__main__":
    main()
