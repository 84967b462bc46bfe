"""Safe checkpoint loading: local files, tensors and plain containers only, never arbitrary pickled code.

Every checkpoint, weight file and record this project reads goes through :func:`safe_load`
(``torch.load(weights_only=True)``, or safetensors for ``.safetensors`` files). A URL is refused: nothing is
downloaded (:func:`remote_scheme` tells a URL from a local path).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from saliency_lab.core.resources import resolve_resource

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects that ``torch.load(weights_only=True)`` refuses to unpickle."""


class RemoteCheckpointError(UnsafeCheckpointError):
    """A checkpoint was given as a URL: only local files are read."""


def remote_scheme(path: str | os.PathLike | None) -> str | None:
    """The URL scheme of ``path`` (``"http"``, ``"s3"``, ...) or None for a local path."""
    match = _URL.match(str(path)) if path is not None else None
    return match.group(1).lower() if match else None


def safe_load(path: str | os.PathLike) -> dict:
    """Load a local checkpoint without executing pickled code (``weights_only=True``).

    Raises:
        RemoteCheckpointError: ``path`` is a URL (http://, s3://, ...): nothing is downloaded.
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs arbitrary unpickling (e.g. carries a malicious payload).
    """
    scheme = remote_scheme(path)
    if scheme is not None:
        raise RemoteCheckpointError(
            f"refusing to load {path}: it is a {scheme}:// URL, and checkpoints are read from local files only "
            "(a downloaded file is code you did not check). Download it yourself and pass the local path.")
    path = Path(resolve_resource(path))  # assets/... falls back to the installed package's copy
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch wraps the refusal in an UnpicklingError
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not loadable with weights_only=True ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}). Only tensors and plain containers are accepted.") from err
