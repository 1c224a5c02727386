"""mergekit recipes: each method against mergekit's own formulas (written out here, after mergekit
0.1.5's ``generalized_task_arithmetic``, ``sparsify`` and ``linear``), per-model and per-tensor
parameters, the model card, the tokenizer, and one line for what is not supported."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

import ame
from ame.io import Checkpoint
from ame.merge import MergeError

KEYS = ("layers.0.self_attn.w", "layers.0.mlp.w", "norm.b")


@pytest.fixture
def models(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.self_attn.w": torch.randn(6, 5, generator=g), "layers.0.mlp.w": torch.randn(40, 3, generator=g),
            "norm.b": torch.randn(4, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    experts = []
    for i in range(3):
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(sd, str(tmp_path / f"e{i}.safetensors"))
        experts.append(sd)
    return tmp_path, base, experts


def recipe(root, method, models, parameters=None, base=True, **extra):
    r = {"merge_method": method, "models": models, **extra}
    if base:
        r["base_model"] = str(root / "base.safetensors")
    if parameters:
        r["parameters"] = parameters
    (root / "r.yml").write_text(yaml.safe_dump(r))
    return root / "r.yml"


def entries(root, weights, density=None):
    return [{"model": str(root / f"e{i}.safetensors"),
             "parameters": {"weight": w, **({"density": density} if density is not None else {})}}
            for i, w in enumerate(weights)]


# mergekit's formulas, minimal
def magnitude(t, density):  # keep the top max(1, ⌊density·numel⌋) by |value|: exactly that many
    if density >= 1:
        return t
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel())  # mergekit's argsort leaves the order of ties open; we keep the first ones
    mask[torch.argsort(t.abs().reshape(-1), descending=True, stable=True)[:k]] = 1
    return t * mask.reshape(t.shape)


def generalized(base, experts, weights, density, consensus, normalize, lam, key):
    deltas = torch.stack([magnitude(e[key] - base[key], density(key)) for e in experts])
    w = torch.tensor(weights, dtype=deltas.dtype).view(-1, *[1] * base[key].dim())
    deltas = deltas * w
    if consensus:
        majority = (deltas.sum(0) >= 0).float() * 2 - 1
        mask = (deltas.sign() == majority).float()
        mixed, divisor = (deltas * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), w.sum(0).expand_as(deltas[0]).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return base[key] + lam * mixed


def close(out, ref, tol=1e-6):
    return max(float((out[k] - ref[k]).abs().max()) for k in ref) <= tol


def rules(attn, rest):
    return [{"filter": "self_attn", "value": attn}, {"value": rest}]


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_recipe_is_mergekits_ties_with_per_tensor_density_and_weights(models, normalize):
    root, base, experts = models
    weights = [0.5, 1.0, 0.7]
    r = recipe(root, "ties", entries(root, weights, rules(0.3, 0.6)), {"normalize": normalize, "lambda": 0.9})
    out = dict(ame.merge(recipe=r))
    dens = lambda k: 0.3 if "self_attn" in k else 0.6  # noqa: E731
    assert close(out, {k: generalized(base, experts, weights, dens, True, normalize, 0.9, k) for k in KEYS})


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_and_linear_recipes_are_mergekits(models, normalize):
    root, base, experts = models
    weights = [0.2, rules(1.5, 0.4), 0.3]  # a per-tensor weight for the second model
    w = lambda k: [0.2, 1.5 if "self_attn" in k else 0.4, 0.3]  # noqa: E731
    ta = dict(ame.merge(recipe=recipe(root, "task_arithmetic", entries(root, weights), {"normalize": normalize})))
    assert close(ta, {k: generalized(base, experts, w(k), lambda _: 1.0, False, normalize, 1.0, k) for k in KEYS})
    lin = dict(ame.merge(recipe=recipe(root, "linear", entries(root, weights), base=False)))
    assert close(lin, {k: sum(wi * e[k] for wi, e in zip(w(k), experts)) / sum(w(k)) for k in KEYS}, 1e-5)


def test_dare_recipes_keep_each_tensors_l1_norm_as_mergekit_rescales(models):
    root, base, experts = models
    out = dict(ame.merge(recipe=recipe(root, "dare_linear", entries(root, [1.0], 0.5)[:1])))
    for k in KEYS:
        tau, kept = experts[0][k] - base[k], out[k] - base[k]
        nz = kept.abs() > 1e-6
        assert 0 < int(nz.sum()) < tau.numel() or tau.numel() < 8
        assert torch.allclose(kept.abs().sum(), tau.abs().sum(), rtol=1e-4)  # the L1 norm kept
        scale = (kept[nz] / tau[nz])
        assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-4)  # one factor per tensor
    ties = dict(ame.merge(recipe=recipe(root, "dare_ties", entries(root, [1.0, 1.0, 1.0], 1.0))))
    assert close(ties, {k: generalized(base, experts, [1, 1, 1], lambda _: 1.0, True, False, 1.0, k) for k in KEYS})


def test_ame_recipe_runs_ame(models):
    root, base, experts = models
    r = recipe(root, "ame", [{"model": str(root / f"e{i}.safetensors")} for i in range(3)],
               {"optimizer": "sgd", "lr": 1.0, "lr_schedule": "harmonic", "pivot": "init"})
    out = dict(ame.merge(recipe=r))  # AME-GD with step 1/k: the soup
    assert close(out, {k: sum(e[k] for e in experts) / 3 for k in KEYS}, 1e-6)
    adam = dict(ame.merge(recipe=recipe(root, "ame", [str(root / f"e{i}.safetensors") for i in range(3)],
                                        {"optimizer": "adam", "lr": 1e-3, "epochs": 2})))
    assert all(torch.isfinite(adam[k]).all() for k in KEYS)


@pytest.mark.parametrize("change, message", [
    ({"merge_method": "slerp"}, "merge_method: 'slerp' is not supported"),
    ({"slices": [{"sources": []}]}, "slices (layer ranges) is not supported"),
    ({"tokenizer_source": "union"}, "tokenizer_source: union"),
    ({"models": [{"model": "e0.safetensors", "parameters": {"weight": [0.1, 0.9]}}]}, "gradient over layers"),
    ({"models": [{"model": "e0.safetensors", "parameters": {"epsilon": 0.1}}]}, "'epsilon' is not supported"),
    ({"parameters": {"gamma": 0.1}}, "parameters.gamma is not supported for merge_method ties"),
    ({"chat_template": "x"}, "chat_template is not supported"),
    ({"models": [{"model": "e0.safetensors"}]}, "has no weight"),
])
def test_what_ame_merge_does_not_support_is_one_line_naming_it(models, change, message):
    root = models[0]
    r = {"merge_method": "ties", "base_model": "base.safetensors",
         "models": [{"model": "e0.safetensors", "parameters": {"weight": 1.0, "density": 0.5}}], **change}
    (root / "r.yml").write_text(yaml.safe_dump(r))
    with pytest.raises(MergeError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        ame.merge(recipe=root / "r.yml", out=root / "out.safetensors")
    assert "\n" not in str(err.value) and not (root / "out.safetensors").exists()


# -- a real client: GPT-2 folders, the recipe and the Hydra overrides give the same model --------------
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2r")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    base.save_pretrained(root / "base", safe_serialization=True)
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    (root / "base" / "vocab.json").write_text(json.dumps({str(i): i for i in range(64)}))
    for i in range(3):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.02 * torch.randn_like(p))
        base.save_pretrained(root / f"e{i}", max_shard_size="40KB", safe_serialization=True)
        torch.manual_seed(i + 1)
    return root


@pytest.mark.slow  # two command-line merges and transformers
def test_a_ties_recipe_over_gpt2s_equals_the_hydra_overrides_loads_and_has_a_card(gpt2, tmp_path):
    r = {"merge_method": "ties", "base_model": str(gpt2 / "base"), "dtype": "float32", "tokenizer_source": "base",
         "models": [{"model": str(gpt2 / f"e{i}"), "parameters": {"weight": w, "density": 0.4}}
                    for i, w in enumerate([1.0, 0.5, 0.8])],
         "parameters": {"normalize": True}}
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(r))
    env_python = [sys.executable, "-m", "ame.merge"]
    a = subprocess.run([*env_python, f"recipe={tmp_path / 'ties.yml'}", f"out={tmp_path / 'from_recipe'}"],
                       capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr
    assert "merged: ties of 3 experts" in a.stdout and "peak memory" in a.stdout  # the summary line
    b = subprocess.run([*env_python, "aggregator=ties", f"experts.paths=[{','.join(str(gpt2 / f'e{i}') for i in range(3))}]",
                        f"experts.init={gpt2 / 'base'}", "aggregator.density=0.4", "aggregator.weights=[1.0,0.5,0.8]",
                        "aggregator.trim=tensor", "aggregator.zero_sign=positive", f"out={tmp_path / 'from_overrides'}",
                        "quiet=true"],
                       capture_output=True, text=True, timeout=300)
    assert b.returncode == 0 and b.stdout.strip() == "", b.stdout + b.stderr  # quiet=true: nothing but errors
    x, y = Checkpoint(tmp_path / "from_recipe"), Checkpoint(tmp_path / "from_overrides")
    assert list(x) == list(y) and all(torch.equal(x[k], y[k]) for k in x)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from_recipe")
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8)[None]).logits).all()
    card = (tmp_path / "from_recipe" / "README.md").read_text()
    assert "ties" in card and "merge_method: ties" in card and str(gpt2 / "e2") in card and "sha256" in card
    assert (tmp_path / "from_recipe" / "vocab.json").read_text() == (gpt2 / "base" / "vocab.json").read_text()
    assert "aggregator=ties" in (tmp_path / "from_overrides" / "README.md").read_text()  # the command, recorded
    record = json.loads((tmp_path / "from_recipe" / ".ame-merge.json").read_text())
    assert record["aggregator"] == "ties" and len(record["experts"]) == 3


def test_a_file_output_records_how_it_was_made_in_its_metadata(models):
    root = models[0]
    out = root / "m.safetensors"
    ame.merge(recipe=recipe(root, "task_arithmetic", entries(root, [0.3, 0.3, 0.3])), out=out)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()["ame_merge"])
    assert record["aggregator"] == "task_arithmetic" and "merge_method: task_arithmetic" in record["recipe"]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk_mb", [8, 0.5])
def test_ties_per_tensor_trim_of_large_tensors_is_mergekits(tmp_path, chunk_mb, ties):
    """Tensors large enough for the sampled selection (within a chunk: chunk_mb=8) and cut across
    chunks (radix selection: chunk_mb=0.5) give mergekit's TIES exactly; also when many |τ| tie at
    the k-th value (values on a coarse grid, as 16-bit weights are): exactly k entries kept, as
    mergekit keeps, the tied ones first in the tensor's order."""
    g = torch.Generator().manual_seed(3)
    base = {"layers.0.mlp.w": torch.randn(700, 500, generator=g), "norm.b": torch.randn(300, generator=g)}
    grid = (lambda t: torch.round(t * 64) / 64) if ties else (lambda t: t)
    base = {k: grid(v) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    experts = []
    for i in range(3):
        experts.append({k: grid(v + 0.1 * torch.randn(v.shape, generator=g)) for k, v in base.items()})
        save_file(experts[-1], str(tmp_path / f"e{i}.safetensors"))
    if ties:  # the case is real: far more entries tie at the k-th |τ| than fit in the top k
        a = (experts[0]["layers.0.mlp.w"] - base["layers.0.mlp.w"]).abs().reshape(-1)
        k = int(0.2 * a.numel())
        assert int((a >= a.kthvalue(a.numel() - k + 1).values).sum()) > k + 1000
    r = recipe(tmp_path, "ties", entries(tmp_path, [1.0, 0.5, 0.8], 0.2), {"normalize": True})
    out = dict(ame.merge(recipe=r, chunk_mb=chunk_mb))
    assert close(out, {k: generalized(base, experts, [1.0, 0.5, 0.8], lambda k: 0.2, True, True, 1.0, k) for k in base})
