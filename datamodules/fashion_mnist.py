"""Locating and reading the Fashion-MNIST IDX files.

The files come from (in this order): an explicit ``data_dir``; the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); torchvision's downloader where the machine has internet.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
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
    """Parse an IDX file (optionally gzipped): big-endian magic 0x0000 08 ndim, then ndim uint32 sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated: expected {expected} bytes of data, found {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(tuple(dims))


def locate(data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Return a folder holding the four Fashion-MNIST files, or raise FileNotFoundError with install advice."""
    candidates = [Path(data_dir)] if data_dir is not None else []
    candidates.append(DEBIAN_DIR)
    for folder in candidates:
        if all(_find(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    if download and data_dir is not None:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(data_dir), train=True, download=True)
            FashionMNIST(str(data_dir), train=False, download=True)
        except Exception as err:  # no internet: fall through to the install hint
            raise FileNotFoundError(f"{INSTALL_HINT} (download failed: {err})") from err
        return locate(data_dir, download=False)
    where = f" Looked in: {', '.join(str(c) for c in candidates)}."
    raise FileNotFoundError(INSTALL_HINT + where)


def load(split: str, data_dir: str | os.PathLike | None = None, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,28,28) uint8 and labels (N,) int64 of the 'train' (60k) or 'test' (10k) file (read-only)."""
    return _load_cached(split, None if data_dir is None else str(data_dir), download)


@functools.lru_cache(maxsize=4)  # every split and datamodule of a process shares one decoded copy
def _load_cached(split: str, data_dir: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(FILES)}, got {split!r}")
    folder = locate(data_dir, download)
    img_stem, lbl_stem = FILES[split]
    images = _read_idx(_find(folder, img_stem))
    labels = _read_idx(_find(folder, lbl_stem)).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"Fashion-MNIST {split} files in {folder} have inconsistent shapes {images.shape}, {labels.shape}")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels
