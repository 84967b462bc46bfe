"""Time of work on a device, and the one setup every benchmark shares.

Kernels on an accelerator run asynchronously, so the clock is read only after the device has finished what was
queued (before the start and before the stop). Benchmarks take ``--device``, ``--threads`` and ``--clock``
(:func:`add_timing_arguments`), build a :class:`Stopwatch` from them (:func:`stopwatch_from_args`) and print its
:meth:`Stopwatch.header` (machine, device, threads, clock, load) above their figures.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from saliency_lab.core.machine import describe, load_average

T = TypeVar("T")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device: torch.device | str) -> None:
    """Wait for every kernel queued on ``device`` (CUDA or MPS); nothing to wait for on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], T], device: torch.device | str, clock: Callable[[], float] = time.perf_counter
          ) -> tuple[T, float]:
    """``(fn(), seconds)``: the seconds ``fn`` took on ``device``, measured between two synchronisations."""
    synchronize(device)
    start = clock()
    result = fn()
    synchronize(device)
    return result, clock() - start


def default_device() -> str:
    """``"cuda"`` where a GPU is visible, else ``"cpu"``: what ``--device auto`` means."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Stopwatch:
    """Synchronised timing on one device with one clock (``"wall"``: seconds that pass; ``"cpu"``: this process's
    CPU seconds, which on a shared machine do not count the waiting for a core; only meaningful on the CPU)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    clock: str = "wall"

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {self.clock!r}")

    def time(self, fn: Callable[[], T]) -> tuple[T, float]:
        """``(fn(), seconds)`` between two synchronisations of the device."""
        return timed(fn, self.device, CLOCKS[self.clock])

    def median(self, fn: Callable[[], object], repeats: int = 5) -> float:
        """The median seconds of ``repeats`` calls of ``fn``."""
        return statistics.median(self.time(fn)[1] for _ in range(repeats))

    def header(self) -> str:
        """One line naming what the figures below were measured on."""
        info = describe(self.device)
        return (f"{info['device_name']} ({info['logical_cores']} logical cores, {torch.get_num_threads()} torch "
                f"threads, CPU capability {info['cpu_capability']}, bf16 native {info['cpu_bf16_native']}), torch "
                f"{info['torch']}, {self.clock} clock, {load_average()}")


def add_timing_arguments(parser: argparse.ArgumentParser, threads: int = 2, clock: str = "wall") -> None:
    """``--device`` (auto | cpu | cuda[:N]), ``--threads`` (torch intra-op threads) and ``--clock`` (wall | cpu)."""
    parser.add_argument("--device", default="auto", help="auto (a GPU where visible, else the CPU), cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=threads, help="torch intra-op threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=clock,
                        help="wall seconds, or this process's CPU seconds (a shared machine: cpu with --threads 1)")


def stopwatch_from_args(args: argparse.Namespace) -> Stopwatch:
    """Apply ``--threads`` and return the :class:`Stopwatch` of ``--device`` / ``--clock``."""
    torch.set_num_threads(args.threads)
    device = default_device() if args.device == "auto" else args.device
    return Stopwatch(torch.device(device), args.clock)
