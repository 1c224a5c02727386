"""GLD-23K: the federated Google Landmarks v2 subset (233 clients, 203 classes, about 23k images).

Expected under ``root`` (the layout of the federated split files, e.g. TensorFlow Federated's
``gldv2`` / FedML's ``Landmarks``)::

    mini_gld_train_split.csv   columns user_id, image_id, class
    mini_gld_test.csv          columns image_id, class (a user_id column is ignored)
    images/<image_id>.jpg

Images are resized (shorter side) and centre-cropped to ``image_size`` once, then cached as a
uint8 tensor like every other dataset; each training image keeps its client id
(``ImageData.train_groups``) for ``data/shards=natural``.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from ame.data.datasets import ImageData, cached
from ame.errors import AMEError, positive_int, require
from ame.progress import progress


def _read_csv(path: Path, needed: tuple[str, ...]) -> list[dict[str, str]]:
    require(path.is_file(), f"GLD-23K: {path} not found; set data.root to the folder holding the federated split "
            f"files ({path.name}) and images/, or data.dataset.{'train' if 'user_id' in needed else 'test'}_csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in needed if rows and c not in rows[0]]
    require(rows and not missing, f"GLD-23K: {path} needs the columns {list(needed)}"
            + (f"; missing {missing}" if missing else "; it has no rows"))
    return rows


def _decode(rows: list[dict[str, str]], image_dir: Path, size: int, what: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as TF

    out = torch.empty(len(rows), 3, size, size, dtype=torch.uint8)
    for i, row in enumerate(progress(rows, f"decoding GLD-23K {what}")):
        path = image_dir / f"{row['image_id']}.jpg"
        try:
            img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            if not path.is_file():
                raise AMEError(f"GLD-23K: image {path} (listed in the {what} split) not found; download the "
                               "images or fix data.dataset.image_dir") from None
            raise AMEError(f"cannot decode image {path} ({str(e).splitlines()[0][:80]}); replace or remove it") from None
        out[i] = TF.center_crop(TF.resize(img, [size], antialias=True), [size, size])
    return out


def load_gld23k(root: str, train_csv: str = "mini_gld_train_split.csv", test_csv: str = "mini_gld_test.csv",
                image_dir: str = "images", image_size: int = 224, cache_dir: str | None = None) -> ImageData:
    """GLD-23K from ``root`` (see the module docstring), at ``image_size``², cached as uint8."""
    positive_int(image_size, "data.dataset.image_size", minimum=8)
    root_path = Path(root).expanduser().resolve()
    files = [root_path / train_csv, root_path / test_csv]

    def build() -> ImageData:
        train = _read_csv(files[0], ("user_id", "image_id", "class"))
        test = _read_csv(files[1], ("image_id", "class"))
        classes = sorted({r["class"] for r in train + test}, key=lambda c: (len(c), c))  # numeric ids in order
        index = {c: i for i, c in enumerate(classes)}
        users = {u: i for i, u in enumerate(dict.fromkeys(r["user_id"] for r in train))}
        images = root_path / image_dir
        return ImageData(
            "gld23k", _decode(train, images, image_size, "train"),
            torch.tensor([index[r["class"]] for r in train], dtype=torch.int64),
            _decode(test, images, image_size, "test"), torch.tensor([index[r["class"]] for r in test], dtype=torch.int64),
            classes, train_groups=torch.tensor([users[r["user_id"]] for r in train], dtype=torch.int64))

    # keyed by the split files and the images' listing: changed files are decoded again
    return cached("gld23k", f"{files[0]}|{files[1]}|{image_dir}|{image_size}", cache_dir, build,
                  watch=[*files, root_path / image_dir])
