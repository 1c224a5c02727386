"""Every conf/aggregator option, as composed from its YAML, against a property of its maths: the
soup family against the (weighted) mean, each AME optimizer against its first step in closed form
(one expert, pivot = init: g = w0 − x), task vectors against their definitions, greedy soup against
its choice, the output ensemble refusing to merge."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ame.aggregators import average
from ame.errors import AMEError

ROOT = Path(__file__).resolve().parents[2]  # the repository (the `root` fixture, for parametrize)
OPTIONS = sorted(p.stem for p in (ROOT / "conf" / "aggregator").glob("*.yaml"))
G = torch.Generator().manual_seed(0)
BASE = {"w": torch.randn(50, generator=G)}
EXPERTS = [{"w": BASE["w"] + 0.3 * torch.randn(50, generator=G)} for _ in range(4)]
SIZES = [1.0, 2.0, 3.0, 4.0]


def test_every_option_is_checked_here():
    assert set(OPTIONS) == set(PROPERTIES), "a new conf/aggregator option needs a property in this file"


def _first_step(cfg, w0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One step of the option's torch.optim optimizer from w0 on g = w0 − x, written out."""
    o = cfg.optimizer
    name, lr, g = o._target_.rsplit(".", 1)[-1], float(o.lr), w0 - x
    if name in ("Adam", "AdamW"):
        eps = float(o.get("eps", 1e-8))
        w = w0 * (1 - lr * float(o.get("weight_decay", 0.01 if name == "AdamW" else 0.0)))
        return w - lr * g / (g.abs() + eps)  # bias-corrected m̂ = g, v̂ = g²
    if name == "Adagrad":
        return w0 - lr * g / (g.abs() + float(o.get("eps", 1e-10)))
    if name == "RMSprop":
        v = (1 - float(o.get("alpha", 0.99))) * g * g
        return w0 - lr * g / (v.sqrt() + float(o.get("eps", 1e-8)))
    if name == "Adadelta":
        rho, eps = float(o.get("rho", 0.9)), float(o.get("eps", 1e-6))
        v = (1 - rho) * g * g
        return w0 - lr * math.sqrt(eps) / (v + eps).sqrt() * g
    if name == "SGD":
        return w0 - lr * g
    raise AssertionError(f"no closed form for {name}")


def soup_family(option, agg, cfg):
    out = agg(EXPERTS, SIZES, BASE)["w"]
    weights = SIZES if option == "weighted_soup" else [1.0] * 4
    ref = sum(w * e["w"] for w, e in zip(weights, EXPERTS)) / sum(weights)
    assert torch.allclose(out, ref, atol=1e-6)


def ame_first_step(option, agg, cfg):
    out = agg(EXPERTS[:1], [1.0], BASE)["w"]  # one expert, one epoch: one step from the pivot (init)
    assert cfg.pivot == "init" and cfg.epochs == 1
    assert torch.allclose(out, _first_step(cfg, BASE["w"], EXPERTS[0]["w"]), atol=1e-6)


def task_arithmetic(option, agg, cfg):
    out = agg(EXPERTS, SIZES, BASE)["w"]
    assert torch.allclose(out, BASE["w"] + cfg.scaling * sum(e["w"] - BASE["w"] for e in EXPERTS), atol=1e-6)


def ties(option, agg, cfg):
    taus = torch.stack([e["w"] - BASE["w"] for e in EXPERTS])
    d = taus.shape[1]
    taus = taus * (taus.abs() >= taus.abs().kthvalue(d - int(d * cfg.density), dim=1, keepdim=True).values)
    keep = torch.where(torch.sign(taus.sum(0)) > 0, taus > 0, taus < 0)
    ref = BASE["w"] + cfg.scaling * (taus * keep).sum(0) / keep.sum(0).clamp_min(1)
    assert torch.allclose(agg(EXPERTS, SIZES, BASE)["w"], ref, atol=1e-6)


def dare(option, agg, cfg):
    big = {"w": torch.zeros(4000)}
    out = agg([{"w": torch.ones(4000)}], [1.0], big)["w"]  # τ = 1: kept entries are 1/density × λ
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], cfg.scaling / cfg.density))
    assert abs(float(kept.float().mean()) - cfg.density) < 0.05


def greedy(option, agg, cfg):
    target = EXPERTS[2]["w"]
    out = agg(EXPERTS, SIZES, BASE, score=lambda sd: -float((sd["w"] - target).norm()))["w"]
    assert torch.equal(out, target) and agg.info["chosen"] == [2]  # any soup with another is farther


def ensemble(option, agg, cfg):
    assert not agg.single_network
    with pytest.raises(AMEError, match="is N networks"):
        agg(EXPERTS, SIZES, BASE)


PROPERTIES = {"soup": soup_family, "ame_sgd": soup_family, "weighted_soup": soup_family,
              "ame_adam": ame_first_step, "ame_adamw": ame_first_step, "ame_adagrad": ame_first_step,
              "ame_rmsprop": ame_first_step, "ame_adadelta": ame_first_step,
              "task_arithmetic": task_arithmetic, "ties": ties, "dare": dare, "greedy_soup": greedy,
              "ensemble": ensemble}


@pytest.mark.parametrize("option", OPTIONS)
def test_each_aggregator_config_computes_its_maths(option, tmp_path, compose_cfg):
    cfg = compose_cfg([f"aggregator={option}"], tmp_path).aggregator
    PROPERTIES[option](option, instantiate(cfg), cfg)


@pytest.mark.parametrize("name", OPTIONS)
def test_every_aggregator_config_builds_and_soups_agree(name, tmp_path, buffers, compose_cfg, tiny_experts):
    """Its name and data use as declared; on experts with statistics and counters (buffers), a finite
    network, and the soup family's exactly the mean (float buffers averaged as parameters)."""
    cfg = compose_cfg([f"aggregator={name}"], tmp_path)
    agg = instantiate(cfg.aggregator)
    assert agg.name == name and agg.data_free == (name != "greedy_soup")
    if name == "ensemble":  # N networks: evaluated from the experts' outputs, no weights to check here
        assert agg.single_network is False
        return
    ex, init = tiny_experts(4), tiny_experts(1, seed=7)[0]
    score = {} if agg.data_free else {"score": lambda sd: -float(sd["layer.bias"].abs().sum())}
    out = agg(ex, [5, 5, 5, 5], init, buffers, **score)
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    if name in ("soup", "ame_sgd", "weighted_soup"):
        soup = average(ex, buffers=buffers)
        assert all(torch.allclose(out[k].double(), soup[k].double(), atol=1e-6) for k in soup)
