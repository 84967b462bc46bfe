"""ImageNet and COCO datamodules on real files: embedded scenes exported by ``datamodules.export`` must come
back unchanged (PNG), and broken inputs must fail or be skipped loudly."""
from __future__ import annotations

import io
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from saliency_lab.datamodules import (BadImageError, BadImageWarning, ClutteredFashionMNIST, COCODataModule, COCODetection,
                         ImageNetDataModule, ImageNetFolder, boxes_to_mask)
from saliency_lab.datamodules.common import load_rgb
from saliency_lab.cli.export_scenes import main as export_main
from saliency_lab.datamodules.scene_export import coco_category_id, export_coco, export_imagenet, synset_name

SIZE = 32


@pytest.fixture(scope="module")
def scenes():
    return {split: ClutteredFashionMNIST(split, SIZE, num_scenes=20) for split in ("train", "val")}


@pytest.fixture(scope="module")
def imagenet_root(scenes, tmp_path_factory):
    return export_imagenet(tmp_path_factory.mktemp("imagenet"), scenes)


@pytest.fixture(scope="module")
def imagenet_flat(scenes, tmp_path_factory):
    return export_imagenet(tmp_path_factory.mktemp("imagenet_flat"), {"val": scenes["val"]}, val_layout="flat")


@pytest.fixture(scope="module")
def coco_export(scenes, tmp_path_factory):
    annotation_file = export_coco(scenes["val"], tmp_path_factory.mktemp("coco"), n=8)
    return annotation_file.parent.parent / "images", annotation_file


def scene_of(path: str) -> int:
    return int(re.search(r"_(\d{8})\.", path).group(1))


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def random_rgb(seed: int, size=(SIZE, SIZE)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


# --- ImageNet ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["folders", "flat"])
@pytest.mark.parametrize("boxes_from", ["xml", "csv"])
def test_imagenet_val_round_trip(scenes, imagenet_root, imagenet_flat, layout, boxes_from):
    root = imagenet_root if layout == "folders" else imagenet_flat
    annotations = root / "LOC_val_solution.csv" if boxes_from == "csv" else None  # None: finds val_boxes/
    data = ImageNetFolder(root, "val", SIZE, annotations=annotations, crop_fraction=1.0)
    assert len(data) == 20 and data.num_classes == 10
    assert data.classes == [synset_name(k) for k in range(10)]
    assert data.class_names == list(ClutteredFashionMNIST.classes)
    for i, (path, _) in enumerate(data.samples):
        got, want = data[i], scenes["val"][scene_of(path)]
        assert torch.equal(got["image"], want["image"])  # PNG of 8-bit levels: exact
        assert got["label"] == want["label"] and got["index"] == i
        assert torch.equal(got["boxes"], want["boxes"])
        assert torch.equal(got["mask"], boxes_to_mask(want["boxes"], SIZE, SIZE))
        assert not (want["mask"] & ~got["mask"]).any()  # the object lies inside its box mask


def test_imagenet_train_has_labels_but_no_ground_truth(scenes, imagenet_root):
    data = ImageNetFolder(imagenet_root, "train", 24)
    assert len(data) == 20
    for i, (path, label) in enumerate(data.samples):
        assert label == scenes["train"].labels[scene_of(path)]
    sample = data[0]
    assert sample["image"].shape == (3, 24, 24) and sample["boxes"].shape == (0, 4)
    assert sample["mask"].shape == (1, 24, 24) and not sample["mask"].any()


def test_imagenet_eval_crop_moves_boxes(scenes, imagenet_root):
    data = ImageNetFolder(imagenet_root, "val", 28)  # crop_fraction 0.875: shorter side 32, centre crop 28
    for i in range(3):
        want = scenes["val"][scene_of(data.samples[i][0])]
        assert torch.equal(data[i]["image"], want["image"][:, 2:30, 2:30])
        assert torch.allclose(data[i]["boxes"], (want["boxes"] - 2).clamp(0, 28))


def test_imagenet_rescales_boxes_from_xml_size(tmp_path):
    (tmp_path / "val" / "n1").mkdir(parents=True)
    random_rgb(0, (64, 48)).save(tmp_path / "val" / "n1" / "a.png")
    (tmp_path / "val_boxes").mkdir()
    (tmp_path / "val_boxes" / "a.xml").write_text(
        "<annotation><size><width>32</width><height>24</height></size>"
        "<object><name>n1</name><bndbox><xmin>4</xmin><ymin>2</ymin><xmax>11</xmax><ymax>9</ymax></bndbox></object>"
        "<object><name>n2</name><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        "</annotation>")
    sample = ImageNetFolder(tmp_path, "val", 24, classes=["n1", "n2"], crop_fraction=1.0)[0]
    # annotated at 32x24 -> [4,2,12,10]; file is 64x48 (x2); resized to 32x24 (x0.5); crop x from 4
    assert sample["boxes"].tolist() == [[0.0, 2.0, 8.0, 10.0]]  # the other class's box is not ground truth
    assert sample["mask"].sum() == 8 * 8


def test_imagenet_class_mapping_from_train_folders(tmp_path):
    for split, synset in (("train", "n2"), ("train", "n1"), ("val", "n2")):
        (tmp_path / split / synset).mkdir(parents=True, exist_ok=True)
        random_rgb(1).save(tmp_path / split / synset / f"{split}_{synset}.png")
    data = ImageNetFolder(tmp_path, "val", SIZE)
    assert data.classes == ["n1", "n2"] and data.samples[0][1] == 1  # sorted train folders, shared by val
    (tmp_path / "val" / "n3").mkdir()
    with pytest.raises(ValueError, match="n3"):
        ImageNetFolder(tmp_path, "val", SIZE)


def test_imagenet_flat_val_without_labels_fails_naming_the_file(imagenet_flat, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(imagenet_flat / "val", root / "val")
    shutil.copy(imagenet_flat / "synsets.txt", root)
    with pytest.raises(ValueError, match=r"embedded_val_00000000\.png.*not in a class folder"):
        ImageNetFolder(root, "val", SIZE)


def test_imagenet_datamodule_batches(imagenet_root):
    dm = ImageNetDataModule(imagenet_root, image_size=SIZE, batch_size=8, num_workers=0, crop_fraction=1.0)
    assert dm.num_classes == 10 and dm.classes[0] == "n00000000"
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert batch["image"].shape == (8, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (8,) and batch["label"].dtype == torch.long
        assert batch["mask"].shape == (8, 1, SIZE, SIZE) and batch["mask"].dtype == torch.bool
        assert batch["index"].shape == (8,) and len(batch["boxes"]) == 8
        assert all(b.ndim == 2 and b.shape[1] == 4 and b.dtype == torch.float32 for b in batch["boxes"])
    assert all(len(b) == 1 for b in batch["boxes"])  # val: one box per scene


@pytest.fixture
def folder_with_bad_files(tmp_path):
    folder = tmp_path / "train" / "n1"
    folder.mkdir(parents=True)
    random_rgb(2).save(folder / "a_good.png")
    random_rgb(3).save(folder / "b_good.JPEG", "JPEG")
    jpeg, png = png_bytes(random_rgb(4), "JPEG"), png_bytes(random_rgb(5))
    (folder / "c_truncated.JPEG").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "d_truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "e_text.JPEG").write_text("this is not an image\n")
    (folder / "notes.txt").write_text("not a candidate: ignored\n")
    return tmp_path, ["c_truncated.JPEG", "d_truncated.png", "e_text.JPEG"]


@pytest.mark.parametrize("verify", ["quick", "full"])
def test_bad_images_are_skipped_with_one_warning(folder_with_bad_files, verify):
    root, bad = folder_with_bad_files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageNetFolder(root, "train", SIZE, verify=verify)
    ours = [w for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "skipped 3 " in message and all(name in message for name in bad) and "notes.txt" not in message
    assert [Path(p).name for p, _ in data.samples] == ["a_good.png", "b_good.JPEG"]
    assert data[1]["image"].shape == (3, SIZE, SIZE)


def test_bad_images_fail_fast_on_request(folder_with_bad_files):
    root, bad = folder_with_bad_files
    with pytest.raises(BadImageError, match=re.escape(bad[0])):
        ImageNetFolder(root, "train", SIZE, on_error="raise")


def test_unchecked_bad_image_fails_on_access_naming_the_file(folder_with_bad_files):
    root, bad = folder_with_bad_files
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadImageWarning)
        data = ImageNetFolder(root, "train", SIZE, verify="off")
    assert len(data) == 5
    with pytest.raises(BadImageError, match=re.escape(bad[2])):
        data[4]


def test_image_modes_become_rgb(tmp_path):
    folder = tmp_path / "train" / "n1"
    folder.mkdir(parents=True)
    rgb = random_rgb(6)
    gray, rgba = rgb.convert("L"), rgb.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: colours must survive (alpha dropped, not composited)
    gray.save(folder / "gray.png")
    rgb.convert("CMYK").save(folder / "cmyk.JPEG", "JPEG")
    rgba.save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("LA").save(folder / "gray_alpha.png")
    Image.fromarray(np.asarray(gray).astype(np.uint16) << 8).save(folder / "gray16.png")
    data = ImageNetFolder(tmp_path, "train", SIZE, crop_fraction=1.0)
    assert len(data) == 6
    for i in range(len(data)):
        assert data[i]["image"].shape == (3, SIZE, SIZE)
    as_array = {Path(p).stem: np.asarray(load_rgb(p)) for p, _ in data.samples}
    assert all(a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8 for a in as_array.values())
    for name in ("gray", "gray16", "gray_alpha"):
        assert np.array_equal(as_array[name], np.repeat(np.asarray(gray)[..., None], 3, axis=2))
    assert np.array_equal(as_array["rgba"], np.asarray(rgb))
    assert np.array_equal(as_array["palette"], np.asarray(rgb.convert("P").convert("RGB")))


# --- COCO ----------------------------------------------------------------------------------------------------

def test_coco_round_trip(scenes, coco_export):
    image_dir, annotation_file = coco_export
    data = COCODetection(image_dir, annotation_file, SIZE)
    assert data.category_ids == [coco_category_id(k) for k in range(10)] == list(range(1, 20, 2))
    assert data.classes == list(ClutteredFashionMNIST.classes) and len(data) == 8
    for i in range(len(data)):
        got, want = data[i], scenes["val"][i]
        for key in ("image", "label", "mask", "boxes"):
            assert torch.equal(got[key], want[key]), key


def _edited_json(annotation_file: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(annotation_file.read_text())
    edit(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_categories_polygons_and_crowds(scenes, coco_export, tmp_path):
    image_dir, annotation_file = coco_export
    label0, label1 = (int(scenes["val"][i]["label"]) for i in range(2))
    other = (label0 + 1) % 10
    crowd_block = np.zeros((SIZE, SIZE), np.uint8, order="F")
    crowd_block[28:, 28:] = 1
    crowd_rle = mask_utils.encode(crowd_block)
    crowd_rle["counts"] = crowd_rle["counts"].decode()

    def edit(data):
        base = {"iscrowd": 0, "area": 64.0}
        data["annotations"] += [
            dict(base, id=100, image_id=1, category_id=coco_category_id(other), bbox=[2, 2, 8, 8],
                 segmentation=[[2, 2, 10, 2, 10, 10, 2, 10]]),  # a polygon of a second category
            dict(base, id=101, image_id=1, category_id=coco_category_id((label0 + 2) % 10), bbox=[28, 28, 4, 4],
                 segmentation=crowd_rle, iscrowd=1),  # crowd-only category: no sample
            dict(base, id=102, image_id=2, category_id=coco_category_id(label1), bbox=[28, 28, 4, 4],
                 segmentation=crowd_rle, iscrowd=1)]  # crowd of the scene's own category

    path = _edited_json(annotation_file, tmp_path, edit)
    data = COCODetection(image_dir, path, SIZE)
    assert len(data) == 9
    first = [data[i] for i, (img, _) in enumerate(data.sample_ids) if img == 1]
    assert sorted(int(s["label"]) for s in first) == sorted([label0, other])
    polygon = next(s for s in first if int(s["label"]) == other)
    assert polygon["boxes"].tolist() == [[2.0, 2.0, 10.0, 10.0]]
    assert polygon["mask"][0, 3:9, 3:9].all() and polygon["mask"].sum() <= 81
    merged = data[data.sample_ids.index((2, coco_category_id(label1)))]
    assert merged["mask"][0, 28:, 28:].all() and len(merged["boxes"]) == 2
    plain = COCODetection(image_dir, path, SIZE, merge_crowd=False)
    unmerged = plain[plain.sample_ids.index((2, coco_category_id(label1)))]
    assert torch.equal(unmerged["mask"], scenes["val"][1]["mask"]) and len(unmerged["boxes"]) == 1
    subset = COCODetection(image_dir, path, SIZE, categories=[ClutteredFashionMNIST.classes[other]])
    assert subset.num_classes == 1 and len(subset) == 1 + sum(int(scenes["val"][i]["label"]) == other
                                                                 for i in range(8))


def test_coco_missing_image_fails_at_construction(coco_export, tmp_path):
    image_dir, annotation_file = coco_export

    def edit(data):
        data["images"].append({"id": 999, "file_name": "missing_000.png", "width": SIZE, "height": SIZE})

    with pytest.raises(FileNotFoundError, match=r"missing_000\.png"):
        COCODetection(image_dir, _edited_json(annotation_file, tmp_path, edit), SIZE)


def test_coco_bad_and_non_rgb_images(coco_export, tmp_path):
    image_dir, annotation_file = coco_export
    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    Image.open(images / "00000000.png").convert("L").save(images / "00000000.png")
    Image.open(images / "00000001.png").convert("CMYK").save(images / "00000001.tif")
    (images / "00000002.png").write_text("not an image")

    def edit(data):
        data["images"][1]["file_name"] = "00000001.tif"

    path = _edited_json(annotation_file, tmp_path, edit)
    with pytest.warns(BadImageWarning, match=r"skipped 1 .*00000002\.png"):
        data = COCODetection(image_dir=images, annotation_file=path, image_size=SIZE)
    assert len(data) == 7 and all(data[i]["image"].shape == (3, SIZE, SIZE) for i in range(2))
    with pytest.raises(BadImageError, match=r"00000002\.png"):
        COCODetection(images, path, SIZE, on_error="raise")


def test_coco_datamodule(coco_export):
    image_dir, annotation_file = coco_export
    dm = COCODataModule(image_dir, annotation_file, image_size=24, batch_size=4, num_workers=0)
    assert dm.num_classes == 10 and dm.category_ids[:2] == [1, 3]
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["mask"].shape == (4, 1, 24, 24)
    assert batch["label"].dtype == torch.long and batch["mask"].dtype == torch.bool and len(batch["boxes"]) == 4
    with pytest.raises(ValueError, match="no train split"):
        dm.train_dataloader()
    trained = COCODataModule(image_dir, annotation_file, image_dir, annotation_file, image_size=24, batch_size=4,
                             num_workers=0)
    trained.setup("fit")
    assert next(iter(trained.train_dataloader()))["image"].shape == (4, 3, 24, 24)


# --- the export CLI ------------------------------------------------------------------------------------------

def test_export_cli(tmp_path, capsys):
    export_main(["--format", "imagenet", "--out", str(tmp_path / "in"), "--num-val", "3", "--image-size", "24",
                 "--jpeg", "--val-layout", "flat"])
    export_main(["--format", "coco", "--out", str(tmp_path / "coco"), "--num-val", "2", "--image-size", "24"])
    assert "wrote COCO val" in capsys.readouterr().out
    data = ImageNetFolder(tmp_path / "in", "val", 24, crop_fraction=1.0)
    scenes = ClutteredFashionMNIST("val", 24, num_scenes=3)
    for i in range(3):
        assert data[i]["label"] == scenes[i]["label"] and torch.equal(data[i]["boxes"], scenes[i]["boxes"])
        assert (data[i]["image"] - scenes[i]["image"]).abs().mean() < 0.05  # JPEG: close, not exact
    coco = COCODetection(tmp_path / "coco" / "val" / "images", tmp_path / "coco" / "val" / "annotations" /
                         "instances.json", 24)
    assert len(coco) == 2
