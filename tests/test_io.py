"""Weight files are untrusted input: safetensors, or weights-only torch.load, and atomic writes."""
from __future__ import annotations

import pickle

import pytest
import torch

from ame.errors import AMEError
from ame.io import atomic_path, load_state_dict, save_state_dict


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "expert.pt"
    with open(bad, "wb") as f:
        pickle.dump({"w": Exploit(marker)}, f)
    with pytest.raises(AMEError, match="cannot read weights"):
        load_state_dict(bad)
    assert not marker.exists()


def test_weights_only_pt_and_safetensors_round_trip(tmp_path):
    sd = {"a": torch.randn(3, 4), "n": torch.tensor(7)}
    torch.save(sd, tmp_path / "e.pt")
    save_state_dict(sd, tmp_path / "e.safetensors", {"shard_size": "12"})
    for name in ("e.pt", "e.safetensors"):
        out = load_state_dict(tmp_path / name)
        assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


def test_truncated_safetensors_is_one_clear_error(tmp_path):
    save_state_dict({"a": torch.randn(100)}, tmp_path / "e.safetensors")
    data = (tmp_path / "e.safetensors").read_bytes()
    (tmp_path / "e.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AMEError, match="cannot read weights"):
        load_state_dict(tmp_path / "e.safetensors")


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
