"""The weight I/O layer (ame/io): strict reading, safe writing, one metadata parser.

Each class of bad input is built here and must stop with one clear line (and, for a file, the
``safetensors`` library must reject it too); no merge may change, delete or nest into a user's
files, and nothing temporary is left behind on any exit path."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ame
from ame.errors import AMEError
from ame.io import Checkpoint, atomic_path, save, save_state_dict
from ame.merge import MergeError

# -- reading -----------------------------------------------------------------------------------------


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickle_that_runs_code_is_refused_by_the_reader_in_use_and_never_runs(suffix, tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / f"expert{suffix}"
    torch.save({"w": torch.zeros(2), "x": Exploit(marker)}, bad)
    for attempt in (lambda: Checkpoint(bad), lambda: ame.merge([bad, bad], "soup")):
        with pytest.raises(AMEError) as err:
            attempt()
        msg = str(err.value)
        assert "never unpickled" in msg and "\n" not in msg and "weights_only=False" not in msg, msg
    assert not marker.exists()


def test_weights_only_pt_and_safetensors_read_the_same(tmp_path):
    sd = {"a": torch.randn(3, 4), "n": torch.tensor(7), "empty": torch.zeros(0, 3)}
    torch.save(sd, tmp_path / "e.pt")
    save_state_dict(sd, tmp_path / "e.safetensors", {"shard_size": "12"})
    for name in ("e.pt", "e.safetensors"):
        out = dict(Checkpoint(tmp_path / name))
        assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


def _raw(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return path


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_FILES = {  # name: (header, data, header length override), each rejected by the library itself
    "header is a list": ([F32_2], b"\0" * 8, None),
    "entry not an object": ({"w": [1, 2]}, b"", None),
    "no data_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None),
    "unknown dtype": ({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    "negative shape": ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None),
    "overlapping offsets": ({"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                            b"\0" * 12, None),
    "offsets disagree with shape x dtype": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 48]}},
                                            b"\0" * 48, None),
    "gap between tensors": ({"a": F32_2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
                            b"\0" * 16, None),
    "trailing bytes": ({"w": F32_2}, b"\0" * 12, None),
    "truncated data": ({"w": F32_2}, b"\0" * 4, None),
    "header length past the end": ({"w": F32_2}, b"\0" * 8, 10_000),
    "header length over the limit": ({"w": F32_2}, b"\0" * 8, 200_000_000),
    "not JSON": (b"{not json}   ", b"", None),
    "metadata not strings": ({"__metadata__": {"shard_size": 5}, "w": F32_2}, b"\0" * 8, None),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_safetensors_file_the_library_rejects_is_one_line_and_never_read(case, tmp_path):
    header, data, length = BAD_FILES[case]
    path = _raw(tmp_path / "e.safetensors", header, data, length)
    with pytest.raises(Exception):  # the format's own library rejects it ...
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(AMEError) as err:  # ... and so do we, in one line naming the file
        Checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_files_the_library_writes_are_accepted_exactly(tmp_path):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(5), "c": torch.randn(4).half(), "z": torch.zeros(0)}
    save_file(sd, str(tmp_path / "lib.safetensors"), {"k": "v"})
    ck = Checkpoint(tmp_path / "lib.safetensors")
    assert ck.metadata == {"k": "v"} and all(torch.equal(ck[k], sd[k]) for k in sd)


def _folder(root: Path, weight_map) -> Path:
    root.mkdir()
    save_file({"a": torch.zeros(2)}, str(root / "s1.safetensors"))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


@pytest.mark.parametrize("weight_map, message", [
    (["a", "s1.safetensors"], "'weight_map' must map tensor names to file names"),
    ({"a": 5}, "'weight_map' must map tensor names to file names"),
    ({"a": "../../x.safetensors"}, "an index may only name files in its own folder"),
    ({"a": "/etc/passwd"}, "an index may only name files in its own folder"),
    ({"a": "s1.safetensors", "b": "s2.safetensors"}, "which is not in the folder"),
    ({"a": "s1.safetensors", "b": "s1.safetensors"}, "the index names 'b', which its file does not hold"),
])
def test_a_bad_index_is_one_line(weight_map, message, tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"outside")
    with pytest.raises(AMEError, match=message) as err:
        Checkpoint(_folder(tmp_path / "m", weight_map))
    assert "\n" not in str(err.value)


# -- metadata: one parser, the same verdict in run.py and ame.merge --------------------------------

@pytest.mark.parametrize("meta, message", [
    ({"ame": json.dumps({"shard_size": "-5"})}, "metadata field 'shard_size' must be a positive integer"),
    ({"ame": json.dumps({"shard_size": "abc"})}, "metadata field 'shard_size' must be a positive integer"),
    ({"ame": json.dumps({"shard_size": "0"})}, "metadata field 'shard_size' must be a positive integer"),
    ({"shard_size": "-5"}, "metadata field 'shard_size' must be a positive integer"),
    ({"ame": "{not json"}, "metadata entry 'ame' is not JSON"),
    ({"ame": "[1, 2]"}, "metadata entry 'ame' must be a JSON object"),
])
def test_bad_metadata_is_refused_by_merge_and_run_alike(meta, message, tmp_path):
    from ame.experts import FileExperts

    for i in range(2):
        save_file({"w": torch.full((2,), float(i))}, str(tmp_path / f"e{i}.safetensors"), meta)
    before = _hashes(tmp_path)
    with pytest.raises(MergeError, match=message):
        ame.merge(str(tmp_path / "e*.safetensors"), "weighted_soup", out=tmp_path / "out.safetensors")
    with pytest.raises(AMEError, match=message):
        FileExperts(str(tmp_path / "e*.safetensors"), None, None, None).experts()
    assert _hashes(tmp_path) == before  # nothing written, nothing left


# -- writing: never over, inside or around an input; never delete what this tool did not write -----

def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _experts(root: Path, folders: bool = False) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(2):
        sd = {"w": torch.full((3,), float(i))}
        if folders:
            (root / f"e{i}").mkdir()
            save_file(sd, str(root / f"e{i}" / "model.safetensors"), {"format": "pt"})
            (root / f"e{i}" / "config.json").write_text("{}")
            out.append(root / f"e{i}")
        else:
            save_file(sd, str(root / f"e{i}.safetensors"))
            out.append(root / f"e{i}.safetensors")
    (root / "README.md").write_text("my experts")
    return out


OUT_CASES = {
    "an input file": (False, lambda ex, tmp: ex[0], "is an input of this merge"),
    "an input folder": (True, lambda ex, tmp: ex[0], "is an input of this merge"),
    "the init": (False, lambda ex, tmp: tmp / "init.safetensors", "is an input of this merge"),
    "inside an input folder": (True, lambda ex, tmp: ex[0] / "sub", "lies inside the input"),
    "the folder holding the inputs": (True, lambda ex, tmp: tmp / "in", "contains the input"),
    "a hard link to an input": (False, lambda ex, tmp: (os.link(ex[1], tmp / "link.safetensors"),
                                                        tmp / "link.safetensors")[1], "is an input of this merge"),
    "an unrelated folder": (True, lambda ex, tmp: tmp / "thesis", "was not written by ame.merge"),
    "an unrelated file": (False, lambda ex, tmp: tmp / "thesis" / "notes.safetensors", "was not written by ame.merge"),
    "a folder named like a file": (False, lambda ex, tmp: tmp / "x.safetensors", "is an existing folder"),
}


@pytest.mark.parametrize("case", OUT_CASES)
def test_out_never_touches_an_input_or_a_users_file(case, tmp_path):
    folders, where, message = OUT_CASES[case]
    experts = _experts(tmp_path / "in", folders)
    save_file({"w": torch.zeros(3)}, str(tmp_path / "init.safetensors"))
    (tmp_path / "thesis" / "sub").mkdir(parents=True)
    (tmp_path / "thesis" / "thesis.txt").write_text("years of work")
    (tmp_path / "thesis" / "sub" / "data.csv").write_text("1,2")
    save_file({"w": torch.ones(3)}, str(tmp_path / "thesis" / "notes.safetensors"))
    (tmp_path / "x.safetensors").mkdir()
    (tmp_path / "x.safetensors" / "keep.txt").write_text("keep")
    out = where(experts, tmp_path)
    before = _hashes(tmp_path)
    with pytest.raises(MergeError, match=message) as err:
        ame.merge(experts, "task_arithmetic", init=tmp_path / "init.safetensors", out=out)
    assert "\n" not in str(err.value)
    assert _hashes(tmp_path) == before  # every byte of every file as it was; nothing added or removed


def test_a_previous_output_is_replaced_and_overwrite_true_replaces_a_users_file(tmp_path):
    experts = _experts(tmp_path / "in", folders=True)
    first = ame.merge(experts, "soup", out=tmp_path / "merged")
    assert (tmp_path / "merged" / ".ame-merge.json").is_file() and torch.allclose(first["w"], torch.full((3,), 0.5))
    again = ame.merge(experts[:1] * 2, "soup", out=tmp_path / "merged")  # ours: replaced
    assert torch.equal(again["w"], torch.zeros(3))
    files = _experts(tmp_path / "f")
    ame.merge(files, "soup", out=tmp_path / "m.safetensors")
    ame.merge(files, "soup", out=tmp_path / "m.safetensors")  # marked in its metadata: replaced
    (tmp_path / "mine.pt").write_bytes(b"user data")
    with pytest.raises(MergeError, match="overwrite=true"):
        ame.merge(files, "soup", out=tmp_path / "mine.pt")
    assert (tmp_path / "mine.pt").read_bytes() == b"user data"
    ame.merge(files, "soup", out=tmp_path / "mine.pt", overwrite=True)
    assert torch.allclose(Checkpoint(tmp_path / "mine.pt")["w"], torch.full((3,), 0.5))
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_key_prefix_that_leaves_tensors_out_cannot_write_a_partial_folder_model(tmp_path):
    root = tmp_path / "e0"
    root.mkdir()
    save_file({"h.0.w": torch.zeros(2), "h.1.w": torch.ones(2)}, str(root / "model.safetensors"), {"format": "pt"})
    with pytest.raises(MergeError, match="keeps 1 of the 2 tensors"):
        ame.merge([root, root], "soup", key_prefix="h.0.", out=tmp_path / "out")
    part = ame.merge([root, root], "soup", key_prefix="h.0.", out=tmp_path / "part.safetensors")  # a file is fine
    assert list(part) == ["w"] and not (tmp_path / "out").exists()


# -- the Python API and the command line: every error one line ------------------------------------

def test_api_takes_one_path_or_glob_and_refuses_wrong_types_in_one_line(tmp_path):
    files = _experts(tmp_path)
    assert torch.allclose(ame.merge(str(tmp_path / "e*.safetensors"), "soup")["w"], torch.full((3,), 0.5))
    assert torch.equal(ame.merge(str(files[0]), "soup")["w"], torch.zeros(3))  # one path, not its characters
    for call, message in [
        (lambda: ame.merge(5, "soup"), "experts.paths must be a checkpoint path"),
        (lambda: ame.merge([files[0], 3.5], "soup"), "each expert must be a path"),
        (lambda: ame.merge(files, 7), "aggregator must be the name"),
        (lambda: ame.merge(files, "soup", seed="abc"), "seed must be an integer"),
        (lambda: ame.merge(files, "soup", sizes=5), "experts.sizes must be a list"),
        (lambda: ame.merge(files, "soup", out=3), "out must be a path"),
        (lambda: ame.merge(files, "soup", chunk_mb=float("inf")), "aggregator.chunk_mb must be a finite number"),
        (lambda: ame.merge([{"n": torch.tensor(1)}, {"n": torch.tensor(2)}], "soup"), "no floating-point tensors"),
    ]:
        with pytest.raises(MergeError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def _cli(args: list[str], cwd: Path, preexec=None, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ame.merge", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def _one_line(proc, message: str, code: int = 1) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == code and len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a subprocess per case (interpreter and torch start-up): the API test above covers the checks
@pytest.mark.parametrize("args, message", [
    (["out=."], "give a file name ending in .safetensors"),
    (["out=e0.safetensors"], "is an input of this merge"),
    (["out=m.safetensors", "experts.sizes=5"], "experts.sizes must be a list"),
    (["out=m.safetensors", "seed=abc"], "seed must be an integer"),
    (["out=m.safetensors", "aggregator.chunk_mb=inf"], "aggregator.chunk_mb must be a finite number"),
])
def test_command_line_errors_are_one_line(args, message, tmp_path):
    _experts(tmp_path)
    before = _hashes(tmp_path)
    _one_line(_cli(["aggregator=soup", "experts.paths=[e0.safetensors,e1.safetensors]", *args], tmp_path), message)
    assert _hashes(tmp_path) == before


def test_a_full_disk_or_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(2):
        save_file({"w": torch.randn(300_000)}, str(tmp_path / "in" / f"e{i}.safetensors"))
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    proc = _cli(["aggregator=soup", "experts.paths=in/*.safetensors", "out=m.safetensors"], tmp_path, preexec=limit)
    _one_line(proc, "cannot write m.safetensors (File too large)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no temporary


INTERRUPT = """
import os, runpy, signal, sys
import ame.io.writer as w
write, sig = w.FileOutput.write, getattr(signal, sys.argv.pop(1))
def interrupted(self, *a):
    write(self, *a)
    os.kill(os.getpid(), sig)
w.FileOutput.write = interrupted
sys.argv[0] = "ame.merge"
runpy.run_module("ame.merge", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, message", [("SIGINT", 130, "interrupted; nothing written"),
                                                ("SIGTERM", 143, "terminated; nothing written")])
def test_ctrl_c_or_sigterm_mid_write_is_one_line_and_leaves_nothing(sig, code, message, tmp_path):
    _experts(tmp_path / "in", folders=True)
    _one_line(_cli(["aggregator=soup", "experts.paths=[e0,e1]", "out=."], tmp_path / "in"), "contains the input")
    # SIGINT as a terminal sends it, even where this test runs in the background (`nohup pytest &`
    # starts it with SIGINT ignored, which the merge would inherit and never see the interrupt)
    reset = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = _cli([sig, "aggregator=soup", "experts.paths=[in/e0,in/e1]", "out=merged"], tmp_path, preexec=reset,
                code=INTERRUPT)
    _one_line(proc, message, code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# -- files -------------------------------------------------------------------------------------------

def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AMEError, match="cannot write"):
        save_state_dict({"a": torch.zeros(1)}, blocker / "sub" / "x.safetensors")


def test_a_zero_size_tensor_round_trips_through_every_format(tmp_path):
    sd = {"w": torch.randn(2, 3), "empty": torch.zeros(0, 4)}
    for name in ("z.pt", "z.safetensors", "z.ckpt"):
        back = dict(save(sd, tmp_path / name))
        assert all(torch.equal(back[k], sd[k]) for k in sd), name
