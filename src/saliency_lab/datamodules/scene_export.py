"""Write embedded scenes in the real ImageNet and COCO file formats, so the real loaders run on real files.

ImageNet (``export_imagenet``)::

    out/train/<synset>/<stem>.png
    out/val/<synset>/<stem>.png        (or out/val/<stem>.png with val_layout="flat", labels from the boxes)
    out/val_boxes/<stem>.xml           Pascal-VOC XML with the scene's box (ImageNet's inclusive xmax/ymax)
    out/LOC_val_solution.csv           the same boxes in Kaggle's format (write_csv=True)
    out/synsets.txt                    "n0000000k <class name>" lines; sorted synset order = class index

COCO (``export_coco``)::

    out/images/<8-digit id>.png
    out/annotations/instances.json     categories with ids 1, 3, 5, ... (deliberately not contiguous, so the
                                       loader's remapping is exercised); one annotation per scene: RLE mask,
                                       bbox xywh, area, iscrowd 0

PNG (default) round-trips the scenes exactly: they are already quantised to 8-bit levels. JPEG is lossy.

CLI: ``saliency-lab export-scenes --format imagenet|coco --out DIR --num-train N --num-val M
[--image-size S --seed S --jpeg --val-layout folders|flat]``; COCO writes ``DIR/train`` and ``DIR/val``.
"""
from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from .embedded import ClutteredFashionMNIST
from .scenes import Clutter

FORMATS = {"png": (".png", {}), "jpeg": (".JPEG", {"quality": 95})}


def synset_name(label: int) -> str:
    """Synset-like folder name of class ``label``: n00000000, n00000001, ... (sorts like the indices)."""
    return f"n{label:08d}"


def _to_pil(image: torch.Tensor) -> Image.Image:
    """(3,H,W) float in [0,1] -> 8-bit RGB image (exact for 8-bit-level inputs)."""
    return Image.fromarray(image.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def _save(image: torch.Tensor, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _to_pil(image).save(path, **FORMATS[fmt][1])


def _voc_xml(path: Path, image_file: str, width: int, height: int, objects: list[tuple[str, list[int]]]) -> None:
    """Pascal-VOC XML as in ImageNet's ``Annotations/CLS-LOC``: boxes as 0-based inclusive xmin..xmax."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = path.parent.name
    ET.SubElement(root, "filename").text = Path(image_file).stem
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for synset, (x1, y1, x2, y2) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = synset
        for key, value in (("pose", "Unspecified"), ("truncated", 0), ("difficult", 0)):
            ET.SubElement(obj, key).text = str(value)
        box = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x1), ("ymin", y1), ("xmax", x2 - 1), ("ymax", y2 - 1)):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=False)


def _int_boxes(boxes: torch.Tensor) -> list[list[int]]:
    """Non-empty (K,4) xyxy boxes as ints (scene boxes are whole pixels)."""
    return [b for b in boxes.round().long().tolist() if b[2] > b[0] and b[3] > b[1]]


def _scenes(split: str, source: int | Dataset, **dataset_kwargs) -> Dataset:
    return ClutteredFashionMNIST(split, num_scenes=source, **dataset_kwargs) if isinstance(source, int) else source


def export_imagenet(
    out_dir: str | os.PathLike,
    splits: Mapping[str, int | Dataset],
    fmt: str = "png",
    val_layout: str = "folders",
    write_csv: bool = True,
    image_size: int = 64,
    seed: int = 0,
    clutter: Clutter | None = None,
    data_dir: str | os.PathLike | None = None,
) -> Path:
    """Write scenes as an ImageNet-style folder (layout in the module docstring); returns ``out_dir``.

    Args:
        splits: {"train" | "val": number of scenes or a dataset of sample dicts with ``.classes``}; a number
            n takes scenes 0..n-1 of the embedded split of the same name (built with image_size, seed,
            clutter, data_dir).
        fmt: "png" (exact) or "jpeg" (``.JPEG``, quality 95).
        val_layout: "folders" (val/<synset>/) or "flat" (val/ directly, like the official val tarball).
        write_csv: also write ``LOC_val_solution.csv`` for the val boxes.
    """
    if fmt not in FORMATS or val_layout not in ("folders", "flat") or not set(splits) <= {"train", "val"}:
        raise ValueError(f"bad export options: fmt={fmt!r} (png|jpeg), val_layout={val_layout!r} (folders|flat),"
                         f" splits={list(splits)} (train, val)")
    out = Path(out_dir)
    suffix = FORMATS[fmt][0]
    kwargs = dict(image_size=image_size, seed=seed, clutter=clutter, data_dir=data_dir)
    classes, solution = None, []
    for split, source in splits.items():
        scenes = _scenes(split, source, **kwargs)
        classes = scenes.classes
        for i in range(len(scenes)):
            sample = scenes[i]
            synset, stem = synset_name(int(sample["label"])), f"embedded_{split}_{i:08d}"
            flat = split == "val" and val_layout == "flat"
            _save(sample["image"], out / split / ("" if flat else synset) / (stem + suffix), fmt)
            if split == "val":
                objects = [(synset, box) for box in _int_boxes(sample["boxes"])]
                height, width = sample["image"].shape[1:]
                _voc_xml(out / "val_boxes" / f"{stem}.xml", stem + suffix, width, height, objects)
                solution.append((stem, " ".join(f"{s} {x1} {y1} {x2 - 1} {y2 - 1}" for s, (x1, y1, x2, y2) in objects)))
    if classes is not None:
        lines = [f"{synset_name(k)} {name}\n" for k, name in enumerate(classes)]
        (out / "synsets.txt").write_text("".join(lines), encoding="utf-8")
    if write_csv and solution:
        with open(out / "LOC_val_solution.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("ImageId", "PredictionString"), *sorted(solution)])
    return out


def coco_category_id(label: int) -> int:
    """COCO category id of class ``label``: 1, 3, 5, ... (gaps on purpose, like COCO's own 1..90 for 80)."""
    return 2 * label + 1


def export_coco(dataset: Dataset, out_dir: str | os.PathLike, n: int | None = None, fmt: str = "png") -> Path:
    """Write the first ``n`` samples (default: all) of ``dataset`` as COCO; returns the annotation file.

    Each scene becomes one image (id = index + 1) with one annotation of its class: ``segmentation`` =
    compressed RLE of its mask (``counts`` as str for JSON), ``bbox`` = its box as xywh, ``area`` = mask
    pixels, ``iscrowd`` = 0.
    """
    out = Path(out_dir)
    n = len(dataset) if n is None else min(int(n), len(dataset))
    categories = [{"id": coco_category_id(k), "name": name, "supercategory": "fashion"}
                  for k, name in enumerate(dataset.classes)]
    images, annotations = [], []
    for i in range(n):
        sample = dataset[i]
        height, width = sample["image"].shape[1:]
        file_name = f"{i:08d}{FORMATS[fmt][0]}"
        _save(sample["image"], out / "images" / file_name, fmt)
        images.append({"id": i + 1, "file_name": file_name, "width": int(width), "height": int(height)})
        rle = mask_utils.encode(np.asfortranarray(sample["mask"][0].numpy().astype(np.uint8)))
        for x1, y1, x2, y2 in _int_boxes(sample["boxes"]):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1,
                "category_id": coco_category_id(int(sample["label"])),
                "segmentation": {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)), "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0})
    path = out / "annotations" / "instances.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path
