"""Reading byte ranges ahead (ame.io.readahead): every path gives the file's bytes, the plan never
changes a result, a bad file is one clear error from the consumer's thread."""
from __future__ import annotations

import os

import pytest
import torch

import ame
from ame.errors import AMEError
from ame.io.readahead import ALIGN, DIRECT_MIN, Files, ReadAhead, Span, _cached, aligned, drop_from_page_cache, room
from ame.io.safetensors import write_safetensors
from ame.pool import ExpertPool


def _file(tmp_path, nbytes: int, seed: int = 0):
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / f"blob{seed}"
    path.write_bytes(data.numpy().tobytes())
    return str(path), data


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("cached", [True, False])
def test_every_read_path_gives_the_files_bytes(tmp_path, direct, cached):
    """Unaligned offsets and lengths, a range ending at the end of the file, adjacent ranges joined,
    small ranges: mapped from the page cache, from the disk (O_DIRECT) and plainly."""
    size = 3 * DIRECT_MIN + 12345
    path, data = _file(tmp_path, size)
    if not cached:
        drop_from_page_cache([path])
    fd = os.open(path, os.O_RDONLY)
    resident = _cached(fd, 0, size)  # tmpfs keeps every page resident, dropped or not
    os.close(fd)
    spans = [Span(path, 7, DIRECT_MIN + 5), Span(path, 7 + DIRECT_MIN + 5, 1000),  # adjacent: one read
             Span(path, 2 * DIRECT_MIN + 3, size - 2 * DIRECT_MIN - 3),  # to the end of the file
             Span(path, ALIGN, 10), Span(path, 0, 0)]
    files = Files(direct=direct)
    buf = aligned(room(spans))
    views = files.read(spans, buf)
    for s, v in zip(spans, views):
        assert torch.equal(v, data[s.offset:s.offset + s.nbytes])
    inside = [buf.data_ptr() <= v.data_ptr() < buf.data_ptr() + buf.numel() for v in views[:3]]
    read_direct = direct and files.direct and files._fds[path][1] is not None  # this file system allows O_DIRECT
    if resident or read_direct:  # (a plain read's kernel read-ahead may cache the ranges after it)
        assert inside == [not resident] * 3  # page-cached ranges are mapped, not copied into the buffer
    files.close()


def test_a_file_shorter_than_its_span_is_one_clear_error(tmp_path):
    path, _ = _file(tmp_path, 2 * DIRECT_MIN)
    for direct in (True, False):
        with pytest.raises(AMEError, match="ended early"):
            Files(direct=direct).read([Span(path, DIRECT_MIN, 2 * DIRECT_MIN)], aligned(4 * DIRECT_MIN))


def test_read_ahead_follows_the_plan_reads_repeats_once_and_keeps_memory_bounded(tmp_path):
    path, data = _file(tmp_path, 8 * DIRECT_MIN)
    spans = {k: [Span(path, k * DIRECT_MIN, DIRECT_MIN)] for k in range(8)}
    plan = [(k, spans[k]) for k in (0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 3)]  # 0-2 and 3 asked for twice
    reads = []
    files = Files()
    real = files.read
    files.read = lambda s, b: reads.append(s[0].offset // DIRECT_MIN) or real(s, b)
    with ReadAhead(files, plan, budget=room(spans[0])) as ra:  # room for one: waits, never deadlocks
        for k, _ in plan:
            (v,) = ra.take(k)
            assert torch.equal(v, data[k * DIRECT_MIN:(k + 1) * DIRECT_MIN])
            assert ra.used <= room(spans[0]) * 5  # what the plan must hold (0-2 and 3) plus one read ahead
        assert ra.take(0) is None  # past the plan: the caller reads it itself
    assert reads == list(range(8))


def test_read_ahead_out_of_order_falls_back_and_errors_reach_the_consumer(tmp_path):
    path, data = _file(tmp_path, 2 * DIRECT_MIN)
    good, bad = [Span(path, 0, DIRECT_MIN)], [Span(path, DIRECT_MIN, 2 * DIRECT_MIN)]  # bad: past the end
    with ReadAhead(Files(), [("a", good), ("b", bad)]) as ra:
        assert ra.take("b") is None  # not the plan's next step
        assert torch.equal(ra.take("a")[0], data[:DIRECT_MIN])
        with pytest.raises(AMEError, match="ended early"):
            ra.take("b")


def _bf16_experts(tmp_path, n=3, rows=700):
    """bf16 safetensors experts big enough for the O_DIRECT path, with entries whose mean is exactly 0."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(rows, 1024, generator=gen)
    paths = []
    for i in range(n):
        sd = {"emb": (base + 0.01 * torch.randn(rows, 1024, generator=gen)).to(torch.bfloat16),
              "zero": torch.tensor([1.5, -2.0, 0.25]).mul(1 if i % 2 == 0 else -1).to(torch.bfloat16),
              "norm": torch.randn(1000, generator=gen).to(torch.bfloat16)}
        if n % 2 == 1 and i == n - 1:
            sd["zero"] = torch.zeros(3, dtype=torch.bfloat16)
        paths.append(tmp_path / f"e{i}.safetensors")
        write_safetensors(paths[-1], sd)
        drop_from_page_cache([paths[-1]])
    return paths


def test_the_soup_of_bf16_experts_is_the_correctly_rounded_mean_within_one_ulp(tmp_path):
    """Float32 accumulation of 16-bit experts: within 1 bf16 ulp of the float64 mean rounded to bf16,
    and exactly 0 where the mean is 0 (what mergekit's ``linear`` gives)."""
    paths = _bf16_experts(tmp_path)
    soup = ame.merge(paths, "soup")
    for k, v in soup.items():
        xs = [ExpertPool([p]).whole(0, [k])[k].double() for p in paths]
        exact = (sum(xs) / len(xs)).to(torch.bfloat16)
        ulps = (v.view(torch.int16).int() - exact.view(torch.int16).int()).abs()
        assert v.dtype == torch.bfloat16 and int(ulps.max()) <= 1, k
    assert torch.equal(soup["zero"], torch.zeros(3, dtype=torch.bfloat16))


@pytest.mark.parametrize("aggregator,kw", [("soup", {}), ("ame_adam", {"pivot": "soup", "epochs": 2}),
                                           ("ties", {"density": 0.3}), ("dare", {"density": 0.5})])
def test_results_do_not_depend_on_the_read_ahead(tmp_path, aggregator, kw):
    """The same merge with files read ahead (cold, O_DIRECT) and from state dicts (no file reads)."""
    paths = _bf16_experts(tmp_path, n=4)
    init = paths[0] if aggregator in ("ties", "dare") else None
    experts = paths[1:] if init else paths
    from_files = ame.merge(experts, aggregator, init=init, chunk_mb=1, **kw)
    sds = [ExpertPool([p]).whole(0) for p in experts]
    from_dicts = ame.merge(sds, aggregator, init=ExpertPool([init]).whole(0) if init else None, chunk_mb=1, **kw)
    for k in from_files:
        assert torch.equal(from_files[k], from_dicts[k]), k
