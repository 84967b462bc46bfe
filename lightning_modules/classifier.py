"""Training the embedded black box: a small timm CNN classifying cluttered Fashion-MNIST scenes.

Its checkpoints carry a ``"blackbox"`` record (``blackbox_record``) so that ``BlackBox("ckpt:PATH")``
rebuilds the frozen classifier from any of them with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics

from .blackbox import blackbox_record, create_network, read_blackbox_record


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``create_network(model)`` on batches ``{image (B,3,H,W) in [0,1], label (B,)}``.

    Args:
        model: ``"timm:NAME"`` or ``"torchvision:NAME"``.
        num_classes: classes of the data.
        model_kwargs: constructor keywords (e.g. ``{"channels": [32, 64, 128, 256]}`` for a narrow ResNet).
        mean, std: input normalisation, stored with the black box.
        lr, weight_decay: AdamW; the learning rate follows a one-cycle schedule over the whole run.
        label_smoothing: of the cross-entropy.
        hflip: random horizontal flips of training images (per image, from the global seeded RNG).
        weights: start from the network of this black-box record or classifier checkpoint (read with
            ``weights_only=True``), e.g. to test the committed embedded black box with ``train.py test``.
    """

    def __init__(
        self,
        model: str = "timm:resnet10t",
        num_classes: int = 10,
        model_kwargs: dict | None = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        lr: float = 3e-3,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.1,
        hflip: bool = True,
        weights: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.net = create_network(model, num_classes, model_kwargs)
        if weights is not None:
            self._load_weights(weights)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.accuracy = torch.nn.ModuleDict({
            split: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
            for split in ("train_", "val", "test")})  # "train" is a reserved ModuleDict attribute name

    def _load_weights(self, path: str) -> None:
        record = read_blackbox_record(path)
        hp = self.hparams
        mine = (hp.model, hp.num_classes, dict(hp.model_kwargs or {}), list(hp.mean), list(hp.std))
        theirs = (record["model"], record["num_classes"], record["model_kwargs"], record["mean"], record["std"])
        if [str(v) for v in mine] != [str(v) for v in theirs]:
            raise ValueError(f"weights {path} are of another classifier: (model, num_classes, model_kwargs, mean, "
                             f"std) = {theirs}, this one is {mine}")
        self.net.load_state_dict(record["state_dict"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) in [0,1] -> logits (B,K)."""
        return self.net((images - self.mean) / self.std)

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        if not self.hparams.hflip:
            return images
        flip = torch.rand(images.shape[0], device=images.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        images = self._augment(batch["image"]) if split == "train" else batch["image"]
        logits = self(images)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        metric = self.accuracy["train_" if split == "train" else split]
        metric(logits.argmax(1), batch["label"])
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                 batch_size=len(images))
        self.log(f"{split}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(images))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=int(self.trainer.estimated_stepping_batches),
            pct_start=0.15)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        hp = self.hparams
        checkpoint["blackbox"] = blackbox_record(hp.model, self.net, hp.num_classes, hp.model_kwargs, hp.mean, hp.std)
