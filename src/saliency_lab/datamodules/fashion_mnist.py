"""Locating and reading the Fashion-MNIST IDX files.

The files come from an explicit ``data_dir`` (and only from there: a folder that lacks a file is an error
naming it, never a silent fallback to another copy; torchvision's downloader fills it on request where the
machine has internet), or, without ``data_dir``, from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``).

Reading checks what the scenes rely on and names the file otherwise: a readable (optionally gzipped) IDX
file whose header matches its size, images of 28 x 28, one label per image, labels in [0, 10), and at
least two classes present.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ITEM_SHAPE = (28, 28)
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
INSTALL_HINT = (
    "Fashion-MNIST was not found. Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; "
    f"puts the files in {DEBIAN_DIR}), or pass data_dir=<folder with train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz>, "
    "or run `make demo`, which installs it."
)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        for sub in (folder, folder / "raw", folder / "FashionMNIST" / "raw"):
            if (sub / name).is_file():
                return sub / name
    return None


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian magic 0x0000 08 ndim, then ndim uint32 sizes, then
    the data; any other content raises ValueError naming the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip: BadGzipFile (an OSError), EOFError when cut short
        raise ValueError(f"{path} cannot be read: it is truncated or not a {'gzip' if path.suffix == '.gz' else 'IDX'} "
                         f"file ({type(err).__name__}: {err}); replace it with a complete copy") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4].hex() or 'none'})")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if ndim == 0 or len(data) < offset:
        raise ValueError(f"{path} is truncated or not an IDX file: its header declares {ndim} dimensions, the "
                         f"file holds {len(data)} bytes")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    if len(data) - offset != expected:
        problem = "truncated" if len(data) - offset < expected else "longer than its header says"
        raise ValueError(f"{path} is {problem}: the header declares {dims} = {expected} bytes of data, found "
                         f"{len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _missing(folder: Path) -> list[str]:
    return [stem for pair in FILES.values() for stem in pair if _find(folder, stem) is None]


def locate(data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Return the folder holding the four Fashion-MNIST files, or raise FileNotFoundError naming what is
    missing (with install advice). An explicit ``data_dir`` is the only folder looked in."""
    if data_dir is None:
        if not _missing(DEBIAN_DIR):
            return DEBIAN_DIR
        raise FileNotFoundError(f"{INSTALL_HINT} Looked in: {DEBIAN_DIR}.")
    folder = Path(data_dir)
    missing = _missing(folder)
    if not missing:
        return folder
    if download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(folder), train=True, download=True)
            FashionMNIST(str(folder), train=False, download=True)
        except Exception as err:  # no internet: fall through to the install hint
            raise FileNotFoundError(f"{INSTALL_HINT} (download failed: {err})") from err
        return locate(folder, download=False)
    raise FileNotFoundError(
        f"data_dir {folder} lacks the Fashion-MNIST file(s) {', '.join(m + '[.gz]' for m in missing)}; an explicit "
        f"data_dir is used alone, with no fallback to another copy: complete it, or leave data_dir unset to use "
        f"the installed one. {INSTALL_HINT}")


def load(split: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,28,28) uint8 and labels (N,) int64 in [0, 10) of the 'train' (60k) or 'test' (10k) file
    (read-only arrays)."""
    return _load_cached(split, None if data_dir is None else str(data_dir), download)


@functools.lru_cache(maxsize=4)  # every split and datamodule of a process shares one decoded copy
def _load_cached(split: str, data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FILES)}, got {split!r}")
    folder = locate(data_dir, download)
    image_path, label_path = (_find(folder, stem) for stem in FILES[split])
    images = _read_idx(image_path)
    labels = _read_idx(label_path).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != ITEM_SHAPE:
        raise ValueError(f"{image_path} holds items of shape {images.shape[1:]}, expected {ITEM_SHAPE} "
                         f"(Fashion-MNIST images)")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{label_path} holds labels of shape {labels.shape}, expected one per image of "
                         f"{image_path}: ({images.shape[0]},)")
    bad = np.flatnonzero(labels >= len(CLASSES))
    if len(bad):
        raise ValueError(f"{label_path}: {len(bad)} label(s) outside [0, {len(CLASSES)}), e.g. {labels[bad[0]]} at "
                         f"item {bad[0]}")
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"{label_path}: every label is {present.tolist()}; the scenes need at least two classes "
                         "(the labels file is corrupt or belongs to another data set)")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels
