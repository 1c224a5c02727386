"""model=timm: any timm model by name, pretrained from a local file with its own input statistics."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ame.errors import AMEError
from ame.models import input_renormalizer, timm_model


@pytest.mark.parametrize("name", ["resnet18", pytest.param("convnext_atto", marks=pytest.mark.slow),
                                  pytest.param("vit_tiny_patch16_224", marks=pytest.mark.slow)])
def test_any_timm_model_builds_for_the_data(name):
    model = timm_model(3, 32, 10, name)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_pretrained_from_a_local_file_normalises_with_its_own_statistics(tmp_path):
    donor = timm_model(3, 32, 1000, "resnet18")
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    model = timm_model(3, 32, 10, "resnet18", pretrained=str(tmp_path / "r18.safetensors")).eval()
    assert torch.equal(model.conv1.weight, donor.conv1.weight)  # the file's weights (its head replaced)
    mean_p, std_p = (torch.tensor(v)[:, None, None] for v in model.input_stats)
    assert torch.allclose(mean_p.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    raw = torch.rand(2, 3, 32, 32)
    data_mean, data_std = torch.tensor([0.2, 0.3, 0.4]), torch.tensor([0.1, 0.2, 0.3])
    with torch.no_grad():
        expected = model((raw - mean_p) / std_p)
        input_renormalizer(model, data_mean, data_std)
        got = model((raw - data_mean[:, None, None]) / data_std[:, None, None])
    assert torch.allclose(got, expected, atol=1e-4)
    assert set(model.state_dict()) == set(timm_model(3, 32, 10, "resnet18").state_dict())  # no new entries


def test_unknown_name_and_missing_file_are_one_line():
    with pytest.raises(AMEError, match="not a timm model"):
        timm_model(3, 32, 10, "resnet_does_not_exist")
    with pytest.raises(AMEError, match="not found"):
        timm_model(3, 32, 10, "resnet18", pretrained="/nonexistent/w.safetensors")
