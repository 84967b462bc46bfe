"""Explaining files as ``Trainer.predict``: a LightningModule whose predict step explains its batch.

Lightning provides the loop (DDP sharding, devices, precision, progress bars); the outputs are written
by :class:`saliency_lab.callbacks.explanation_writer.ExplanationWriter` as each batch finishes (``explain.py``).
"""
from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


class ExplanationModule(pl.LightningModule):
    """Explain the black box's predicted class on every image of a batch.

    Args:
        blackbox: the frozen classifier (``BlackBox``) the explainer explains.
        explainer: any explainer of the registry (the contract in docs/architecture.md).
        seed_indices: per dataset position, the index the explainer seeds that image's randomness with
            (``ImageFile.seed_index``: stable per file, so a map does not depend on the batch, the
            process or which other files are explained in the same run).

    ``predict_step(batch)`` takes an ``image_files.collate_files`` batch and returns ``{"index" (B,),
    "saliency" (B,1,S,S) float32 on the CPU, "target" (B,) the explained class = the argmax of the black
    box on the S x S image, "probability" (B,) its softmax probability there, "forwards", "backwards",
    "seconds" (per image: the explainer's cost and wall time of the batch divided by B), "bad" (the
    batch's bad files, passed through)}``.
    """

    def __init__(self, blackbox: torch.nn.Module, explainer, seed_indices: list[int]):
        super().__init__()
        self.blackbox = blackbox
        self.explainer = explainer
        # the explainer's own networks (a predictor's generator) move with the module to the accelerator
        self.explainer_networks = torch.nn.ModuleList(
            v for v in vars(explainer).values() if isinstance(v, torch.nn.Module) and v is not blackbox)
        self.seed_indices = torch.tensor(seed_indices, dtype=torch.long)

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        # only what the black box reads goes to the accelerator; the full-size originals stay for the writer
        return {**batch, "image": batch["image"].to(device), "index": batch["index"].to(device)}

    def predict_step(self, batch: dict, batch_idx: int = 0) -> dict:
        index, images = batch["index"], batch["image"]
        out = {"index": index.cpu(), "bad": batch["bad"]}
        if not len(index):
            return out
        with torch.no_grad():
            probs = self.blackbox.probs(images).float()
        probability, target = probs.max(dim=1)
        start = time.perf_counter()
        saliency = self.explainer(images, target, self.seed_indices[index.cpu()])
        seconds = time.perf_counter() - start
        count, cost = len(index), self.explainer.cost
        out.update(saliency=saliency.float().cpu(), target=target.cpu(), probability=probability.cpu(),
                   forwards=cost.forwards / count, backwards=cost.backwards / count, seconds=seconds / count)
        return out
