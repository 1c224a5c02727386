"""A real client: three tiny Hugging Face GPT-2 models, saved sharded, merged by ``ame.merge`` and
``python -m ame.merge``, loaded back by ``transformers`` and run."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ame
from ame.io import Checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        model = transformers.GPT2LMHeadModel(config)
        paths.append(root / f"expert{i}")
        model.save_pretrained(paths[-1], max_shard_size="40KB", safe_serialization=True)
    assert (paths[0] / "model.safetensors.index.json").is_file()  # sharded
    return root, paths


def _forward(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = model(torch.arange(10)[None] % 64).logits
    assert logits.shape == (1, 10, 64) and torch.isfinite(logits).all()
    return model


def test_python_api_merge_loads_in_transformers(gpt2_experts, tmp_path):
    root, paths = gpt2_experts
    out = tmp_path / "merged"
    ame.merge(paths, "soup", out=out)
    assert sorted(p.name for p in out.iterdir()) == sorted([".ame-merge.json", "README.md", *(p.name for p in paths[0].iterdir())])
    model = _forward(out)
    experts = [dict(Checkpoint(p)) for p in paths]
    merged = model.state_dict()
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.allclose(merged[key], torch.stack([e[key] for e in experts]).mean(0), atol=1e-6)


# slow: an interpreter's start-up; the fast suite merges GPT-2s through the API (above) and runs the
# command line on safetensors files (tests/io/test_checkpoint.py)
@pytest.mark.slow
def test_command_line_merge_with_ame_adam_loads_in_transformers(gpt2_experts, tmp_path, root):
    _, paths = gpt2_experts
    out = tmp_path / "adam"
    proc = subprocess.run([sys.executable, "-m", "ame.merge", "aggregator=ame_adam", "aggregator.optimizer.lr=1e-3",
                           f"experts.paths=[{','.join(map(str, paths))}]", f"out={out}"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _forward(out)
