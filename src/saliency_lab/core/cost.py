"""What black-box work costs: passes counted, FLOPs counted, peak memory measured, and GPU-hours from them.

The pieces ``saliency-lab cost`` (``cli/cost.py``) puts together, each usable on its own:

- :class:`PassCounter`: images sent forward through a :class:`BlackBox` (every ``logits``, ``features`` and
  ``features_and_logits`` call goes through ``BlackBox._run``, which the counter wraps) and images whose
  black-box output a gradient reached (a tensor hook on each output that requires grad: one backward per
  pass and image, however many of its outputs the loss used);
- :func:`count_flops`: the FLOPs of a call as ``torch.utils.flop_counter.FlopCounterMode`` counts them
  (matrix products and convolutions, forward and backward, 2 per multiply-add; element-wise work, pooling and
  interpolation count 0);
- :func:`peak_memory`: the peak of the bytes a call allocates on top of what was allocated before it (CPU: the
  allocator's events as ``torch.profiler`` records them with ``profile_memory``; CUDA:
  ``torch.cuda.max_memory_allocated``); :func:`slope` turns two peaks into bytes per image;
- :func:`stand_in_blackbox`: a cheap black box with the geometry of a real one (input size, classes,
  normalisation, feature strides and channels), to count the passes of methods whose count depends on the image size and
  their hyper-parameters, not on the network;
- :data:`GPUS` and :func:`gpu_hours`: hours of one GPU for a number of FLOPs at a fraction of its peak.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from saliency_lab.core.blackbox import BlackBox

T = TypeVar("T")
IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 training split
DEFAULT_UTILISATION = 0.4  # the fraction of the dense peak assumed sustained (an assumption, not a measurement)
PRECISIONS = ("bf16", "tf32")


@dataclasses.dataclass(frozen=True)
class GPU:
    """Dense (no structured sparsity) tensor-core peaks of one GPU, TFLOP/s.

    Attributes:
        name: the GPU as ``--gpus`` names it.
        bf16: peak dense BF16 (= FP16) tensor-core TFLOP/s: passes under bf16 autocast.
        tf32: peak dense TF32 tensor-core TFLOP/s: float32 passes (PyTorch runs float32 convolutions in TF32 on
            these GPUs by default, ``torch.backends.cudnn.allow_tf32``).
        source: the datasheet the numbers come from (its "with sparsity" figures are twice these).
    """

    name: str
    bf16: float
    tf32: float
    source: str

    def peak(self, precision: str) -> float:
        """Peak FLOP/s (not TFLOP/s) of ``precision`` ("bf16" or "tf32")."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        return getattr(self, precision) * 1e12


# Vendor datasheets, dense figures (half of the "with sparsity" ones they print beside them).
GPUS = {gpu.name: gpu for gpu in (
    GPU("A100", 312.0, 156.0, "NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe: BF16 312, TF32 156)"),
    GPU("H100", 989.0, 494.5, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM (BF16 1,979 / TF32 989 with sparsity)"),
    GPU("H100-PCIe", 756.0, 378.0,
        "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe (BF16 1,513 / TF32 756 with sparsity)"),
    GPU("H200", 989.0, 494.5, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM (BF16 1,979 / TF32 989 with sparsity)"),
    GPU("L40S", 362.0, 183.0, "NVIDIA L40S datasheet (BF16 362.05 / 733 with sparsity, TF32 183 / 366)"),
    GPU("L4", 121.0, 60.0, "NVIDIA L4 datasheet (BF16 242 / TF32 120 with sparsity)"),
    GPU("A10", 125.0, 62.5, "NVIDIA A10 datasheet (BF16 125 / 250 with sparsity, TF32 62.5 / 125)"),
)}
DEFAULT_GPUS = ("A100", "H100", "L40S")


def parse_gpus(text: str | Sequence[str]) -> list[GPU]:
    """The GPUs of ``"A100,H100"`` (or a list of names), case-insensitive; an unknown name is refused, naming
    the known ones."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    by_lower = {name.lower(): gpu for name, gpu in GPUS.items()}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown or not names:
        raise ValueError(f"--gpus: unknown GPU(s) {unknown or names}; known: {', '.join(GPUS)}")
    return [by_lower[n.lower()] for n in names]


def gpu_hours(flops: float, gpu: GPU, bf16_fraction: float = 1.0,
              utilisation: float = DEFAULT_UTILISATION) -> float:
    """Hours one ``gpu`` needs for ``flops`` FLOPs at ``utilisation`` (in (0, 1]) of its dense peaks, a fraction
    ``bf16_fraction`` of them at the bf16 peak and the rest at the TF32 peak (float32 passes):
    flops x (f / bf16 + (1 - f) / tf32) / utilisation / 3600."""
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
    if not 0 <= bf16_fraction <= 1:
        raise ValueError(f"bf16_fraction must be in [0, 1], got {bf16_fraction}")
    seconds = float(flops) * (bf16_fraction / gpu.peak("bf16") + (1 - bf16_fraction) / gpu.peak("tf32"))
    return seconds / utilisation / 3600.0


# -- passes -----------------------------------------------------------------------------------------------
def _tensors(out) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for item in out:
            yield from _tensors(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _tensors(item)


class PassCounter:
    """Count the images that go through black boxes inside a ``with`` block.

    ``forwards``: images sent through a black box (a pass of a batch of N counts N), whatever the call
    (``logits``, ``probs``, ``features``, ``features_and_logits``). ``backwards``: images of those passes whose
    outputs a gradient reached (a tensor hook on every output that requires grad; the first one to fire counts
    the pass, so a loss on several of its outputs still counts one backward). A pass made without autograd
    (``no_grad``, or a frozen black box on an input that needs no gradient) has no backward to count.

    Args:
        blackboxes: the :class:`BlackBox` objects to watch (one or several); their ``_run`` is wrapped for the
            block and restored after it.
    """

    def __init__(self, blackboxes: BlackBox | Sequence[BlackBox]):
        self.blackboxes = [blackboxes] if isinstance(blackboxes, BlackBox) else list(blackboxes)
        self.forwards = 0
        self.fast_forwards = 0
        self.backwards = 0
        self.calls = 0

    @property
    def bf16_fraction(self) -> float:
        """Fraction of the forwards that run bf16 on a GPU (0 when there were none)."""
        return self.fast_forwards / self.forwards if self.forwards else 0.0

    def __enter__(self) -> "PassCounter":
        self._saved = [blackbox.__dict__.get("_run") for blackbox in self.blackboxes]
        for blackbox in self.blackboxes:
            blackbox.__dict__["_run"] = self._counted(blackbox, blackbox._run)
        return self

    def __exit__(self, *exc) -> None:
        for blackbox, saved in zip(self.blackboxes, self._saved):
            if saved is None:
                blackbox.__dict__.pop("_run", None)
            else:  # a counter around this one
                blackbox.__dict__["_run"] = saved

    def _counted(self, blackbox: BlackBox, run: Callable):
        def counted(fn, x: torch.Tensor):
            out = run(fn, x)
            images = int(x.shape[0])
            self.forwards += images
            if blackbox.precision == "bf16" or (blackbox.precision == "auto" and blackbox._fast_depth > 0):
                self.fast_forwards += images
            self.calls += 1
            needing = [t for t in _tensors(out) if t.requires_grad]
            if needing:
                seen = [False]

                def count_backward(grad: torch.Tensor) -> None:
                    if not seen[0]:
                        seen[0] = True
                        self.backwards += images

                for tensor in needing:
                    tensor.register_hook(count_backward)
            return out

        return counted


# -- FLOPs ------------------------------------------------------------------------------------------------
class _GlobalOnly:
    """In place of ``FlopCounterMode``'s module tracker: every FLOP counts under "Global" only. The tracker's
    backward hooks on module inputs break ``torch.autograd.grad`` with respect to a leaf input (Grad-CAM's
    call), and the per-module split is not needed here."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc) -> None:
        return None


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), FLOPs)``: the FLOPs ``FlopCounterMode`` counts while ``fn`` runs (forward and any backward
    inside it; 2 per multiply-add of matrix products and convolutions, element-wise work not counted)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        result = fn()
    return result, int(counter.get_total_flops())


def pass_flops(blackbox: BlackBox, image_size: int, backward: bool = False, batch: int = 1) -> float:
    """FLOPs per image of one black-box pass on ``batch`` random (3, image_size, image_size) images in [0, 1]:
    the forward (``backward`` False), or the forward and a backward to the input (``backward`` True; the
    black box is frozen, so no weight gradient is computed)."""
    device = _device_of(blackbox)
    x = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        if not backward:
            with torch.no_grad():
                return blackbox.logits(x)
        with torch.enable_grad():
            y = x.clone().requires_grad_(True)
            blackbox.logits(y).float().sum().backward()

    return count_flops(run)[1] / batch


# -- memory -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) for the block."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """``(fn(), bytes)``: the peak of the memory ``fn`` allocated on ``device`` above what was allocated when it
    started (tensors alive before the call, e.g. the weights, are not counted).

    CPU: every allocation and free of the CPU allocator as ``torch.profiler`` records them (``profile_memory``),
    summed in time order, workspaces of the kernels included. CUDA: ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``, less the bytes allocated before."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return result, int(peak)


def slope(small: tuple[int, float], large: tuple[int, float]) -> float:
    """Per-image growth between two (batch size, value) measurements: (v_large - v_small) / (b_large - b_small),
    at least 0 (the part of a peak that grows with the batch, without what every batch pays once)."""
    (b0, v0), (b1, v1) = small, large
    if b1 <= b0:
        raise ValueError(f"slope needs a larger second batch, got {b0} and {b1}")
    return max(0.0, (v1 - v0) / (b1 - b0))


# -- the stand-in black box -------------------------------------------------------------------------------
class _Broadcast(nn.Module):
    """A one-channel map (B, 1, h, w) as ``channels`` identical channels: a view, no FLOPs, no memory."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1)


class StandInNet(nn.Module):
    """One strided one-channel 3 x 3 convolution per feature level and a linear head: feature maps at
    ``strides`` (input side / map side) with ``channels`` channels each (the one channel broadcast, so the
    methods that read features compute on maps of the real network's shape), and ``num_classes`` logits.
    What it computes is meaningless; its passes cost a few MFLOPs at 224."""

    def __init__(self, strides: Sequence[int], channels: Sequence[int], num_classes: int):
        super().__init__()
        if len(strides) != len(channels) or not strides:
            raise ValueError(f"one stride per channel count, at least one level; got {list(strides)}, {list(channels)}")
        stages, previous = [], 1
        for index, (stride, width) in enumerate(zip(strides, channels)):
            step = max(1, int(stride) // previous)
            stages.append(nn.Sequential(nn.Conv2d(3 if index == 0 else 1, 1, 3, stride=step, padding=1), nn.ReLU(),
                                        _Broadcast(width)))
            previous *= step
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)[:, :1]
        return self.head(x.mean((2, 3)))


def stand_in_blackbox(blackbox: BlackBox, input_size: int, seed: int = 0) -> BlackBox:
    """A :class:`StandInNet` black box with ``blackbox``'s geometry: its classes, normalisation, and its feature
    levels' strides and channels (probed at ``input_size``), its ``precision`` setting (so that the passes in
    :meth:`BlackBox.fast` blocks are told apart), contiguous layout, on ``blackbox``'s device.

    The passes a method makes depend on the image size and its hyper-parameters (masks, windows, steps,
    iterations), not on the network, so they can be counted on this network where the real one would take
    too long (e.g. iGOS++ with a ResNet-50 at 224 on a CPU). Counts that depend on the network's outputs
    (iGOS++'s line-search trials) are one sample there."""
    strides = list(getattr(blackbox, "feature_strides", None) or [4, 8, 16, 32])
    channels = list(getattr(blackbox, "feature_channels", None) or [1] * len(strides))
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        net = StandInNet(strides, channels, int(blackbox.num_classes))
    layers = [f"stages.{i}" for i in range(len(strides))]
    stand_in = BlackBox.from_module(net, mean=blackbox.mean.flatten().tolist(), std=blackbox.std.flatten().tolist(),
                                    num_classes=int(blackbox.num_classes), feature_layers=layers,
                                    input_size=int(input_size), precision=blackbox.precision, channels_last=False)
    return stand_in.to(_device_of(blackbox))


def _device_of(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def round_sig(value: float, digits: int = 3) -> float:
    """``value`` rounded to ``digits`` significant digits (0 and non-finite values unchanged)."""
    if not value or not math.isfinite(value):
        return value
    return round(value, digits - 1 - int(math.floor(math.log10(abs(value)))))
