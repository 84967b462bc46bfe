"""Training the embedded black box: a small timm CNN classifying cluttered Fashion-MNIST scenes.

The classifier arrives as a :class:`BlackBox` (in configs ``class_path: saliency_lab.core.blackbox.BlackBox`` with the
architecture, the number of classes and the normalisation in ``init_args``), the same object every other
module takes; this module is the one place that trains its network. Its checkpoints carry a ``"blackbox"``
record (``BlackBox.export_record``) so that ``BlackBox("ckpt:PATH")`` rebuilds the frozen classifier from any
of them with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics

from saliency_lab.core.blackbox import BlackBox, read_blackbox_record


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``blackbox.net`` on batches ``{image (B,3,H,W) in [0,1], label (B,)}``.

    Args:
        blackbox: the classifier to train: architecture (``"timm:NAME"`` or ``"torchvision:NAME"``, constructor
            keywords such as ``{"channels": [32, 64, 128, 256]}``), classes and input normalisation, stored with
            the record. Its network is unfrozen here and follows this module's train / eval mode (a
            :class:`BlackBox` on its own always stays frozen and in eval mode).
        lr, weight_decay: AdamW; the learning rate follows a one-cycle schedule over the whole run.
        label_smoothing: of the cross-entropy.
        hflip: random horizontal flips of training images (per image, from the global seeded RNG).
        weights: start from the network of this black-box record or classifier checkpoint (read with
            ``weights_only=True``, checked to be this architecture), e.g. to test the committed embedded black
            box with ``train.py test``.
    """

    def __init__(
        self,
        blackbox: BlackBox,
        lr: float = 3e-3,
        weight_decay: float = 0.05,
        label_smoothing: float = 0.1,
        hflip: bool = True,
        weights: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["blackbox"])
        self.blackbox = blackbox if isinstance(blackbox, BlackBox) else BlackBox.from_config(blackbox)
        self.hparams["blackbox"] = self.blackbox.config()
        self._hparams_initial["blackbox"] = self.blackbox.config()
        self.blackbox.net.requires_grad_(True)
        if weights is not None:
            self._load_weights(weights)
        num_classes = self.blackbox.num_classes
        self.accuracy = torch.nn.ModuleDict({
            split: torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
            for split in ("train_", "val", "test")})  # "train" is a reserved ModuleDict attribute name

    @property
    def net(self) -> torch.nn.Module:
        """The network being trained (``blackbox.net``)."""
        return self.blackbox.net

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        self.blackbox.net.train(mode)  # BlackBox.train() keeps it in eval mode; here it trains
        return self

    def _load_weights(self, path: str) -> None:
        record = read_blackbox_record(path)
        box = self.blackbox
        mine = (box.spec, box.num_classes, dict(box.model_kwargs or {}), box.mean.flatten(), box.std.flatten())
        theirs = (record["model"], record["num_classes"], record["model_kwargs"], record["mean"], record["std"])
        same = [str(a) == str(b) for a, b in zip(mine[:3], theirs[:3])]
        same += [torch.allclose(a, torch.tensor(b, dtype=a.dtype)) for a, b in zip(mine[3:], theirs[3:])]
        if not all(same):
            mine = (*mine[:3], mine[3].tolist(), mine[4].tolist())
            raise ValueError(f"weights {path} are of another classifier: (model, num_classes, model_kwargs, mean, "
                             f"std) = {theirs}, this one is {mine}")
        self.net.load_state_dict(record["state_dict"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) in [0,1] -> logits (B,K) (the black box's own normalisation)."""
        return self.blackbox.logits(images)

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
        checkpoint["blackbox"] = self.blackbox.export_record()
