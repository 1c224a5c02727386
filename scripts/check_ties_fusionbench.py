"""TIES against FusionBench's own ``ties_merging`` on the same tensors: a BatchNorm network, the
parameters only (published TIES trims parameters; this project gives the BatchNorm statistics a
budget of their own). Prints the largest difference per density.

FusionBench's TIES module needs only torch, so its wheel is enough (no install, no dependencies):

    pip download fusion-bench==0.2.33 --no-deps -d /tmp/fb && (cd /tmp/fb && unzip -q -o fusion_bench-*.whl)
    python scripts/check_ties_fusionbench.py /tmp/fb
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import types
from pathlib import Path

import torch

from ame.aggregators import TaskVectors


def _load(root: Path):
    for name in ("fusion_bench", "fusion_bench.utils"):  # stand-ins: skip the package's heavy __init__
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = []
    for name, rel in (("fusion_bench.utils.type", "utils/type.py"),
                      ("fbu", "method/ties_merging/ties_merging_utils.py")):
        spec = importlib.util.spec_from_file_location(name, root / "fusion_bench" / rel)
        mod = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["fbu"]


def bn_net(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 5))
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["1.running_mean"], sd["1.running_var"] = torch.randn(8) * 5, torch.rand(8) * 20 + 1
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fusion_bench_root", type=Path, help="folder holding the unpacked fusion_bench package")
    fbu = _load(ap.parse_args().fusion_bench_root)
    base, experts = bn_net(0), [bn_net(s) for s in (1, 2, 3)]
    buffers = [k for k in base if "running" in k or "num_batches" in k]
    params = [k for k in base if k not in buffers]
    only = lambda sd: {k: sd[k] for k in params}  # noqa: E731
    for density in (0.05, 0.1, 0.2, 0.5, 0.9):
        ours = TaskVectors(scaling=1.0, density=density, sparsify="magnitude", sign_election=True,
                           combine="mean")(experts, None, base, buffers)
        flat_ptm = fbu.state_dict_to_vector(only(base))
        taus = torch.vstack([fbu.state_dict_to_vector(only(e)) for e in experts]) - flat_ptm
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            merged = fbu.ties_merging(taus, reset_thresh=density, merge_func="mean")
        ref = fbu.vector_to_state_dict(flat_ptm + merged, only(base))
        print(f"density {density}: max |ours − FusionBench| over the parameters = "
              f"{max(float((ours[k] - ref[k]).abs().max()) for k in params):.3g}")


if __name__ == "__main__":
    main()
