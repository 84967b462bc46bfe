"""ImageNet (ILSVRC-2012 CLS-LOC) from its usual on-disk layouts, as a Dataset and a LightningDataModule.

Layout under ``root``::

    train/<synset>/*.JPEG       training images in class folders
    val/<synset>/*.JPEG         validation images in class folders (as after the usual "valprep" script), or
    val/*.JPEG                  the flat official / Kaggle layout: labels then come from the box annotations
    val_boxes/<stem>.xml        one Pascal-VOC XML per val image (ILSVRC ``Annotations/CLS-LOC/val``), or
    LOC_val_solution.csv        Kaggle: ``ImageId,PredictionString``, "synset xmin ymin xmax ymax synset ..."
    synsets.txt                 optional "synset name" lines (or Kaggle's ``LOC_synset_mapping.txt``)

Other locations are passed as ``annotations`` (an XML folder or a CSV file) and ``classes``.

Classes: index k is the k-th synset of, in this order of precedence, ``classes`` (a list of synsets or a
file of "synset [name]" lines), a synset file in ``root`` (the dataset's own declaration of its classes,
which also covers classes missing from a partial copy), or the sorted class folders of ``train/`` (``val/``
when there is no ``train/``), like torchvision's ImageFolder. Every split uses that one mapping; a class
folder or an annotated synset outside it is an error, not a silently dropped class.

Boxes: ImageNet's coordinates are 0-based pixel indices with xmax/ymax *inclusive* (xmin can be 0, xmax at
most width-1); they become this project's xyxy with x2 = xmax + 1 (exclusive), clipped to the image. When
an XML's ``<size>`` differs from the decoded image (a resized copy of ImageNet), boxes are rescaled.

Decoding and resizing: two independent options. ``decoder`` picks the JPEG decoder: ``"torchvision"``
(default: ``torchvision.io.decode_jpeg`` for RGB and grayscale JPEGs, Pillow for everything else and for every
file torchvision refuses, see ``common.load_rgb_uint8``) or ``"pil"`` (``PIL.Image.open(path).convert("RGB")``
through ``common.load_rgb``). ``resize`` picks where the crop, resize and flip run: ``"tensor"`` (default:
``torchvision.transforms.v2`` on the (3,H,W) uint8 tensor, bilinear with ``antialias=True``) or ``"pil"`` (the
same v2 transforms on the PIL image, i.e. Pillow's bilinear resize). ``decoder="pil", resize="pil"`` is what
this module did before the options; the defaults load faster (docs/results/data_loading.md). torchvision 0.29
deprecates its image decoders in favour of TorchCodec: should a later torchvision drop ``decode_jpeg``,
``decoder="torchvision"`` fails at construction saying so, and ``decoder="pil"`` is the way on.
Every choice gives the same pixels as ``decoder="pil", resize="pil"`` within ``PIXEL_TOLERANCE`` (in [0,1]
units, the final float images for the same files and the same crop parameters): largest absolute difference
at most 2/255, mean absolute difference at most 0.1/255. Why these bounds: the two decoders are the same
libjpeg-turbo (same IDCT, same chroma upsampling) and agree exactly on the JPEGs both take; the two resize
paths compute Pillow's antialiased bilinear filter in fixed point and differ only by rounding, one 8-bit level
on under 1% of the values (measured: docs/results/data_loading.md). The max bound leaves one level of headroom
over that; the mean bound sits well above the measured rounding and well below the coding error of the JPEG
files themselves (0.58/255 on the quality-95 files there). A resize without antialiasing fails both (13/255
max, 0.16/255 mean on a 500 x 375 file). ``tests/test_imagenet_loading.py`` checks the bounds.
"""
from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from PIL import Image

from .common import (DECODERS, IMAGE_EXTENSIONS, SplitDataModule, _check_option, boxes_to_mask, drop_bad_images,
                     is_image_file, load_rgb, load_rgb_uint8, rgb_to_tensor, torchvision_jpeg_problem)

SPLITS = ("train", "val")
SYNSET_FILES = ("synsets.txt", "LOC_synset_mapping.txt")
DEFAULT_ANNOTATIONS = ("val_boxes", "LOC_val_solution.csv")  # looked up in root, in this order
RESIZERS = ("tensor", "pil")
PIXEL_TOLERANCE = {"max_abs": 2 / 255, "mean_abs": 0.1 / 255}
"""Largest and mean absolute difference in [0,1] allowed between the images of two decoder/resize choices."""

Objects = list[tuple[str, list[float]]]
"""(synset, [x1, y1, x2, y2]) per annotated object, in the annotation's pixel grid, x2/y2 exclusive."""


# --- classes -----------------------------------------------------------------------------------------------

def read_synset_file(path: str | os.PathLike) -> dict[str, str]:
    """Ordered {synset: name} from lines "synset [name ...]" (blank lines and ``#`` comments skipped)."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            synset, _, name = line.partition(" ")
            if synset in out:
                raise ValueError(f"{path}: synset {synset!r} is listed twice")
            out[synset] = name.strip() or synset
    if not out:
        raise ValueError(f"{path}: no synsets in the file")
    return out


def _class_folders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir()) if folder.is_dir() else []


def resolve_classes(root: str | os.PathLike, classes: Sequence[str] | str | os.PathLike | None = None
                    ) -> tuple[list[str], list[str]]:
    """The class order (synsets) and their human-readable names (precedence: see the module docstring).

    Names come from the ``classes`` file, else from a synset file in ``root``; a synset without a known
    name is its own name.
    """
    root = Path(root)
    names = next((read_synset_file(root / f) for f in SYNSET_FILES if (root / f).is_file()), {})
    if isinstance(classes, (str, os.PathLike)):
        names = read_synset_file(classes)
        synsets = list(names)
    elif classes is not None:
        synsets = [str(c) for c in classes]
    else:
        synsets = list(names) or _class_folders(root / "train") or _class_folders(root / "val")
    if not synsets:
        raise FileNotFoundError(f"{root}: no {' or '.join(SYNSET_FILES)} and no class folders in train/ or val/;"
                                f" pass classes=[synset, ...] or classes=<file of 'synset name' lines>")
    if len(set(synsets)) != len(synsets):
        raise ValueError(f"classes for {root} contain duplicates: {synsets}")
    return synsets, [names.get(s, s) for s in synsets]


# --- box annotations ---------------------------------------------------------------------------------------

def _inclusive_to_xyxy(xmin: float, ymin: float, xmax: float, ymax: float) -> list[float]:
    return [xmin, ymin, xmax + 1, ymax + 1]


def read_voc_xml(path: str | os.PathLike) -> tuple[tuple[int, int] | None, Objects]:
    """Pascal-VOC XML -> ((width, height) from ``<size>``, or None if absent/zero; objects)."""
    try:
        root = ET.parse(path).getroot()
        width, height = (int(float(root.findtext(f"size/{k}") or 0)) for k in ("width", "height"))
        objects = []
        for obj in root.iter("object"):
            coords = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            objects.append((obj.findtext("name").strip(), _inclusive_to_xyxy(*coords)))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable Pascal-VOC annotation ({type(err).__name__}: {err})") from err
    return ((width, height) if width > 0 and height > 0 else None), objects


def read_loc_csv(path: str | os.PathLike) -> dict[str, Objects]:
    """Kaggle ``LOC_val_solution.csv`` -> {image stem: objects}."""
    table: dict[str, Objects] = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: expected the header 'ImageId,PredictionString', got {header}")
        for line_no, row in enumerate(rows, start=2):
            if not row:
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if len(tokens) % 5:
                raise ValueError(f"{path}, line {line_no}: PredictionString must be groups of "
                                 f"'synset xmin ymin xmax ymax', got {row[1:]!r}")
            try:
                objects = [(tokens[k], _inclusive_to_xyxy(*map(float, tokens[k + 1:k + 5])))
                           for k in range(0, len(tokens), 5)]
            except ValueError as err:
                raise ValueError(f"{path}, line {line_no}: bad box coordinate ({err})") from err
            table.setdefault(row[0].strip(), []).extend(objects)
    return table


class BoxAnnotations:
    """Per-image boxes from a folder of Pascal-VOC XML files (each read when needed) or a Kaggle CSV
    (read once). ``lookup(stem)`` -> ((width, height) or None, objects), or None if the image has none."""

    def __init__(self, source: str | os.PathLike):
        self.source = Path(source)
        if self.source.is_dir():
            self._table = None
        elif self.source.is_file():
            self._table = read_loc_csv(self.source)
        else:
            raise FileNotFoundError(f"{self.source}: box annotations not found (expected a folder of Pascal-VOC "
                                    f"XML files or a LOC_val_solution.csv file)")

    @classmethod
    def find(cls, root: str | os.PathLike) -> BoxAnnotations | None:
        """The first of ``DEFAULT_ANNOTATIONS`` that exists in ``root``, else None."""
        for name in DEFAULT_ANNOTATIONS:
            if (Path(root) / name).exists():
                return cls(Path(root) / name)
        return None

    def lookup(self, stem: str) -> tuple[tuple[int, int] | None, Objects] | None:
        if self._table is not None:
            objects = self._table.get(stem)
            return None if objects is None else (None, objects)
        xml = self.source / f"{stem}.xml"
        return read_voc_xml(xml) if xml.is_file() else None


# --- the dataset -------------------------------------------------------------------------------------------

def check_decoding(decoder: str, resize: str) -> None:
    """``ValueError`` for an unknown ``decoder`` or ``resize``; ``RuntimeError`` when ``decoder="torchvision"``
    cannot work here (torchvision's image extension did not load)."""
    _check_option("decoder", decoder, DECODERS)
    _check_option("resize", resize, RESIZERS)
    if decoder == "torchvision" and (problem := torchvision_jpeg_problem()):
        raise RuntimeError(f"decoder='torchvision' needs torchvision.io.decode_jpeg, which fails here ({problem});"
                           f" use decoder='pil'")


class ImageNetFolder(Dataset):
    """One ImageNet split. ``dataset[i]`` is a sample dict (see ``datamodules.common``).

    Samples: ``image`` (3,S,S) float32 in [0,1] (8-bit levels, RGB: see ``common.load_rgb`` for grayscale,
    CMYK, alpha and palette files), ``label`` () long, ``mask`` (1,S,S) bool = union of the image's boxes
    of its *own* class, ``boxes`` (K,4) float32 xyxy px (x2, y2 exclusive; boxes cropped away entirely
    are dropped), ``index`` () long = position in this dataset.

    Geometry. val: standard ImageNet evaluation — resize the shorter side to
    ``int(image_size / crop_fraction)`` (256 for 224), centre-crop ``image_size``; boxes follow the same
    resize and crop. train: ``RandomResizedCrop(image_size, scale=train_scale)`` + horizontal flip (torch's
    global RNG, which the DataLoader seeds per worker); train samples carry NO ground truth: boxes (0,4)
    and an all-False mask, since only evaluation uses it. Val images without annotations (or without any
    box of their class) get the same empty ground truth.

    Bad files: every file with an image suffix (``common.IMAGE_EXTENSIONS``) is a candidate; other files
    are ignored. At construction ``verify`` checks candidates (see ``common.drop_bad_images``): "quick"
    (default; two tiny reads per JPEG/PNG, a decode for anything suspicious — finds truncated files and
    non-images named .JPEG), "full" (decode everything) or "off". ``on_error="skip"`` drops bad files with
    ONE ``BadImageWarning`` naming them; ``"raise"`` fails with ``BadImageError`` naming the file. A file
    that breaks after the check fails in ``__getitem__`` with ``BadImageError`` naming it.

    Args:
        root: dataset root (layout in the module docstring).
        split: "train" or "val".
        image_size: output side S.
        classes: class order: a list of synsets or a "synset [name]" file (default: module docstring).
        annotations: val boxes: a folder of ``<stem>.xml`` or a ``LOC_val_solution.csv``
            (default for val: ``root/val_boxes`` or ``root/LOC_val_solution.csv`` if present). Also the
            source of labels for images lying directly in ``root/<split>`` (flat layout).
        crop_fraction: val centre-crop fraction in (0, 1]; 1 resizes the shorter side straight to S.
        train_scale: area range of RandomResizedCrop.
        verify, on_error, scan_workers: the bad-file check (above); scan_workers = threads.
        decoder: "pil" or "torchvision", the JPEG decoder (module docstring).
        resize: "tensor" or "pil", where crop, resize and flip run (module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        image_size: int = 224,
        classes: Sequence[str] | str | os.PathLike | None = None,
        annotations: str | os.PathLike | None = None,
        crop_fraction: float = 0.875,
        train_scale: tuple[float, float] = (0.08, 1.0),
        verify: str = "quick",
        on_error: str = "skip",
        scan_workers: int = 8,
        decoder: str = "torchvision",
        resize: str = "tensor",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        check_decoding(decoder, resize)
        self.decoder, self.resize = decoder, resize
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self.root, self.split, self.image_size = Path(root), split, int(image_size)
        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: ImageNet {split} folder not found")
        self.classes, self.class_names = resolve_classes(root, classes)
        self.num_classes = len(self.classes)
        if annotations is not None:
            self.annotations = BoxAnnotations(annotations)
        else:  # train images are in class folders and carry no boxes: no need to read the val files
            self.annotations = BoxAnnotations.find(root) if split == "val" else None
        samples = self._list_images(folder)
        if not samples:
            raise FileNotFoundError(f"{folder}: no image files found (suffixes {', '.join(IMAGE_EXTENSIONS)})")
        keep = drop_bad_images([p for p, _ in samples], verify, on_error, scan_workers,
                               where=f"ImageNet {split} split {folder}")
        self.samples = [samples[i] for i in keep]
        if split == "train":
            self.transform = v2.Compose([v2.RandomResizedCrop(self.image_size, scale=train_scale, antialias=True),
                                         v2.RandomHorizontalFlip()])
        else:
            self.transform = v2.Compose([v2.Resize(int(self.image_size / crop_fraction), antialias=True),
                                         v2.CenterCrop(self.image_size)])

    def _list_images(self, folder: Path) -> list[tuple[str, int]]:
        """(path, label) of every candidate: class folders give the label, loose files take it from the
        annotations (flat layout). Sorted by path, so the order is the same on every machine."""
        index = {s: k for k, s in enumerate(self.classes)}
        samples = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir():
                if entry.name not in index:
                    raise ValueError(f"{entry.path}: class folder {entry.name!r} is not one of the "
                                     f"{len(index)} classes (from `classes`, a synset file or the train folders)")
                files = sorted(f.name for f in os.scandir(entry.path) if f.is_file() and is_image_file(f.name))
                samples += [(os.path.join(entry.path, f), index[entry.name]) for f in files]
            elif is_image_file(entry.name):
                samples.append((entry.path, self._annotated_label(entry.path, index)))
        return samples

    def _annotated_label(self, path: str, index: dict[str, int]) -> int:
        found = self.annotations.lookup(Path(path).stem) if self.annotations is not None else None
        if not found or not found[1]:
            source = self.annotations.source if self.annotations is not None else "no annotations found"
            raise ValueError(f"{path}: image is not in a class folder and has no box annotation to take "
                             f"its label from ({source})")
        synset = found[1][0][0]  # ImageNet annotates only the image's own class
        if synset not in index:
            raise ValueError(f"{path}: annotated synset {synset!r} is not one of the {len(index)} classes")
        return index[synset]

    def own_boxes(self, i: int, width: int, height: int) -> torch.Tensor:
        """(K,4) float32 xyxy boxes of sample i's own class in the decoded image's pixels (W x H)."""
        path, label = self.samples[i]
        found = self.annotations.lookup(Path(path).stem) if self.annotations is not None else None
        if not found:
            return torch.zeros(0, 4)
        size, objects = found
        boxes = torch.tensor([box for synset, box in objects if synset == self.classes[label]],
                             dtype=torch.float32).reshape(-1, 4)
        if size is not None and size != (width, height):  # annotation made on a differently sized copy
            boxes *= torch.tensor([width / size[0], height / size[1]] * 2)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return boxes

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Image.Image | torch.Tensor:
        """The decoded file as the resize path wants it: an 8-bit RGB PIL image (``resize="pil"``) or a
        (3,H,W) uint8 tensor (``resize="tensor"``); ``BadImageError`` naming the file if it cannot be decoded."""
        if self.resize == "pil":
            if self.decoder == "pil":
                return load_rgb(path)
            return Image.fromarray(load_rgb_uint8(path, self.decoder).permute(1, 2, 0).numpy())
        return load_rgb_uint8(path, self.decoder)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        image = self.load(path)
        size = self.image_size
        if self.split == "train":
            image, boxes = self.transform(image), torch.zeros(0, 4)
        else:
            height, width = image.shape[-2:] if isinstance(image, torch.Tensor) else (image.height, image.width)
            boxes = tv_tensors.BoundingBoxes(self.own_boxes(i, width, height), format="XYXY",
                                             canvas_size=(height, width))
            image, boxes = self.transform(image, boxes)  # the crop clips boxes to the output canvas
            boxes = boxes.as_subclass(torch.Tensor)
            boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        image = image.float().div_(255).contiguous() if isinstance(image, torch.Tensor) else rgb_to_tensor(image)
        return {"image": image, "label": torch.tensor(label), "mask": boxes_to_mask(boxes, size, size),
                "boxes": boxes, "index": torch.tensor(i)}


# --- the datamodule ----------------------------------------------------------------------------------------

class ImageNetDataModule(SplitDataModule):
    """ImageNet train/val loaders (test and predict = val); batches as in ``datamodules.common``.

    ``classes`` (synsets) and ``num_classes`` are known right after construction (from the folders or the
    ``classes`` argument), so configs can link them into models. Each process builds its own datasets in
    ``setup`` (so each rank runs the bad-file check); Lightning adds the DistributedSampler under DDP.

    Args:
        root: dataset root (see ``datamodules.imagenet``).
        image_size: output side.
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader workers.
        classes: class order (list of synsets or a synset file); default: root's synset file, else the
            sorted train class folders.
        val_annotations: val boxes (XML folder or ``LOC_val_solution.csv``); default: found in root.
        verify, on_error: the bad-file check, see ``ImageNetFolder``.
        crop_fraction, train_scale: geometry, see ``ImageNetFolder``.
        decoder, resize: "pil" | "torchvision" JPEG decoder and "tensor" | "pil" resize path (defaults and the
            pixel tolerance between them: the module docstring).
    """

    test_split = "val"  # test/predict read the labelled val split

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 8,
        classes: list[str] | str | None = None,
        val_annotations: str | None = None,
        verify: str = "quick",
        on_error: str = "skip",
        crop_fraction: float = 0.875,
        train_scale: tuple[float, float] = (0.08, 1.0),
        decoder: str = "torchvision",
        resize: str = "tensor",
    ):
        super().__init__()
        check_decoding(decoder, resize)
        self.save_hyperparameters()
        self.classes, self.class_names = resolve_classes(root, classes)
        self.num_classes = len(self.classes)
        self.datasets: dict[str, ImageNetFolder] = {}

    def dataset(self, split: str) -> ImageNetFolder:
        if split not in self.datasets:
            hp = self.hparams
            self.datasets[split] = ImageNetFolder(
                hp.root, split, hp.image_size, classes=self.classes,
                annotations=hp.val_annotations if split == "val" else None,
                crop_fraction=hp.crop_fraction, train_scale=hp.train_scale, verify=hp.verify,
                on_error=hp.on_error, decoder=hp.decoder, resize=hp.resize)
        return self.datasets[split]

