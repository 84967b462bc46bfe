"""Evaluation as ``Trainer.test``: a LightningModule whose test step explains its batch with every method
and scores the maps, writing one row per (image, method) as soon as it is done.

Lightning then provides DDP sharding, progress bars and precision; the rows make the run resumable: a
rerun reads them first and skips every finished (image, method) pair.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Mapping

import pytorch_lightning as pl
import torch

from metrics import EvaluationSettings, RowStore, explained_class, score_saliency


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
        save_all_maps: save every map there, not only the overlay ones (so another evaluation can score them).
        reuse: method name -> (maps folder, {dataset index: row}) of an earlier evaluation of that method with
            the same settings: its saved maps are scored instead of explaining again, and its rows' cost
            (seconds, forwards, backwards) is reported, so the result is what explaining anew would give.
        image_limits: method name -> N: that method explains only the images with dataset index < N (the
            first N of the split), e.g. the slow per-image optimisers of a large comparison.
    """

    def __init__(self, blackbox: torch.nn.Module, explainers: Mapping[str, object], settings: EvaluationSettings,
                 target_rule: str, row_dir: str | os.PathLike, map_dir: str | os.PathLike,
                 overlay_indices: set[int] = frozenset(), save_all_maps: bool = False,
                 reuse: Mapping[str, tuple[Path, dict[int, dict]]] | None = None,
                 image_limits: Mapping[str, int] | None = None):
        super().__init__()
        self.blackbox = blackbox
        self.explainers = dict(explainers)
        self.settings, self.target_rule = settings, target_rule
        self.row_dir, self.map_dir = Path(row_dir), Path(map_dir)
        self.overlay_indices = set(overlay_indices)
        self.save_all_maps = save_all_maps
        self.reuse = dict(reuse or {})
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

    def _saliency(self, name, explainer, images, targets, indices) -> tuple[torch.Tensor, list[dict]]:
        """Maps (B,1,H,W) and each image's cost {seconds, forwards, backwards}: saved maps of an earlier
        evaluation where ``reuse`` has them, else the explainer's."""
        folder, source = self.reuse.get(name, (None, {}))
        saved = [folder is not None and i in source and (folder / name / f"{i}.pt").is_file() for i in indices.tolist()]
        maps, costs = [None] * len(saved), [None] * len(saved)
        for j, i in enumerate(indices.tolist()):
            if saved[j]:
                maps[j] = torch.load(folder / name / f"{i}.pt", weights_only=True).to(images.device, images.dtype)
                costs[j] = {k: source[i][k] for k in ("seconds", "forwards", "backwards")}
        fresh = torch.tensor([j for j, s in enumerate(saved) if not s], dtype=torch.long, device=images.device)
        if len(fresh):
            start = time.perf_counter()
            computed = explainer(images[fresh], targets[fresh], indices[fresh])
            seconds = (time.perf_counter() - start) / len(fresh)
            cost = explainer.cost
            for k, j in enumerate(fresh.tolist()):
                maps[j] = computed[k]
                costs[j] = {"seconds": seconds, "forwards": cost.forwards / len(fresh),
                            "backwards": cost.backwards / len(fresh)}
        return torch.stack(maps), costs

    def _explain_and_score(self, name, explainer, images, labels, targets, masks, indices, sel) -> None:
        saliency, costs = self._saliency(name, explainer, images[sel], targets[sel], indices[sel])
        bad = ~torch.isfinite(saliency).flatten(1).all(1)
        if bad.any():
            raise ValueError(f"method {name!r} returned NaN/Inf saliency for dataset indices "
                             f"{indices[sel][bad].tolist()}")
        scores = score_saliency(self.blackbox, images[sel], saliency, targets[sel], masks[sel], self.settings)
        rows = []
        for j, idx in enumerate(indices[sel].tolist()):
            row = {"index": idx, "method": name, "label": int(labels[sel][j]), "target": int(targets[sel][j]),
                   **costs[j]}
            row.update({k: _float(v[j]) for k, v in scores.values.items()})
            row["deletion_curve"] = scores.deletion_curve[j].tolist()
            row["insertion_curve"] = scores.insertion_curve[j].tolist()
            rows.append(row)
            if idx in self.overlay_indices or self.save_all_maps:
                (self.map_dir / name).mkdir(parents=True, exist_ok=True)
                torch.save(saliency[j].detach().cpu().clone(), self.map_dir / name / f"{idx}.pt")
        self.store.append(rows)
        self.done.update((r["index"], name) for r in rows)


def _float(value: torch.Tensor) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.nan
