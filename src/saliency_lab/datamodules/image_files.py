"""A user's own image files as black-box inputs (``explain.py``): discovery, safe output names, decoding,
the resize rule, and what a trained model records about its inputs (size, class names).

Discovery (:func:`find_images`, :func:`collect_images`): every input is a file (taken whatever its suffix)
or a folder, walked recursively for files with an image suffix (``common.IMAGE_EXTENSIONS``); hidden files
and folders (a leading ``.``: ``.git``, macOS ``._x.jpg`` resource forks), the output folder and every
folder holding a saliency-lab output record (a ``run.json`` with the key :data:`OUTPUT_MARKER`, which
``explain.py`` writes) are skipped, so one run never explains another run's maps; symlinked folders are
not followed. Only regular files are taken: a named pipe (FIFO), socket or device file with an image
suffix is never opened (opening a FIFO blocks forever) but *skipped and named*. A symlinked file is
followed only when its target lies inside the input folders, unless ``follow_symlinks`` (``explain.py
--follow_symlinks true``); one pointing elsewhere is skipped and named. Each file gets a *relative* path:
relative to the common folder of the inputs (the folder itself for one folder, the files' folder for a
list of files), so ``--images a b`` keeps ``a/...`` and ``b/...`` apart.

Output names (:func:`output_stem`): the relative path is mirrored under the output folder, each part
sanitised: characters other than letters, digits and ``. _ + -`` become ``_``, leading dots are dropped
(no hidden files, no ``..``), long names are shortened; a part that had to change gets 8 hex digits of
its original's SHA-1, so two names that sanitise alike (``a b.jpg``, ``a_b.jpg``) stay apart. The result
never leaves the output folder (:func:`inside`).

Decoding and modes (:func:`load_image`): EXIF orientation applied (the image as viewers show it);
greyscale is replicated to three channels, palette images map through their palette, alpha is dropped
(the stored colours are kept, not composited), CMYK uses PIL's formula, 16-bit greyscale (``I;16``) keeps
its high 8 bits. 32-bit images, integer (``I``) and float (``F``, e.g. float TIFFs), have no fixed white
level: they are scaled by their own range, min -> 0 and max -> 255 (a constant image is all 0), then
replicated like greyscale; a float image holding NaN or +-inf is a bad file ("non-finite pixel values").
Files whose header claims more than ``max_pixels`` (decompression bombs), truncated files, non-images and
files that are not regular files are *bad*: :class:`ImageFiles` returns them as ``{"index", "problem"}``
instead of failing, so a run can go on.

Memory: a JPEG is decoded at a reduced scale where its DCT allows it (PIL ``Image.draft``, 1/2 to 1/8)
when the reduced image is still at least as large as everything made from it (the saved map, see
:func:`map_size`); other formats are decoded at full size, bounded by ``max_pixels``. Decoding one image
holds at most about :data:`DECODE_BYTES_PER_PIXEL` bytes per pixel (PIL keeps RGB as 4 bytes a pixel;
the file's mode, the converted and the oriented copy, the uint8 array), so the default ``max_pixels`` of
:data:`DEFAULT_MAX_PIXELS` (89.5 M, PIL's own bomb threshold) costs at most 16 x 89.5 M = 1.4 GB per
decoding process (the main one and each ``num_workers`` worker); what a batch keeps (the S x S input and
the original at the saved map size, <= ``max_map_side``^2 x 3 bytes = 50 MB at 4096) does not grow with
the file, nor does writing a map (about 80 bytes a pixel of the saved map, the overlay's temporaries
included: 1.3 GB at 4096 x 4096). At the defaults (batch size 8, no workers) that is 1.4 + 8 x 0.05 + 1.3
< 3.5 GB; each worker adds 1.4 GB and its two prefetched batches (0.8 GB): a 24 GiB machine has room for
the black box and the explainer.

The saved map size (:func:`map_size`): the file's own W x H, or, when its longer side exceeds
``max_map_side``, W x H scaled down (aspect ratio kept, each side rounded, at least 1) so that the longer
side is ``max_map_side``.

The resize rule (:func:`resize_to_input`): the whole image is resized to the black box's S x S input
(bilinear with antialiasing, PIL, on 8-bit RGB, as the datamodules resize), ignoring the aspect ratio.
No pixel is cropped away or padded in, so every original pixel gets a saliency value when the S x S map
is resized back to H x W (bilinear); the price is a stretched view of non-square images, which CNNs
trained with scale augmentation tolerate better than missing borders.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from saliency_lab.core.resources import current_class_path

from .common import (IMAGE_EXTENSIONS, BadImageError, _quiet_bomb_warnings, _size_problem, is_image_file,
                     rgb_to_tensor)

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # 89.5 M pixels: where PIL starts warning about bombs
DECODE_BYTES_PER_PIXEL = 16  # the most bytes a pixel costs while one image is decoded (module docstring)
DEFAULT_MAX_MAP_SIDE = 4096  # the longest side of a saved map (module docstring: the saved map size)
OUTPUT_MARKER = "saliency_lab_output"  # a run.json key: the folder holding it is an output, never an input
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


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device file"),
          (stat.S_ISBLK, "a device file"), (stat.S_ISDIR, "a folder"))


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` (symlinks followed) is not opened as an image: it is missing or not a regular file
    (e.g. "a named pipe (FIFO)"); None for a regular file. Uses ``os.stat`` only: nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        return f"cannot be read ({type(err).__name__}: {err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"{kind}, not a regular file; never opened"


def is_output_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a saliency-lab output record: a ``run.json`` (a regular file) that is a JSON
    object with the key :data:`OUTPUT_MARKER`."""
    record = os.path.join(folder, "run.json")
    if not_a_regular_file(record) is not None:
        return False
    try:
        with open(record, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and OUTPUT_MARKER in value


def _symlink_problem(path: str, roots: Sequence[Path], follow_symlinks: bool) -> str | None:
    """Why the symlink ``path`` is not followed (its target lies outside every input folder), or None."""
    if follow_symlinks or not os.path.islink(path):
        return None
    target = Path(path).resolve()
    if any(target.is_relative_to(root) for root in roots):
        return None
    return (f"a symbolic link to {target}, outside the input folders; not followed (pass --follow_symlinks true "
            "to explain it)")


def _walk(folder: str, exclude: str | None, roots: Sequence[Path], follow_symlinks: bool
          ) -> tuple[list[str], list[tuple[str, str]]]:
    """(the image files under ``folder``, the (path, problem) of those skipped) by the discovery rules."""
    found, skipped = [], []
    for parent, dirs, files in os.walk(folder):  # followlinks=False: no loops through symlinked folders
        kept = []
        for d in sorted(dirs):
            path = os.path.join(parent, d)
            if d.startswith(".") or (exclude is not None and os.path.abspath(path) == exclude):
                continue
            if not os.path.islink(path) and is_output_folder(path):
                skipped.append((path, "a saliency-lab output folder (its run.json says so); not explained"))
                continue
            kept.append(d)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith(".") or not is_image_file(name):
                continue
            path = os.path.join(parent, name)
            problem = _symlink_problem(path, roots, follow_symlinks) or not_a_regular_file(path)
            if problem is None:
                found.append(path)
            else:
                skipped.append((path, problem))
    return found, skipped


def find_images(inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None,
                follow_symlinks: bool = False) -> tuple[list[ImageFile], list[tuple[str, str]]]:
    """The image files of ``inputs`` (files and folders, see the module docstring), sorted by relative path,
    each once, and the ``(path, problem)`` of the files and folders skipped (not regular files, symlinks
    leading outside the input folders, other runs' output folders). ``exclude``: a folder never entered
    (the output folder, which may lie inside an input).

    Raises:
        FileNotFoundError: an input does not exist, or no image file was found.
    """
    if not inputs:
        raise FileNotFoundError("no input given: pass image files or folders")
    exclude = os.path.abspath(exclude) if exclude is not None else None
    folders = [Path(item).resolve() for item in map(os.fspath, inputs) if os.path.isdir(item)]
    files, anchors, skipped = [], [], []
    for item in map(os.fspath, inputs):
        if os.path.isdir(item) and is_output_folder(item):
            skipped.append((item, "a saliency-lab output folder (its run.json says so); not explained"))
        elif os.path.isdir(item):
            anchors.append(os.path.abspath(item))
            found, problems = _walk(item, exclude, folders, follow_symlinks)
            files += found
            skipped += problems
        elif os.path.isfile(item):  # named on the command line: taken, symlink or not
            anchors.append(os.path.dirname(os.path.abspath(item)))
            files.append(item)
        elif os.path.exists(item):
            raise FileNotFoundError(f"--images: {item} is {not_a_regular_file(item)}")
        else:
            raise FileNotFoundError(f"--images: {item} is neither a file nor a folder")
    root = os.path.commonpath(anchors) if anchors else ""
    unique = {os.path.abspath(f): f for f in files}
    found = [ImageFile(f, Path(os.path.relpath(a, root)).as_posix()) for a, f in unique.items()]
    if not found:
        raise FileNotFoundError(f"no image files (suffixes {', '.join(IMAGE_EXTENSIONS)}) in "
                                f"{', '.join(map(os.fspath, inputs))}"
                                + (f"; skipped: {'; '.join(f'{p} ({why})' for p, why in skipped[:10])}"
                                   if skipped else ""))
    return sorted(found, key=lambda f: f.relative), sorted(set(skipped))


def collect_images(inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None,
                   follow_symlinks: bool = False) -> list[ImageFile]:
    """The image files of :func:`find_images`, without the list of those skipped."""
    return find_images(inputs, exclude, follow_symlinks)[0]


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


def map_size(width: int, height: int, max_side: int = DEFAULT_MAX_MAP_SIDE) -> tuple[int, int]:
    """(W, H) of the saved map of a W x H image: W x H, or scaled down so that the longer side is
    ``max_side`` (aspect ratio kept, each side rounded, at least 1)."""
    if max_side < 1:
        raise ValueError(f"max_map_side must be >= 1, got {max_side}")
    longer = max(width, height)
    if longer <= max_side:
        return int(width), int(height)
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) of ``img`` as viewers show it (after its EXIF orientation), read from the header only."""
    width, height = img.size
    orientation = img.getexif().get(0x0112) if hasattr(img, "getexif") else None
    return (height, width) if orientation in _SWAPS_SIDES else (width, height)


def _range_to_rgb(img: Image.Image, path: str) -> Image.Image:
    """A 32-bit image (mode ``I`` or ``F``) scaled by its own range to 8 bits (min -> 0, max -> 255, a
    constant image all 0), as RGB; a BadImageError naming ``path`` when a value is NaN or +-inf."""
    values = np.asarray(img, dtype=np.float64)
    if not np.isfinite(values).all():
        raise BadImageError(f"{path}: cannot decode image (non-finite pixel values (NaN or inf) in a mode "
                            f"{img.mode} image: no range to scale by)")
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(scaled).astype(np.uint8)).convert("RGB")


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """The mode rules of the module docstring: any mode -> 8-bit RGB."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)).convert("RGB")
    if img.mode in ("I", "F"):
        return _range_to_rgb(img, path)
    if img.mode == "P" and isinstance(img.info.get("transparency"), bytes):
        img = img.convert("RGBA")  # PIL warns when converting such palettes straight to RGB
    return img.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_map_side: int = DEFAULT_MAX_MAP_SIDE) -> tuple[Image.Image, tuple[int, int]]:
    """Decode a user's image file as the module docstring says: (8-bit RGB PIL image, (W, H) of the file as
    viewers show it). The image is the file at full size, or smaller for a large JPEG (decoded at a reduced
    scale, never below the saved map size ``map_size(W, H, max_map_side)``). Raises ``BadImageError``
    naming the file: not a regular file, more than ``max_pixels`` pixels, truncated, not an image, a
    non-finite float image."""
    path = os.fspath(path)
    problem = not_a_regular_file(path)
    if problem:
        raise BadImageError(f"{path}: not opened ({problem})")
    try:
        with _quiet_bomb_warnings(), Image.open(path) as img:
            too_big = _size_problem(img, max_pixels)
            if too_big:
                raise BadImageError(f"{path}: cannot decode image ({too_big})")
            width, height = _oriented_size(img)
            if img.format == "JPEG":
                wanted = map_size(width, height, max_map_side)
                img.draft("RGB", wanted if (width, height) == img.size else wanted[::-1])
            return _to_rgb(ImageOps.exif_transpose(img), path), (width, height)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's corrupt-data signals
        raise BadImageError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


def resize_to_input(image: Image.Image, size: int) -> torch.Tensor:
    """8-bit RGB PIL image (any W x H) -> (3, size, size) float32 in [0, 1] (the resize rule above)."""
    return rgb_to_tensor(image.resize((size, size), Image.Resampling.BILINEAR))


class ImageFiles(Dataset):
    """Image files decoded for a black box with S x S inputs.

    ``dataset[i]`` is ``{"index": i, "image": (3,S,S) float32 in [0,1], "original": (h,w,3) uint8,
    "size": (W, H)}``: ``original`` is the decoded RGB image at its saved map size h x w (:func:`map_size`
    of the file's W x H, for the overlays), ``size`` the file's own size as viewers show it; or
    ``{"index": i, "problem": str}`` for a bad file.

    Args:
        files: the inputs (:func:`collect_images`).
        size: S, the black box's input side.
        max_pixels: larger images are bad files (default: ``PIL.Image.MAX_IMAGE_PIXELS``).
        max_map_side: the longest side of a saved map (:func:`map_size`).
    """

    def __init__(self, files: Sequence[ImageFile], size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_map_side: int = DEFAULT_MAX_MAP_SIDE):
        if size < 1:
            raise ValueError(f"image size must be >= 1, got {size}")
        if max_map_side < 1:
            raise ValueError(f"max_map_side must be >= 1, got {max_map_side}")
        self.files, self.size, self.max_pixels = list(files), int(size), int(max_pixels)
        self.max_map_side = int(max_map_side)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        try:
            image, (width, height) = load_image(self.files[i].path, self.max_pixels, self.max_map_side)
        except BadImageError as err:
            cause = err.__cause__ or err
            return {"index": i, "problem": f"{type(cause).__name__}: {cause}"}
        saved = map_size(width, height, self.max_map_side)
        shown = image if image.size == saved else image.resize(saved, Image.Resampling.BILINEAR)
        return {"index": i, "image": resize_to_input(image, self.size), "size": (width, height),
                "original": torch.from_numpy(np.array(shown, dtype=np.uint8))}


def collate_files(samples: list[dict]) -> dict:
    """Batch of :class:`ImageFiles` samples: ``image`` (B,3,S,S) and ``index`` (B,) of the good files,
    ``original`` a list of B (h,w,3) uint8 tensors (at the saved map size), ``size`` a list of B (W, H) of
    the files, ``bad`` a list of (index, problem) of the bad ones."""
    good = [s for s in samples if "problem" not in s]
    if good:
        images = torch.stack([s["image"] for s in good])
    else:  # a batch of bad files only: an empty batch of the right shape
        images = torch.empty(0, 3, 0, 0)
    return {"image": images, "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
            "original": [s["original"] for s in good], "size": [s["size"] for s in good],
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
