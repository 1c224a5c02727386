"""The cache (ame/cache.py) and the safetensors reader/writer under it: the real safetensors
library agrees byte for byte, damaged entries are reported and rebuilt, never used."""
from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from ame.cache import Entry, cached_tensors
from ame.errors import AMEError
from ame.io import read_safetensors, write_safetensors

TENSORS = {"b": torch.arange(3, dtype=torch.int64), "a": torch.randn(2, 3), "c": torch.zeros(5, dtype=torch.uint8),
           "d": torch.ones(1, dtype=torch.float16), "e": torch.tensor(3.0), "f": torch.zeros(0, 4),
           "g": torch.ones(2, dtype=torch.bfloat16), "h": torch.tensor([True, False]), "i": torch.ones(3).double(),
           "j": torch.ones(2, dtype=torch.int32), "k": torch.ones(2, dtype=torch.int16), "l": torch.ones(2, dtype=torch.int8)}


def test_streaming_writer_gives_safetensors_own_bytes_and_reader_matches_the_library(tmp_path):
    meta = {"ame": json.dumps({"x": "é"})}
    save_file(TENSORS, tmp_path / "ref.safetensors", metadata=meta)
    digest = write_safetensors(tmp_path / "ours.safetensors", TENSORS, meta)
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert (tmp_path / "ours.safetensors").read_bytes() == ref and digest == hashlib.sha256(ref).hexdigest()
    tensors, metadata, read_digest = read_safetensors(tmp_path / "ref.safetensors")
    lib = load_file(tmp_path / "ref.safetensors")
    assert metadata == meta and read_digest == digest and tensors.keys() == lib.keys()
    assert all(tensors[k].dtype == lib[k].dtype and torch.equal(tensors[k], lib[k]) for k in lib)


def _damage_keeping_size_and_mtime(path):
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: bit rot
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("damage", ["flip_same_size_and_mtime", "truncate", "garbage", "unrecorded"])
def test_damaged_tensor_file_is_reported_dropped_and_rebuilt(damage, tmp_path, capsys):
    builds = []
    build = lambda: builds.append(1) or {"w": torch.arange(100.0)}  # noqa: E731
    first = cached_tensors(tmp_path, "things", "k1", build)
    path = tmp_path / "things" / "k1" / "data.safetensors"
    if damage == "flip_same_size_and_mtime":
        _damage_keeping_size_and_mtime(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    else:
        (tmp_path / "things" / "k1" / "manifest.json").write_text(json.dumps({"files": {}}))
    again = cached_tensors(tmp_path, "things", "k1", build)
    assert len(builds) == 2 and torch.equal(again["w"], first["w"])
    if damage != "unrecorded":  # a file the manifest never recorded (a job killed before it did) is simply rebuilt
        warnings = [line for line in capsys.readouterr().err.splitlines() if "data.safetensors" in line]
        assert len(warnings) == 1 and "rebuilding" in warnings[0]
    assert torch.equal(cached_tensors(tmp_path, "things", "k1", build)["w"], first["w"]) and len(builds) == 2


@pytest.mark.parametrize("manifest", ["{}", "[]", "not json", '{"files": {"x": 3}}', ""])
def test_damaged_manifest_is_reported_and_its_files_rebuilt(manifest, tmp_path):
    entry = Entry(tmp_path, "things", "k")
    entry.put_json("m.json", {"a": 1})
    entry.manifest_path.write_text(manifest)
    assert Entry(tmp_path, "things", "k").load_json("m.json") is None  # not trusted without its record
    entry.put_json("m.json", {"a": 2})
    assert Entry(tmp_path, "things", "k").load_json("m.json") == {"a": 2}


@pytest.mark.parametrize("content", [b'{"soup": {"id/acc": 0.5}', b"not json", b"{}", b""])
def test_damaged_json_entry_is_never_used(content, tmp_path):
    entry = Entry(tmp_path, "metrics", "k")
    entry.put_json("reference.json", {"soup": {"id/acc": 0.5}})
    (entry.root / "reference.json").write_bytes(content)
    assert entry.load_json("reference.json") is None and not (entry.root / "reference.json").exists()


def test_json_entry_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        Entry(tmp_path, "metrics", "k").put_json("x.json", {"a": float("nan")})


def test_a_job_waiting_for_a_lock_says_so_and_gives_up_after_the_timeout(tmp_path, monkeypatch, capsys):
    holder, waiter = Entry(tmp_path, "experts", "k", what="these trained experts"), Entry(tmp_path, "experts", "k")
    monkeypatch.setenv("AME_CACHE_LOCK_TIMEOUT", "0.3")
    with holder.lock():
        with pytest.raises(AMEError, match="gave up after 0 s waiting for"):
            with waiter.lock():
                pass
    assert "waiting for cache entry experts/k (held by another job) ..." in capsys.readouterr().err
    released = threading.Event()
    monkeypatch.setenv("AME_CACHE_LOCK_TIMEOUT", "30")

    def hold():
        with holder.lock():
            released.wait(0.3)

    t = threading.Thread(target=hold)
    t.start()
    released.wait(0.1)
    with waiter.lock():  # waits, then gets it
        pass
    t.join()
