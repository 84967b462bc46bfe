"""Run explainers on a fixed probe set at validation / test end and log every metric, curves and overlays.

:class:`ExplainerEvaluation` is the in-training view of what ``evaluate.py`` reports: the same explainers
(``explainers.build``), the same metrics (:func:`metrics.score_saliency`), on a few images. The pieces it is
made of are shared with :mod:`callbacks.sanity`: the probe set (:func:`collect_probe`), explainer specs
(:func:`explainer_keys`, :func:`build_explainer`) and the base class :class:`ProbeSetCallback`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics.aggregation import MeanMetric

from callbacks.figures import curves_figure, overlay_grid
from metrics import (
    CausalMetric,
    CausalProtocol,
    EvaluationSettings,
    FaithfulnessMetric,
    IoUF1Metric,
    PointingGameMetric,
    PRAUCMetric,
    SaliencyScores,
    ValueMean,
    explained_class,
    score_saliency,
)

STAGE_KEYS = {"validate": "val", "test": "test"}  # Lightning stage -> the namespace of logged names
PROTOCOL_PRESETS = {"rise": CausalProtocol.rise, "igos": CausalProtocol.igos}
TARGET_RULES = ("predicted", "label")
SELF = "self"  # explainer entry meaning "the LightningModule's own as_explainer()"
_SPEC_KEYS = ("name", "alias")  # entries of a dict spec that are not hyper-parameters

# An explainer spec: a registry name, {"name": ..., "alias": optional key, **hparams}, or (Python API only)
# a factory blackbox -> explainer whose __name__ is its key.
ExplainerSpec = Union[str, Mapping[str, Any], Callable[..., Any]]


# ---------------------------------------------------------------------------------------------------------
# Explainer specs


def explainer_key(spec: ExplainerSpec) -> str:
    """The name results are logged under: the registry name, a dict's ``alias`` (else its ``name``), or a
    factory's ``__name__``."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"an explainer dict needs a 'name', got {dict(spec)}")
        return str(spec.get("alias", spec["name"]))
    if callable(spec):
        return spec.__name__
    raise TypeError(f"an explainer is a name, a dict or a factory, got {type(spec).__name__}")


def explainer_keys(specs: Sequence[ExplainerSpec]) -> list[str]:
    """Keys of ``specs`` in order; two specs with one key (e.g. RISE twice) need an ``alias`` each."""
    keys = [explainer_key(spec) for spec in specs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"explainers {duplicates} appear more than once: give each an 'alias'")
    if not keys:
        raise ValueError("no explainers given")
    return keys


def build_explainer(spec: ExplainerSpec, blackbox: torch.nn.Module, pl_module: pl.LightningModule | None = None):
    """An explainer of ``blackbox`` following the explainer contract (ARCHITECTURE.md).

    ``"self"`` (or ``{"name": "self"}``) is ``pl_module.as_explainer()``: a trained module that explains
    by itself (the mask predictor); it takes no hyper-parameters here.
    """
    if callable(spec) and not isinstance(spec, (str, Mapping)):
        return spec(blackbox)
    name = spec if isinstance(spec, str) else spec["name"]
    hparams = {} if isinstance(spec, str) else {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    if name == SELF:
        if pl_module is None or not callable(getattr(pl_module, "as_explainer", None)):
            raise ValueError(f'explainer "{SELF}" needs a LightningModule with an as_explainer() method')
        if hparams:
            raise ValueError(f'explainer "{SELF}" takes no hyper-parameters, got {sorted(hparams)}')
        return pl_module.as_explainer()
    import explainers  # late: the registry imports every method's dependencies (captum, grad-cam)

    return explainers.build(name, blackbox, **hparams)


# ---------------------------------------------------------------------------------------------------------
# Protocol


def make_protocol(protocol: str | Mapping[str, Any] | CausalProtocol, image_size: int, target: str) -> CausalProtocol:
    """The deletion / insertion protocol at ``image_size`` with the explained-class rule ``target``.

    ``protocol`` is a preset name ("rise", "igos"), a dict of :class:`CausalProtocol` fields (with an
    optional ``"preset"`` entry naming the preset they override; without it the fields override the class
    defaults, which are RISE at 224), or a ready :class:`CausalProtocol`.
    """
    if isinstance(protocol, CausalProtocol):
        return dataclasses.replace(protocol, target=target)
    fields = {"preset": protocol} if isinstance(protocol, str) else dict(protocol)
    preset = fields.pop("preset", None)
    if fields.get("target", target) != target:
        raise ValueError(f"protocol target {fields['target']!r} contradicts the callback's target {target!r}")
    fields["target"] = target
    if preset is None:
        return CausalProtocol(**fields)
    if preset not in PROTOCOL_PRESETS:
        raise ValueError(f"unknown protocol preset {preset!r}; known: {sorted(PROTOCOL_PRESETS)}")
    return PROTOCOL_PRESETS[preset](image_size, **fields)


# ---------------------------------------------------------------------------------------------------------
# Probe set


@dataclasses.dataclass
class ProbeSet:
    """A rank's share of the fixed probe images.

    Attributes:
        images: (N,3,H,W) float in [0,1]. labels: (N,) long. masks: (N,1,H,W) bool ground truth.
        indices: (N,) long dataset indices (the batch's ``index``; seeds per-image randomness).
        positions: (N,) long positions in the whole probe set (0..num_images-1).
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    indices: Tensor
    positions: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> ProbeSet:
        """A copy on ``device``; always new storage (``clone``), so tensors read under inference mode can be
        used by autograd when this runs inside ``torch.inference_mode(False)``."""
        return ProbeSet(*(getattr(self, f.name).to(device).clone() for f in dataclasses.fields(self)))


def first_loader(loaders: Any) -> DataLoader:
    """The first DataLoader of what ``trainer.val_dataloaders`` / ``test_dataloaders`` hold."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise RuntimeError("no dataloader to take probe images from")
    return loaders


def collect_probe(loader: DataLoader, num_images: int, rank: int = 0, world_size: int = 1) -> ProbeSet:
    """The probe images of ``rank``: positions p < num_images with p % world_size == rank, on the CPU.

    The probe set is the first ``num_images`` items of the loader's *dataset* in dataset order, read with
    ``dataset[p]`` and batched with the loader's ``collate_fn`` — not the loader's iteration order: under
    DDP Lightning gives each rank a DistributedSampler, which would make "the first images" differ by rank,
    and a shuffling sampler would change them every epoch. Each rank reads only its own share.
    Needs a map-style dataset of sample dicts (``datamodules.common``).
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise TypeError("the probe set is read by index: the dataloader needs a map-style dataset")
    positions = list(range(rank, min(num_images, len(dataset)), world_size))
    # An empty share (more ranks than images) still needs shapes and dtypes: read item 0, keep none of it.
    batch = loader.collate_fn([dataset[p] for p in positions or [0]])
    keep = len(positions)
    indices = batch.get("index", torch.tensor(positions or [0]))
    return ProbeSet(images=batch["image"][:keep], labels=batch["label"][:keep].long(),
                    masks=batch["mask"][:keep].bool(), indices=indices[:keep].long(),
                    positions=torch.tensor(positions or [0], dtype=torch.long)[:keep])


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Lift Lightning's ``inference_mode`` / ``no_grad`` of validation and test loops: explainers need
    gradients, and tensors made here must be usable by autograd."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


# ---------------------------------------------------------------------------------------------------------
# The shared callback skeleton


class ProbeSetCallback(pl.Callback):
    """Runs :meth:`evaluate` on a fixed probe set at the end of validation and / or test epochs.

    Subclasses implement ``evaluate(trainer, pl_module, stage, blackbox, probe)``; it runs under
    :func:`autograd_enabled` on this rank's share of the probe images (already on the module's device).

    Args:
        num_images: size of the whole probe set (split over ranks).
        every_n_epochs: during ``fit``, run after validation of epochs e with (e + 1) % n == 0;
            ``trainer.validate`` / ``trainer.test`` always run. Never during the sanity check.
        stages: any of "validate" (validation in ``fit`` and ``trainer.validate``) and "test".
        blackbox_attr: the LightningModule attribute holding the :class:`BlackBox`.
        prefix: prepended to every logged name, ``{prefix}/{val|test}/...``; None for none.
    """

    def __init__(self, num_images: int, every_n_epochs: int, stages: Sequence[str], blackbox_attr: str,
                 prefix: str | None):
        super().__init__()
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        unknown = set(stages) - set(STAGE_KEYS)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; choose from {sorted(STAGE_KEYS)}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.stages = tuple(stages)
        self.blackbox_attr = blackbox_attr
        self.prefix = prefix.strip("/") if prefix else None
        self._probes: dict[str, ProbeSet] = {}  # stage -> this rank's share, on the CPU, read once

    # -- Lightning hooks ----------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "validate" not in self.stages:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._run(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._run(trainer, pl_module, "test")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Our epoch-level values are reduced by torchmetrics already, so Lightning's advice to log them with
        # sync_dist=True would only add an all-reduce per scalar. Silence it for our names only.
        names = "|".join(re.escape(self.name(s) + "/") for s in self.stages)
        warnings.filterwarnings("ignore", message=rf"It is recommended to use `self\.log\('({names})")

    # -- shared machinery ---------------------------------------------------------------------------
    def name(self, stage: str, *parts: str) -> str:
        """The logged name ``{prefix}/{val|test}/{parts...}``."""
        return "/".join(p for p in (self.prefix, STAGE_KEYS[stage], *parts) if p)

    def blackbox(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        blackbox = getattr(pl_module, self.blackbox_attr, None)
        if blackbox is None or not callable(getattr(blackbox, "logits", None)):
            raise AttributeError(f"{type(pl_module).__name__}.{self.blackbox_attr} is not a BlackBox; set "
                                 "blackbox_attr to the attribute that holds it")
        return blackbox

    def probe(self, trainer: pl.Trainer, stage: str) -> ProbeSet:
        """This rank's share of the probe set of ``stage``, read on first use and kept (CPU)."""
        if stage not in self._probes:
            loaders = trainer.val_dataloaders if stage == "validate" else trainer.test_dataloaders
            self._probes[stage] = collect_probe(first_loader(loaders), self.num_images, trainer.global_rank,
                                                trainer.world_size)
        return self._probes[stage]

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        blackbox = self.blackbox(pl_module)
        with autograd_enabled():
            probe = self.probe(trainer, stage).to(pl_module.device)
            self.evaluate(trainer, pl_module, stage, blackbox, probe)

    def explained_classes(self, blackbox: torch.nn.Module, probe: ProbeSet, rule: str) -> Tensor:
        """(N,) explained class of each probe image under ``rule`` (an empty share gives an empty tensor)."""
        if not len(probe):
            return probe.labels
        return explained_class(blackbox, probe.images, probe.labels, rule)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, blackbox: torch.nn.Module,
                 probe: ProbeSet) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# Accumulators of one explainer


class ScoreMeters:
    """The torchmetrics accumulators of one explainer on this rank (sums and counts, summed over ranks).

    :meth:`compute` is a collective under DDP (torchmetrics syncs its states): every rank must call it, in
    the same order, even with no images of its own.
    """

    REGION_SUFFIXES = ("", "_top", "_pixel")  # iou / f1, iou_top / f1_top, iou_pixel / f1_pixel
    COSTS = ("forwards", "backwards", "seconds")
    NORMALISED = ("deletion_norm", "insertion_norm")

    def __init__(self, steps: int, num_classes: int, device: torch.device):
        self.causal = CausalMetric(steps).to(device)
        self.normalised = {name: ValueMean(name).to(device) for name in self.NORMALISED}
        self.mf = FaithfulnessMetric().to(device)
        self.mi = PRAUCMetric().to(device)
        self.regions = {suffix: IoUF1Metric().to(device) for suffix in self.REGION_SUFFIXES}
        self.pointing = PointingGameMetric(num_classes).to(device)
        # NaN = "not counted" (an explainer without ``cost``): ignored, so such a mean is 0 / 0 = NaN.
        self.costs = {name: MeanMetric(nan_strategy="ignore").to(device) for name in self.COSTS}

    def update(self, scores: SaliencyScores, targets: Tensor, gt_mask: Tensor, cost: Any, seconds: float) -> None:
        """Add one chunk: its scores, explained classes (B,), ground truth (B,1,H,W), the explainer's
        ``cost`` of the call (None if it does not count) and the call's wall time."""
        values = scores.values
        self.causal.update(values["deletion"], values["insertion"], scores.deletion_curve, scores.insertion_curve)
        for name, metric in self.normalised.items():
            metric.update(values[name])
        self.mf.update(values["mf"])
        self.mi.update(values["mi"])
        for suffix, metric in self.regions.items():
            metric.update(values[f"iou{suffix}"], values[f"f1{suffix}"])
        # score_saliency counts an image without ground truth as a miss; here it is not evaluated at all.
        has_gt = gt_mask.flatten(1).any(1)
        self.pointing.update(values["pointing_game"][has_gt].bool(), targets[has_gt])
        images = targets.shape[0]
        measured = {"seconds": seconds, "forwards": getattr(cost, "forwards", math.nan),
                    "backwards": getattr(cost, "backwards", math.nan)}
        for name, total in measured.items():
            self.costs[name].update(torch.tensor(total / images), weight=images)

    def compute(self) -> tuple[dict[str, float], tuple[Tensor, Tensor]]:
        """Reduced means ({metric: float}, NaN where no image counted) and the mean (deletion, insertion)
        curves (n+1,)."""
        causal, mf, mi, pointing = self.causal.compute(), self.mf.compute(), self.mi.compute(), self.pointing.compute()
        values = {"deletion": causal["deletion"], "insertion": causal["insertion"], "mf": mf["mf"],
                  "mf_excluded": mf["excluded"], "mi": mi["pr_auc"], "pointing_game": pointing["accuracy"],
                  "pointing_game_hit_rate": pointing["hit_rate"]}
        for name, metric in self.normalised.items():
            normalised = metric.compute()
            values.update({name: normalised[name], f"{name}_excluded": normalised["excluded"]})
        for suffix, metric in self.regions.items():
            region = metric.compute()
            values.update({f"iou{suffix}": region["iou"], f"f1{suffix}": region["f1"]})
        for name, metric in self.costs.items():
            values[f"{name}_per_image"] = metric.compute()
        values["images"] = causal["count"] + causal["excluded"]
        scalars = {name: float(value) for name, value in values.items()}
        return scalars, (causal["deletion_curve"], causal["insertion_curve"])


# ---------------------------------------------------------------------------------------------------------
# The callback


class ExplainerEvaluation(ProbeSetCallback):
    """Explain a fixed probe set with every explainer at validation / test end; log metrics and figures.

    Logged with ``pl_module.log`` (epoch level, ``sync_dist=False``: the values are already reduced over
    ranks by torchmetrics, every rank logs the same number) as ``{prefix}/{val|test}/{explainer}/{metric}``:
    the means over images of ``deletion``, ``insertion``, ``deletion_norm`` and ``insertion_norm`` (PROTOCOLS.md,
    "Normalised causal scores"; ``*_norm_excluded`` counts the images whose curve was too flat), ``mf`` (raw, percent), ``mi`` (percent),
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
        explainers: registry names, ``{"name": ..., "alias": key (optional), **hparams}`` dicts, or
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
        make_protocol(protocol, 224, target)  # fail at construction, not after the first epoch
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
        return EvaluationSettings(protocol=make_protocol(self.protocol, image_size, self.target),
                                  mf_steps=self.mf_steps, pointing_tolerance=self.pointing_tolerance)

    def explainers(self, pl_module: pl.LightningModule, blackbox: torch.nn.Module) -> dict[str, Any]:
        """The explainers, built once per black box."""
        if self._explainers is None or self._built_for != id(blackbox):
            self._explainers = {key: build_explainer(spec, blackbox, pl_module) for key, spec in self.specs.items()}
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
        from pytorch_lightning.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for kind, path in paths.items():
                    logger.log_image(key=self.name(stage, kind), images=[str(path)], step=trainer.global_step)
