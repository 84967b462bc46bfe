"""COCO instance annotations (via pycocotools) as a saliency Dataset and LightningDataModule.

A sample is one (image, category) pair: every category with at least one non-crowd instance in an image
gives that image one sample whose target is the category, so an image with a person and a dog is
explained twice. Ground truth = that category's instances only.

Crowd annotations (``iscrowd=1``, one RLE region around a group of objects): a category present *only* as
a crowd gives no sample (COCO's own evaluation does not count crowds as objects), but with
``merge_crowd=True`` (default) a crowd region of the sample's category joins its mask and boxes, because
the region does show that class and saliency there is not a localisation error.

Classes: contiguous indices 0..K-1 in the order of sorted category ids (COCO's 80 ids span 1..90), over
all categories of the JSON or over the ``categories`` selected (ids or names).

Geometry: images are resized straight to ``image_size`` x ``image_size`` (bilinear, antialiased), masks
with nearest neighbour, boxes scaled per axis. Deliberately no crop: evaluation must keep objects near the
borders; the price is a changed aspect ratio. Masks and boxes are rasterised in the JSON's
``width``/``height`` and scaled from there, the image from its decoded size, so the two agree even if the
files were resized after annotation.

Validation (hostile or careless JSON files): a structurally broken file (no ``images``/``annotations``/
``categories`` lists, entries without ``id``/``image_id``/``category_id``, duplicate ids, annotations of
unknown images) raises ``ValueError`` naming the file. Field values are checked one by one: an image needs
a ``file_name`` inside ``image_dir`` (relative, without ``..``) and a positive ``width``/``height`` below
``MAX_SIDE`` and ``common.max_image_pixels()``; an annotation needs a ``bbox`` of 4 finite numbers with
positive size, a ``segmentation`` that is empty, polygons (lists of >= 6 finite numbers, even length) or
an RLE of the image's size, and ``iscrowd`` 0 or 1. A sample touched by an invalid field is skipped, and
one ``BadAnnotationWarning`` counts them and names the JSON file, the annotation ids and the reasons
(``on_error="raise"``: ``ValueError`` at the first one). Files of skipped images are never opened.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from .common import SplitDataModule, boxes_to_mask, drop_bad_images, load_rgb, max_image_pixels, rgb_to_tensor

_MAX_NAMED = 10  # missing files / invalid annotations named in a message; the rest are counted
MAX_SIDE = 65_535  # JPEG's own limit on a side; a larger width/height in the JSON is corrupt


class BadAnnotationWarning(UserWarning):
    """COCO samples with invalid annotation fields were skipped (the message counts them, names the JSON
    file, the annotation or image ids and the reasons)."""


def read_annotation_json(path: str | os.PathLike) -> dict:
    """Parse a COCO instances JSON, with errors that name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: COCO annotation file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{path}: not a COCO instances file (no '{key}' list)")
    required = {"images": ("id",), "annotations": ("id", "image_id", "category_id"), "categories": ("id", "name")}
    for key, fields in required.items():
        seen = set()
        for position, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise ValueError(f"{path}: {key}[{position}] has no {', '.join(repr(f) for f in missing)}")
            if not isinstance(entry["id"], (int, str)) or isinstance(entry["id"], bool):
                raise ValueError(f"{path}: {key}[{position}] has id {entry['id']!r}, expected an int or a string")
            if entry["id"] in seen:
                raise ValueError(f"{path}: {key} id {entry['id']!r} appears twice")
            seen.add(entry["id"])
    return data


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def image_entry_problem(info: dict) -> str | None:
    """Why an ``images`` entry cannot be used (its file is then never opened), or None."""
    name = info.get("file_name")
    if not isinstance(name, str) or not name or "\0" in name:
        return f"file_name {name!r} is not a file name"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return f"file_name {name!r} is an absolute path; it must lie inside image_dir"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return f"file_name {name!r} climbs out of image_dir with '..'"
    for key in ("width", "height"):
        value = info.get(key)
        if not _is_number(value) or value != int(value) or not 0 < value <= MAX_SIDE:
            return f"{key} {value!r} is not an integer in [1, {MAX_SIDE}]"
    if info["width"] * info["height"] > max_image_pixels():
        return (f"width x height = {info['width']} x {info['height']} exceeds the limit of {max_image_pixels():,} "
                "pixels (PIL.Image.MAX_IMAGE_PIXELS)")
    return None


def _segmentation_problem(segmentation, height: int, width: int) -> str | None:
    if not segmentation:
        return None  # no mask: the box stands in for it
    if isinstance(segmentation, list):
        for k, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return f"segmentation polygon {k} is not a list of >= 3 (x, y) pairs"
            if not all(_is_number(v) for v in polygon):
                return f"segmentation polygon {k} holds a value that is not a finite number"
        return None
    if isinstance(segmentation, dict):
        counts, size = segmentation.get("counts"), segmentation.get("size")
        if not isinstance(size, list) or [int(v) if _is_number(v) else v for v in size] != [height, width]:
            return f"segmentation RLE size {size!r} is not the image's [height, width] = {[height, width]}"
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts) or \
                    sum(counts) != height * width:
                return "segmentation RLE counts are not non-negative run lengths covering the image"
        elif not isinstance(counts, str):
            return f"segmentation RLE counts must be a string or a list, got {type(counts).__name__}"
        return None
    return f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}"


def annotation_problem(ann: dict, info: dict) -> str | None:
    """Why an annotation's fields cannot be used (given its image entry ``info``, already valid), or None."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, width, height]"
    if not all(_is_number(v) for v in bbox):
        return f"bbox {bbox!r} holds a value that is not a finite number"
    if not (bbox[2] > 0 and bbox[3] > 0):
        return f"bbox {bbox!r} has no area (width and height must be > 0)"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd {ann.get('iscrowd')!r} is not 0 or 1"
    return _segmentation_problem(ann.get("segmentation"), int(info["height"]), int(info["width"]))


def select_categories(data: dict, categories: Sequence[int | str] | None, path: str | os.PathLike
                      ) -> tuple[list[int], list[str]]:
    """Sorted category ids and their names: all of the JSON's, or the ``categories`` given (ids or names)."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    if categories is None:
        ids = sorted(names)
    else:
        by_name = {name: cid for cid, name in names.items()}
        unknown = [c for c in categories if c not in names and c not in by_name]
        if unknown:
            raise ValueError(f"{path}: categories {unknown} are neither ids nor names of its categories")
        ids = sorted({c if c in names else by_name[c] for c in categories})
    if not ids:
        raise ValueError(f"{path}: no categories")
    return ids, [names[c] for c in ids]


def _coco_index(data: dict, path: str | os.PathLike) -> COCO:
    """A pycocotools COCO object over already-parsed data (its index printout silenced)."""
    image_ids = {img["id"] for img in data["images"]}
    orphans = [a.get("id") for a in data["annotations"] if a.get("image_id") not in image_ids]
    if orphans:
        raise ValueError(f"{path}: {len(orphans)} annotation(s) refer to image ids not in 'images' "
                         f"(annotation ids {orphans[:_MAX_NAMED]})")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCODetection(Dataset):
    """(image, category) samples of a COCO instances file; ``dataset[i]`` is a sample dict
    (``datamodules.common``).

    Samples: ``image`` (3,S,S) float32 in [0,1] (RGB: see ``common.load_rgb`` for grayscale, CMYK,
    alpha), ``label`` () long (contiguous class index), ``mask`` (1,S,S) bool = union of the category's
    instance masks (``COCO.annToMask``: polygons and RLE; an instance without segmentation uses its box),
    ``boxes`` (K,4) float32 xyxy px (COCO's xywh + scaling; x2/y2 exclusive), ``index`` () long.
    ``sample_ids[i]`` = (COCO image id, category id) of sample i. See the module docstring for crowds,
    classes and the resize.

    Construction fails with ``FileNotFoundError`` naming the files when the JSON references images missing
    from ``image_dir`` (any listed image, even one without annotations: a missing file means a broken copy);
    undecodable images that give samples are handled by ``verify``/``on_error`` as in ``ImageNetFolder``
    (``common.drop_bad_images``): skipped with one ``BadImageWarning``, or ``BadImageError``. Samples
    touched by an invalid annotation field (module docstring, "Validation") are skipped with one
    ``BadAnnotationWarning``, or ``ValueError`` with ``on_error="raise"``.

    Args:
        image_dir: folder the JSON's ``file_name`` entries are relative to.
        annotation_file: COCO instances JSON.
        image_size: output side S.
        categories: category ids or names to keep (default: all).
        merge_crowd: add crowd regions of the sample's category to its mask and boxes.
        verify, on_error, scan_workers: the bad-image check (``on_error`` also governs invalid annotations).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        image_size: int = 224,
        categories: Sequence[int | str] | None = None,
        merge_crowd: bool = True,
        verify: str = "quick",
        on_error: str = "skip",
        scan_workers: int = 8,
    ):
        self.image_dir, self.annotation_file = Path(image_dir), Path(annotation_file)
        self.image_size, self.merge_crowd = int(image_size), merge_crowd
        data = read_annotation_json(annotation_file)
        self.category_ids, self.classes = select_categories(data, categories, annotation_file)
        self.num_classes = len(self.classes)
        self.label_of = {cid: k for k, cid in enumerate(self.category_ids)}
        self.coco = _coco_index(data, annotation_file)
        bad_images, bad_anns = self._invalid_entries()
        candidates = [(img_id, cid) for img_id in sorted(self.coco.imgs) for cid in self._categories_in(img_id)]
        samples = [s for s in candidates if s[0] not in bad_images and not self._touches(s, bad_anns)]
        self._report_invalid(bad_images, bad_anns, len(candidates) - len(samples), on_error)
        self._check_exist(self.path(img_id) for img_id in sorted(self.coco.imgs) if img_id not in bad_images)
        paths = {img_id: self.path(img_id) for img_id, _ in samples}  # decoding is checked where it matters
        ids = list(paths)
        keep = drop_bad_images([paths[i] for i in ids], verify, on_error, scan_workers,
                               where=f"COCO images of {self.annotation_file}")
        good = {ids[k] for k in keep}
        self.sample_ids = [s for s in samples if s[0] in good]

    def _invalid_entries(self) -> tuple[dict, dict]:
        """({image id: reason}, {annotation id: reason}) of the entries whose fields cannot be used."""
        bad_images = {img_id: why for img_id, info in self.coco.imgs.items()
                      if (why := image_entry_problem(info)) is not None}
        bad_anns = {}
        for ann in self.coco.anns.values():
            if ann["image_id"] in bad_images or ann["category_id"] not in self.label_of:
                continue
            why = annotation_problem(ann, self.coco.imgs[ann["image_id"]])
            if why is not None:
                bad_anns[ann["id"]] = why
        return bad_images, bad_anns

    def _relevant(self, ann: dict, cat_id: int) -> bool:
        """Does the ground truth of a (image, cat_id) sample use this annotation of the image?"""
        return ann["category_id"] == cat_id and (self.merge_crowd or ann.get("iscrowd", 0) != 1)

    def _touches(self, sample: tuple[int, int], bad_anns: dict) -> bool:
        return any(a["id"] in bad_anns and self._relevant(a, sample[1]) for a in self.coco.imgToAnns.get(sample[0], []))

    def _report_invalid(self, bad_images: dict, bad_anns: dict, skipped: int, on_error: str) -> None:
        """One BadAnnotationWarning (or, with on_error="raise", a ValueError) naming the invalid entries."""
        problems = [f"image {i} ({self.coco.imgs[i].get('file_name')!r}): {why}" for i, why in bad_images.items()]
        problems += [f"annotation {a} (image {self.coco.anns[a]['image_id']}): {why}" for a, why in bad_anns.items()]
        if not problems:
            return
        if on_error == "raise":
            raise ValueError(f"{self.annotation_file}: invalid COCO annotation: {problems[0]} (pass on_error='skip' "
                             "to skip such samples with a warning)")
        more = f"; and {len(problems) - _MAX_NAMED} more" if len(problems) > _MAX_NAMED else ""
        warnings.warn(f"{self.annotation_file}: skipped {skipped} sample(s) with invalid annotations "
                      f"({len(problems)} invalid entries): {'; '.join(problems[:_MAX_NAMED])}{more}",
                      BadAnnotationWarning, stacklevel=3)

    def _categories_in(self, img_id: int) -> list[int]:
        anns = self.coco.imgToAnns.get(img_id, [])
        return sorted({a["category_id"] for a in anns if a.get("iscrowd", 0) != 1 and a["category_id"] in self.label_of})

    def path(self, img_id: int) -> str:
        return os.path.join(self.image_dir, self.coco.imgs[img_id]["file_name"])

    def _check_exist(self, paths) -> None:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
            raise FileNotFoundError(f"{self.annotation_file} references {len(missing)} image file(s) missing from "
                                    f"{self.image_dir}: {', '.join(missing[:_MAX_NAMED])}{more}")

    def ground_truth(self, img_id: int, cat_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask (1,h,w) bool and boxes (K,4) float32 xyxy of one category, in the JSON's image size."""
        info = self.coco.imgs[img_id]
        height, width = int(info["height"]), int(info["width"])
        anns = [a for a in self.coco.imgToAnns[img_id] if self._relevant(a, cat_id)]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        mask = torch.zeros(1, height, width, dtype=torch.bool)
        for ann, box in zip(anns, boxes):
            if ann.get("segmentation"):
                mask[0] |= torch.from_numpy(self.coco.annToMask(ann).astype(bool))
            else:  # box-only annotation: its box is the best mask there is
                mask |= boxes_to_mask(box[None], height, width)
        return mask, boxes

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> dict:
        img_id, cat_id = self.sample_ids[i]
        size = [self.image_size, self.image_size]
        image = TF.resize(load_rgb(self.path(img_id)), size)
        mask, boxes = self.ground_truth(img_id, cat_id)
        height, width = mask.shape[1:]
        mask = TF.resize(tv_tensors.Mask(mask), size).as_subclass(torch.Tensor)  # Mask -> nearest neighbour
        boxes = boxes * torch.tensor([size[1] / width, size[0] / height] * 2)
        return {"image": rgb_to_tensor(image), "label": torch.tensor(self.label_of[cat_id]), "mask": mask,
                "boxes": boxes, "index": torch.tensor(i)}


class COCODataModule(SplitDataModule):
    """COCO loaders; batches as in ``datamodules.common``. val is the main use (evaluation): test and
    predict use it too; train exists only when ``image_dir_train`` and ``annotations_train`` are given
    (same resize, no augmentation, same classes as val).

    ``classes`` (category names), ``category_ids`` and ``num_classes`` come from the val JSON at
    construction, so configs can link them into models.

    Args:
        image_dir_val, annotations_val: val images folder and instances JSON.
        image_dir_train, annotations_train: optional train counterparts.
        image_size: output side (images resized to a square, see ``datamodules.coco``).
        batch_size: samples per batch (per process under DDP).
        num_workers: DataLoader workers.
        categories: category ids or names to keep (default: all of the val JSON).
        merge_crowd, verify, on_error: see ``COCODetection``.
    """

    test_split = "val"  # test/predict read the labelled val split

    def __init__(
        self,
        image_dir_val: str,
        annotations_val: str,
        image_dir_train: str | None = None,
        annotations_train: str | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 8,
        categories: list[int | str] | None = None,
        merge_crowd: bool = True,
        verify: str = "quick",
        on_error: str = "skip",
    ):
        super().__init__()
        if (image_dir_train is None) != (annotations_train is None):
            raise ValueError("give both image_dir_train and annotations_train, or neither")
        self.save_hyperparameters()
        data = read_annotation_json(annotations_val)
        self.category_ids, self.classes = select_categories(data, categories, annotations_val)
        self.num_classes = len(self.classes)
        self.datasets: dict[str, COCODetection] = {}

    def dataset(self, split: str) -> COCODetection:
        if split not in self.datasets:
            hp = self.hparams
            if split == "train" and hp.annotations_train is None:
                raise ValueError("COCODataModule has no train split: pass image_dir_train and annotations_train")
            image_dir, annotations = ((hp.image_dir_train, hp.annotations_train) if split == "train"
                                      else (hp.image_dir_val, hp.annotations_val))
            self.datasets[split] = COCODetection(image_dir, annotations, hp.image_size, self.category_ids,
                                                 hp.merge_crowd, hp.verify, hp.on_error)
        return self.datasets[split]

    @property
    def has_train(self) -> bool:
        return self.hparams.annotations_train is not None
