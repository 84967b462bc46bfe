"""What every datamodule shares: the batch layout and its collate function.

A sample is a dict ``image`` (3,H,W) float32 in [0,1], ``label`` () long, ``mask`` (1,H,W) bool,
``boxes`` (K,4) float32 xyxy in pixels, ``index`` () long. A batch stacks all of them except ``boxes``,
which stays a list of B tensors because K varies.
"""
from __future__ import annotations

import torch

BATCH_KEYS = ("image", "label", "mask", "boxes", "index")


def collate_samples(samples: list[dict]) -> dict:
    """Stack a list of sample dicts into a batch dict (``boxes`` kept as a list)."""
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("image", "label", "mask", "index")}
    batch["boxes"] = [s["boxes"] for s in samples]
    return batch


def boxes_to_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Union of xyxy boxes (K,4) in pixels (x2, y2 exclusive) -> (1,H,W) bool."""
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        mask[0, max(y1, 0):min(y2, height), max(x1, 0):min(x2, width)] = True
    return mask
