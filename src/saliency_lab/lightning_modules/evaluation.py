"""Evaluation as ``Trainer.test``: a LightningModule whose test step explains its batch with every method
and scores the maps, writing one row per (image, method) as soon as it is done.

Lightning then provides DDP sharding, progress bars and precision; the rows make the run resumable: a
rerun reads them first and skips every finished (image, method) pair whose row carries the method's current
key (``metrics.rows``: what produced the row), so rows made with other settings are computed again.

The model-randomisation check (:mod:`metrics.sanity`) runs in the same test step when asked for
(:class:`RandomisationCheck`): each process checks the images of its own shard, on its device, against a
randomised copy of the black box, and writes per-image rows like the metric rows, which ``evaluate.py``
aggregates after the stage.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch

from saliency_lab.core.files import atomic_write
from saliency_lab.core.timing import timed
from saliency_lab.metrics import EvaluationSettings, RowStore, explained_class, score_saliency
from saliency_lab.metrics.report import image_rows
from saliency_lab.metrics.sanity import randomisation_rows

# The cost of one explanation in a row; a row written before cpu_seconds existed lacks it.
COST_KEYS = ("seconds", "cpu_seconds", "forwards", "backwards")


@dataclasses.dataclass
class RandomisationCheck:
    """What the test step's model-randomisation check does (:func:`metrics.sanity.randomisation_rows`).

    Attributes:
        factories: method -> ``blackbox -> explainer`` (rebuilt on each randomised copy).
        indices: the dataset indices checked (the first images of the split).
        fractions: non-decreasing fractions of layers randomised at each step (0.0 first: the trained model).
        seed: of the re-initialisation.
        row_dir: where the per-image rows go (a ``RowStore``, one file per process).
        records: method -> what each of its rows records as ``settings``; a rerun reuses exactly the rows
            whose record is the current one, and recomputes the others.
    """

    factories: Mapping[str, Callable[[torch.nn.Module], Any]]
    indices: set[int]
    fractions: Sequence[float]
    seed: int
    row_dir: str | os.PathLike
    records: Mapping[str, dict]

    def current(self, row: Mapping) -> bool:
        """Whether a stored row was made with these settings (and its image is still checked)."""
        return (row.get("explainer") in self.records and row.get("settings") == self.records[row["explainer"]]
                and int(row["index"]) in self.indices)


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
        row_keys: method name -> the key of what produces its rows (``metrics.rows.content_key``), written
            into every row; only rows with that key count as done. None: rows without keys, any row counts.
        randomisation: also run the model-randomisation check on its images (None: not).
        image_limits: method name -> N: that method explains only the images with dataset index < N (the
            first N of the split), e.g. the slow per-image optimisers of a large comparison.

    ``seconds`` of a row is the explainer's wall time per image of its batch, read after a device
    synchronise (:func:`core.timing.timed`); ``cpu_seconds`` is this process's CPU time over the same call per
    image (every thread's; on a machine shared with other jobs it does not count the time spent waiting for a
    core, which the wall time does).
    """

    def __init__(self, blackbox: torch.nn.Module, explainers: Mapping[str, object], settings: EvaluationSettings,
                 target_rule: str, row_dir: str | os.PathLike, map_dir: str | os.PathLike,
                 overlay_indices: set[int] = frozenset(), save_all_maps: bool = False,
                 reuse: Mapping[str, tuple[Path, dict[int, dict]]] | None = None,
                 row_keys: Mapping[str, str] | None = None,
                 randomisation: RandomisationCheck | None = None,
                 image_limits: Mapping[str, int] | None = None):
        super().__init__()
        self.blackbox = blackbox
        self.explainers = dict(explainers)
        self.settings, self.target_rule = settings, target_rule
        self.row_dir, self.map_dir = Path(row_dir), Path(map_dir)
        self.overlay_indices = set(overlay_indices)
        self.save_all_maps = save_all_maps
        self.reuse = dict(reuse or {})
        self.row_keys = None if row_keys is None else dict(row_keys)
        self.image_limits = dict(image_limits or {})
        self.store: RowStore | None = None
        self.done: dict[str, set[int]] = {}
        self.randomisation = randomisation
        self.randomisation_store: RowStore | None = None
        self.randomised: set[tuple[int, str, int]] = set()  # (index, method, step) with a current row

    def on_test_start(self) -> None:
        self.store = RowStore(self.row_dir, self.global_rank)
        self.done = self.store.finished(self.row_keys)
        if self.randomisation is not None:
            self.randomisation_store = RowStore(self.randomisation.row_dir, self.global_rank)
            self.randomised = {(int(r["index"]), r["explainer"], int(r["step"]))
                               for r in self.randomisation_store.records() if self.randomisation.current(r)}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            # batches made under inference mode cannot enter autograd: take ordinary copies
            images, labels = batch["image"].clone(), batch["label"].clone()
            masks, indices = batch["mask"].clone(), batch["index"].clone()
            check_batch(images, indices)
            targets = explained_class(self.blackbox, images, labels, self.target_rule,
                                      self.settings.protocol.max_forward_batch)
            for name, explainer in self.explainers.items():
                done, limit = self.done.get(name, ()), self.image_limits.get(name, math.inf)
                todo = [j for j, i in enumerate(indices.tolist()) if i not in done and i < limit]
                if todo:
                    self._explain_and_score(name, explainer, images, labels, targets, masks, indices,
                                            torch.tensor(todo, device=images.device))
            if self.randomisation is not None:
                self._randomisation_check(images, targets, indices)

    def _randomisation_check(self, images, targets, indices) -> None:
        """Rows of the model-randomisation check of this batch's checked images that have no current row."""
        check = self.randomisation
        steps = range(len(check.fractions))
        for name, factory in check.factories.items():
            todo = [j for j, i in enumerate(indices.tolist()) if i in check.indices
                    and any((i, name, step) not in self.randomised for step in steps)]
            if not todo:
                continue
            sel = torch.tensor(todo, device=images.device)
            rows = randomisation_rows(self.blackbox, {name: factory}, images[sel], targets[sel], indices[sel],
                                      check.fractions, check.seed)
            for row in rows:
                row["settings"] = check.records[name]
            self.randomisation_store.append(rows)
            self.randomised.update((r["index"], name, r["step"]) for r in rows)

    def _saliency(self, name, explainer, images, targets, indices) -> tuple[torch.Tensor, list[dict]]:
        """Maps (B,1,H,W) and each image's cost {seconds, forwards, backwards}: saved maps of an earlier
        evaluation where ``reuse`` has them, else the explainer's."""
        folder, source = self.reuse.get(name, (None, {}))
        saved = [folder is not None and i in source and (folder / name / f"{i}.pt").is_file() for i in indices.tolist()]
        maps, costs = [None] * len(saved), [None] * len(saved)
        for j, i in enumerate(indices.tolist()):
            if saved[j]:
                maps[j] = torch.load(folder / name / f"{i}.pt", weights_only=True).to(images.device, images.dtype)
                costs[j] = {k: source[i][k] for k in COST_KEYS if k in source[i]}
        fresh = torch.tensor([j for j, s in enumerate(saved) if not s], dtype=torch.long, device=images.device)
        if len(fresh):
            cpu = time.process_time()
            computed, seconds = timed(lambda: explainer(images[fresh], targets[fresh], indices[fresh]), images.device)
            cpu = (time.process_time() - cpu) / len(fresh)
            seconds /= len(fresh)
            cost = explainer.cost
            for k, j in enumerate(fresh.tolist()):
                maps[j] = computed[k]
                costs[j] = {"seconds": seconds, "cpu_seconds": cpu, "forwards": cost.forwards / len(fresh),
                            "backwards": cost.backwards / len(fresh)}
        return torch.stack(maps), costs

    def _explain_and_score(self, name, explainer, images, labels, targets, masks, indices, sel) -> None:
        saliency, costs = self._saliency(name, explainer, images[sel], targets[sel], indices[sel])
        bad = ~torch.isfinite(saliency).flatten(1).all(1)
        if bad.any():
            raise ValueError(f"method {name!r} returned NaN/Inf saliency for dataset indices "
                             f"{indices[sel][bad].tolist()}")
        scores = score_saliency(self.blackbox, images[sel], saliency, targets[sel], masks[sel], self.settings)
        rows = image_rows(name, indices[sel], labels[sel], targets[sel], scores, costs)
        if self.row_keys:
            for row in rows:
                row["key"] = self.row_keys[name]
        for j, idx in enumerate(indices[sel].tolist()):
            if idx in self.overlay_indices or self.save_all_maps:
                (self.map_dir / name).mkdir(parents=True, exist_ok=True)
                saved = saliency[j].detach().cpu().clone()
                atomic_write(self.map_dir / name / f"{idx}.pt", lambda tmp, saved=saved: torch.save(saved, tmp))
        self.store.append(rows)
        self.done.setdefault(name, set()).update(r["index"] for r in rows)
