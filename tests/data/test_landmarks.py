"""GLD-23K on a tiny fixture in its own format (made here, no download): the loader, natural
(client) shards, and the data=gld23k model=vit_s path end to end."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from ame.data import load_gld23k, split
from ame.data.shards import iid, natural
from ame.errors import AMEError

USERS = {"u7": 9, "u1": 6, "u3": 5, "u9": 4, "u2": 3, "u5": 3}  # images per client


def make_fixture(root):
    """GLD-23K's layout: split CSVs (user_id, image_id, class) and images/<image_id>.jpg of mixed sizes."""
    from torchvision.io import encode_jpeg

    (root / "images").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    train, test, n = [], [], 0
    for user, count in USERS.items():
        for _ in range(count):
            train.append({"user_id": user, "image_id": f"img{n:04d}", "class": str([5, 17, 120][n % 3])})
            n += 1
    for i in range(9):
        test.append({"image_id": f"img{n:04d}", "class": str([5, 17, 120][i % 3])})
        n += 1
    for row in train + test:
        c = int(row["class"])
        h, w = (int(v) for v in torch.randint(20, 48, (2,), generator=g))
        img = (torch.rand(3, h, w, generator=g) * 60 + c).clamp(0, 255).to(torch.uint8)  # the class sets the colour
        (root / "images" / f"{row['image_id']}.jpg").write_bytes(encode_jpeg(img).numpy().tobytes())
    for name, rows, cols in (("mini_gld_train_split.csv", train, ["user_id", "image_id", "class"]),
                             ("mini_gld_test.csv", test, ["image_id", "class"])):
        with open(root / name, "w", newline="") as f:
            w = csv.DictWriter(f, cols)
            w.writeheader()
            w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def gld_root(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("gld23k"))


def test_loader_decodes_resizes_and_keeps_the_clients(gld_root, tmp_path):
    d = load_gld23k(str(gld_root), image_size=16, cache_dir=str(tmp_path))
    assert d.train_x.shape == (30, 3, 16, 16) and d.test_x.shape == (9, 3, 16, 16)
    assert d.classes == ["5", "17", "120"] and d.train_y[:3].tolist() == [0, 1, 2]
    assert d.train_groups.tolist() == sum(([i] * c for i, c in enumerate(USERS.values())), [])
    again = load_gld23k(str(gld_root), image_size=16, cache_dir=str(tmp_path))  # from the cache
    assert torch.equal(again.train_x, d.train_x) and torch.equal(again.train_groups, d.train_groups)
    assert again.fingerprint() == d.fingerprint()


def test_missing_files_are_one_clear_error(gld_root, tmp_path):
    with pytest.raises(AMEError, match="mini_gld_train_split.csv not found; set data.root"):
        load_gld23k(str(tmp_path), image_size=16)
    broken = make_fixture(tmp_path / "broken")
    (broken / "images" / "img0003.jpg").unlink()
    with pytest.raises(AMEError, match="img0003.jpg .*not found"):
        load_gld23k(str(broken), image_size=16)


def test_natural_shards_keep_clients_whole_and_balance_sizes():
    groups = np.repeat(np.arange(len(USERS)), list(USERS.values()))
    labels = np.zeros(len(groups), dtype=np.int64)
    s = split(labels, lambda y, rng, groups: natural(y, 3, rng, groups), seed=0, groups=groups)
    assert sorted(np.concatenate(s.shards).tolist()) == list(range(len(groups)))
    for shard in s.shards:  # a client is never cut in two
        for c in np.unique(groups[shard]):
            assert set(np.flatnonzero(groups == c)) <= set(shard.tolist())
    assert sorted(s.sizes) == [9, 9, 12]  # largest client first, each to the smallest shard: 9 | 6+3 | 5+4+3
    again = split(labels, lambda y, rng, groups: natural(y, 3, rng, groups), seed=0, groups=groups)
    assert all(np.array_equal(a, b) for a, b in zip(s.shards, again.shards))
    with pytest.raises(AMEError, match="only 6 clients"):
        natural(labels, 7, np.random.default_rng(0), groups)
    with pytest.raises(AMEError, match="needs a dataset that records its clients"):
        natural(labels, 2, np.random.default_rng(0), None)
    plain = split(labels, lambda y, rng: iid(y, 3, rng), seed=0, groups=groups)  # other splitters ignore groups
    assert sum(plain.sizes) == len(groups)


@pytest.mark.slow
def test_gld23k_with_vit_s_composes_and_runs_end_to_end(gld_root, tmp_path, read_results, run_cli):
    cfg = run_cli(["--cfg", "job", "data=gld23k"], tmp_path, out="cfg").stdout
    assert "vit_small_patch16_224" in cfg and "ame.data.shards.natural" in cfg and "torch.optim.AdamW" in cfg
    # fig1 runs the strong CIFAR regime by default; ~regime keeps the data config's own model (ViT-S)
    fig1 = run_cli(["--cfg", "job", "experiment=fig1", "data=gld23k", "~regime"], tmp_path, out="cfg1").stdout
    assert "ame.data.load_gld23k" in fig1 and "vit_small_patch16_224" in fig1 and "base_seed: null" in fig1
    run_cli(["data=gld23k", f"data.root={gld_root}", "data.dataset.image_size=32", "data.shards.num_shards=2",
             "train.epochs=1", "train.batch_size=8", "eval.corruptions=[gaussian_noise]", "eval.severities=[3]",
             "logger=none", "aggregator=ame_adam"], tmp_path)
    r = read_results(tmp_path / "out")
    assert r["data"]["name"] == "gld23k" and sorted(r["data"]["shard_sizes"]) == [14, 16]  # 9+4+3 | 6+5+3
    assert 0 <= r["metrics"]["id/acc"] <= 1 and "ood/gaussian_noise/acc" in r["metrics"]
    assert [e["shard_size"] for e in r["experts"]] == r["data"]["shard_sizes"]
