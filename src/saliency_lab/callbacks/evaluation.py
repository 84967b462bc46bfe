"""Run explainers on a fixed probe set at validation / test end and log every metric, curves and overlays.

:class:`ExplainerEvaluation` is the in-training view of what ``evaluate.py`` reports: the same explainer
specs (:mod:`explainers.specs`), the same protocol factory (:func:`metrics.make_protocol`), the same metrics
(:func:`metrics.score_saliency`) and the same aggregation (:func:`metrics.report.summarise` of the per-image
rows), on a few images. Its parts live beside it: the probe set (:mod:`callbacks.probe`), the callback
skeleton (:mod:`callbacks.base`) and the figures (:mod:`callbacks.figures`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor

from saliency_lab.callbacks.base import ProbeSetCallback, gather_rows
from saliency_lab.callbacks.figures import curves_figure, overlay_grid
from saliency_lab.callbacks.probe import ProbeSet
from saliency_lab.core.files import atomic_write_json
from saliency_lab.core.timing import timed
from saliency_lab.explainers import ExplainerSpec, explainer_keys
from saliency_lab.metrics import TARGET_RULES, EvaluationSettings, make_protocol, score_saliency
from saliency_lab.metrics.report import image_rows, mean_curves, summarise


class ExplainerEvaluation(ProbeSetCallback):
    """Explain a fixed probe set with every explainer at validation / test end; log metrics and figures.

    Logged with ``pl_module.log`` (epoch level, ``sync_dist=False``: every rank aggregates the rows of all
    ranks, so every rank logs the same number) as ``{prefix}/{val|test}/{explainer}/{metric}``: the per-image
    rows of all ranks go through :func:`metrics.report.summarise`, the aggregation ``evaluate.py`` reports, so
    each name means what it means in ``results.json``: ``deletion``, ``insertion``, ``deletion_norm``,
    ``insertion_norm`` (docs/protocols.md, "Normalised causal scores"), ``road_morf``, ``road_lerf``, ``road_gap``
    (docs/protocols.md, "ROAD"), ``mf`` (raw, percent), ``mf_normalized``
    (per-image min-max across the explainers), ``mi`` (percent), ``pointing_game`` (mean over the annotated
    classes, as TorchRay) and ``pointing_game_hit_rate`` (over images), ``iou``, ``f1``, ``iou_top``,
    ``f1_top``, ``iou_pixel``, ``f1_pixel``; an image whose value is NaN (no ground truth, the M_F guard, a
    flat curve) is left out of that mean only, and counted: ``mf_excluded``, ``deletion_norm_excluded``,
    ``insertion_norm_excluded`` and ``no_ground_truth`` (images without ground truth, left out of the
    localisation metrics; warned about once per evaluation). ``images`` counts the images scored;
    ``forwards_per_image``, ``backwards_per_image`` and ``seconds_per_image`` (after a device synchronise)
    the explainer's cost. The last values are kept in :attr:`last_results` ({explainer: {metric: float}}).

    Rank 0 also draws an overlay grid (its own probe images, at most ``overlay_images``) and the mean
    deletion / insertion curves of every explainer, saves them and a JSON record (protocol, target rule,
    explainer hyper-parameters, results) under ``{default_root_dir}/eval/`` with the epoch in the file
    name, and sends the images to every ``WandbLogger``.

    The black box is ``getattr(pl_module, blackbox_attr)``. Under DDP rank r explains the probe images at
    positions p % world_size == r; the rows are gathered over ranks before anything is aggregated.

    Args:
        explainers: explainer specs (:mod:`explainers.specs`): registry names, ``{"name": ..., "alias": key
            (optional), "checkpoint": PATH (trained methods), **hparams}`` dicts, or
            ``"self"``: ``pl_module.as_explainer()``. (Python API: also factories ``blackbox -> explainer``.)
            Built once, on first use, with the module's black box.
        num_images: the probe set, the first ``num_images`` items of the first validation (test) dataloader's
            dataset — the same images every epoch.
        every_n_epochs, stages, blackbox_attr, prefix: see :class:`ProbeSetCallback`.
        protocol: deletion / insertion protocol, see :func:`make_protocol`; the image size comes from the
            probe images.
        target: explained class, "predicted" (the black box's argmax on the clean image) or "label".
        mf_steps: n of M_F (Delta = 1/n). pointing_tolerance: pixels; None = 15 px at 224, scaled.
        overlay_images: rows of the overlay grid (0: no grid).
        batch_size: probe images per explainer call (bounds the explainers' activation memory).
    """

    def __init__(
        self,
        explainers: Sequence[ExplainerSpec],
        num_images: int = 32,
        every_n_epochs: int = 1,
        protocol: str | dict = "rise",
        target: str = "predicted",
        mf_steps: int = 32,
        pointing_tolerance: float | None = None,
        overlay_images: int = 8,
        stages: Sequence[str] = ("validate", "test"),
        blackbox_attr: str = "blackbox",
        prefix: str | None = None,
        batch_size: int = 16,
    ):
        super().__init__(num_images, every_n_epochs, stages, blackbox_attr, prefix)
        if target not in TARGET_RULES:
            raise ValueError(f"target must be one of {TARGET_RULES}, got {target!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        make_protocol(protocol, 224, target=target)  # fail at construction, not after the first epoch
        self.specs = dict(zip(explainer_keys(explainers), explainers))
        self.protocol = protocol
        self.target = target
        self.mf_steps = mf_steps
        self.pointing_tolerance = pointing_tolerance
        self.overlay_images = overlay_images
        self.batch_size = batch_size
        self.last_results: dict[str, dict[str, float]] = {}
        self._explainers: dict[str, Any] | None = None
        self._built_for: int | None = None  # id() of the black box the explainers were built on

    def settings(self, image_size: int) -> EvaluationSettings:
        return EvaluationSettings(protocol=make_protocol(self.protocol, image_size, target=self.target),
                                  mf_steps=self.mf_steps, pointing_tolerance=self.pointing_tolerance)

    def explainers(self, pl_module: pl.LightningModule, blackbox: torch.nn.Module) -> dict[str, Any]:
        """The explainers, built once per black box."""
        if self._explainers is None or self._built_for != id(blackbox):
            self._explainers = {key: self.build_explainer(spec, blackbox, pl_module) for key, spec in self.specs.items()}
            self._built_for = id(blackbox)
        return self._explainers

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, blackbox: torch.nn.Module,
                 probe: ProbeSet) -> None:
        settings = self.settings(probe.images.shape[-1])
        targets = self.explained_classes(blackbox, probe, self.target)
        rows, overlays = [], {}
        for key, explainer in self.explainers(pl_module, blackbox).items():
            overlays[key] = self._explain_and_score(key, explainer, blackbox, probe, targets, settings, rows)
        rows = gather_rows(rows)  # a collective: every rank, in the same order
        keys = list(self.specs)
        summary, excluded = summarise(rows, keys, warn=trainer.is_global_zero)
        results = {}
        for key in keys:
            values = {k: math.nan if v is None else float(v) for k, v in summary[key].items()}
            for name in ("mf", "deletion_norm", "insertion_norm"):
                values[f"{name}_excluded"] = float(excluded[f"{name}_degenerate"][key])
            values["no_ground_truth"] = float(excluded["no_ground_truth"])
            results[key] = values
        self.last_results = results
        for key, values in results.items():
            for metric, value in values.items():
                pl_module.log(self.name(stage, key, metric), value, on_step=False, on_epoch=True, sync_dist=False)
        if trainer.is_global_zero:
            fractions = torch.linspace(0, 1, settings.protocol.steps + 1)
            self._write_outputs(trainer, stage, probe, targets, overlays, mean_curves(rows, keys), fractions, settings)

    def _explain_and_score(self, key: str, explainer: Any, blackbox: torch.nn.Module, probe: ProbeSet,
                           targets: Tensor, settings: EvaluationSettings, rows: list[dict]) -> Tensor:
        """Explain and score the probe share in chunks of ``batch_size``, adding one row per image to ``rows``
        (:func:`metrics.report.image_rows`); return the first ``overlay_images`` maps (N',1,H,W) for the grid."""
        kept = []
        for start in range(0, len(probe), self.batch_size):
            part = slice(start, start + self.batch_size)
            images, classes = probe.images[part], targets[part]
            saliency, seconds = timed(lambda: explainer(images, classes, probe.indices[part]), images.device)
            scores = score_saliency(blackbox, images, saliency, classes, probe.masks[part], settings)
            count, cost = len(images), getattr(explainer, "cost", None)
            # NaN = "not counted" (an explainer without ``cost``): the aggregation leaves it out.
            per_image = {"seconds": seconds / count, "forwards": getattr(cost, "forwards", math.nan) / count,
                         "backwards": getattr(cost, "backwards", math.nan) / count}
            rows += image_rows(key, probe.indices[part], probe.labels[part], classes, scores, [per_image] * count)
            if start < self.overlay_images:
                kept.append(saliency.detach().cpu())
        if not kept:
            return probe.images.new_zeros(0, 1, *probe.images.shape[-2:]).cpu()
        return torch.cat(kept)[: self.overlay_images]

    def _write_outputs(self, trainer: pl.Trainer, stage: str, probe: ProbeSet, targets: Tensor,
                       overlays: dict[str, Tensor], curves: dict[str, tuple[Tensor, Tensor]], fractions: Tensor,
                       settings: EvaluationSettings) -> None:
        """Rank 0: PNGs and a JSON record under ``{default_root_dir}/eval/``, images to W&B loggers."""
        folder = Path(trainer.default_root_dir) / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{self.name(stage).replace('/', '_')}_epoch{trainer.current_epoch:03d}"
        figures = {"curves": curves_figure(fractions, {k: (d.cpu(), i.cpu()) for k, (d, i) in curves.items()})}
        rows = min(self.overlay_images, len(probe))
        if rows:
            titles = [f"#{i} c={c}" for i, c in zip(probe.indices[:rows].tolist(), targets[:rows].tolist())]
            figures["overlays"] = overlay_grid(probe.images[:rows].cpu(), overlays, titles)
        paths = {}
        for kind, figure in figures.items():
            paths[kind] = folder / f"{stem}_{kind}.png"
            figure.savefig(paths[kind], dpi=100)
        record = {"stage": stage, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "num_images": self.num_images, "settings": settings.to_dict(probe.images.shape[-1]),
                  "explainers": {k: getattr(e, "hparams", None) for k, e in (self._explainers or {}).items()},
                  "results": self.last_results}
        atomic_write_json(folder / f"{stem}.json", record, indent=1, default=str)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for kind, path in paths.items():
                    logger.log_image(key=self.name(stage, kind), images=[str(path)], step=trainer.global_step)
