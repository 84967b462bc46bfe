"""What every datamodule shares: the batch layout and its collate function.

A sample is a dict ``image`` (3,H,W) float32 in [0,1], ``label`` () long, ``mask`` (1,H,W) bool,
``boxes`` (K,4) float32 xyxy in pixels, ``index`` () long. A batch stacks all of them except ``boxes``,
which stays a list of B tensors because K varies.

The file-based datamodules (ImageNet, COCO) also share image decoding (``load_rgb``, ``rgb_to_tensor``;
``load_rgb_uint8`` with a choice of JPEG decoder) and the bad-file check (``drop_bad_images``,
``BadImageWarning``, ``BadImageError``).
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

try:  # deprecated since torchvision 0.29 (superseded by TorchCodec); gone in some later release
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    ImageReadMode = decode_jpeg = None

BATCH_KEYS = ("image", "label", "mask", "boxes", "index")


def collate_samples(samples: list[dict]) -> dict:
    """Stack a list of sample dicts into a batch dict (``boxes`` kept as a list)."""
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("image", "label", "mask", "index")}
    batch["boxes"] = [s["boxes"] for s in samples]
    return batch


def boxes_to_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Union of xyxy boxes (K,4) in pixels (x2, y2 exclusive) -> (1,H,W) bool."""
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        mask[0, max(y1, 0):min(y2, height), max(x1, 0):min(x2, width)] = True
    return mask


# ---------------------------------------------------------------------------------------------------------
# Image files: what the file-based datamodules (ImageNet, COCO) share.
# ---------------------------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
"""Lower-case suffixes of files that are taken as images; any other file (.txt, .xml, ...) is ignored."""

VERIFY_MODES = ("quick", "full", "off")
DECODERS = ("pil", "torchvision")
"""JPEG decoders of :func:`load_rgb_uint8`: Pillow, or ``torchvision.io.decode_jpeg`` (both libjpeg-turbo)."""
ON_ERROR_MODES = ("skip", "raise")
_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_PNG_START, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
_MAX_NAMED = 10  # files named in a skip warning; the rest are only counted
_CHECK_CHUNK = 256  # files per thread task in drop_bad_images


class BadImageWarning(UserWarning):
    """Image files that could not be decoded were skipped (the message counts and names them)."""


class BadImageError(OSError):
    """An image file could not be decoded (the message names it)."""


def max_image_pixels() -> int:
    """The most pixels (width x height) an image may claim: PIL's ``Image.MAX_IMAGE_PIXELS`` (89.5 M by
    default; raise it there for larger images). A header claiming more is a decompression bomb: refused
    before decoding, as PIL itself refuses beyond twice that limit."""
    return int(Image.MAX_IMAGE_PIXELS or 2**63)


@contextlib.contextmanager
def _quiet_bomb_warnings():
    """Silence PIL's DecompressionBombWarning, which names no file: ``_size_problem`` refuses those images
    with a message that does. (The filter is process-wide while active, which covers the check's threads.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _size_problem(img: Image.Image, max_pixels: int | None = None) -> str | None:
    """Why the header's size is refused (more than ``max_pixels``, default :func:`max_image_pixels`), or None."""
    width, height = img.size
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    if width * height > limit:
        where = "PIL.Image.MAX_IMAGE_PIXELS" if max_pixels is None else "max_pixels"
        return (f"DecompressionBombError: its header claims {width} x {height} = {width * height:,} pixels, more "
                f"than the limit of {limit:,} ({where})")
    return None


def is_image_file(name: str | os.PathLike) -> bool:
    """True when the file name has one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike, orient: bool = False, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image; raise ``BadImageError`` naming the file if it fails.

    Mode conversions (deliberately simple, like torchvision's default loader): grayscale ``L``/``1`` is
    replicated to three channels; ``CMYK`` uses PIL's formula without ICC profiles; alpha (``RGBA``,
    ``LA``, ``PA``, transparent palettes) is dropped, i.e. the stored colours are kept and *not* composited
    on a background; ``P`` maps through its palette; 16-bit grayscale keeps its 8 high bits (PIL's own
    conversion would clip it to white). Truncated files fail unless the caller has set
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``.

    ``orient`` applies the EXIF orientation tag first (the image as viewers show it; for users' photos).
    ``max_pixels`` (default :func:`max_image_pixels`) refuses larger images before decoding them
    (decompression bombs: a small file whose header claims e.g. 10^10 pixels); PIL itself refuses only above
    twice ``Image.MAX_IMAGE_PIXELS``.
    """
    try:
        with _quiet_bomb_warnings(), Image.open(path) as img:
            too_big = _size_problem(img, max_pixels)
            if too_big:
                raise BadImageError(f"{os.fspath(path)}: cannot decode image ({too_big})")
            if orient:
                img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):
                return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)).convert("RGB")
            if img.mode == "P" and isinstance(img.info.get("transparency"), bytes):
                img = img.convert("RGBA")  # PIL warns when converting such palettes straight to RGB
            return img.convert("RGB")
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's corrupt-data signals
        raise BadImageError(f"{os.fspath(path)}: cannot decode image ({type(err).__name__}: {err})") from err


def rgb_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image (W,H) -> (3,H,W) float32 ``k/255`` in [0,1] (the embedded scenes' levels)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def rgb_to_uint8(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image (W,H) -> (3,H,W) uint8 tensor (a channels-last view of one copy of the pixels)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _torchvision_decode_jpeg(data: bytearray) -> torch.Tensor:
    """JPEG bytes -> (3,H,W) uint8 RGB through ``torchvision.io.decode_jpeg`` (no EXIF orientation, like
    :func:`load_rgb`). torchvision 0.29 deprecates its image decoders (in favour of TorchCodec) and warns on every
    call; that warning is silenced here. ``RuntimeError`` when the data is not a JPEG it can decode."""
    if decode_jpeg is None:
        raise RuntimeError("this torchvision has no torchvision.io.decode_jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)


@functools.lru_cache(maxsize=1)
def torchvision_jpeg_problem() -> str | None:
    """Why ``torchvision.io.decode_jpeg`` cannot serve here (missing, or its image extension failed to load), or
    None when it decodes a small JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, "JPEG")
    try:
        _torchvision_decode_jpeg(bytearray(buffer.getvalue()))
    except RuntimeError as err:
        return f"{type(err).__name__}: {err}"
    return None


def load_rgb_uint8(path: str | os.PathLike, decoder: str = "torchvision", max_pixels: int | None = None
                   ) -> torch.Tensor:
    """Decode an image file into a (3,H,W) uint8 RGB tensor; raise ``BadImageError`` naming the file if it fails.

    ``decoder="pil"`` is :func:`load_rgb` (every mode rule there). ``decoder="torchvision"`` reads the file once,
    reads its header with Pillow (the ``max_pixels`` refusal of decompression bombs, the format and the mode), then
    decodes JPEGs whose header says RGB (YCbCr) or grayscale with ``torchvision.io.decode_jpeg``; every other file
    (PNG, CMYK JPEGs, other formats), and every JPEG that torchvision refuses (truncated, corrupt), goes through
    :func:`load_rgb`, so *which* files decode or fail, and the message naming a bad one, are Pillow's. Pillow's
    wheels and torchvision's both decode with libjpeg-turbo (same IDCT, same chroma upsampling): for the files
    torchvision takes the two give the same pixels (``tests/test_imagenet_loading.py`` checks this).
    """
    if decoder == "pil":
        return rgb_to_uint8(load_rgb(path, max_pixels=max_pixels))
    _check_option("decoder", decoder, DECODERS)
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        with _quiet_bomb_warnings(), Image.open(io.BytesIO(data)) as img:
            fast = _size_problem(img, max_pixels) is None and img.format == "JPEG" and img.mode in ("RGB", "L")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        fast = False  # load_rgb below names the reason
    if fast:
        try:
            return _torchvision_decode_jpeg(data)
        except RuntimeError:
            pass  # Pillow decides (it names what is wrong, or decodes what it can, e.g. LOAD_TRUNCATED_IMAGES)
    return rgb_to_uint8(load_rgb(path, max_pixels=max_pixels))


def _ends_are_intact(path: str) -> bool:
    """Cheap completeness test: a JPEG/PNG file that starts with its signature and ends with its end
    marker (EOI / IEND chunk) was written completely. False means "decode to be sure", not "bad":
    other formats and JPEGs with trailing bytes after EOI land there too."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - 12, 0))
        tail = f.read()
    return (head.startswith(_JPEG_START) and tail.endswith(_JPEG_END)) or (
        head.startswith(_PNG_START) and tail.endswith(_PNG_END))


def image_problem(path: str, verify: str = "quick") -> str | None:
    """Why ``path`` is not a readable image, or None if it is.

    Both modes first read the header (``Image.open``, no decoding) and refuse an image claiming more than
    :func:`max_image_pixels` (a decompression bomb). Then ``verify="quick"`` trusts JPEG/PNG files whose
    signature and end marker are in place (two tiny reads, so it scales to ImageNet) and fully decodes
    everything else; ``"full"`` decodes every file (JPEGs at 1/8 scale through PIL's draft mode, which still
    reads the whole entropy-coded stream, so truncation is detected; corrupt data inside a complete file may
    still decode without error). ``python -m benchmarks.image_check`` measures both per file (figures in
    docs/results/speed.md).
    """
    try:
        with Image.open(path) as img:
            too_big = _size_problem(img)
            if too_big:
                return too_big
            if verify == "quick" and _ends_are_intact(path):
                return None
            img.draft("RGB", (1, 1))  # JPEG only: cheapest DCT scale; a no-op for other formats
            img.load()
        return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


def _check_option(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def drop_bad_images(paths: Sequence[str], verify: str = "quick", on_error: str = "skip",
                    workers: int = 8, where: str = "") -> list[int]:
    """Check image files and return the positions of the good ones.

    Args:
        paths: image files to check.
        verify: "quick", "full" (see ``image_problem``) or "off" (no check: every position is kept and
            a bad file fails later, when it is loaded, with ``BadImageError``).
        on_error: "skip" drops bad files and emits ONE ``BadImageWarning`` that counts them and names
            the first ten with the reason; "raise" stops at the first bad file (in path order) with
            ``BadImageError`` naming it.
        workers: threads for the check (file reads and PIL decoding release the GIL).
        where: what the files belong to, for the messages (e.g. "ImageNet val split in /data/imagenet").
    """
    _check_option("verify", verify, VERIFY_MODES)
    _check_option("on_error", on_error, ON_ERROR_MODES)
    if verify == "off":
        return list(range(len(paths)))
    keep, bad = [], []
    # Chunks, because ThreadPoolExecutor.map makes one future per item up front: 1.28M for ImageNet train.
    chunks = [paths[k:k + _CHECK_CHUNK] for k in range(0, len(paths), _CHECK_CHUNK)]
    with _quiet_bomb_warnings(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda chunk: [image_problem(p, verify) for p in chunk], chunks)
        for i, problem in enumerate(problem for chunk in results for problem in chunk):
            if problem is None:
                keep.append(i)
            elif on_error == "raise":
                pool.shutdown(wait=True, cancel_futures=True)
                raise BadImageError(f"{paths[i]}: not a readable image ({problem}){' in ' + where if where else ''};"
                                    f" pass on_error='skip' to skip such files with a warning")
            else:
                bad.append((paths[i], problem))
    if bad:
        named = "; ".join(f"{p} ({why})" for p, why in bad[:_MAX_NAMED])
        more = f"; and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
        warnings.warn(f"skipped {len(bad)} unreadable image file(s){' in ' + where if where else ''}: {named}{more}",
                      BadImageWarning, stacklevel=3)
    return keep


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool) -> DataLoader:
    """The DataLoader every file-based datamodule uses: ``collate_samples`` batches, workers kept alive
    between epochs. Under DDP Lightning swaps in a DistributedSampler itself."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_samples, persistent_workers=num_workers > 0, drop_last=False)


class SplitDataModule(pl.LightningDataModule):
    """What every datamodule of this project shares: loaders over ``self.dataset(split)``.

    Subclasses implement ``dataset(split)`` (built once, cached) and set ``test_split`` (the split that
    test/predict read: "test" for the embedded data, "val" for ImageNet and COCO) and may override
    ``has_train``. ``self.hparams`` must hold ``batch_size`` and ``num_workers``.
    """

    test_split = "test"

    @property
    def has_train(self) -> bool:
        return True

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val") if self.has_train else ("val",), "validate": ("val",),
                  "test": (self.test_split,), "predict": (self.test_split,)}
        every = ("train", "val", self.test_split) if self.has_train else ("val", self.test_split)
        for split in dict.fromkeys(splits.get(stage, every)):  # ordered, without repeats
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return make_loader(self.dataset(split), self.hparams.batch_size, self.hparams.num_workers, shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_split, shuffle=False)
