"""Datasets: digits ship with scikit-learn; CIFAR reads an ImageFolder tree (decoded once, cached)
or torchvision's files, and says clearly when neither is there."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ame.data import load_cifar, load_digits
from ame.errors import AMEError

SHARED = Path(os.environ.get("AME_SHARED_CIFAR", Path(__file__).resolve().parents[3] / "shared/data/cifar10-jpeg.tar.gz"))


def test_digits_is_a_fixed_uint8_split():
    a, b = load_digits(), load_digits()
    assert a.train_x.dtype == torch.uint8 and a.shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.train_y) + len(a.test_y) == 1797 and torch.equal(a.test_x, b.test_x)
    assert int(a.train_x.max()) == 255 and a.fingerprint() == b.fingerprint()
    normed = a.normalize(a.train_x)
    assert abs(float(normed.mean())) < 1e-3 and abs(float(normed.std()) - 1) < 1e-2


def test_image_folder_is_decoded_once_and_cached(tmp_path, monkeypatch, make_image_folder):
    from ame.data import datasets

    make_image_folder(tmp_path / "cifar10-jpeg")
    data = load_cifar("cifar10", str(tmp_path), download=False, cache_dir=str(tmp_path / "cache"))
    assert data.train_x.shape == (12, 3, 32, 32) and data.test_x.shape == (6, 3, 32, 32)
    assert data.classes == ["cat", "dog", "frog"] and data.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    cached = list((tmp_path / "cache" / "datasets").glob("*/data.safetensors"))
    assert len(cached) == 1
    monkeypatch.setattr(datasets, "_decode_folder", None)  # the cache, not the files, serves the second load
    again = load_cifar("cifar10", str(tmp_path), download=False, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(again.train_x, data.train_x) and again.classes == data.classes


@pytest.mark.parametrize("change", ["add", "remove", "replace"])
def test_changed_image_folder_is_decoded_again(change, tmp_path, make_image_folder):
    from torchvision.io import decode_image, encode_jpeg, write_file

    root = make_image_folder(tmp_path / "cifar10-jpeg")
    first = load_cifar("cifar10", str(tmp_path), download=False, cache_dir=str(tmp_path / "cache"))
    image = root / "train" / "dog" / "0001.jpg"
    if change == "remove":
        image.unlink()
    else:
        target = image.with_name("0009.jpg") if change == "add" else image
        write_file(str(target), encode_jpeg(255 - decode_image(str(image)), quality=95))
    again = load_cifar("cifar10", str(tmp_path), download=False, cache_dir=str(tmp_path / "cache"))
    fresh = load_cifar("cifar10", str(tmp_path), download=False)  # no cache: the truth
    assert torch.equal(again.train_x, fresh.train_x) and again.fingerprint() == fresh.fingerprint()
    assert again.fingerprint() != first.fingerprint()
    assert len(list((tmp_path / "cache" / "datasets").glob("*/data.safetensors"))) == 2


def test_missing_data_without_download_names_data_root(tmp_path):
    with pytest.raises(AMEError, match="data.root=") as err:
        load_cifar("cifar10", str(tmp_path / "nowhere"), download=False)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason="the shared CIFAR-10 JPEG archive is not on this machine")
def test_shared_cifar10_jpeg_archive_loads_as_the_full_dataset(tmp_path):
    import tarfile

    with tarfile.open(SHARED) as tar:
        tar.extractall(tmp_path, filter="data")
    data = load_cifar("cifar10", str(tmp_path), download=False)
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    assert data.classes[:3] == ["airplane", "automobile", "bird"]
    assert torch.bincount(data.train_y).tolist() == [5000] * 10
