"""The out-of-distribution sets: generated once and cached (verified), the published arrays'
layout, the literature's reporting, and both through ``run.py``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ame.eval.corruptions import FAMILIES, STANDARD, corrupt
from ame.eval.ood import PUBLISHED, generated_sets, published_sets
from ame.errors import AMEError
from ame.eval.evaluate import ood_metrics


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (12, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(12) % 10


def test_generated_sets_are_cached_once_and_verified(images, tmp_path, capsys):
    x, y = images
    names, sev = ["gaussian_noise", "pixelate"], [1, 4]
    first = generated_sets(x, y, names, sev, seed=3, cache_dir=tmp_path, workers=2)
    assert set(first) == {(n, s) for n in names for s in sev}
    for (n, s), (xc, yc) in first.items():
        assert torch.equal(xc, corrupt(x, n, s, 3)) and torch.equal(yc, y)
    files = sorted((tmp_path / "corrupted").glob("*/data.safetensors"))
    assert len(files) == 4 and all((f.parent / "manifest.json").exists() for f in files)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = generated_sets(x, y, names, sev, seed=3, cache_dir=tmp_path, workers=1)
    assert all(torch.equal(again[k][0], first[k][0]) for k in first)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # read, not rebuilt
    # the key follows the content, the seed and the subsample
    generated_sets(x[:6], y[:6], ["gaussian_noise"], [1], seed=3, cache_dir=tmp_path)
    generated_sets(x, y, ["gaussian_noise"], [1], seed=4, cache_dir=tmp_path)
    assert len(list((tmp_path / "corrupted").glob("*/data.safetensors"))) == 6
    # a damaged entry is reported and rebuilt, never used
    victim = files[0]
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0xFF
    victim.write_bytes(bytes(raw))
    capsys.readouterr()
    healed = generated_sets(x, y, names, sev, seed=3, cache_dir=tmp_path)
    assert "rebuilding" in capsys.readouterr().err
    assert all(torch.equal(healed[k][0], first[k][0]) for k in first)


def _write_published(folder, n=6, shape=(8, 8, 1), names=("gaussian_noise", "contrast"), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.tile(rng.integers(0, classes, n), 5).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    arrays = {}
    for name in names:
        arrays[name] = rng.integers(0, 256, (5 * n, *shape)).astype(np.uint8)
        np.save(folder / f"{name}.npy", arrays[name])
    return labels, arrays


def test_published_arrays_are_read_per_severity_with_their_labels(tmp_path):
    labels, arrays = _write_published(tmp_path / "CIFAR-10-C", n=6, shape=(8, 8, 3))
    sets = published_sets(tmp_path, ["gaussian_noise", "contrast"], [2, 5], seed=0, size=None,
                          image_shape=(3, 8, 8), num_classes=10)  # the archive's own sub-folder is found
    x, y = sets["contrast", 2]
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.uint8
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), arrays["contrast"][6:12])
    assert np.array_equal(y.numpy(), labels[6:12])
    sub = published_sets(tmp_path, ["contrast"], [5], seed=1, size=3, image_shape=(3, 8, 8), num_classes=10)
    xs, ys = sub["contrast", 5]
    assert len(xs) == 3 and len(ys) == 3


@pytest.mark.parametrize("damage, match", [
    ("missing", "contrast.npy is missing"),
    ("shape", r"expected uint8 \(30, 8, 8, 1\)"),
    ("labels", "labels outside"),
    ("float_labels", "holds float32 values; labels are integers"),
    ("garbage", "cannot read"),
])
def test_bad_published_folders_are_one_clear_line(tmp_path, damage, match):
    _write_published(tmp_path, n=6)
    if damage == "missing":
        (tmp_path / "contrast.npy").unlink()
    elif damage == "shape":
        np.save(tmp_path / "contrast.npy", np.zeros((30, 8, 8, 3), np.uint8))
    elif damage == "labels":
        np.save(tmp_path / "labels.npy", np.full(30, 12, np.uint8))
    elif damage == "float_labels":
        np.save(tmp_path / "labels.npy", np.full(30, 1.5, np.float32))
    else:
        (tmp_path / "contrast.npy").write_bytes(b"not an array")
    with pytest.raises(AMEError, match=match):
        published_sets(tmp_path, ["gaussian_noise", "contrast"], [1], 0, None, (1, 8, 8), 10)


def test_the_published_archives_are_the_zenodo_records():
    assert PUBLISHED["cifar10-c"][0].endswith("2535967/files/CIFAR-10-C.tar")
    assert PUBLISHED["cifar100-c"][0].endswith("3555552/files/CIFAR-100-C.tar")


def test_ood_metrics_report_as_the_literature_does():
    rng = np.random.default_rng(0)
    acc = {(c, s): float(rng.uniform()) for c in [*STANDARD, "spatter", "saturate"] for s in range(1, 6)}
    m = ood_metrics(acc)
    std = [v for (c, _), v in acc.items() if c in STANDARD]
    assert m["ood/acc"] == pytest.approx(np.mean(std))
    assert m["ood/acc"] == pytest.approx(np.mean([m[f"ood/{c}/acc"] for c in STANDARD]))
    assert m["ood/extra_acc"] == pytest.approx(np.mean([v for (c, _), v in acc.items() if c not in STANDARD]))
    for s in range(1, 6):
        assert m[f"ood/s{s}/acc"] == pytest.approx(np.mean([acc[c, s] for c in STANDARD]))
    for fam, members in FAMILIES.items():
        assert m[f"ood/{fam}/acc"] == pytest.approx(np.mean([acc[c, s] for c in members for s in range(1, 6)]))
    assert m["ood/spatter/s3/acc"] == acc["spatter", 3] and m["ood/fog/acc"] == pytest.approx(
        np.mean([acc["fog", s] for s in range(1, 6)]))
    only_extras = ood_metrics({("saturate", 1): 0.5})
    assert "ood/acc" not in only_extras and only_extras["ood/extra_acc"] == 0.5


@pytest.mark.slow
def test_a_run_on_published_arrays_reports_the_same_keys_as_a_generated_run(tmp_path, fast, run_pipeline):
    from ame.data import load_digits
    d = load_digits()
    folder = tmp_path / "digits-c"
    folder.mkdir()
    n = len(d.test_y)
    np.save(folder / "labels.npy", np.tile(d.test_y.numpy(), 5).astype(np.uint8))
    for name in ("gaussian_noise", "contrast", "saturate"):
        sets = [corrupt(d.test_x, name, s).permute(0, 2, 3, 1).numpy() for s in range(1, 6)]
        np.save(folder / f"{name}.npy", np.concatenate(sets))
    assert np.load(folder / "contrast.npy").shape == (5 * n, 8, 8, 1)
    args = [*fast, "eval.extras=[saturate]", "eval.ood_subsample=null"]
    gen = run_pipeline(args, tmp_path, out="gen")["metrics"]  # in process: the evaluation is tested
    pub = run_pipeline([*args, f"eval.source={folder}"], tmp_path, out="pub")["metrics"]
    ood = {k for k in gen if k.startswith("ood/")}
    assert ood == {k for k in pub if k.startswith("ood/")}
    assert {"ood/acc", "ood/extra_acc", "ood/saturate/acc", "ood/noise/acc", "ood/s5/acc",
            "ood/contrast/s1/acc"} <= ood
    # the arrays hold the same images the generator makes: the same accuracies
    assert all(gen[k] == pytest.approx(pub[k]) for k in ood)
    with pytest.raises(AMEError, match="eval.source") as err:
        run_pipeline([*args, f"eval.source={tmp_path / 'nowhere'}"], tmp_path, out="bad")
    assert "\n" not in str(err.value)
