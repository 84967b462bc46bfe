"""Safe checkpoint loading: tensors and plain containers only, never arbitrary pickled code.

Every checkpoint, weight file and record this project reads goes through :func:`safe_load`
(``torch.load(weights_only=True)``, or safetensors for ``.safetensors`` files).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects that ``torch.load(weights_only=True)`` refuses to unpickle."""


def safe_load(path: str | os.PathLike) -> dict:
    """Load a checkpoint without executing pickled code (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs arbitrary unpickling (e.g. carries a malicious payload).
    """
    path = Path(path)
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
