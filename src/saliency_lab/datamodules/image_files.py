"""A user's own image files as black-box inputs (``explain.py``): discovery, safe output names, decoding,
the resize rule, and what a trained model records about its inputs (size, class names).

Discovery (:func:`collect_images`): every input is a file (taken whatever its suffix) or a folder, walked
recursively for files with an image suffix (``common.IMAGE_EXTENSIONS``); hidden files and folders (a
leading ``.``: ``.git``, macOS ``._x.jpg`` resource forks) and the output folder are skipped, symlinked
folders are not followed. Each file gets a *relative* path: relative to the common folder of the inputs
(the folder itself for one folder, the files' folder for a list of files), so ``--images a b`` keeps
``a/...`` and ``b/...`` apart.

Output names (:func:`output_stem`): the relative path is mirrored under the output folder, each part
sanitised: characters other than letters, digits and ``. _ + -`` become ``_``, leading dots are dropped
(no hidden files, no ``..``), long names are shortened; a part that had to change gets 8 hex digits of
its original's SHA-1, so two names that sanitise alike (``a b.jpg``, ``a_b.jpg``) stay apart. The result
never leaves the output folder (:func:`inside`).

Decoding and modes: ``common.load_rgb`` with EXIF orientation applied (the image as viewers show it):
greyscale is replicated to three channels, palette images map through their palette, alpha is dropped
(the stored colours are kept, not composited), CMYK uses PIL's formula, 16-bit greyscale keeps its high
8 bits. Files above ``max_pixels`` (decompression bombs), truncated files and non-images are *bad*:
:class:`ImageFiles` returns them as ``{"index", "problem"}`` instead of failing, so a run can go on.

The resize rule (:func:`resize_to_input`): the whole image is resized to the black box's S x S input
(bilinear with antialiasing, PIL, on 8-bit RGB, as the datamodules resize), ignoring the aspect ratio.
No pixel is cropped away or padded in, so every original pixel gets a saliency value when the S x S map
is resized back to H x W (bilinear); the price is a stretched view of non-square images, which CNNs
trained with scale augmentation tolerate better than missing borders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from saliency_lab.core.resources import current_class_path

from .common import IMAGE_EXTENSIONS, BadImageError, is_image_file, load_rgb, rgb_to_tensor

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # 89.5 M pixels: where PIL starts warning about bombs
_UNSAFE = re.compile(r"[^\w.+-]")  # \w: unicode letters, digits, _
_MAX_PART = 120  # characters of a sanitised name part; suffixes such as ".overlay.png" are added after


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """One input file: ``path`` as found on disk, ``relative`` its POSIX path below the inputs' root."""

    path: str
    relative: str

    @property
    def seed_index(self) -> int:
        """A per-file integer in [0, 2**31) for the explainers' per-image seeds: it depends on the relative
        path only, so a file's map does not change with the batch, the process or the other files."""
        return zlib.crc32(self.relative.encode("utf-8", "surrogateescape")) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------------
# Discovery and names


def _walk(folder: str, exclude: str | None) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(folder):  # followlinks=False: no loops through symlinked folders
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (exclude is None or os.path.abspath(os.path.join(parent, d)) != exclude))
        found += [os.path.join(parent, f) for f in sorted(files) if not f.startswith(".") and is_image_file(f)]
    return found


def collect_images(inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None) -> list[ImageFile]:
    """The image files of ``inputs`` (files and folders, see the module docstring), sorted by relative path,
    each once. ``exclude``: a folder never entered (the output folder, which may lie inside an input).

    Raises:
        FileNotFoundError: an input does not exist, or no image file was found.
    """
    if not inputs:
        raise FileNotFoundError("no input given: pass image files or folders")
    exclude = os.path.abspath(exclude) if exclude is not None else None
    files, anchors = [], []
    for item in map(os.fspath, inputs):
        if os.path.isdir(item):
            anchors.append(os.path.abspath(item))
            files += _walk(item, exclude)
        elif os.path.isfile(item):
            anchors.append(os.path.dirname(os.path.abspath(item)))
            files.append(item)
        else:
            raise FileNotFoundError(f"--images: {item} is neither a file nor a folder")
    root = os.path.commonpath(anchors)
    unique = {os.path.abspath(f): f for f in files}
    found = [ImageFile(f, Path(os.path.relpath(a, root)).as_posix()) for a, f in unique.items()]
    if not found:
        raise FileNotFoundError(f"no image files (suffixes {', '.join(IMAGE_EXTENSIONS)}) in "
                                f"{', '.join(map(os.fspath, inputs))}")
    return sorted(found, key=lambda f: f.relative)


def safe_part(name: str) -> str:
    """One path part made safe as a file name (rules in the module docstring)."""
    clean = _UNSAFE.sub("_", name).lstrip(".") or "_"
    if clean != name or len(clean) > _MAX_PART:
        digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        stem, suffix = os.path.splitext(clean)
        suffix = suffix if len(suffix) <= 10 else ""
        clean = f"{stem[:_MAX_PART - 9 - len(suffix)]}-{digest}{suffix}"
    return clean


def output_stem(relative: str) -> str:
    """The sanitised relative path (POSIX) that a file's outputs are named after (``STEM.map.png`` ...)."""
    return "/".join(safe_part(part) for part in relative.split("/") if part not in ("", "."))


def inside(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when ``path`` resolves (symlinks followed) to a place inside ``folder``."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


# ---------------------------------------------------------------------------------------------------------
# Decoding and resizing


def resize_to_input(image: Image.Image, size: int) -> torch.Tensor:
    """8-bit RGB PIL image (any W x H) -> (3, size, size) float32 in [0, 1] (the resize rule above)."""
    return rgb_to_tensor(image.resize((size, size), Image.Resampling.BILINEAR))


class ImageFiles(Dataset):
    """Image files decoded for a black box with S x S inputs.

    ``dataset[i]`` is ``{"index": i, "image": (3,S,S) float32 in [0,1], "original": (H,W,3) uint8}`` (the
    decoded full-size RGB image, for overlays), or ``{"index": i, "problem": str}`` for a bad file.

    Args:
        files: the inputs (:func:`collect_images`).
        size: S, the black box's input side.
        max_pixels: larger images are bad files (default: ``PIL.Image.MAX_IMAGE_PIXELS``).
    """

    def __init__(self, files: Sequence[ImageFile], size: int, max_pixels: int = DEFAULT_MAX_PIXELS):
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        self.files, self.size, self.max_pixels = list(files), int(size), int(max_pixels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            image = load_rgb(self.files[i].path, orient=True, max_pixels=self.max_pixels)
        except BadImageError as err:
            cause = err.__cause__ or err
            return {"index": i, "problem": f"{type(cause).__name__}: {cause}"}
        return {"index": i, "image": resize_to_input(image, self.size),
                "original": torch.from_numpy(np.array(image, dtype=np.uint8))}


def collate_files(samples: list[dict]) -> dict:
    """Batch of :class:`ImageFiles` samples: ``image`` (B,3,S,S) and ``index`` (B,) of the good files,
    ``original`` a list of B (H,W,3) uint8 tensors, ``bad`` a list of (index, problem) of the bad ones."""
    good = [s for s in samples if "problem" not in s]
    if good:
        images = torch.stack([s["image"] for s in good])
    else:  # a batch of bad files only: an empty batch of the right shape
        images = torch.empty(0, 3, 0, 0)
    return {"image": images, "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
            "original": [s["original"] for s in good],
            "bad": [(s["index"], s["problem"]) for s in samples if "problem" in s]}


# ---------------------------------------------------------------------------------------------------------
# What a trained model records about its inputs


def training_data(checkpoint: dict | None) -> dict:
    """The datamodule hyper-parameters a Lightning checkpoint recorded (``{}`` when there are none)."""
    record = (checkpoint or {}).get("datamodule_hyper_parameters") if isinstance(checkpoint, dict) else None
    return dict(record) if isinstance(record, dict) else {}


def recorded_input_size(checkpoints: Sequence[dict | None], spec: str) -> int | None:
    """The input side S a model was trained at: the ``image_size`` of the training data recorded in one of
    ``checkpoints`` (a predictor's or a classifier's Lightning checkpoint), an ``input_size`` in a black-box
    record, else the default of the architecture ``spec`` for ``timm:``/``torchvision:`` specs (timm's
    ``pretrained_cfg["input_size"]``, 224 for torchvision). None when unknown (a bare ``ckpt:`` record)."""
    for checkpoint in checkpoints:
        for value in (training_data(checkpoint).get("image_size"),
                      (checkpoint or {}).get("input_size") if isinstance(checkpoint, dict) else None):
            if value is not None:
                return int(value[-1] if isinstance(value, (list, tuple)) else value)
    kind, _, name = spec.partition(":")
    if kind == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        return int(cfg.input_size[-1]) if cfg is not None else None
    if kind == "torchvision":
        return 224
    return None


def recorded_class_names(checkpoints: Sequence[dict | None], num_classes: int) -> list[str] | None:
    """Human-readable names of the ``num_classes`` classes, where a checkpoint tells them: the
    ``class_names`` (else ``classes``) of the datamodule it was trained on, rebuilt from its recorded
    hyper-parameters (project datamodules ``saliency_lab.datamodules.*`` only: nothing else is imported; one that cannot
    be rebuilt here, e.g. ImageNet without its folder, is skipped); else timm's bundled ImageNet-1k
    descriptions for a 1000-class model. None when unknown."""
    import importlib

    for checkpoint in checkpoints:
        record = training_data(checkpoint)
        module, _, name = current_class_path(record.pop("_class_path", "")).rpartition(".")
        if module != "saliency_lab.datamodules" and not module.startswith("saliency_lab.datamodules."):
            continue
        kwargs = {k: v for k, v in record.items() if not k.startswith("_")}
        try:
            data = getattr(importlib.import_module(module), name)(**kwargs)
        except Exception:  # noqa: BLE001 (names are a nicety: any failure means "unknown")
            continue
        names = getattr(data, "class_names", None) or getattr(data, "classes", None)
        if isinstance(names, (list, tuple)) and len(names) == num_classes:
            return [str(n) for n in names]
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(k) for k in range(1000)]
    return None


def read_class_names(path: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names from a text file, line k = the name of class k (blank lines are errors, so no class shifts)."""
    names = Path(path).read_text(encoding="utf-8").splitlines()
    while names and not names[-1].strip():
        names.pop()
    if len(names) != num_classes or not all(n.strip() for n in names):
        raise ValueError(f"{path}: expected {num_classes} non-empty lines (one class name per line), got "
                         f"{len(names)} lines")
    return [n.strip() for n in names]
