"""mergekit recipes: ``python -m ame.merge recipe=recipe.yml out=merged`` runs a mergekit YAML.

A recipe (mergekit 0.1.5's format) names ``models`` (each a local checkpoint path with optional
``parameters``), ``base_model``, ``merge_method``, shared ``parameters``, ``dtype``/``out_dtype`` and
``tokenizer_source``. It becomes one of this project's aggregators with mergekit's semantics:

    linear            Σ w_i x_i / Σ w_i (normalize, default true; else Σ w_i x_i)
    task_arithmetic   base + λ Σ w_i τ_i            (normalize: / Σ w_i; default false)
    ties              per-tensor top-k (density), sign of Σ w_i τ_i (0 → +), Σ over agreeing / Σ w_i
                      (normalize, default true); trim: global gives the published global budget
    dare_ties         random keep (density), L1-norm rescale (rescale, default true), sign consensus
    dare_linear       random keep, L1-norm rescale, no sign consensus
    ame               AME (this project): parameters optimizer (adam, adagrad, sgd, ... or a torch.optim
                      class path), lr, epochs, pivot, pseudogradient, amplification, order, lr_schedule

``weight`` and ``density`` may be per model, shared, or per tensor with mergekit's rules
(``[{filter: self_attn, value: 0.5}, {value: 0.3}]``). Anything else mergekit offers (slerp,
breadcrumbs, della, model_stock, ``slices``, ``modules``, gradients over layers, ``tokenizer``, ...)
is refused in one line naming it: never silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ame.errors import AMEError, require

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "ame")
TOP = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}
UNSUPPORTED_TOP = {"slices": "slices (layer ranges)", "modules": "modules", "tokenizer": "tokenizer (vocabulary merging)",
                   "chat_template": "chat_template"}
SHARED = {"normalize", "lambda", "rescale", "int8_mask", "trim", "weight", "density"}
PER_MODEL = {"weight", "density"}
AME_KEYS = {"optimizer", "lr", "epochs", "pivot", "pseudogradient", "amplification", "order", "lr_schedule", "seed"}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _first(items):
    """The first of ``items`` in sorted order, for a message (None when empty)."""
    return sorted(items)[0] if items else None


@dataclass
class Plan:
    """What a recipe asks for, in this project's terms."""
    aggregator: str  # a conf/aggregator option
    settings: dict[str, Any]  # its overrides
    experts: list[str]
    init: str | None
    dtype: str | None
    tokenizer: Path | None  # folder to copy the tokenizer files from
    text: str  # the recipe as given, for the model card
    path: Path
    notes: list[str] = field(default_factory=list)
    sizes: list[float] | None = None  # merge_method ame: the models' weights as shard sizes


def _value(v, where: str):
    """A parameter value: a number or bool, or mergekit rules; gradients are refused."""
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list):
        if all(isinstance(r, dict) for r in v):
            for r in v:
                require(set(r) <= {"filter", "value"} and "value" in r,
                        f"{where}: a rule has the keys filter and value, got {sorted(r)}")
                _value(r["value"], where)
            return [{"filter": r.get("filter"), "value": r["value"]} for r in v]
        raise AMEError(f"{where}: {v!r} is a gradient over layers, which ame.merge does not support; give one "
                       "value, or rules with filter")
    require(isinstance(v, (int, float, bool)), f"{where}: expected a number, got {v!r}")
    return v


def _model(entry, i: int, file: Path) -> tuple[str, dict]:
    where = f"{file}: models[{i}]"
    if isinstance(entry, str):
        return entry, {}
    require(isinstance(entry, dict) and "model" in entry, f"{where} must be a mapping with a 'model' path")
    unknown = set(entry) - {"model", "parameters"}
    require(not unknown, f"{where}: {_first(unknown)!r} is not supported by ame.merge (model and parameters are)")
    model = entry["model"]
    require(isinstance(model, str) and model.strip(), f"{where}.model must be a path, got {model!r}")
    params = entry.get("parameters") or {}
    require(isinstance(params, dict), f"{where}.parameters must be a mapping")
    bad = set(params) - PER_MODEL
    require(not bad, f"{where}.parameters: {_first(bad)!r} is not supported by ame.merge (weight and density are)")
    return model, {k: _value(v, f"{where}.parameters.{k}") for k, v in params.items()}


def load(path: str | Path) -> Plan:
    """Read and check a mergekit recipe; every problem one line naming the field."""
    file = Path(str(path)).expanduser()
    require(file.is_file(), f"recipe={path}: no such file; give a mergekit YAML recipe")
    text = file.read_text()
    try:
        r = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AMEError(f"recipe={path} is not valid YAML ({str(e).splitlines()[0]})") from None
    require(isinstance(r, dict), f"recipe={path} must be a YAML mapping with models and merge_method")
    for key, what in UNSUPPORTED_TOP.items():
        require(key not in r, f"{file}: {what} is not supported by ame.merge; merge whole models with 'models:'")
    unknown = set(r) - TOP
    require(not unknown, f"{file}: {_first(unknown)!r} is not a recipe field ame.merge supports "
            f"({', '.join(sorted(TOP))})")
    method = r.get("merge_method")
    require(method in METHODS, f"{file}: merge_method: {method!r} is not supported by ame.merge; use one of "
            f"{', '.join(METHODS)}")
    models = r.get("models")
    require(isinstance(models, list) and models, f"{file}: models must be a non-empty list")
    base = r.get("base_model")
    require(base is None or (isinstance(base, str) and base.strip()), f"{file}: base_model must be a path")
    shared = r.get("parameters") or {}
    require(isinstance(shared, dict), f"{file}: parameters must be a mapping")
    allowed = AME_KEYS if method == "ame" else SHARED
    bad = set(shared) - allowed
    require(not bad, f"{file}: parameters.{_first(bad)} is not supported for merge_method {method} "
            f"({', '.join(sorted(allowed))})")
    entries = [_model(m, i, file) for i, m in enumerate(models)]
    experts = [(m, p) for m, p in entries if m != base]  # the base is never a task vector (as mergekit)
    require(experts, f"{file}: models must name at least one model besides base_model")
    dtype = r.get("out_dtype") or r.get("dtype")
    require(dtype is None or dtype in DTYPES, f"{file}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    tok = r.get("tokenizer_source")
    tokenizer = None
    if tok is not None:
        require(tok != "union", f"{file}: tokenizer_source: union (a merged vocabulary) is not supported by "
                "ame.merge; use base or a model path")
        require(isinstance(tok, str), f"{file}: tokenizer_source must be base or a path")
        tokenizer = Path(base if tok == "base" else tok).expanduser()
        require(tok != "base" or base is not None, f"{file}: tokenizer_source: base, but there is no base_model")
        require(tokenizer.is_dir(), f"{file}: tokenizer_source {tokenizer} is not a folder")
    plan = Plan("", {}, [m for m, _ in experts], base, DTYPES.get(dtype) if dtype else None, tokenizer, text, file)
    if method == "ame":
        _ame(plan, shared, experts, file)
    else:
        _task_vectors(plan, method, shared, experts, file)
    return plan


def _per_model(key: str, experts: list, shared: dict, default):
    """One value per expert (its own, else the shared one, else ``default``); a single value when all agree."""
    values = [p.get(key, shared.get(key, default)) for _, p in experts]
    return values[0] if all(v == values[0] for v in values) else values


def _task_vectors(plan: Plan, method: str, shared: dict, experts: list, file: Path) -> None:
    shared = {k: _value(v, f"{file}: parameters.{k}") if k in PER_MODEL else v for k, v in shared.items()}
    for k in ("normalize", "rescale", "int8_mask"):
        require(not isinstance(shared.get(k), list), f"{file}: parameters.{k} must be true or false")
    lam = shared.get("lambda", 1.0)
    require(isinstance(lam, (int, float)) and not isinstance(lam, bool), f"{file}: parameters.lambda must be a number")
    missing = [m for m, p in experts if "weight" not in p and "weight" not in shared]
    require(not missing, f"{file}: model {_first(missing)} has no weight (parameters.weight), which {method} needs")
    weights = _per_model("weight", experts, shared, None)
    density = _per_model("density", experts, shared, 1.0)
    trim = shared.get("trim", "tensor")
    require(trim in ("tensor", "global"), f"{file}: parameters.trim must be tensor (mergekit) or global (published)")
    s: dict[str, Any] = {"weights": weights, "scaling": float(lam)}
    if method == "linear":
        require(plan.experts and "density" not in shared and all("density" not in p for _, p in experts),
                f"{file}: linear takes no density")
        plan.aggregator = "task_arithmetic"
        plan.init = plan.experts[0]  # linear uses no base: x_1 + Σ w_i (x_i − x_1) / Σ w_i = Σ w_i x_i / Σ w_i
        s.update(normalize=bool(shared.get("normalize", True)), scaling=1.0)
        if not s["normalize"]:
            raise AMEError(f"{file}: linear with normalize: false (Σ w_i x_i) is not supported by ame.merge; give "
                           "weights that sum to 1 instead")
        plan.notes.append("linear: the weighted average, computed as x_1 + Σ w_i (x_i − x_1) / Σ w_i")
        plan.settings = s
        return
    require(plan.init is not None, f"{file}: merge_method {method} needs base_model")
    if method == "task_arithmetic":
        plan.aggregator = "task_arithmetic"
        s.update(normalize=bool(shared.get("normalize", False)))
    elif method == "ties":
        plan.aggregator = "ties"
        s.update(density=density, trim=trim, zero_sign="positive",
                 combine="mean" if shared.get("normalize", True) else "sum")
    else:  # dare_ties, dare_linear
        plan.aggregator = "dare"
        consensus = method == "dare_ties"
        s.update(density=density, trim="tensor", rescale="l1" if shared.get("rescale", True) else "none",
                 sign_election=consensus, zero_sign="positive",
                 combine="mean" if consensus and shared.get("normalize", False) else "sum",
                 normalize=bool(shared.get("normalize", False)) and not consensus)
    plan.settings = s


def _ame(plan: Plan, shared: dict, experts: list, file: Path) -> None:
    opt = shared.get("optimizer", "adam")
    require(isinstance(opt, str), f"{file}: parameters.optimizer must be a name (adam, adagrad, ...) or a class path")
    conf = Path(__file__).resolve().parents[2] / "conf" / "aggregator"
    option = f"ame_{opt.lower()}"
    s: dict[str, Any] = {}
    if (conf / f"{option}.yaml").is_file():
        plan.aggregator = option
    else:
        require("." in opt, f"{file}: parameters.optimizer: {opt!r} is not one of "
                f"{', '.join(p.stem[4:] for p in sorted(conf.glob('ame_*.yaml')))} nor a torch.optim class path")
        plan.aggregator = "ame_adam"
        s["optimizer"] = {"_target_": opt}
    if "lr" in shared:
        s.setdefault("optimizer", {})["lr"] = shared["lr"]
    for k in AME_KEYS - {"optimizer", "lr"}:
        if k in shared:
            s[k] = shared[k]
    if "pivot" not in s and plan.init is None:
        s["pivot"] = "soup"
    weights = [p.get("weight") for _, p in experts]
    if any(w is not None for w in weights):
        require(all(isinstance(w, (int, float)) and w > 0 for w in weights),
                f"{file}: with merge_method ame, weight is each model's shard size (a positive number for every "
                "model), used with amplification: shard_size")
        plan.notes.append("ame: model weights are the shard sizes")
        s.setdefault("amplification", "shard_size")
    plan.settings = s
    plan.sizes = [float(w) for w in weights] if all(w is not None for w in weights) else None
