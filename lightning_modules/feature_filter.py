"""The feature filter (class selector) and its stage-1 training (METHODS.md §1).

:class:`FeatureFilter` gates the black box's last feature map X (B, C, h, w) for a class s:

    Y_ij = X_ij * sigmoid(X_ij^T C_s - b)

with C (K, C) one learnt embedding per class (init N(0, 1/sqrt(C)) as a standard deviation) and b a
confidence bias (0 in training; raise it at inference to keep only confident positions).

:class:`FeatureFilterModule` trains only C on the frozen black box: per image, with probability
``fake_prob`` the class is replaced by a random *other* class, and the binary cross-entropy of the
real/fake decision mean_ij sigmoid(X_ij^T C_k) against "is k the image's class" is minimised — real
classes light up the positions of their object, wrong ones are switched off.

Its checkpoints hold a ``"feature_filter"`` record (the embedding and its shape, plain data) that
:meth:`FeatureFilter.from_checkpoint` reads with ``weights_only=True``; the black box's weights are not
stored (its spec is, in the hyper-parameters), since the black box is frozen and rebuilt from its spec.
"""
from __future__ import annotations

import math
import warnings
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from explainers.perturbation import seeded_generator
from lightning_modules.blackbox import BlackBox, safe_load

FILTER_FORMAT = "saliency-lab/feature-filter/v1"
BLACKBOX_PREFIX = "blackbox."
# Streams of per-image randomness (the third part of seeded_generator's seed): one per use, so e.g. the
# fake-class draw and the substrate draw of an image are independent.
STREAM_FAKE_CLASS, STREAM_SUBSTRATE, STREAM_COLOUR = 1, 2, 3
VALIDATION_EPOCH = -1  # validation draws use this "epoch": the same substrates every epoch


class FeatureFilter(nn.Module):
    """Class selector Y = X * sigmoid(X^T C_s - b) on the black box's last feature level.

    Args:
        channels: C of the feature map. num_classes: K.
        bias: b, subtracted from every logit (0 in training).

    Shapes: ``forward(x (B,C,h,w), classes (B,)) -> (B,C,h,w)``; ``gate`` -> (B,1,h,w) in (0,1);
    ``logits`` -> (B,1,h,w) = X^T C_s - b.
    """

    def __init__(self, channels: int, num_classes: int, bias: float = 0.0):
        super().__init__()
        self.channels, self.num_classes, self.bias = int(channels), int(num_classes), float(bias)
        self.embedding = nn.Parameter(torch.randn(num_classes, channels) / math.sqrt(channels))

    def logits(self, x: Tensor, classes: Tensor, bias: float | None = None) -> Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"the filter expects {self.channels} channels, got {x.shape[1]}")
        weights = self.embedding[classes].to(x.dtype)  # (B, C)
        bias = self.bias if bias is None else bias
        return torch.einsum("bchw,bc->bhw", x, weights).unsqueeze(1) - bias

    def gate(self, x: Tensor, classes: Tensor, bias: float | None = None) -> Tensor:
        return torch.sigmoid(self.logits(x, classes, bias))

    def forward(self, x: Tensor, classes: Tensor, bias: float | None = None) -> Tensor:
        return x * self.gate(x, classes, bias)

    def record(self) -> dict:
        """Plain-data record (``weights_only``-loadable) that :meth:`from_record` rebuilds this filter from."""
        return {"format": FILTER_FORMAT, "channels": self.channels, "num_classes": self.num_classes,
                "bias": self.bias, "embedding": self.embedding.detach().cpu().clone()}

    @classmethod
    def from_record(cls, record: dict) -> "FeatureFilter":
        if not isinstance(record, dict) or record.get("format") != FILTER_FORMAT:
            raise ValueError(f"not a feature-filter record (expected format {FILTER_FORMAT!r})")
        module = cls(record["channels"], record["num_classes"], record.get("bias", 0.0))
        with torch.no_grad():
            module.embedding.copy_(record["embedding"])
        return module

    @classmethod
    def from_checkpoint(cls, path: str) -> tuple["FeatureFilter", dict]:
        """(filter, record) from a stage-1 checkpoint written by :class:`FeatureFilterModule`."""
        checkpoint = safe_load(path)
        record = checkpoint.get("feature_filter") if isinstance(checkpoint, dict) else None
        if record is None:
            raise ValueError(f"{path} is not a feature-filter checkpoint (no 'feature_filter' record); train one "
                             "with configs/experiment/*_filter.yaml")
        return cls.from_record(record), record

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}, bias={self.bias}"


def per_image_uniforms(seed: int, epoch: int, stream: int, indices: Tensor, count: int = 1) -> Tensor:
    """(B, count) uniforms in [0, 1) on the CPU; image b's draw depends only on (seed, epoch, stream,
    indices[b]), so it does not change with the batch size or the number of processes."""
    rows = [torch.rand(count, generator=seeded_generator("cpu", seed, epoch, stream, int(i)))
            for i in indices.tolist()]
    return torch.stack(rows) if rows else torch.empty(0, count)


class FrozenBlackBoxModule(pl.LightningModule):
    """Shared plumbing of the stage-1 and stage-2 modules: a frozen :class:`BlackBox` at ``self.blackbox``.

    - The black box is built from its spec (``blackbox``, ``blackbox_weights``, ``num_classes``,
      ``blackbox_kwargs``, ``feature_levels``); its weights are left out of every checkpoint (stripped in
      :meth:`on_save_checkpoint`, put back from the live black box in :meth:`on_load_checkpoint`), so a
      checkpoint holds only what was trained.
    - ``channels_last``: move the module and each batch to channels-last memory format (faster convs on
      recent GPUs, especially with bf16).
    """

    def _build_blackbox(self, blackbox: str, blackbox_weights: str | None, num_classes: int | None,
                        blackbox_kwargs: dict | None, feature_levels: int) -> BlackBox:
        return BlackBox(blackbox, num_classes=num_classes, weights=blackbox_weights, model_kwargs=blackbox_kwargs,
                        feature_levels=feature_levels)

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
        blackbox: black-box spec (``"ckpt:PATH"``, ``"timm:NAME"``, ``"torchvision:NAME"``).
        blackbox_weights: local weight file for a timm / torchvision spec.
        num_classes: classes of the black box (default: the spec's).
        blackbox_kwargs: the black box's model constructor keywords.
        feature_levels: levels of ``BlackBox.features`` (the filter uses the last).
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
        blackbox: str = "ckpt:assets/embedded_blackbox.pt",
        blackbox_weights: str | None = None,
        num_classes: int | None = None,
        blackbox_kwargs: dict | None = None,
        feature_levels: int = 4,
        target: str = "label",
        fake_prob: float = 0.5,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        lr_step_epochs: int | None = None,
        seed: int = 0,
        channels_last: bool = False,
    ):
        super().__init__()
        if target not in ("label", "predicted"):
            raise ValueError(f"target must be 'label' or 'predicted', got {target!r}")
        if not 0 < fake_prob < 1:
            raise ValueError(f"fake_prob must be in (0, 1), got {fake_prob}")
        self.save_hyperparameters()
        self.blackbox = self._build_blackbox(blackbox, blackbox_weights, num_classes, blackbox_kwargs, feature_levels)
        self.filter = FeatureFilter(self.blackbox.feature_channels[-1], self.blackbox.num_classes)

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
            for name, chosen in (("real_gate", ~fake), ("fake_gate", fake)):
                if chosen.any():
                    self.log(f"{split}/{name}", gate[chosen].mean(), on_epoch=True, sync_dist=True,
                             batch_size=int(chosen.sum()))
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
        record.update(blackbox=self.hparams.blackbox, feature_channels=list(self.blackbox.feature_channels))
        checkpoint["feature_filter"] = record


def load_filter(path: str | None, blackbox: BlackBox) -> FeatureFilter:
    """The stage-1 filter at ``path`` for ``blackbox`` (checked to fit), or a random one when ``path`` is None."""
    channels, classes = blackbox.feature_channels[-1], blackbox.num_classes
    if path is None:
        warnings.warn("no filter_checkpoint given: the feature filter is randomly initialised (untrained); train "
                      "it first with a *_filter.yaml experiment", stacklevel=3)
        return FeatureFilter(channels, classes)
    module, record = FeatureFilter.from_checkpoint(path)
    if (module.channels, module.num_classes) != (channels, classes):
        raise ValueError(f"the filter in {path} is for {module.channels} channels / {module.num_classes} classes, "
                         f"the black box has {channels} / {classes}")
    trained_on = record.get("blackbox")
    if trained_on and trained_on != blackbox.spec and not str(trained_on).startswith("ckpt:"):
        warnings.warn(f"the filter in {path} was trained on {trained_on}, the black box is {blackbox.spec}",
                      stacklevel=3)
    return module


__all__ = ["FeatureFilter", "FeatureFilterModule", "FrozenBlackBoxModule", "load_filter", "per_image_uniforms"]
