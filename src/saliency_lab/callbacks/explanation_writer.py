"""Writes what ``explain.py`` computes, one input file at a time, as Lightning's predict loop delivers it.

Per input file (``STEM`` = its sanitised relative path, ``image_files.output_stem``), under the output
folder:

- ``STEM.map.png``  the saliency map at its saved size as a 16-bit greyscale PNG, min-max scaled to
  0..65535 per map (a constant map is all 0); ``map_min``/``map_max`` in the index undo the scaling;
- ``STEM.map.npy``  the same map as float32 (H, W), unscaled (the explainer's own values);
- ``STEM.overlay.png``  the map over a grey copy of the image (``callbacks.figures.overlay_image``);
- a line of ``index.jsonl``: ``file`` (relative path), ``path`` (as given), ``outputs``, ``width``,
  ``height`` (the file's, as viewers show it), ``map_width``, ``map_height`` (the saved maps'), ``method``,
  ``class`` (the explained class), ``class_name`` (null where unknown),
  ``probability`` (its softmax probability on the resized image), ``cost`` (``forwards``, ``backwards``:
  black-box passes per image; ``seconds``: explainer wall time per image), ``map_min``, ``map_max``.

The saved size: the file's own W x H, or, for a file whose longer side exceeds ``max_map_side`` (default
4096), W x H scaled down so that the longer side is ``max_map_side`` (aspect ratio kept, each side
rounded, at least 1; ``image_files.map_size``): a 30000 x 20000 scan gives a 4096 x 2731 map, not
2.4 GB of float32. The maps are resized from the black box's S x S input to that size bilinearly.

Files are written under temporary names and renamed, and the index line comes last, so a file listed in
the index is complete and a killed run leaves nothing half-written behind a line; :func:`read_index` is
what a rerun skips.
Bad files, and the files discovery skipped (not regular files, symlinks out of the inputs, other runs'
output folders), are collected on every process and named in ONE ``BadImageWarning`` at the end (and
listed in ``skipped.json``); the run goes on.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter

from saliency_lab.callbacks.figures import overlay_image
from saliency_lab.core.files import append_lines as append_file_lines
from saliency_lab.core.files import atomic_write, atomic_write_json
from saliency_lab.datamodules.common import BadImageWarning
from saliency_lab.datamodules.image_files import ImageFile, inside, output_stem

INDEX = "index.jsonl"
SKIPPED = "skipped.json"
SUFFIXES = {"map": ".map.png", "npy": ".map.npy", "overlay": ".overlay.png"}
_NAMED = 100  # bad files named in the warning; skipped.json lists all


def output_paths(stem: str) -> dict[str, str]:
    """The outputs of a file with sanitised relative path ``stem``, relative to the output folder."""
    return {kind: stem + suffix for kind, suffix in SUFFIXES.items()}


def read_index(out: str | os.PathLike) -> dict[str, dict]:
    """``{file: index entry}`` of the files already explained in ``out`` whose outputs all exist (the
    first entry of a file wins; a line cut short by a killed run is ignored)."""
    path, done = Path(out) / INDEX, {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("file") not in done and all((Path(out) / p).is_file() for p in entry["outputs"].values()):
            done[entry["file"]] = entry
    return done


def append_lines(path: Path, entries: list[dict]) -> None:
    """Append JSON lines under an exclusive lock (DDP processes share the file), flushed and fsynced, after
    cutting a torn last line left by a killed run (``core.files.append_lines``)."""
    append_file_lines(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8"))


def _replace(path: Path, save) -> None:
    """``save(tmp)`` then rename onto ``path``: readers never see a half-written file."""
    atomic_write(path, save)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
        np.save(f, array)


def map_to_uint16(saliency: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """(H, W) float -> (uint16 (H, W) min-max scaled to 0..65535, min, max)."""
    low, high = float(saliency.min()), float(saliency.max())
    scaled = (saliency - low) / (high - low) if high > low else torch.zeros_like(saliency)
    return scaled.mul(65535).round().to(torch.int32).numpy().astype(np.uint16), low, high


def _gather(items: list) -> list:
    """Every process's ``items``, concatenated (the list itself without DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


class ExplanationWriter(BasePredictionWriter):
    """Write each explained file's outputs and index line after every predict batch (see the module docstring).

    Args:
        out: the output folder.
        files: the inputs, by dataset position (the ``index`` of a prediction).
        method: the explainer's name, recorded in the index.
        class_names: names of the black box's classes (None: unknown, ``class_name`` is null).
        skipped: (path, problem) of the files skipped before decoding (``image_files.find_images``).
    """

    def __init__(self, out: str | os.PathLike, files: Sequence[ImageFile], method: str,
                 class_names: Sequence[str] | None = None, skipped: Sequence[tuple[str, str]] = ()):
        super().__init__(write_interval="batch")
        self.out, self.files, self.method = Path(out), list(files), method
        self.class_names = list(class_names) if class_names is not None else None
        self.bad: list[tuple[str, str]] = list(skipped)  # this process's bad files
        self.skipped: list[tuple[str, str]] = []  # every process's, after the run
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction: dict, batch_indices, batch: dict, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        self.bad += [(self.files[i].path, problem) for i, problem in prediction["bad"]]
        if "saliency" not in prediction:
            return
        entries = []
        for j, i in enumerate(prediction["index"].tolist()):
            entry = self._write_file(self.files[i], batch["original"][j], batch["size"][j], prediction["saliency"][j])
            if entry is None:
                continue
            target = int(prediction["target"][j])
            entry.update(method=self.method, **{"class": target},
                         class_name=self.class_names[target] if self.class_names else None,
                         probability=float(prediction["probability"][j]),
                         cost={k: float(prediction[k]) for k in ("forwards", "backwards", "seconds")})
            entries.append(entry)
        if entries:
            append_lines(self.out / INDEX, entries)
            self.written += len(entries)

    def _write_file(self, file: ImageFile, original: torch.Tensor, size: Sequence[int], saliency: torch.Tensor
                    ) -> dict | None:
        """Write one file's three outputs: ``original`` (h, w, 3) uint8 is the image at the saved map size,
        ``size`` the file's (W, H), ``saliency`` (1, S, S). Returns its index entry without the prediction
        fields."""
        outputs = output_paths(output_stem(file.relative))
        targets = {kind: self.out / rel for kind, rel in outputs.items()}
        folder = targets["map"].parent
        if not inside(self.out, folder):  # e.g. a symlink planted inside the output folder
            self.bad.append((file.path, f"its output folder {folder} resolves outside {self.out}; not written"))
            return None
        folder.mkdir(parents=True, exist_ok=True)
        map_height, map_width = original.shape[:2]
        full = F.interpolate(saliency[None].float(), size=(map_height, map_width), mode="bilinear",
                             align_corners=False)[0, 0]
        levels, low, high = map_to_uint16(full)
        _replace(targets["npy"], lambda tmp: _save_npy(tmp, full.numpy().astype(np.float32)))
        _replace(targets["map"], lambda tmp: Image.fromarray(levels).save(tmp, format="PNG"))
        _replace(targets["overlay"], lambda tmp: Image.fromarray(overlay_image(original, full).numpy()).save(
            tmp, format="PNG"))
        width, height = size
        return {"file": file.relative, "path": file.path, "outputs": outputs, "width": int(width),
                "height": int(height), "map_width": int(map_width), "map_height": int(map_height),
                "map_min": low, "map_max": high}

    def on_predict_end(self, trainer, pl_module) -> None:
        self.report(sorted(set(_gather(self.bad))), trainer.is_global_zero)

    def report(self, bad: list[tuple[str, str]], global_zero: bool = True) -> None:
        """Keep ``bad`` (every process's) as :attr:`skipped`; on the global-zero process, write
        ``skipped.json`` and name them in one warning."""
        self.skipped = bad
        if not global_zero:
            return
        atomic_write_json(self.out / SKIPPED, [{"path": p, "problem": why} for p, why in bad], ensure_ascii=False)
        if bad:
            named = "; ".join(f"{p} ({why})" for p, why in bad[:_NAMED])
            more = f"; and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
            warnings.warn(f"skipped {len(bad)} unreadable image file(s), all listed in {self.out / SKIPPED}: "
                          f"{named}{more}", BadImageWarning, stacklevel=1)
