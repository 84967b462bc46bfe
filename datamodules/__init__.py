"""Datamodules: every one yields batches ``{image (B,3,H,W) in [0,1], label (B,), mask (B,1,H,W) bool,
boxes [list of (K,4) xyxy px], index (B,)}`` (see ``datamodules.common``)."""
from .common import boxes_to_mask, collate_samples
from .embedded import ClutteredFashionMNIST, ClutteredFashionMNISTDataModule
from .scenes import Clutter

__all__ = ["Clutter", "ClutteredFashionMNIST", "ClutteredFashionMNISTDataModule", "boxes_to_mask",
           "collate_samples"]
