"""Run explainers on a fixed probe set at validation / test end and log every metric, curves and overlays.

:class:`ExplainerEvaluation` is the in-training view of what ``evaluate.py`` reports: the same explainer
specs (:mod:`explainers.specs`), the same protocol factory (:func:`metrics.make_protocol`), the same metrics
(:func:`metrics.score_saliency`), on a few images. Its parts live beside it: the probe set
(:mod:`callbacks.probe`), the callback skeleton (:mod:`callbacks.base`), the accumulators
(:mod:`callbacks.meters`) and the figures (:mod:`callbacks.figures`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor

from callbacks.base import ProbeSetCallback
from callbacks.figures import curves_figure, overlay_grid
from callbacks.meters import ScoreMeters
from callbacks.probe import ProbeSet
from explainers import ExplainerSpec, explainer_keys
from metrics import TARGET_RULES, EvaluationSettings, make_protocol, score_saliency


class ExplainerEvaluation(ProbeSetCallback):
    """Explain a fixed probe set with every explainer at validation / test end; log metrics and figures.

    Logged with ``pl_module.log`` (epoch level, ``sync_dist=False``: the values are already reduced over
    ranks by torchmetrics, every rank logs the same number) as ``{prefix}/{val|test}/{explainer}/{metric}``:
    the means over images of ``deletion``, ``insertion``, ``deletion_norm`` and ``insertion_norm`` (PROTOCOLS.md,
    "Normalised causal scores"; ``*_norm_excluded`` counts the images whose curve was too flat), ``mf`` (raw,
    percent), ``mi`` (percent),
    ``pointing_game`` (accuracy over the classes evaluated) and ``pointing_game_hit_rate``, ``iou``, ``f1``,
    ``iou_top``, ``f1_top``, ``iou_pixel``, ``f1_pixel``; an image whose value is NaN (no ground truth, the
    M_F guard) is left out of that mean only; ``mf_excluded`` counts M_F's guard; ``images`` the images
    scored; ``forwards_per_image``, ``backwards_per_image`` and ``seconds_per_image`` the explainer's cost.
    The last values are kept in :attr:`last_results` ({explainer: {metric: float}}).

    Rank 0 also draws an overlay grid (its own probe images, at most ``overlay_images``) and the mean
    deletion / insertion curves of every explainer, saves them and a JSON record (protocol, target rule,
    explainer hyper-parameters, results) under ``{default_root_dir}/eval/`` with the epoch in the file
    name, and sends the images to every ``WandbLogger``.

    The black box is ``getattr(pl_module, blackbox_attr)``. Under DDP rank r explains the probe images at
    positions p % world_size == r; the means and curves are summed over ranks before anything is logged.

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
        results, curves, overlays = {}, {}, {}
        for key, explainer in self.explainers(pl_module, blackbox).items():
            meters = ScoreMeters(settings.protocol.steps, blackbox.num_classes, probe.images.device)
            overlays[key] = self._explain_and_score(explainer, blackbox, probe, targets, settings, meters)
            results[key], curves[key] = meters.compute()
        self.last_results = results
        for key, values in results.items():
            for metric, value in values.items():
                pl_module.log(self.name(stage, key, metric), value, on_step=False, on_epoch=True, sync_dist=False)
        if trainer.is_global_zero:
            fractions = torch.linspace(0, 1, settings.protocol.steps + 1)
            self._write_outputs(trainer, stage, probe, targets, overlays, curves, fractions, settings)

    def _explain_and_score(self, explainer: Any, blackbox: torch.nn.Module, probe: ProbeSet, targets: Tensor,
                           settings: EvaluationSettings, meters: ScoreMeters) -> Tensor:
        """Explain and score the probe share in chunks of ``batch_size``; return the first
        ``overlay_images`` maps (N',1,H,W) for the overlay grid."""
        kept = []
        for start in range(0, len(probe), self.batch_size):
            part = slice(start, start + self.batch_size)
            images, classes = probe.images[part], targets[part]
            began = time.perf_counter()
            saliency = explainer(images, classes, probe.indices[part])
            if saliency.device.type == "cuda":  # kernels are asynchronous: wait before reading the clock
                torch.cuda.synchronize(saliency.device)
            seconds = time.perf_counter() - began
            scores = score_saliency(blackbox, images, saliency, classes, probe.masks[part], settings)
            meters.update(scores, classes, probe.masks[part], getattr(explainer, "cost", None), seconds)
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
        (folder / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str, allow_nan=True))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for kind, path in paths.items():
                    logger.log_image(key=self.name(stage, kind), images=[str(path)], step=trainer.global_step)
