"""The skeleton every probe-set callback shares: when to run (validation / test end, every n epochs, never
in the sanity check), on which images (this rank's share of the probe set, on the module's device), with
autograd available inside Lightning's inference-mode loops, and how logged names are namespaced."""
from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from saliency_lab.callbacks.probe import ProbeSet, collect_probe, first_loader
from saliency_lab.explainers import ExplainerSpec, build_explainer
from saliency_lab.metrics import explained_class

STAGE_KEYS = {"validate": "val", "test": "test"}  # Lightning stage -> the namespace of logged names


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's rows (plain dicts), in rank order, on every rank: a collective under DDP (every rank
    must call it, also with no rows); the rows themselves on a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(rows)
    parts: list[list[dict] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(rows))
    return [row for part in parts for row in part]


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Lift Lightning's ``inference_mode`` / ``no_grad`` of validation and test loops: explainers need
    gradients, and tensors made here must be usable by autograd."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


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

    @staticmethod
    def build_explainer(spec: ExplainerSpec, blackbox: torch.nn.Module, pl_module: pl.LightningModule) -> Any:
        """The explainer of ``spec`` (:func:`explainers.build_explainer`); ``"self"`` is the module's own
        ``as_explainer()`` (a trained module that explains by itself, e.g. the mask predictor)."""
        own = getattr(pl_module, "as_explainer", None)
        return build_explainer(spec, blackbox, own if callable(own) else None)

    def explained_classes(self, blackbox: torch.nn.Module, probe: ProbeSet, rule: str) -> Tensor:
        """(N,) explained class of each probe image under ``rule`` (an empty share gives an empty tensor)."""
        if not len(probe):
            return probe.labels
        return explained_class(blackbox, probe.images, probe.labels, rule)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, blackbox: torch.nn.Module,
                 probe: ProbeSet) -> None:
        raise NotImplementedError
