"""Shared by the benchmark scripts: the embedded black box (the committed record, else same-shape random
weights — speed does not depend on the weights), embedded test images, and a median timer."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from core.blackbox import BlackBox
from datamodules import ClutteredFashionMNIST

DEMO_CKPT = Path(__file__).resolve().parents[1] / "assets" / "embedded_blackbox.pt"


def embedded_blackbox() -> BlackBox:
    if DEMO_CKPT.is_file():
        return BlackBox(f"ckpt:{DEMO_CKPT}")
    return BlackBox("timm:resnet10t", num_classes=10, model_kwargs={"channels": [32, 64, 128, 256]},
                    mean=(0.5,) * 3, std=(0.25,) * 3)


def embedded_batch(n: int, image_size: int = 64) -> dict:
    ds = ClutteredFashionMNIST("test", image_size=image_size, num_scenes=n)
    samples = [ds[i] for i in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in ("image", "label", "mask", "index")}


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
