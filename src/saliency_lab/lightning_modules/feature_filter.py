"""Stage 1 of the mask predictor: train the feature filter (class selector) on a frozen black box
(docs/methods.md §1), and the plumbing both predictor stages share (:class:`FrozenBlackBoxModule`).

:class:`FeatureFilterModule` trains only the class embedding C of :class:`saliency_lab.networks.feature_filter.FeatureFilter`
(Y = X * sigmoid(X^T C_s - b)) on the frozen black box: per image, with probability ``fake_prob`` the class
is replaced by a random *other* class, and the binary cross-entropy of the real/fake decision
mean_ij sigmoid(X_ij^T C_k) against "is k the image's class" is minimised — real classes light up the
positions of their object, wrong ones are switched off.

Its checkpoints hold a ``"feature_filter"`` record (the embedding and its shape, plain data) that
:meth:`FeatureFilter.from_checkpoint` reads with ``weights_only=True``; the black box's weights are not
stored (its config is, in the hyper-parameters), since the black box is frozen and rebuilt from it.
"""
from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.seeding import per_image_uniforms
from saliency_lab.metrics import TARGET_RULES
from saliency_lab.networks.feature_filter import FeatureFilter

BLACKBOX_PREFIX = "blackbox."
# Streams of per-image randomness (the third part of seeded_generator's seed): one per use, so e.g. the
# fake-class draw and the substrate draw of an image are independent.
STREAM_FAKE_CLASS, STREAM_SUBSTRATE, STREAM_COLOUR = 1, 2, 3
GATE_NAMES = ("real_gate", "fake_gate")
VALIDATION_EPOCH = -1  # validation draws use this "epoch": the same substrates every epoch


class FrozenBlackBoxModule(pl.LightningModule):
    """Shared plumbing of the stage-1 and stage-2 modules: a frozen :class:`BlackBox` at ``self.blackbox``.

    - The black box arrives as one object (in configs: ``class_path: saliency_lab.core.blackbox.BlackBox`` with its
      ``init_args``). The hyper-parameters record its :meth:`BlackBox.config` (plain data), never the
      module, so checkpoints stay ``weights_only``-loadable and ``load_from_checkpoint`` rebuilds it; its
      weights are left out of every checkpoint (stripped in :meth:`on_save_checkpoint`, put back from the
      live black box in :meth:`on_load_checkpoint`), so a checkpoint holds only what was trained.
    - ``channels_last``: move the module and each batch to channels-last memory format (faster convs on
      recent GPUs, especially with bf16).

    Subclasses call ``self.save_hyperparameters(ignore=["blackbox"])`` and then :meth:`_set_blackbox`.
    """

    def _set_blackbox(self, blackbox: BlackBox | Mapping) -> None:
        """Keep ``blackbox`` (or build it from a recorded config) and record its config in the hparams."""
        self.blackbox = blackbox if isinstance(blackbox, BlackBox) else BlackBox.from_config(blackbox)
        self.hparams["blackbox"] = self.blackbox.config()
        self._hparams_initial["blackbox"] = self.blackbox.config()  # what the loggers receive

    def _epoch(self) -> int:
        return self.current_epoch if self.training else VALIDATION_EPOCH

    def _images(self, batch: dict) -> Tensor:
        images = batch["image"]
        if self.hparams.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def setup(self, stage: str) -> None:
        if self.hparams.get("channels_last"):
            self.to(memory_format=torch.channels_last)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(BLACKBOX_PREFIX)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.blackbox.state_dict().items():
            state.setdefault(BLACKBOX_PREFIX + key, value)


class FeatureFilterModule(FrozenBlackBoxModule):
    """Stage 1: train the :class:`FeatureFilter`'s class embedding on a frozen black box.

    Args:
        blackbox: the frozen :class:`BlackBox` (the filter gates its last feature level).
        target: the real class of an image: ``"label"`` (ground truth) or ``"predicted"`` (the black box's
            argmax, the class the predictor will explain).
        fake_prob: fraction of images shown a random wrong class (target 0).
        lr, weight_decay: Adam on the embedding (constant learning rate, or halved every
            ``lr_step_epochs`` epochs when given).
        seed: seeds the per-image fake-class draws (with the epoch and the image's dataset index).
        channels_last: see :class:`FrozenBlackBoxModule`.

    Logs ``{train,val}/loss`` (BCE), ``{train,val}/acc`` (real/fake decided by mean gate > 0.5) and
    ``val/real_gate``, ``val/fake_gate`` (mean gate of real and of wrong classes).
    """

    def __init__(
        self,
        blackbox: BlackBox,
        target: str = "label",
        fake_prob: float = 0.5,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        lr_step_epochs: int | None = None,
        seed: int = 0,
        channels_last: bool = False,
    ):
        super().__init__()
        if target not in TARGET_RULES:
            raise ValueError(f"target must be one of {TARGET_RULES}, got {target!r}")
        if not 0 < fake_prob < 1:
            raise ValueError(f"fake_prob must be in (0, 1), got {fake_prob}")
        self.save_hyperparameters(ignore=["blackbox"])
        self._set_blackbox(blackbox)
        self.filter = FeatureFilter(self.blackbox.feature_channels[-1], self.blackbox.num_classes)
        # Mean gate of real and of fake classes per evaluation split. Metric objects, not per-batch means: a
        # batch (or a whole DDP rank) may hold no fake class at all, and every rank must still log the same
        # keys, or the ranks' all-reduces pair up wrongly and DDP hangs.
        self.gate_means = nn.ModuleDict({f"{split}_{name}": MeanMetric(nan_strategy="ignore")
                                         for split in ("val", "test") for name in GATE_NAMES})

    def _step(self, batch: dict, split: str) -> Tensor:
        images = self._images(batch)
        with torch.no_grad():
            if self.hparams.target == "label":
                last = self.blackbox.features(images)[-1]
                real = batch["label"]
            else:
                features, logits = self.blackbox.features_and_logits(images)
                last, real = features[-1], logits.argmax(1)
        index = batch.get("index", torch.arange(images.shape[0]))
        draws = per_image_uniforms(self.hparams.seed, self._epoch(), STREAM_FAKE_CLASS, index, 2).to(self.device)
        fake = draws[:, 0] < self.hparams.fake_prob
        classes_count = self.filter.num_classes
        offset = 1 + (draws[:, 1] * (classes_count - 1)).long().clamp_max(classes_count - 2)
        classes = torch.where(fake, (real + offset) % classes_count, real)
        gate = self.filter.gate(last.float(), classes, bias=0.0).flatten(1).mean(1)
        is_real = (~fake).float()
        loss = F.binary_cross_entropy(gate.clamp(1e-6, 1 - 1e-6), is_real)
        acc = ((gate > 0.5).float() == is_real).float().mean()
        size = images.shape[0]
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                 batch_size=size)
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=size)
        if split != "train":
            for name, chosen in zip(GATE_NAMES, (~fake, fake)):
                metric = self.gate_means[f"{split}_{name}"]
                metric.update(gate.detach()[chosen].float())
                self.log(f"{split}/{name}", metric, on_epoch=True)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.filter.parameters(), lr=self.hparams.lr,
                                     weight_decay=self.hparams.weight_decay)
        if not self.hparams.lr_step_epochs:
            return optimizer
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, self.hparams.lr_step_epochs, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        record = self.filter.record()
        record.update(blackbox=self.hparams.blackbox["init_args"]["model"],
                      feature_channels=list(self.blackbox.feature_channels))
        checkpoint["feature_filter"] = record


__all__ = ["FeatureFilterModule", "FrozenBlackBoxModule"]
