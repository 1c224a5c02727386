"""A command line that Hydra cannot compose (an unknown key, an option that does not exist, a
malformed override, a ${...} that does not resolve) ends ``python run.py`` and ``python -m
ame.merge`` with exactly one ``error:`` line and exit code 1, like every other bad input, naming
the problem and the fix (Hydra's own report is several lines)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = [
    (["aggregator.foo=1"], ["Could not override 'aggregator.foo'", "use +aggregator.foo=1"]),
    (["aggregator=nonexistent"], ["Could not find 'aggregator/nonexistent'; available options in 'aggregator':",
                                  "ame_adam", "weighted_soup"]),
    (["aggregator.optimizer.lr=[1"], ["no viable alternative at input '[1'", "override_grammar"]),
    (["+foo=${bar}"], ["Interpolation key 'bar' not found", "fix or remove it"]),
]


@pytest.mark.parametrize("entry", ["run.py", "ame.merge"])
@pytest.mark.parametrize("args, wanted", CASES, ids=["unknown key", "missing option", "bad override", "interpolation"])
def test_a_command_line_hydra_cannot_compose_is_one_line(entry, args, wanted, root, tmp_path):
    if entry == "ame.merge" and args[0].startswith("+foo"):
        args = ["out=${bar}"]  # the merge reads out= first
    cmd = [sys.executable, str(root / "run.py")] if entry == "run.py" else [sys.executable, "-m", "ame.merge"]
    proc = subprocess.run([*cmd, *args, "logger=none" if entry == "run.py" else "quiet=true"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root), "HYDRA_FULL_ERROR": "0"})  # a user's own setting
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(w in lines[0] for w in wanted), lines[0]
