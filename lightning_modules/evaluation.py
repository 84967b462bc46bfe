"""Evaluation as ``Trainer.test``: a LightningModule whose test step explains its batch with every method
and scores the maps, writing one row per (image, method) as soon as it is done.

Lightning then provides DDP sharding, progress bars and precision; the rows make the run resumable: a
rerun reads them first and skips every finished (image, method) pair.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Mapping

import pytorch_lightning as pl
import torch

from metrics import EvaluationSettings, explained_class, score_saliency


class RowStore:
    """Per-image rows as JSON lines under ``folder``, one file per process (``rows-rank{R}.jsonl``).

    Rows are flushed and fsynced as they are appended, so a killed run loses at most the batch in flight;
    a line cut short by the kill is ignored when reading.
    """

    def __init__(self, folder: str | os.PathLike, rank: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rows-rank{rank}.jsonl"

    def read_all(self) -> list[dict]:
        rows = []
        for path in sorted(self.folder.glob("rows-rank*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # the last line of a killed run
                    continue
        return rows

    def finished(self) -> set[tuple[int, str]]:
        return {(int(r["index"]), r["method"]) for r in self.read_all()}

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def check_batch(images: torch.Tensor, indices: torch.Tensor) -> None:
    """Clear errors for images that no explainer or metric can be trusted on."""
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bad.any():
        raise ValueError(f"images with NaN/Inf values at dataset indices {indices[bad].tolist()}")
    out_of_range = (images.flatten(1).amin(1) < 0) | (images.flatten(1).amax(1) > 1)
    if out_of_range.any():
        raise ValueError(f"images outside [0,1] at dataset indices {indices[out_of_range].tolist()}: callers pass "
                         "[0,1] pixels, the black box normalises them itself")


class EvaluationModule(pl.LightningModule):
    """Explain and score every test batch.

    Args:
        blackbox: the frozen classifier (``BlackBox``).
        explainers: method name -> explainer (the registry's contract).
        settings: metric knobs.
        target_rule: "predicted" (the black box's class on the clean image) or "label".
        row_dir: where the rows go (``RowStore``).
        map_dir: where the maps of ``overlay_indices`` are saved (``METHOD/INDEX.pt``) for the figures.
        image_limits: method name -> N: that method explains only the images with dataset index < N (the
            first N of the split), e.g. the slow per-image optimisers of a large comparison.
    """

    def __init__(self, blackbox: torch.nn.Module, explainers: Mapping[str, object], settings: EvaluationSettings,
                 target_rule: str, row_dir: str | os.PathLike, map_dir: str | os.PathLike,
                 overlay_indices: set[int] = frozenset(), image_limits: Mapping[str, int] | None = None):
        super().__init__()
        self.blackbox = blackbox
        self.explainers = dict(explainers)
        self.settings, self.target_rule = settings, target_rule
        self.row_dir, self.map_dir = Path(row_dir), Path(map_dir)
        self.overlay_indices = set(overlay_indices)
        self.image_limits = dict(image_limits or {})
        self.store: RowStore | None = None
        self.done: set[tuple[int, str]] = set()

    def on_test_start(self) -> None:
        self.store = RowStore(self.row_dir, self.global_rank)
        self.done = self.store.finished()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            # batches made under inference mode cannot enter autograd: take ordinary copies
            images, labels = batch["image"].clone(), batch["label"].clone()
            masks, indices = batch["mask"].clone(), batch["index"].clone()
            check_batch(images, indices)
            targets = explained_class(self.blackbox, images, labels, self.target_rule,
                                      self.settings.protocol.max_forward_batch)
            for name, explainer in self.explainers.items():
                limit = self.image_limits.get(name, math.inf)
                todo = [j for j, i in enumerate(indices.tolist()) if (i, name) not in self.done and i < limit]
                if todo:
                    self._explain_and_score(name, explainer, images, labels, targets, masks, indices,
                                            torch.tensor(todo, device=images.device))

    def _explain_and_score(self, name, explainer, images, labels, targets, masks, indices, sel) -> None:
        start = time.perf_counter()
        saliency = explainer(images[sel], targets[sel], indices[sel])
        seconds = (time.perf_counter() - start) / len(sel)
        bad = ~torch.isfinite(saliency).flatten(1).all(1)
        if bad.any():
            raise ValueError(f"method {name!r} returned NaN/Inf saliency for dataset indices "
                             f"{indices[sel][bad].tolist()}")
        scores = score_saliency(self.blackbox, images[sel], saliency, targets[sel], masks[sel], self.settings)
        cost = explainer.cost
        rows = []
        for j, idx in enumerate(indices[sel].tolist()):
            row = {"index": idx, "method": name, "label": int(labels[sel][j]), "target": int(targets[sel][j]),
                   "seconds": seconds, "forwards": cost.forwards / len(sel), "backwards": cost.backwards / len(sel)}
            row.update({k: _float(v[j]) for k, v in scores.values.items()})
            row["deletion_curve"] = scores.deletion_curve[j].tolist()
            row["insertion_curve"] = scores.insertion_curve[j].tolist()
            rows.append(row)
            if idx in self.overlay_indices:
                (self.map_dir / name).mkdir(parents=True, exist_ok=True)
                torch.save(saliency[j].detach().cpu().clone(), self.map_dir / name / f"{idx}.pt")
        self.store.append(rows)
        self.done.update((r["index"], name) for r in rows)


def _float(value: torch.Tensor) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.nan
