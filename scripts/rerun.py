"""Run finished runs again with this checkout's code, and say, run by run, whether they stay the same.

    python scripts/rerun.py multirun/verdict --out multirun-rerun/verdict          # every run under it
    python scripts/rerun.py multirun/verdict/b0_n4/s0/soup --out /tmp/again -- logger=none

Every run folder under the given paths (a ``results.json`` beside ``.hydra/overrides.yaml``) is run
again by ``run.py`` with the overrides it recorded (and the extra ones after ``--``), into ``OUT``
at the same relative path; a run already there is not run again (resumable). The cache is used as
usual: the experts, the base and the reference metrics a run reused are reused again (they are not
re-checked); the aggregate is recomputed, and its evaluation is reused only when its weights are
byte for byte the cached ones. Then, per run: whether the aggregate's weights are identical (every
tensor, ``torch.equal``), and the largest difference of its metrics (the network's, its soup's,
base's and ensemble's). This is how results made by several versions of the code (a long sweep
over many commits: the tables warn about it) are checked against the final one.

Exit status: 0 when every run reran to identical weights and metrics, 1 when some differ or a rerun
failed, 2 for inputs that cannot be used.
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

from ame.errors import AMEError  # noqa: E402

REFERENCES = ("soup", "base", "ensemble")  # the reference networks a results.json also carries


def runs(path: Path) -> list[Path]:
    """The run folders at or under ``path``, in path order."""
    if (path / "results.json").is_file():
        found = [path]
    else:
        found = sorted(p.parent for p in path.rglob("results.json"))
    return [p for p in found if (p / ".hydra" / "overrides.yaml").is_file()]


def overrides(run: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        recorded = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "overrides.yaml"))
    except Exception as e:  # noqa: BLE001 — any YAML or I/O problem is the same bad input
        raise AMEError(f"cannot read {run / '.hydra' / 'overrides.yaml'} ({type(e).__name__}): rerun needs the "
                       "overrides Hydra recorded; rerun a run folder whose .hydra/ is intact") from None
    if not isinstance(recorded, list) or not all(isinstance(o, str) for o in recorded):
        raise AMEError(f"{run / '.hydra' / 'overrides.yaml'} is not a list of overrides; rerun a run folder "
                       "written by run.py")
    return recorded


def metrics(results: dict) -> dict[str, float]:
    """Every number of the run's network and of its references, keyed ``<network>/<metric>``."""
    out = {}
    for who in ("metrics", *REFERENCES):
        for k, v in (results.get(who) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{who}/{k}"] = float(v)
    return out


def weights_equal(a: Path, b: Path) -> bool | None:
    """Whether two safetensors files hold the same tensors (names, dtypes, shapes, values); None
    when neither run saved its aggregate."""
    if not a.is_file() and not b.is_file():
        return None
    if not (a.is_file() and b.is_file()):
        return False
    from safetensors.torch import load_file
    import torch

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def compare(old: Path, new: Path) -> tuple[bool | None, float, list[str]]:
    """(weights identical, the largest |difference| of a metric both have, the metrics one side lacks)."""
    a, b = (metrics(json.loads((p / "results.json").read_text())) for p in (old, new))
    diffs = [abs(a[k] - b[k]) if not (math.isnan(a[k]) and math.isnan(b[k])) else 0.0 for k in a.keys() & b.keys()]
    return weights_equal(old / "aggregate.safetensors", new / "aggregate.safetensors"), max(diffs, default=0.0), \
        sorted(a.keys() ^ b.keys())


def rerun(run: Path, out: Path, extra: list[str]) -> str | None:
    """``run.py`` with ``run``'s overrides into ``out``; None, or its last error line."""
    args = [sys.executable, str(ROOT / "run.py"), *overrides(run), *extra, f"hydra.run.dir={out}"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode == 0 and (out / "results.json").is_file():
        return None
    return (proc.stderr.strip().splitlines() or [f"run.py exited {proc.returncode}"])[-1]


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def main() -> None:
    try:
        _main()
    except AMEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", type=Path, nargs="+", help="run folders, or multirun folders holding them")
    ap.add_argument("--out", type=Path, required=True, help="where the reruns go (the same relative paths)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = args.out.resolve()
    todo: list[tuple[Path, Path]] = []
    for given in args.paths:
        given = given.resolve()
        if _inside(out, given) or _inside(given, out):
            raise AMEError(f"--out {args.out} overlaps the input {given}: the reruns must go elsewhere; choose "
                           "another --out")
        found = runs(given)
        if not found:
            raise AMEError(f"no run folder (results.json beside .hydra/overrides.yaml) at or under {given}; give "
                           "run or multirun folders written by run.py")
        base = given if given not in found else given.parent
        todo += [(r, out / r.relative_to(base)) for r in found]
    for run, _ in todo:
        overrides(run)  # every input readable before anything runs
    same = failed = 0
    print("| run | weights | largest metric Δ |\n|---|---|---:|")
    for run, again in todo:
        name = again.relative_to(out).as_posix()
        if not (again / "results.json").is_file():
            if (problem := rerun(run, again, extra)) is not None:
                failed += 1
                print(f"| {name} | rerun failed: {problem} | |", flush=True)
                continue
        weights, delta, lacking = compare(run, again)
        identical = weights is not False and delta == 0.0 and not lacking
        same += identical
        said = {True: "identical", False: "differ", None: "not saved"}[weights]
        print(f"| {name} | {said} | {delta:.2g}{' (' + ', '.join(lacking) + ' on one side only)' if lacking else ''} |",
              flush=True)
    print(f"\n{len(todo)} runs: {same} identical, {len(todo) - same - failed} differ, {failed} failed to rerun")
    sys.exit(0 if same == len(todo) else 1)


if __name__ == "__main__":
    main()
