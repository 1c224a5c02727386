"""Permutation alignment (weight matching): specs derived from the model, exact recovery of a
permuted copy, clear refusals, and aligned soups of independently initialised experts."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ame.aggregators import average
from ame.align import WeightMatching, permutation_spec, weight_matching
from ame.errors import AMEError
from ame.models import CNN, MLP, ResNet

MODELS = {
    "mlp": (lambda: MLP(1, 8, 10, hidden=(32, 16)), (1, 8, 8)),
    "cnn_batchnorm": (lambda: CNN(3, 16, 10, widths=(8, 16), norm="batch"), (3, 16, 16)),
    "resnet_batchnorm": (lambda: ResNet(3, 16, 10, depth=8, width=8, norm="batch"), (3, 16, 16)),
    "resnet_no_norm": (lambda: ResNet(3, 16, 10, depth=14, width=4, norm="none"), (3, 16, 16)),
}


def _random_net(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    make, _ = MODELS[name]
    net = make().eval()
    for m in net.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0), m.weight.data.normal_(), m.bias.data.normal_()
    return net


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_permuted_copy_aligns_back_exactly(name):
    net, shape = _random_net(name, 0), MODELS[name][1]
    spec = permutation_spec(net, shape)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    perms = {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}
    permuted = spec.apply(perms, sd)
    assert any(not torch.equal(permuted[k], sd[k]) for k in sd)  # it really moved
    x = torch.randn(5, *shape)
    out = net(x)
    net.load_state_dict(permuted)
    assert torch.allclose(net(x), out, atol=1e-5)  # the spec is right: same function
    aligned = spec.apply(weight_matching(spec, sd, permuted), permuted)
    assert all(torch.equal(aligned[k], sd[k]) for k in sd)
    soup = average([sd, aligned], buffers=[k for k, _ in net.named_buffers()])
    assert all(torch.allclose(soup[k].float(), sd[k].float(), atol=1e-6) for k in sd)
    net.load_state_dict(soup)
    assert torch.allclose(net(x), out, atol=1e-5)


def test_residual_streams_share_one_permutation():
    spec = permutation_spec(ResNet(3, 16, 10, depth=8, width=8, norm="batch"), (3, 16, 16))
    stream = next(axes for axes in spec.axes.values() if ("stem.0.weight", 0) in axes)
    # the stem, the first block's second conv (added to the identity) and the next block's input
    assert {("blocks.0.conv2.weight", 0), ("blocks.1.conv1.weight", 1), ("blocks.1.shortcut.0.weight", 1)} <= set(stream)
    assert len(spec.axes) == 6  # per stage: the residual stream and the inner conv


def test_group_norm_with_several_channels_per_group_is_refused():
    with pytest.raises(AMEError, match="GroupNorm.*model.norm=batch"):
        permutation_spec(ResNet(3, 16, 10, depth=8, width=16, norm="group"), (3, 16, 16))


def test_an_unknown_layer_is_refused_with_the_fix():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(AMEError, match="Upsample.*align=none"):
        permutation_spec(net, (3, 8, 8))


def test_weight_matching_records_how_much_closer_the_experts_moved():
    nets = [_random_net("cnn_batchnorm", s).state_dict() for s in range(3)]
    spec = permutation_spec(_random_net("cnn_batchnorm", 0), MODELS["cnn_batchnorm"][1])
    wm = WeightMatching()
    aligned = list(wm(nets, spec))
    assert all(torch.equal(aligned[0][k], nets[0][k]) for k in nets[0])  # the reference is left alone
    before, after = wm.info["cosine_to_reference_before"], wm.info["cosine_to_reference_after"]
    assert before[0] == pytest.approx(1.0) and all(a > b for a, b in zip(after[1:], before[1:]))


@pytest.mark.slow
def test_aligned_soup_of_independent_experts_beats_the_unaligned_soup(tmp_path, fast, run_pipeline):
    """End to end on digits (iid shards; the default Dirichlet shards of 1,800 images leave some experts
    too weak to tell): init=independent, the soup with and without weight matching."""
    args = [*fast, "aggregator=soup", "train.init=independent", "train.epochs=10", "data/shards=iid"]
    plain = run_pipeline([*args, "align=none"], tmp_path, out="plain")  # in process; the second reads the experts
    aligned = run_pipeline([*args, "align=weight_matching"], tmp_path, out="aligned")  # from the cache
    assert plain["align"] is None and aligned["align"]["method"] == "weight_matching"
    assert [e["id/acc"] for e in plain["experts"]] == [e["id/acc"] for e in aligned["experts"]]  # same functions
    assert aligned["metrics"]["id/acc"] > plain["metrics"]["id/acc"] + 0.1  # measured: 0.63 → 0.94


def test_aligned_copies_follow_the_expert_files_never_stale(tmp_path):
    from ame.align import align_experts
    from ame.experts import ExpertSet, Experts
    from ame.io import save_state_dict

    spec = permutation_spec(_random_net("cnn_batchnorm", 0), MODELS["cnn_batchnorm"][1])
    paths = [tmp_path / f"e{i}.safetensors" for i in range(2)]
    for i, p in enumerate(paths):
        save_state_dict(_random_net("cnn_batchnorm", i).state_dict(), p)
    ex = ExpertSet(Experts(paths), [1, 1], None, None, cached=True)
    first = align_experts(ex, WeightMatching(), spec, tmp_path / "out", "k")
    again = align_experts(ex, WeightMatching(), spec, tmp_path / "out", "k")
    assert again.root == first.root  # the same files: reused
    save_state_dict(_random_net("cnn_batchnorm", 5).state_dict(), paths[1])  # a different expert, same path
    changed = align_experts(ex, WeightMatching(), spec, tmp_path / "out", "k")
    assert changed.root != first.root
    fresh = spec.apply(weight_matching(spec, ex.experts[0], ex.experts[1]), ex.experts[1])
    assert all(torch.equal(changed.experts[1][k], fresh[k]) for k in fresh)
