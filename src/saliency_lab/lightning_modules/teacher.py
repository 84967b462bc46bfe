"""Teacher maps: a costly explainer's saliency, computed once on the first images of a training split, for the
mask predictor's teacher loss (``objectives.Teacher(maps=...)``, an ablation lever).

    saliency-lab teacher --method rise --method_hparams '{n_masks: 1000}' --num_images 2000 \\
        --out outputs/teacher/rise1000.pt [--blackbox ckpt:assets/embedded_blackbox.pt] [--data.init_args...]

The file is a ``weights_only``-loadable record: ``indices`` (N,) the dataset indices, ``maps`` (N, 1, H, W)
float16 saliency of the black box's predicted class, ``targets`` (N,), the explainer's name and full
hyper-parameters, and its cost (``forwards``, ``backwards``, ``seconds``) so the teacher's price is reported
with whatever it teaches. An interrupted run resumes from the partial record it saved after every batch.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import Tensor

from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.checkpoints import safe_load

TEACHER_FORMAT = "saliency-lab/teacher-maps/v1"


def compute_teacher_maps(blackbox: BlackBox, explainer, dataset, count: int, batch_size: int,
                         out: str | os.PathLike) -> dict:
    """Explain ``dataset[0..count)`` (predicted classes) with ``explainer``; save and return the record.

    The record is saved after every batch; a call on an existing file continues after its last map (or
    returns it when it already holds ``count``), so a killed run loses at most one batch."""
    out = Path(out)
    record = safe_load(out) if out.is_file() else None
    if record is not None:
        if (record.get("format"), record.get("explainer"), record.get("hparams")) != (
                TEACHER_FORMAT, explainer.name, explainer.hparams):
            raise ValueError(f"{out} holds maps of another explainer or settings ({record.get('explainer')}, "
                             f"{record.get('hparams')}); choose another --out")
        if len(record["indices"]) >= count:
            if not record.get("complete"):  # an interrupted longer run asked for more; it holds what is asked now
                record["complete"] = True
                _save_atomically(record, out)
            return record
    else:
        record = {"format": TEACHER_FORMAT, "explainer": explainer.name, "hparams": explainer.hparams,
                  "blackbox": blackbox.spec, "indices": torch.empty(0, dtype=torch.long),
                  "targets": torch.empty(0, dtype=torch.long), "maps": None, "forwards": 0, "backwards": 0,
                  "seconds": 0.0, "complete": False}
    done = len(record["indices"])
    for start in range(done, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        images = torch.stack([s["image"] for s in samples])
        indices = torch.stack([s["index"] for s in samples]).long()
        with torch.no_grad():
            targets = blackbox.logits(images).argmax(1)
        began = time.perf_counter()
        maps = explainer(images, targets, indices).half()
        record["seconds"] += time.perf_counter() - began
        record["forwards"] += explainer.cost.forwards
        record["backwards"] += explainer.cost.backwards
        record["indices"] = torch.cat([record["indices"], indices])
        record["targets"] = torch.cat([record["targets"], targets])
        record["maps"] = maps if record["maps"] is None else torch.cat([record["maps"], maps])
        record["complete"] = len(record["indices"]) >= count
        _save_atomically(record, out)
    return record


def _save_atomically(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(out.suffix + ".tmp")
    torch.save(record, partial)
    os.replace(partial, out)


def load_teacher_maps(path: str | os.PathLike) -> dict:
    """The record of :func:`compute_teacher_maps` at ``path`` (``weights_only``), checked to be complete."""
    record = safe_load(path)
    if not isinstance(record, dict) or record.get("format") != TEACHER_FORMAT:
        raise ValueError(f"{path} is not a teacher-maps file (format {TEACHER_FORMAT!r}); make one with "
                         "saliency-lab teacher")
    if not record.get("complete"):
        raise ValueError(f"{path} is incomplete ({len(record['indices'])} maps): rerun the command that made it")
    return record


def rank_targets(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Teacher maps (N, 1, H, W) -> per-image standardised pixel ranks at ``size`` (N, 1, h, w), float32.

    The maps are average-pooled to the predictor's mask resolution, then replaced by their ranks (the causal
    metrics read only the ranking), and the ranks standardised to mean 0 and std 1 per image.
    """
    pooled = torch.nn.functional.adaptive_avg_pool2d(maps.float(), size).flatten(1)
    ranks = pooled.argsort(1).argsort(1).float()
    ranks = (ranks - ranks.mean(1, keepdim=True)) / ranks.std(1, unbiased=False, keepdim=True).clamp_min(1e-6)
    return ranks.view(maps.shape[0], 1, *size)
