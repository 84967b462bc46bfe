"""The probe set: the same few images of a split, read by index, that the callbacks explain every epoch."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset


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
