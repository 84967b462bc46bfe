"""Cluttered Fashion-MNIST scenes: shapes, ranges, ground truth, determinism, data location errors."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from saliency_lab.datamodules import Clutter, ClutteredFashionMNIST, ClutteredFashionMNISTDataModule, fashion_mnist


@pytest.fixture(scope="module")
def val_set():
    return ClutteredFashionMNIST("val", image_size=48, num_scenes=64)


def test_batch_layout_shapes_and_ranges():
    dm = ClutteredFashionMNISTDataModule(image_size=40, batch_size=6, num_train=12, num_val=6, num_test=6)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 3, 40, 40) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    assert batch["label"].shape == (6,) and batch["label"].dtype == torch.long
    assert batch["mask"].shape == (6, 1, 40, 40) and batch["mask"].dtype == torch.bool
    assert batch["index"].dtype == torch.long and len(batch["boxes"]) == 6
    assert all(b.shape == (1, 4) and b.dtype == torch.float32 for b in batch["boxes"])
    assert dm.num_classes == 10


def test_mask_lies_in_its_tight_box(val_set):
    for i in range(32):
        s = val_set[i]
        x1, y1, x2, y2 = s["boxes"][0].long().tolist()
        mask = s["mask"][0]
        assert mask.sum() > 20
        assert not mask[:y1].any() and not mask[y2:].any() and not mask[:, :x1].any() and not mask[:, x2:].any()
        # tight: the mask touches every side of its box
        assert mask[y1].any() and mask[y2 - 1].any() and mask[:, x1].any() and mask[:, x2 - 1].any()


def test_item_fills_a_sensible_share_of_the_canvas(val_set):
    areas = torch.stack([val_set[i]["mask"].float().mean() for i in range(32)])
    assert 0.05 < areas.median() < 0.5


def test_distractors_are_never_of_the_label_class(val_set):
    for i in range(64):
        _, item, distractors = val_set.layout(i)
        assert len(distractors) == val_set.clutter.distractors
        assert all(val_set.labels[j] != val_set.labels[item] for j in distractors)


def test_scenes_are_deterministic_per_split_index_and_seed(val_set):
    again = ClutteredFashionMNIST("val", image_size=48, num_scenes=64)
    for i in (0, 7, 63):
        assert torch.equal(val_set[i]["image"], again[i]["image"])
        assert torch.equal(val_set[i]["mask"], again[i]["mask"])
    other_seed = ClutteredFashionMNIST("val", image_size=48, num_scenes=64, seed=1)
    assert not torch.equal(val_set[5]["image"], other_seed[5]["image"])
    train = ClutteredFashionMNIST("train", image_size=48, num_scenes=64)
    assert not torch.equal(val_set[5]["image"], train[5]["image"])


def test_images_are_8_bit_quantised(val_set):
    image = val_set[3]["image"]
    assert torch.allclose(image * 255, (image * 255).round(), atol=1e-4)


def test_more_scenes_than_items_reuse_items_with_new_layouts():
    ds = ClutteredFashionMNIST("val", image_size=32, num_scenes=5001, val_items=5000)
    assert ds[5000]["label"] == ds[0]["label"]
    assert not torch.equal(ds[5000]["image"], ds[0]["image"])


def test_splits_do_not_share_items():
    train = ClutteredFashionMNIST("train", image_size=32)
    val = ClutteredFashionMNIST("val", image_size=32)
    assert len(train.items) + len(val.items) == 60000
    train_keys = {bytes(x) for x in train.items[:2000]}
    # Fashion-MNIST has a few duplicate images; a disjoint split shares at most those
    assert sum(bytes(x) in train_keys for x in val.items) < 10


def test_clutter_knobs_validate_and_come_from_dicts():
    assert Clutter.coerce({"distractors": 0, "item_scale": [0.5, 0.6]}) == Clutter(distractors=0, item_scale=(0.5, 0.6))
    with pytest.raises(ValueError, match="item_scale"):
        Clutter(item_scale=(0.7, 0.2))
    plain = ClutteredFashionMNIST("val", image_size=32, num_scenes=4, clutter={"distractors": 0, "texture_strength": 0})
    assert plain[0]["image"].shape == (3, 32, 32)


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_reads_idx_files_from_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nowhere")
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 12)):
        img_stem, lbl_stem = fashion_mnist.FILES[split]
        _write_idx(tmp_path / f"{img_stem}.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{lbl_stem}.gz", np.arange(n) % 10)
    ds = ClutteredFashionMNIST("test", image_size=32, data_dir=tmp_path)
    assert len(ds) == 12 and ds[11]["label"] == 1
    assert len(ClutteredFashionMNIST("val", image_size=32, data_dir=tmp_path, val_items=10)) == 10


def test_truncated_idx_file_is_named(tmp_path):
    path = tmp_path / "x.gz"
    _write_idx(path, np.zeros((4, 28, 28)))
    data = gzip.open(path).read()[:-10]
    with gzip.open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist._read_idx(path)


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.locate(tmp_path / "empty")


def test_cached_scenes_equal_rendered_ones():
    plain = ClutteredFashionMNIST("val", image_size=32, num_scenes=8)
    cached = ClutteredFashionMNIST("val", image_size=32, num_scenes=8, cache=True)
    for _ in range(2):  # first access renders, second reads the cache
        for i in range(8):
            a, b = plain[i], cached[i]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
            assert torch.equal(a["boxes"], b["boxes"]) and a["label"] == b["label"]
    assert len(cached._cache) == 8
