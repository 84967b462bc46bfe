"""Datamodules: every one yields batches ``{image (B,3,H,W) in [0,1], label (B,), mask (B,1,H,W) bool,
boxes [list of (K,4) xyxy px], index (B,)}`` (see ``datamodules.common``)."""
from .common import boxes_to_mask, collate_samples
from .embedded import ClutteredFashionMNIST, ClutteredFashionMNISTDataModule, embedded_batch
from .scenes import Clutter
from .coco import BadAnnotationWarning, COCODataModule, COCODetection
from .common import BadImageError, BadImageWarning
from .imagenet import ImageNetDataModule, ImageNetFolder

__all__ = ["BadAnnotationWarning", "Clutter", "ClutteredFashionMNIST", "ClutteredFashionMNISTDataModule", "boxes_to_mask",
           "collate_samples", "embedded_batch",
           "BadImageError", "BadImageWarning", "COCODataModule", "COCODetection", "ImageNetDataModule",
           "ImageNetFolder", "export_coco", "export_imagenet"]

_LAZY_EXPORTS = {"export_coco", "export_imagenet"}  # imported on first use: importing the scene export
# here would load PIL writers and pycocotools for every user of the data modules


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        from . import scene_export as export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
