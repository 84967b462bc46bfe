"""Wall-clock time of work on an accelerator: kernels run asynchronously, so the clock is read only after the
device has finished what was queued (before the start and before the stop)."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | str) -> None:
    """Wait for every kernel queued on ``device`` (CUDA or MPS); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], T], device: torch.device | str) -> tuple[T, float]:
    """``(fn(), seconds)``: the seconds ``fn`` took on ``device``, measured between two synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start
