"""Side-by-side merge benchmark: ``python -m ame.merge`` against mergekit on the same Llama experts.

    python scripts/bench_merge.py --params 1.1e9 --experts 4 --peer mergekit
    python scripts/bench_merge.py --geometry 7b --experts 4 --methods soup ties      # 7B-sized tensors
    python scripts/bench_merge.py --params 2e8 --experts 3 --methods soup --peer mergekit   # a quick check

**Experts.** N Llama-architecture checkpoints (``LlamaForCausalLM``, bf16, sharded Hugging Face
layout: ``model-0000k-of-0000m.safetensors`` of at most ``--shard-gb`` GB, the index and the
``config.json`` that ``transformers`` writes, so ``from_pretrained`` loads them). Expert 0 is a
shared base (seeded normal weights, std 0.02; norm weights 1 + noise); expert i ≥ 1 is the base
plus a seeded delta of std ``--delta`` (0.002), so task vectors mean something. Every tensor is
drawn from its own seed (expert, tensor), written straight into the shard files (no model is
built, nothing is initialised twice), and the experts are kept under ``--work`` (default
``/work/bench``) for the next run: a folder per geometry, one per expert, reused when complete.

**Geometry.** ``--geometry tinyllama`` (default): hidden 2048, intermediate 5632, 32 heads with 4
key/value heads, vocabulary 32,000, the number of layers chosen to give about ``--params``
parameters (default 22 layers: 1.1B, TinyLlama-1.1B's shape). ``--geometry 7b``: hidden 4096,
intermediate 11008, 32 heads, vocabulary 32,000 and 2 layers by default, so every tensor is as
large as a 7B model's. ``--geometry tiny`` (hidden 64, 2 layers) is for tests. ``--layers`` sets
the number of layers directly.

**What is timed**, each command a subprocess, one after the other; wall time, user and system CPU
time and peak resident memory come from the kernel (``os.wait4``), the load average
(``os.getloadavg``) is read before and after each:

- reading every expert file once with ``cat``, page-cached (after a first read) and cold;
- ``python -m ame.merge`` with ``--methods`` (default all): ``soup`` and the AME runs
  (``ame_adam``, ``ame_adagrad``; pivot = soup, as with no init) over experts 0..N-1;
  ``task_arithmetic`` (λ = 1/(N-1)), ``ties`` (mergekit's rule: ``recipe=`` the very YAML mergekit
  runs, density 0.2 per tensor), ``ties_global`` (the published rule, ``aggregator=ties``: one top
  20 % per task vector), ``dare`` (density 0.5) with base = expert 0 and experts 1..N-1;
- with ``--peer mergekit``: ``mergekit-yaml --lazy-unpickle --out-shard-size 1B`` with the recipes
  ``linear`` (experts 0..N-1, weight 1 each, normalised: the soup), ``task_arithmetic`` (weight
  λ = 1/(N-1)) and ``ties`` (density 0.2, weight 1, normalised: TIES's disjoint mean), base expert 0.
  mergekit's own defaults otherwise: it computes ``linear`` in float32 and the task-vector methods
  in the experts' dtype (bf16, so its TIES differs from ours, computed in float32, by bf16
  roundings); only the soup is compared value by value.

By default (``--cache cold``) the experts' files are dropped from the page cache before every
command (``fsync`` + ``posix_fadvise(DONTNEED)`` on those files only; nothing machine-wide), so
every command starts as the cold read does; ``--cache warm`` reads them once first instead. After
each command its output is flushed, dropped from the page cache and deleted (untimed).

**Output**: one markdown table, both tools side by side: wall (user, sys) seconds and peak RSS,
ours / mergekit (wall), ours / the cold read (wall), and the load average before → after each
command; then whether the soup equals mergekit's ``linear`` within 1 bf16 ulp, tensor by tensor.

**The peer, mergekit**, in a virtual environment of its own (it pins its own ``transformers`` and
friends; ``pip install 'ame[bench]'`` names it, but a separate venv keeps ours untouched)::

    python3 -m venv /work/venvs/mergekit
    /work/venvs/mergekit/bin/pip install mergekit       # 0.1.5; it takes torch from the disk where a wheel lies there

and ``--peer-python /work/venvs/mergekit/bin/python`` (the default) points the bench at it.
``--device cuda`` runs the AME family with ``aggregator.device=cuda`` and mergekit with ``--cuda``
(task vectors run on the CPU in ``ame.merge``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ame.io.readahead import drop_from_page_cache
from ame.provenance import git_state

ROOT = Path(__file__).resolve().parents[1]
GEOMETRIES = {  # hidden, intermediate, heads, key/value heads, vocabulary
    "tinyllama": dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    "7b": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "tiny": dict(hidden=64, intermediate=172, heads=4, kv_heads=2, vocab=1000),
}
OURS = ("soup", "task_arithmetic", "ties", "ties_global", "dare", "ame_adam", "ame_adagrad")
PEER = {"soup": "linear", "task_arithmetic": "task_arithmetic", "ties": "ties"}  # ours → mergekit's method
WORK = {"soup": "plain average (mergekit `linear` / `soup`)", "task_arithmetic": "task arithmetic, λ = 1/(N−1)",
        "ties": "TIES, density 0.2, mergekit's rule (per-tensor top-k; ours: `recipe=` its YAML)",
        "ties_global": "TIES, density 0.2, published rule (one top-k per task vector)",
        "dare": "DARE, density 0.5", "ame_adam": "AME-Adam, pivot = soup",
        "ame_adagrad": "AME-Adagrad, pivot = soup"}
TASK_VECTORS = ("task_arithmetic", "ties_global", "dare")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# -- the experts ---------------------------------------------------------------------------------

def llama_config(geometry: str, params: float | None, layers: int | None):
    """A ``LlamaConfig`` of ``geometry`` with ``layers`` layers (else as many as give ≈ ``params``;
    without either, 22 layers for ``tinyllama`` — 1.1B parameters — and 2 for the others)."""
    from transformers import LlamaConfig

    g = GEOMETRIES[geometry]
    h, i, v, kv = g["hidden"], g["intermediate"], g["vocab"], g["kv_heads"]
    per_layer = 2 * h * h + 2 * h * (h // g["heads"]) * kv + 3 * h * i + 2 * h
    if layers is None:
        layers = (max(1, round((params - 2 * v * h - h) / per_layer)) if params is not None
                  else 22 if geometry == "tinyllama" else 2)
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=g["heads"],
                         num_key_value_heads=kv, vocab_size=v, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", torch.bfloat16)  # written to config.json
    return config


def llama_shapes(config) -> dict[str, tuple[int, ...]]:
    """The state dict's keys and shapes, from ``LlamaForCausalLM`` built on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


def _seed(*parts: int) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _shards(shapes: dict[str, tuple[int, ...]], max_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most ``max_bytes`` of bf16, in order (as ``save_pretrained`` does)."""
    groups, size = [[]], 0
    for k, s in shapes.items():
        n = 2 * _numel(s)
        if size + n > max_bytes and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups


def make_experts(folder: Path, config, n: int, delta: float, shard_bytes: int) -> list[Path]:
    """Experts 0..n-1 under ``folder`` (those already complete are reused), in sharded HF layout."""
    shapes = llama_shapes(config)
    groups = _shards(shapes, shard_bytes)
    paths = [folder / f"e{i}" for i in range(n)]
    todo = [i for i, p in enumerate(paths) if not (p / ".complete").is_file()]
    if not todo:
        return paths
    need = sum(2 * _numel(s) for s in shapes.values()) * len(todo)
    free = shutil.disk_usage(folder.parent if not folder.exists() else folder).free
    if need > free:
        fail(f"making {len(todo)} experts needs {need / 1e9:.1f} GB under {folder}, {free / 1e9:.1f} GB free; "
             "choose another --work or fewer --experts")
    t0 = time.perf_counter()
    for i in todo:
        shutil.rmtree(paths[i], ignore_errors=True)
        paths[i].mkdir(parents=True)
        config.save_pretrained(paths[i])
    names = [f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors" for j in range(len(groups))]
    files = {i: [_ShardWriter(paths[i] / name, {k: shapes[k] for k in keys}) for name, keys in zip(names, groups)]
             for i in todo}
    for j, keys in enumerate(groups):
        for t, k in enumerate(keys):
            shape = shapes[k]
            gen = torch.Generator().manual_seed(_seed(0, k))
            base = torch.randn(shape, generator=gen) * 0.02
            if len(shape) == 1:  # norm weights: around 1, as trained ones are
                base += 1
            for i in todo:
                if i == 0:
                    files[i][j].write(k, base.to(torch.bfloat16))
                else:
                    gen = torch.Generator().manual_seed(_seed(i, k))
                    files[i][j].write(k, (base + delta * torch.randn(shape, generator=gen)).to(torch.bfloat16))
    for i in todo:
        for f in files[i]:
            f.close()
        total = sum(2 * _numel(s) for s in shapes.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: names[j] for j, keys in enumerate(groups) for k in keys}}
        (paths[i] / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (paths[i] / ".complete").write_text("")
    print(f"# made experts {todo} under {folder} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return paths


class _ShardWriter:
    """A safetensors file written tensor by tensor at known offsets (header first)."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        header, offset, self.at = {"__metadata__": {"format": "pt"}}, 0, {}
        for k, s in shapes.items():
            n = 2 * _numel(s)
            header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + n]}
            self.at[k] = offset
            offset += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self.start = 8 + len(head)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(head)) + head, 0)
        os.ftruncate(self.fd, self.start + offset)

    def write(self, key: str, t: torch.Tensor) -> None:
        view = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        pos = self.start + self.at[key]
        while len(view):
            done = os.pwrite(self.fd, view, pos)
            view, pos = view[done:], pos + done

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- page cache and timing -----------------------------------------------------------------------

def weight_files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in sorted(p.glob("*.safetensors"))]


def resident(files: list[Path]) -> float | None:
    """GB of ``files`` in the page cache (``fincore``, from util-linux), or None without it."""
    if not shutil.which("fincore"):
        return None
    proc = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
                          capture_output=True, text=True)
    return sum(int(x) for x in proc.stdout.split()) / 1e9 if proc.returncode == 0 else None


@dataclass
class Timing:
    wall: float
    user: float
    sys: float
    rss_gb: float
    load: tuple[float, float]
    extra: dict = field(default_factory=dict)
    resident: float | None = None  # GB of the inputs in the page cache when it started

    def cell(self) -> str:
        return f"{self.wall:.1f} s ({self.user:.1f} user, {self.sys:.1f} sys); {self.rss_gb:.2f} GB"

    def detail(self) -> str:
        return self.cell() + "; " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in self.extra.items())


# A small process between this one and the command: a child forked from a large process (this one
# holds torch and transformers) reports that process's resident memory as its own peak (the kernel
# keeps the larger of the two at exec), so the command is started by this launcher and measured there.
LAUNCHER = """
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[3:], stdout=subprocess.DEVNULL if sys.argv[2] == "null" else None)
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss_kb": ru.ru_maxrss,
               "minflt": ru.ru_minflt, "majflt": ru.ru_majflt, "inblock": ru.ru_inblock,
               "code": os.waitstatus_to_exitcode(status)}, f)
"""


def timed(cmd: list[str], log: Path, env: dict | None = None, discard: bool = False) -> Timing:
    """Run ``cmd`` (stdout and stderr to ``log``, or stdout to /dev/null if ``discard``); its wall, user and system time and peak resident
    memory from ``os.wait4`` in a small launcher process."""
    load0 = os.getloadavg()[0]
    usage = log.with_suffix(".json")
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(usage), "null" if discard else "log", *cmd],
                       stdout=fh,
                       stderr=subprocess.STDOUT, cwd=ROOT, env=env, check=True)
    r = json.loads(usage.read_text())
    if r["code"] != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        fail(f"{' '.join(cmd[:6])} ... failed (exit {r['code']}); see {log}:\n" + "\n".join(tail))
    return Timing(r["wall"], r["user"], r["sys"], r["maxrss_kb"] * 1024 / 1e9, (load0, os.getloadavg()[0]),
                  {"minor faults": r["minflt"], "major faults": r["majflt"], "GB from disk": r["inblock"] * 512 / 1e9})


# -- the commands ----------------------------------------------------------------------------------

def ours_command(method: str, paths: list[Path], out: Path, device: str, n: int, recipe: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ame.merge", f"out={out}"]
    if method == "ties":  # the very recipe mergekit runs
        return cmd + [f"recipe={recipe}"]
    cmd.append(f"aggregator={'ties' if method == 'ties_global' else method}")
    if method in TASK_VECTORS:
        cmd += [f"experts.init={paths[0]}", f"experts.paths=[{','.join(map(str, paths[1:]))}]"]
        if method == "task_arithmetic":
            cmd.append(f"aggregator.scaling={1 / (n - 1)!r}")
        if method == "ties_global":
            cmd.append("aggregator.density=0.2")
    else:
        cmd.append(f"experts.paths=[{','.join(map(str, paths))}]")
        if method.startswith("ame_"):
            cmd.append(f"aggregator.device={device}")
    return cmd


def peer_recipe(method: str, paths: list[Path], n: int) -> str:
    """mergekit's YAML recipe for ``method`` (one of its names) on ``paths``."""
    if method == "linear":
        models = "".join(f"  - model: {p}\n    parameters:\n      weight: 1.0\n" for p in paths)
        return f"merge_method: linear\nmodels:\n{models}parameters:\n  normalize: true\n"
    if method == "task_arithmetic":
        weight = f"weight: {1 / (n - 1)!r}"
        params = "  normalize: false\n"
    else:  # ties
        weight = "density: 0.2\n      weight: 1.0"
        params = "  normalize: true\n"
    models = "".join(f"  - model: {p}\n    parameters:\n      {weight}\n" for p in paths[1:])
    return f"merge_method: {method}\nbase_model: {paths[0]}\nmodels:\n{models}parameters:\n{params}"


def peer_command(peer_python: str, recipe: Path, out: Path, device: str) -> list[str]:
    return [peer_python, "-m", "mergekit.scripts.run_yaml", str(recipe), str(out), "--lazy-unpickle",
            "--out-shard-size", "1B", "--no-copy-tokenizer", "--quiet", *(["--cuda"] if device == "cuda" else [])]


def peer_version(peer_python: str) -> str | None:
    try:
        proc = subprocess.run([peer_python, "-c", "import importlib.metadata as m, mergekit; print(m.version('mergekit'))"],
                              capture_output=True, text=True, timeout=300)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


# -- the soup check -------------------------------------------------------------------------------------

def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns (int16) as integers that order like the values (adjacent floats differ by 1)."""
    b = bits.to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart ``a`` and ``b`` (bf16 tensors) are, entry by entry."""
    return (_ordered(a.reshape(-1).view(torch.int16)) - _ordered(b.reshape(-1).view(torch.int16))).abs()


def _tensors(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out |= {k: f for k in h.keys()}
    return out


def compare(ours: Path, theirs: Path, experts: list[Path], block: int = 1 << 22) -> dict:
    """Two bf16 soups of ``experts`` compared tensor by tensor, and each against the correctly
    rounded float64 mean of the experts: ulp distances, entries more than 1 ulp apart (and how
    many of those have a mean of exactly 0), the largest absolute difference, problems."""
    from safetensors import safe_open

    a, b = _tensors(ours), _tensors(theirs)
    e = [_tensors(p) for p in experts]
    r = {"tensors": len(a.keys() & b.keys()), "ulp": 0, "beyond": 0, "beyond_at_zero": 0, "gap": 0.0,
         "ours_vs_mean": 0, "theirs_vs_mean": 0,
         "problems": [f"keys only in {ours.name}: {sorted(a.keys() - b.keys())[:3]}"] if a.keys() - b.keys() else []}
    r["problems"] += [f"keys only in {theirs.name}: {sorted(b.keys() - a.keys())[:3]}"] if b.keys() - a.keys() else []
    for k in sorted(a.keys() & b.keys()):
        with safe_open(str(a[k]), "pt") as fa, safe_open(str(b[k]), "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.shape != y.shape or x.dtype != torch.bfloat16 or y.dtype != torch.bfloat16:
            r["problems"].append(f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
            continue
        x, y = x.reshape(x.shape[0] if x.dim() else 1, -1), y.reshape(x.shape[0] if x.dim() else 1, -1)
        rows = max(1, block // x.shape[1])
        for start in range(0, x.shape[0], rows):
            xs, ys = x[start:start + rows], y[start:start + rows]
            mean = torch.zeros(xs.shape, dtype=torch.float64)
            for m in e:
                with safe_open(str(m[k]), "pt") as fm:
                    part = fm.get_slice(k)
                    mean += (part[start:start + rows] if x.shape[0] > 1 and part.get_shape() else
                             fm.get_tensor(k)).reshape(xs.shape).double()
            mean = (mean / len(e)).to(torch.bfloat16)
            d = ulp_distance(xs, ys)
            r["ulp"] = max(r["ulp"], int(d.max()))
            r["beyond"] += int((d > 1).sum())
            r["beyond_at_zero"] += int(((d > 1) & (mean.reshape(-1) == 0)).sum())
            r["gap"] = max(r["gap"], float((xs.float() - ys.float()).abs().max()))
            r["ours_vs_mean"] = max(r["ours_vs_mean"], int(ulp_distance(xs, mean).max()))
            r["theirs_vs_mean"] = max(r["theirs_vs_mean"], int(ulp_distance(ys, mean).max()))
    return r


# -- the run -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, help="parameters per expert: sets the number of layers (default: "
                    "1.1e9 for tinyllama, 2 layers for 7b and tiny)")
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tinyllama")
    ap.add_argument("--layers", type=int, help="number of layers (default: from --params, see there)")
    ap.add_argument("--experts", type=int, default=4, help="N: expert 0 is the base of the task-vector methods")
    ap.add_argument("--methods", nargs="+", choices=OURS, default=list(OURS))
    ap.add_argument("--peer", choices=["none", "mergekit"], default="none")
    ap.add_argument("--peer-python", default="/work/venvs/mergekit/bin/python",
                    help="the python of the venv where mergekit is installed")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold",
                    help="cold: drop the experts from the page cache before every command; warm: read them first")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("AME_BENCH_DIR", "/work/bench")),
                    help="where the experts are made (and reused) and outputs written")
    ap.add_argument("--delta", type=float, default=0.002, help="std of each expert's difference from the base")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="the experts' shard size (GB)")
    ap.add_argument("--make-only", action="store_true", help="make the experts and stop")
    args = ap.parse_args(argv)

    n = args.experts
    if n < 2:
        fail(f"--experts {n}: need at least 2 (expert 0 is the base of the task-vector methods)")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device here; use --device cpu")
    version = None
    if args.peer == "mergekit":
        version = peer_version(args.peer_python)
        if version is None:
            fail(f"--peer mergekit: no mergekit importable by {args.peer_python}; install it in a venv of its own: "
                 "python3 -m venv /work/venvs/mergekit && /work/venvs/mergekit/bin/pip install mergekit "
                 "(or give --peer-python)")
    commit, dirty, _ = git_state()  # the code timed: taken now, not when the table prints (a commit may land meanwhile)
    code = "unknown" if commit is None else commit[:7] + (" + uncommitted changes" if dirty else "")
    config = llama_config(args.geometry, args.params, args.layers)
    shapes = llama_shapes(config)
    params = sum(_numel(s) for s in shapes.values())
    folder = args.work / (f"llama-h{config.hidden_size}-i{config.intermediate_size}-l{config.num_hidden_layers}-"
                          f"v{config.vocab_size}-kv{config.num_key_value_heads}-d{args.delta:g}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot write {folder} ({e.strerror}); choose another --work")
    paths = make_experts(folder, config, n, args.delta, int(args.shard_gb * 1e9))
    if args.make_only:
        print(folder)
        return 0
    files = weight_files(paths)
    size = sum(f.stat().st_size for f in files)
    runs = folder / "runs"
    runs.mkdir(exist_ok=True)
    for old in runs.iterdir():
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()

    def measure(name: str, cmd: list[str], warm: bool, discard: bool = False) -> Timing:
        """Drop the experts from the page cache (and read them once first if ``warm``), then time ``cmd``."""
        drop_from_page_cache(files)
        if warm:
            subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        before = resident(files)
        t = timed(cmd, runs / f"{name}.log", discard=discard)
        t.resident = before
        print(f"# {name}: {t.detail()}" + (f"; inputs resident before: {before:.2f} GB" if before is not None else ""),
              file=sys.stderr, flush=True)
        return t

    def finish(out: Path, keep: bool = False) -> None:
        if out.is_dir():
            drop_from_page_cache(sorted(out.glob("*.safetensors")))
            if not keep:
                shutil.rmtree(out)

    print(f"# {n} experts × {params / 1e9:.3f}B parameters ({config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}), bf16, {size / 1e9:.1f} GB in {len(files)} files, under {folder}", file=sys.stderr,
          flush=True)
    cat = ["cat", *map(str, files)]
    cold = measure("read_cold", cat, warm=False, discard=True)
    cached = measure("read_cached", cat, warm=True, discard=True)

    results: dict[str, dict[str, Timing]] = {}
    kept: dict[str, Path] = {}
    for method in args.methods:
        results[method] = {}
        peer = PEER.get(method) if args.peer == "mergekit" else None
        recipe = runs / "ties.yaml"
        if method == "ties":
            recipe.write_text(peer_recipe("ties", paths, n))
        if peer:
            recipe = runs / f"{peer}.yaml"
            recipe.write_text(peer_recipe(peer, paths, n))
            out = runs / f"mergekit_{peer}"
            results[method]["peer"] = measure(f"mergekit_{peer}", peer_command(args.peer_python, recipe, out, args.device),
                                              warm=args.cache == "warm")
            finish(out, keep=method == "soup")
            if method == "soup":
                kept["peer_soup"] = out
        out = runs / f"ame_{method}"
        results[method]["ours"] = measure(f"ame_{method}", ours_command(method, paths, out, args.device, n, recipe),
                                          warm=args.cache == "warm")
        finish(out, keep=method == "soup" and peer is not None)
        if method == "soup":
            kept["ours_soup"] = out

    check = None
    if "peer_soup" in kept and "ours_soup" in kept:
        check = compare(kept["ours_soup"], kept["peer_soup"], paths)
        shutil.rmtree(kept["ours_soup"]), shutil.rmtree(kept["peer_soup"])

    # -- the table ------------------------------------------------------------------------------------
    peer_name = f"mergekit {version}" if version else "mergekit (not run)"
    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, torch {torch.__version__}, "
          f"ame {code}, device {args.device}, inputs {args.cache} before each command; {n} experts × "
          f"{params / 1e9:.3f}B parameters (hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
          f"{config.num_hidden_layers} layers, vocabulary {config.vocab_size}), bf16, {size / 1e9:.1f} GB in "
          f"{len(files)} files; base expert 0 for the task-vector methods\n")
    print(f"| work | {peer_name} | `python -m ame.merge` | ours / mergekit | ours / cold read | load avg before → after |")
    print("|---|---|---|---|---|---|")
    held = f" ({cached.resident:.1f} GB of it cached at the start)" if cached.resident is not None else ""
    print(f"| reading the {size / 1e9:.1f} GB once, `cat`, page-cached{held} | | {cached.cell()} | | "
          f"{cached.wall / cold.wall:.2f} | {cached.load[0]:.1f} → {cached.load[1]:.1f} |")
    print(f"| reading the {size / 1e9:.1f} GB once, `cat`, cold | | {cold.cell()} | | 1.00 | "
          f"{cold.load[0]:.1f} → {cold.load[1]:.1f} |")
    for method, r in results.items():
        ours, peer = r["ours"], r.get("peer")
        ratio = f"{ours.wall / peer.wall:.2f}" if peer else ""
        load = (f"{peer.load[0]:.1f} → {peer.load[1]:.1f}; " if peer else "") + f"{ours.load[0]:.1f} → {ours.load[1]:.1f}"
        print(f"| {WORK[method]} | {peer.cell() if peer else '—'} | {ours.cell()} | {ratio} | "
              f"{ours.wall / cold.wall:.2f} | {load} |")
    print("\nCells: wall time (user, system CPU time); peak resident memory. Load: mergekit's command; ours.")
    status = 0
    if check is not None:
        r = check
        ok = not r["problems"] and r["ulp"] <= 1
        status = 0 if ok else 1
        problems = "; " + "; ".join(r["problems"]) if r["problems"] else ""
        print(f"Soup vs mergekit `linear`: {r['tensors']} tensors compared, largest difference {r['ulp']} bf16 ulp, "
              f"{r['beyond']} entries more than 1 ulp apart ({r['beyond_at_zero']} of them where the experts' mean is "
              f"exactly 0; largest absolute difference {r['gap']:.2g}){problems}: "
              f"{'equal within 1 ulp' if ok else 'NOT equal within 1 ulp'}. Against the correctly rounded float64 "
              f"mean: ours within {r['ours_vs_mean']} ulp, mergekit's within {r['theirs_vs_mean']} ulp.")
    return status


if __name__ == "__main__":
    sys.exit(main())
