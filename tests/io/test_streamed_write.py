"""ame.io.safetensors.StreamedSafetensors: an aggregate written slice by slice, in any order, gives
exactly the bytes of ``safetensors.torch.save_file``, whether its whole 4 KB blocks go out with
O_DIRECT from the writer thread or through the page cache; a failed write in the writer thread is
raised, not lost."""
from __future__ import annotations

import errno
import random

import pytest
import torch
from safetensors.torch import save_file

import ame.io.safetensors as st
from ame.io.safetensors import StreamedSafetensors


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"emb.weight": torch.randn(1031, 1027, generator=g).bfloat16(),  # 2.1 MB: whole blocks and odd ends
            "mlp.weight": torch.randn(700, 1100, generator=g),  # 3.1 MB of float32
            "norm.weight": torch.randn(7, generator=g).half(), "step": torch.tensor([3], dtype=torch.int64),
            "a.bias": torch.randn(5, generator=g).bfloat16()}


def write(path, sd, order_seed: int) -> StreamedSafetensors:
    """``sd`` written as float32 row slices of random sizes, in a shuffled order."""
    rnd = random.Random(order_seed)
    out = StreamedSafetensors(path, {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, {"format": "pt"})
    slices = []
    for k, v in sd.items():
        rows, start = v.shape[0], 0
        while start < rows:
            stop = min(rows, start + (rows if start == 0 and k == "mlp.weight" else rnd.choice([1, 3, 200, 600, rows])))
            slices.append((k, start, stop))
            start = stop
    rnd.shuffle(slices)
    for k, a, b in slices:
        v = sd[k][a:b]
        out.write(k, a, v.float() if v.is_floating_point() else v)  # the writer converts to the file's dtype
    return out


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("stage_bytes", [st.STAGE_BYTES, 1_500_000])  # the latter: large slices go out in parts
def test_a_streamed_file_is_byte_for_byte_the_librarys(direct, stage_bytes, tmp_path, monkeypatch):
    monkeypatch.setattr(st, "STAGE_BYTES", stage_bytes)
    if not direct:
        monkeypatch.setattr(st, "O_DIRECT", 0)
    calls = []
    real = StreamedSafetensors._direct
    monkeypatch.setattr(StreamedSafetensors, "_direct", lambda self, data, offset: calls.append(len(data)) or
                        real(self, data, offset))
    sd = tensors()
    save_file(sd, str(tmp_path / "lib.safetensors"), {"format": "pt"})
    out = write(tmp_path / "ours.safetensors", sd, order_seed=1)
    if direct and out.direct < 0:
        pytest.skip(f"{tmp_path} does not take O_DIRECT (tmpfs?): the page-cache case is the other parameter")
    assert (out.direct >= 0) == direct
    out.close()
    assert bool(calls) == direct and all(n % 4096 == 0 for n in calls)  # whole blocks only went out directly
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_a_write_that_fails_in_the_writer_thread_is_raised(tmp_path, monkeypatch):
    def full(self, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(StreamedSafetensors, "_direct", full)
    emb = tensors()["emb.weight"]
    out = StreamedSafetensors(tmp_path / "ours.safetensors", {"emb.weight": (tuple(emb.shape), emb.dtype)}, {})
    out.write("emb.weight", 0, emb.float())
    if out.direct < 0:
        pytest.skip(f"{tmp_path} does not take O_DIRECT: no writer thread")
    with pytest.raises(OSError, match="No space"):
        out.close()
    out.abort()  # after a failure: closes what is open, raises nothing
    assert out.fd == -1 and out.direct == -1
