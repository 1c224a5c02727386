"""Stage 3½ (optional): permutation alignment of experts that do not share an initialisation.

Hidden units can be reordered without changing what a network computes. Experts trained from
independent initialisations (``train.init=independent``) learn similar units in different orders,
so their plain average mixes unrelated units. Weight matching (Ainsworth et al., "Git Re-Basin",
2023) permutes each expert's units to best match a reference expert's weights, then any
aggregator runs on the aligned experts. Like the aggregators, it sees weights only.

Which axes share a permutation is derived from the model itself (:func:`permutation_spec`): the
model is traced with ``torch.fx``; every Conv/Linear output opens a channel space, elementwise
modules (norms, activations, pooling) pass it on, a residual addition ties its inputs' spaces,
and the input and the logits stay fixed.
"""
from __future__ import annotations

import copy
import logging
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from ame.errors import AMEError, positive_int, require
from ame.cache import Entry, sha256_file
from ame.io import StateDict
from ame.progress import progress

log = logging.getLogger(__name__)

_PASS_THROUGH = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity, nn.Dropout,
                 nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = (torch.relu, nn.functional.relu, nn.functional.gelu)
_FIXED = "<fixed>"  # the input and output axes: never permuted


@dataclass
class PermutationSpec:
    """``axes[p]``: the (state-dict key, axis) pairs that permutation ``p`` reorders together;
    ``sizes[p]``: its number of units."""

    axes: dict[str, list[tuple[str, int]]]
    sizes: dict[str, int]

    def apply(self, perms: dict[str, torch.Tensor], sd: StateDict) -> StateDict:
        """``sd`` with unit ``i`` of every space ``p`` taken from unit ``perms[p][i]``."""
        out = dict(sd)
        for p, axes in self.axes.items():
            for key, axis in axes:
                out[key] = out[key].index_select(axis, perms[p])
        return out


def permutation_spec(model: nn.Module, input_shape: Sequence[int]) -> PermutationSpec:
    """Derive which state-dict axes are permuted together by tracing ``model`` (``torch.fx``) on an
    input of ``input_shape`` (C, H, W). One clear error for a layer it cannot reason about."""
    model = copy.deepcopy(model).eval()  # tracing runs it once: leave the caller's BatchNorm statistics alone
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 — fx raises many kinds; all mean the same thing here
        raise AMEError(f"align: cannot trace {type(model).__name__} with torch.fx ({e}); use align=none") from None
    try:
        ShapeProp(gm).propagate(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001
        raise AMEError(f"align: cannot run {type(model).__name__} on a {tuple(input_shape)} input ({e}); "
                       "use align=none") from None
    modules = dict(gm.named_modules())
    parent: dict[str, str] = {_FIXED: _FIXED}

    def find(s: str) -> str:
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    def union(a: str, b: str) -> str:
        ra, rb = find(a), find(b)
        if ra != rb:
            keep, drop = (ra, rb) if rb != _FIXED else (rb, ra)  # the fixed space absorbs
            parent[drop] = keep
            return keep
        return ra

    space: dict[fx.Node, str] = {}
    members: dict[str, list[tuple[str, int]]] = defaultdict(list)
    sizes: dict[str, int] = {}
    for node in gm.graph.nodes:
        src = space.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "placeholder":
            space[node] = _FIXED
        elif node.op == "output":
            require(src is not None, "align: the model's output is not a single tensor; use align=none")
            union(src, _FIXED)  # the logits keep their order
        elif node.op == "call_module":
            m, name = modules[node.target], node.target
            require(name not in parent, f"align: {name} is called twice (shared weights); use align=none")
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                require(not isinstance(m, nn.Conv2d) or m.groups == 1,
                        f"align: {name} is a grouped convolution, which weight matching does not handle; use align=none")
                require(not isinstance(m, nn.Linear) or len(node.args[0].meta["tensor_meta"].shape) == 2,
                        f"align: {name} is a Linear layer on a non-flat input; use align=none")
                members[src].append((f"{name}.weight", 1))
                parent[name], sizes[name] = name, m.weight.shape[0]
                members[name] += [(f"{name}.weight", 0)] + ([(f"{name}.bias", 0)] if m.bias is not None else [])
                space[node] = name
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
                if isinstance(m, nn.GroupNorm) and m.num_groups not in (1, m.num_channels):
                    raise AMEError(f"align: {name} is a GroupNorm with {m.num_groups} groups of several channels; a "
                                   "permutation across groups changes the function; use model.norm=batch or none, or "
                                   "align=none")
                keys = ["weight", "bias"] + (["running_mean", "running_var"] if isinstance(m, nn.modules.batchnorm._BatchNorm)
                                             and m.track_running_stats else [])
                members[src] += [(f"{name}.{k}", 0) for k in keys if getattr(m, k, None) is not None]
                space[node] = src
            elif isinstance(m, _PASS_THROUGH):
                space[node] = src
            elif isinstance(m, nn.Flatten):
                shape = node.args[0].meta["tensor_meta"].shape
                require(find(src) == _FIXED or int(np.prod(shape[2:])) == 1,
                        f"align: {name} flattens {tuple(shape[1:])} feature maps; weight matching handles a flatten "
                        "after global pooling only; use align=none")
                space[node] = src
            else:
                raise AMEError(f"align: cannot derive permutations through {name} ({type(m).__name__}); "
                               "use align=none")
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            a, b = (space.get(x) if isinstance(x, fx.Node) else None for x in node.args[:2])
            require(a is not None and b is not None, f"align: cannot derive permutations through {node.name} "
                    "(an addition with a constant); use align=none")
            space[node] = union(a, b)  # a residual connection: both sides share one permutation
        elif node.op == "call_function" and node.target in _PASS_FUNCTIONS:
            space[node] = src
        else:
            raise AMEError(f"align: cannot derive permutations through {node.op} {node.target}; use align=none")
    axes: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for s, pairs in members.items():
        root = find(s)
        if root != _FIXED:
            axes[root] += pairs
    require(len(axes) > 0, f"align: {type(model).__name__} has no hidden units to permute; use align=none")
    return PermutationSpec(dict(axes), {p: sizes[p] for p in axes})


def weight_matching(spec: PermutationSpec, ref: StateDict, sd: StateDict, max_iter: int = 100,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Permutations of ``sd``'s units that maximise Σ ⟨ref, permuted sd⟩ over all permuted weights:
    coordinate ascent over the permutations, each step an exact linear assignment
    (``scipy.optimize.linear_sum_assignment``), until no permutation improves."""
    perms = {p: torch.arange(n) for p, n in spec.sizes.items()}
    rng = np.random.default_rng(seed)
    names = list(spec.axes)
    where: dict[str, list[tuple[str, int]]] = {}  # key -> the (permutation, axis) pairs acting on it
    for q, pairs in spec.axes.items():
        for key, axis in pairs:
            where.setdefault(key, []).append((q, axis))
    fixed = {p: [ref[key].double().movedim(axis, 0).reshape(spec.sizes[p], -1) for key, axis in spec.axes[p]]
             for p in names}  # the reference's side of every cost matrix: the same on every pass

    def others(key: str, p: str) -> torch.Tensor:
        """``sd[key]`` with every permutation but ``p`` applied."""
        t = sd[key]
        for q, axis in where[key]:
            if q != p:
                t = t.index_select(axis, perms[q])
        return t

    for _ in range(max_iter):
        improved = False
        for p in rng.permutation(names):
            n = spec.sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for a, (key, axis) in zip(fixed[p], spec.axes[p]):
                cost += a @ others(key, p).double().movedim(axis, 0).reshape(n, -1).T
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.from_numpy(cols)
            rows = torch.arange(n)
            if float(cost[rows, new].sum()) > float(cost[rows, perms[p]].sum()) + 1e-9 * float(cost.abs().sum()):
                perms[p], improved = new, True
        if not improved:
            break
    return perms


def _cosine(a: StateDict, b: StateDict, keys: Sequence[str]) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in keys)
    na = sum(float(a[k].double().pow(2).sum()) for k in keys) ** 0.5
    nb = sum(float(b[k].double().pow(2).sum()) for k in keys) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


class WeightMatching:
    """Align every expert to ``reference`` (an expert's index) by weight matching.

    Args:
        max_iter: passes of coordinate ascent over the permutations.
        reference: the expert the others are matched to (it is left as it is).
        seed: the order in which permutations are visited.
    """

    def __init__(self, max_iter: int = 100, reference: int = 0, seed: int = 0):
        positive_int(max_iter, "align.max_iter")
        require(isinstance(reference, int) and reference >= 0,
                f"align.reference must be an expert's index ≥ 0, got {reference!r}")
        self.max_iter, self.reference, self.seed = max_iter, reference, seed
        self.info: dict = {}

    def __call__(self, experts: Sequence[StateDict], spec: PermutationSpec):
        """Yield the aligned experts, in order (one is held at a time, besides the reference)."""
        require(self.reference < len(experts),
                f"align.reference={self.reference}, but there are only {len(experts)} experts")
        ref = experts[self.reference]
        keys = sorted({k for pairs in spec.axes.values() for k, _ in pairs})
        before, after = [], []
        for i in progress(range(len(experts)), "aligning experts"):
            sd = ref if i == self.reference else experts[i]
            aligned = sd if i == self.reference else spec.apply(
                weight_matching(spec, ref, sd, self.max_iter, self.seed), sd)
            before.append(_cosine(ref, sd, keys))
            after.append(_cosine(ref, aligned, keys))
            yield aligned
        self.info = {"method": "weight_matching", "reference": self.reference, "permutations": len(spec.axes),
                     "cosine_to_reference_before": before, "cosine_to_reference_after": after}


def align_experts(ex, aligner: WeightMatching, spec: PermutationSpec, cache_dir: Path, key: str):
    """Align ``ex`` (an :class:`ame.experts.ExpertSet`) and return the set of aligned experts, kept in
    the cache entry ``<cache_dir>/aligned/<key>`` (reused when complete and intact: the key hashes the
    exact expert files and the alignment settings; every copy is verified by its content hash)."""
    from ame.experts import Experts, config_hash  # experts.py does not import this module

    # the exact expert files (their hashes) and the settings: other experts never reuse these copies
    fingerprint = ex.fingerprint or config_hash({"files": [sha256_file(p) for p in ex.experts.paths]})
    entry = Entry(cache_dir, "aligned", config_hash({"experts": fingerprint, "align": key}),
                  {"experts": fingerprint, "align": key}, what="aligned experts")
    names = [f"expert_{i:03d}.safetensors" for i in range(len(ex.experts))]
    with entry.lock():  # parallel jobs align a set once
        info = entry.load_json("info.json")
        if info is not None and all(entry.verify(n) for n in names):
            aligner.info = info
        else:
            for sd, name in zip(aligner(ex.experts, spec), names):  # the aligner first: it records info when exhausted
                entry.put_tensors(name, sd, {"ame": "{}"})
            entry.put_json("info.json", aligner.info)
    return replace(ex, experts=Experts([entry.root / n for n in names]), root=entry.root,
                   fingerprint=f"{fingerprint}-{key}")
