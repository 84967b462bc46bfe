"""Safe checkpoint loading: local files, tensors and plain containers only, never arbitrary pickled code.

Every checkpoint, weight file and record this project reads goes through :func:`safe_load`
(``torch.load(weights_only=True)``, or safetensors for ``.safetensors`` files). A URL is refused: nothing is
downloaded (:func:`remote_scheme` tells a URL from a local path). A file that cannot be read is told apart from
one that is refused: :class:`DamagedCheckpointError` (truncated, damaged, not a checkpoint: copy it again) vs
:class:`UnsafeCheckpointError` (a well-formed pickle holding objects that are not plain data).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from saliency_lab.core.resources import resolve_resource

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects that ``torch.load(weights_only=True)`` refuses to unpickle."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read at all: cut short (an interrupted copy, download or save),
    damaged, or not a PyTorch checkpoint. Not a security refusal: copying the file again fixes it."""


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
        DamagedCheckpointError: the file cannot be read: truncated, damaged, or not a checkpoint.
    """
    scheme = remote_scheme(path)
    if scheme is not None:
        raise RemoteCheckpointError(
            f"refusing to load {path}: it is a {scheme}:// URL, and checkpoints are read from local files only "
            "(a downloaded file is code you did not check). Download it yourself and pass the local path.")
    path = Path(resolve_resource(path))  # assets/... falls back to the installed package's copy
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":  # holds no code: any failure is damage
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (PermissionError, IsADirectoryError, MemoryError):
        raise
    except Exception as err:
        raise load_error(path, err) from err


def is_weights_only_refusal(err: BaseException) -> bool:
    """Whether ``torch.load``'s ``err`` is the refusal of a well-formed pickle that holds objects other than
    tensors and plain containers (torch raises it as an ``UnpicklingError`` "Weights only load failed"), as
    opposed to a file that cannot be read at all."""
    text = str(err)
    unreadable = ("Unsupported operand", "truncated")  # an unknown pickle opcode or a cut pickle: no checkpoint
    return (isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text
            and not any(marker in text for marker in unreadable))


def _first_line(err: BaseException) -> str:
    """``err``'s type and its telling line: the reason after torch's weights-only preamble ("Weights only load
    failed. ...", "Please file an issue ...: WeightsUnpickler error:"), else the first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    preamble = ("Weights only load failed", "Please file an issue")
    reasons = [line for line in lines if not line.startswith(preamble)]
    return f"{type(err).__name__}: {(reasons or lines or ['no message'])[0]}"


def load_error(path: str | os.PathLike, err: BaseException) -> RuntimeError:
    """The error that names ``path`` for ``torch.load(path, weights_only=True)``'s ``err``.

    :class:`UnsafeCheckpointError` for a weights-only refusal (:func:`is_weights_only_refusal`); for anything
    else (``EOFError``, ``zipfile.BadZipFile``, "PytorchStreamReader failed reading zip archive", an ``OSError``
    from a cut archive, an unknown pickle opcode of a file that is no checkpoint)
    :class:`DamagedCheckpointError`, saying the file is damaged or truncated. Both quote torch's reason."""
    detail = _first_line(err)
    if is_weights_only_refusal(err):
        return UnsafeCheckpointError(
            f"refusing to load {path}: it is not loadable with weights_only=True ({detail}). Only tensors and plain "
            "containers are accepted.")
    return DamagedCheckpointError(
        f"cannot read {path}: the checkpoint file is damaged or truncated (e.g. an interrupted copy, download or "
        f"save), or is not a PyTorch checkpoint ({detail}). Copy or save it again.")
