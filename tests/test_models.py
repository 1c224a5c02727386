"""ame.models: each architecture maps images to logits; ResNet-20 has the paper's size; bad settings are one error."""
from __future__ import annotations

import pytest
import torch

from ame.data import load_digits
from ame.errors import AMEError
from ame.models import CNN, MLP, ResNet, buffer_names, build_model


@pytest.mark.parametrize("make, shape", [
    (lambda: MLP(3, 32, 10), (3, 32, 32)), (lambda: CNN(3, 32, 10, norm="group"), (3, 32, 32)),
    (lambda: ResNet(3, 32, 10, norm="batch"), (3, 32, 32)), (lambda: CNN(1, 8, 10), (1, 8, 8)),
    (lambda: ResNet(1, 8, 10), (1, 8, 8))])
def test_models_map_images_to_logits(make, shape):
    assert make()(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet20_has_the_paper_size_and_batchnorm_buffers():
    m = ResNet(3, 32, 10, depth=20, norm="batch")
    assert 0.26e6 < sum(p.numel() for p in m.parameters()) < 0.28e6  # He et al.: 0.27M
    assert any(k.endswith("running_mean") for k in buffer_names(m))
    assert buffer_names(ResNet(3, 32, 10, norm="group")) == []


def test_build_model_reports_bad_architecture_settings(tmp_path, compose_cfg):
    cfg = compose_cfg(["model=resnet20", "model.depth=21"], tmp_path)
    with pytest.raises(AMEError, match="6n\\+2"):
        build_model(cfg.model, load_digits(), 0)
