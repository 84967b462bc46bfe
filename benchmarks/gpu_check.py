"""One check of a GPU machine, ready for the first one lent: what it has, and how fast the project's hot paths run.

Here, once: ``make gpu-check-deps`` (builds ``build/gpu_deps``). On the GPU machine, from the repository root of
the copied working tree with ``build/gpu_deps`` carried along, with the machine's own Python 3.12 and its torch,
torchvision, lightning, timm, torchmetrics and onnx (400 s of time-boxed sections at most, plus start-up)::

    PYTHONPATH=src:build/gpu_deps python -m benchmarks.gpu_check --out $OUT --commit SHA

``build/gpu_deps`` holds what the check imports beyond those packages: the wheels of :data:`GPU_DEPS`
(``--print-deps`` prints the list, the Makefile target installs it). The list is empty at present: the package
imports captum and scipy only inside the functions that use them (the gradient methods, LIME, ROAD), none of which
the check runs, so nothing else is imported (no W&B, captum, scipy, matplotlib, jsonargparse, pycocotools; no data
set either: the images are random, and speed does not depend on them). The copy on the device has no ``.git``:
``--commit`` names the commit in the report. A CPU-sized run (the same code, JSON keys and table layout on a
narrow ResNet-10, ``timm:resnet10t``, at 32 px with small batches and few iterations: what the tests run)::

    python -m benchmarks.gpu_check --out DIR --scale quick --device cpu

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (a table under the date, commit, machine and command).
Sections (each in its own time box, :data:`SECTION_SHARES` of ``--budget`` seconds: 400 at the full scale, which
bounds the GPU run, and 600 at the quick one, where the boxes only guard a shared CPU; a section that fails or runs
out of time records ``{section: message}`` under ``errors`` and the others still run):

1. ``environment``: Python, torch, CUDA, cuDNN, the GPUs (name, memory, compute capability, bf16), the CPU model,
   cores and native bf16, and the versions of the other packages (read from their metadata, not imported).
2. ``mask_predictor``: one training step of the ImageNet-geometry ``MaskPredictor`` (torchvision's ResNet-50,
   random weights, 1000 classes, CT mode, an untrained random feature filter, channels-last as in
   ``imagenet_resnet50_ct.yaml``) at batch 16, 32 and 64 of 224 px random images: median seconds per step after
   a warm-up, images/s and peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set).
   Precision ``bf16-mixed`` (``torch.autocast`` bf16 around the forward and the loss, as Lightning's
   ``bf16-mixed``) where the device computes bf16 natively, else ``32-true``; the JSON says which and why.
3. ``igos_pp`` and ``iassa``: each method at its defaults on the same ResNet-50 at 224 px, one call on a batch
   of 16 images against the same 16 images one call each (same dataset indices, so the same seeds): seconds of
   each, their ratio (seconds one at a time / seconds batched: above 1, the batch is faster), and the largest
   difference between an image's two maps against :data:`MAP_TOLERANCE`
   (relative to the map's largest value; looser than the CPU conformance tests' 1e-5 because a GPU may pick
   other kernels for another batch size). When the time box ends before every single call ran, the rest is
   extrapolated from the measured ones and ``singles_measured`` says how many ran.
4. ``causal_metrics``: deletion + insertion (``metrics.causal_curves``) of 16 random maps on that ResNet-50 under
   the RISE protocol (pixels, 224 steps) and the iGOS++ protocol (28 x 28 cells, 50 steps): images/s.
5. ``embedded_predictor``: training steps of the embedded ``predictor_game`` recipe (:data:`GAME_RECIPE`, as in
   ``embedded_predictor_game.yaml``: the game only, rise and igos protocols, fractions u^3, channels-last,
   bf16-mixed; the committed ``assets/embedded_blackbox.pt``, 64 px, batch 128) against the black box's own
   forward + backward (to the input) of the same batch: images/s of each and their ratio (training / forward +
   backward).

Every figure is timed by :class:`saliency_lab.core.timing.Stopwatch` (synchronised on the device before the start
and before the stop). The JSON also lists the third-party top-level modules the run imported
(``imported_modules``), which ``tests/test_gpu_check.py`` holds to the device's packages and :data:`GPU_DEPS`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from saliency_lab.core.machine import cpu_model, describe
from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args

ROOT = Path(__file__).resolve().parents[1]

# What the GPU machines have installed (with their own dependencies), and what the check needs beyond them:
# build/gpu_deps is built from GPU_DEPS (`make gpu-check-deps`, via --print-deps) and put on PYTHONPATH there.
DEVICE_PACKAGES = ("torch", "torchvision", "lightning", "timm", "torchmetrics", "onnx")
GPU_DEPS: tuple[str, ...] = ()
REPORTED_VERSIONS = ("torchvision", "lightning", "pytorch-lightning", "timm", "torchmetrics", "onnx", "numpy")

SECTIONS = ("environment", "mask_predictor", "igos_pp", "iassa", "causal_metrics", "embedded_predictor")
# Share of --budget each section may use (the rest of the budget is start-up, model building and writing), and
# the least time box of any section.
SECTION_SHARES = {"environment": 0.02, "mask_predictor": 0.2, "igos_pp": 0.28, "iassa": 0.22,
                  "causal_metrics": 0.1, "embedded_predictor": 0.1}
MIN_SECTION_SECONDS = 2.0
# The keys of each section's JSON record, filled or left None (the same at every scale and on errors).
SECTION_KEYS = {
    "environment": ("python", "torch", "cuda", "cudnn", "cuda_available", "gpus", "cpu", "logical_cores",
                    "cpu_capability", "cpu_bf16_native", "versions"),
    "mask_predictor": ("blackbox", "image_size", "mode", "precision", "precision_reason", "warmup_steps",
                       "timed_steps", "memory_measure", "rows"),
    "igos_pp": ("blackbox", "image_size", "images", "hparams", "precision", "batch_seconds", "single_seconds",
                "singles_measured", "singles_extrapolated", "ratio", "batch_forwards", "max_abs_diff",
                "relative_diff", "tolerance", "maps_agree"),
    "causal_metrics": ("blackbox", "image_size", "images", "repeats", "rows"),
    "embedded_predictor": ("blackbox", "image_size", "batch_size", "recipe", "precision", "precision_reason",
                           "warmup_steps", "timed_steps", "train_step_seconds", "train_images_per_second",
                           "forward_backward_seconds", "forward_backward_images_per_second", "ratio"),
}
SECTION_KEYS["iassa"] = SECTION_KEYS["igos_pp"]
PREDICTOR_ROW_KEYS = ("batch_size", "step_seconds", "images_per_second", "peak_memory_mib", "error")
METRIC_ROW_KEYS = ("protocol", "forwards_per_image", "seconds", "images_per_second", "error")

# Batched vs single maps agree when max |difference| <= MAP_TOLERANCE x the batched map's largest |value|.
MAP_TOLERANCE = 1e-3

# embedded_predictor_game.yaml over embedded_predictor_ct.yaml (configs/): the recipe the embedded section trains.
# Its loss terms are read from configs/objectives/game.yaml when the module is built (build_predictor).
GAME_RECIPE = {"mode": "ct", "eta": 1.5, "h": 5.0, "target": "predicted", "lr": 0.01, "method": "predictor_game",
               "objectives": "configs/objectives/game.yaml", "channels_last": True}


@dataclass(frozen=True)
class Scale:
    """Every size of the check: ``full`` (the default on CUDA) or ``quick`` (a CPU run in seconds: the same code
    on a narrow ResNet-10 at 32 px, small batches and few iterations)."""
    blackbox: str                     # the classifier of the mask predictor, explainer and metric sections
    blackbox_kwargs: dict             # BlackBox's other arguments (random weights: no ``weights``)
    image_size: int                   # of those sections, pixels
    predictor_batches: tuple[int, ...]
    warmup_steps: int
    timed_steps: int
    explainer_images: int             # B of the batched call, also the number of single calls
    explainer_hparams: dict = field(default_factory=dict)   # per method, over its defaults
    explainer_warmup: bool = True     # one-iteration calls on one image and on the batch before the timed ones
    metric_steps: int | None = None   # the protocols' steps (None: each protocol's own)
    metric_images: int = 16
    metric_repeats: int = 3
    embedded_image_size: int = 64
    embedded_batch: int = 128
    budget_seconds: float = 400.0


SCALES = {
    "full": Scale(blackbox="torchvision:resnet50", blackbox_kwargs={"num_classes": 1000}, image_size=224,
                  predictor_batches=(16, 32, 64), warmup_steps=3, timed_steps=10, explainer_images=16,
                  metric_images=16, metric_repeats=3, embedded_image_size=64, embedded_batch=128,
                  budget_seconds=400.0),
    "quick": Scale(blackbox="timm:resnet10t",
                   blackbox_kwargs={"num_classes": 10, "model_kwargs": {"channels": [8, 16, 24, 32]}},
                   image_size=32, predictor_batches=(2, 3, 4), warmup_steps=1, timed_steps=2, explainer_images=2,
                   explainer_hparams={"igos_pp": {"iterations": 2, "ig_steps": 2},
                                      "iassa": {"iterations": 2, "window": 60.0, "stride": 30.0}},
                   explainer_warmup=False, metric_images=2, metric_repeats=1, metric_steps=8,
                   embedded_image_size=32, embedded_batch=8, budget_seconds=600.0),
}


class SectionTimeout(Exception):
    """A section ran past its time box."""


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise :class:`SectionTimeout` inside the block once ``seconds`` have passed (SIGALRM; the main thread of a
    POSIX process, else no limit). The signal is handled between Python bytecodes, so a long native call ends
    first."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SectionTimeout(f"ran past its time box of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Context:
    """What every section shares: the device, its stopwatch, the scale, the section's deadline (monotonic clock)
    and the scale's black box (built once, on first use)."""
    stopwatch: Stopwatch
    scale: Scale
    deadline: float = float("inf")
    _blackbox: object = None

    @property
    def device(self) -> torch.device:
        return self.stopwatch.device

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def blackbox_name(self) -> str:
        return f"{self.scale.blackbox} (random weights, {self.scale.blackbox_kwargs['num_classes']} classes)"

    def new_blackbox(self):
        """A fresh frozen BlackBox of the scale's classifier (random weights, seed 0) on the device."""
        from saliency_lab.core.blackbox import BlackBox

        torch.manual_seed(0)
        return BlackBox(self.scale.blackbox, **self.scale.blackbox_kwargs).to(self.device)

    def blackbox(self):
        """The black box the explainer and metric sections share (built on first use)."""
        if self._blackbox is None:
            self._blackbox = self.new_blackbox()
        return self._blackbox

    def drop_blackbox(self) -> None:
        """Forget the shared black box (after a section stopped mid-call: the next one starts from a fresh one)."""
        self._blackbox = None

    def images(self, count: int, size: int, seed: int = 0) -> torch.Tensor:
        """(count, 3, size, size) uniform random images in [0, 1] on the device, the same for a seed."""
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(count, 3, size, size, generator=generator).to(self.device)


def error_text(error: BaseException) -> str:
    """``Type: message`` on one line, the message cut at 500 characters."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:500]}" if text else type(error).__name__


def bf16_precision(device: torch.device) -> tuple[torch.dtype | None, str, str]:
    """(autocast dtype or None, Lightning's precision name, why): bf16-mixed where the device computes bf16
    natively, else 32-true."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16-mixed", "CUDA device supports bf16"
        return None, "32-true", "CUDA device without bf16"
    if device.type == "cpu":
        if describe("cpu")["cpu_bf16_native"]:
            return torch.bfloat16, "bf16-mixed", "CPU computes bf16 natively (oneDNN)"
        return None, "32-true", "CPU without native bf16: float32 (bf16 would be emulated, slowly)"
    return None, "32-true", f"no bf16 autocast measured on {device.type}"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the kernel's peak-RSS mark of this process (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def peak_memory_mib(device: torch.device) -> float | None:
    """MiB: CUDA's peak allocated memory, or the process's peak resident set (VmHWM) on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            return round(next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration):
        return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- sections ------------------------------------------------------------------------------------------------
def environment(result: dict, ctx: Context) -> None:
    """What the machine has: software versions, GPUs, CPU."""
    import importlib.metadata as metadata

    info = describe(ctx.device)
    result.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  cuda_available=torch.cuda.is_available(), cpu=cpu_model(), logical_cores=os.cpu_count(),
                  cpu_capability=info["cpu_capability"], cpu_bf16_native=info["cpu_bf16_native"])
    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported()
        gpus.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}", "bf16": bf16})
    result["gpus"] = gpus
    versions = {}
    for name in REPORTED_VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    result["versions"] = versions


def predictor_training_step(module, optimizer, images: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    """One training step of ``module`` (a MaskPredictor) on ``images`` (B, 3, H, W) in [0, 1], as its
    ``training_step`` under Lightning's ``bf16-mixed`` (``dtype`` bf16) or ``32-true`` (None): the clean
    forward and the loss under autocast, then backward and the optimiser step outside it. No logging."""
    device_type = images.device.type
    images = module._images({"image": images})
    index = torch.arange(images.shape[0], device=images.device)  # dataset indices, on the device as under a Trainer

    def step() -> None:
        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            with torch.no_grad():
                features, logits = module.blackbox.features_and_logits(images)
            loss = module.compute_loss(images, features, logits.argmax(1), index, 0)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def build_predictor(blackbox, **hparams):
    """A MaskPredictor in training mode with an untrained random filter (its warning silenced) and its Adam."""
    from saliency_lab.core.resources import packaged
    from saliency_lab.lightning_modules.mask_predictor import MaskPredictor
    from saliency_lab.lightning_modules.objectives import load_objectives

    if isinstance(hparams.get("objectives"), str):
        hparams = {**hparams, "objectives": load_objectives(packaged(hparams["objectives"]))}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no filter_checkpoint given: ... randomly initialised"
        module = MaskPredictor(blackbox=blackbox, filter_checkpoint=None, **hparams)
    module.to(blackbox_device(blackbox))
    module.setup("fit")  # channels-last where the hyper-parameters ask, as under a Trainer
    module.train()
    optimizer = torch.optim.Adam([p for p in module.net.parameters() if p.requires_grad], lr=module.hparams.lr)
    return module, optimizer


def blackbox_device(blackbox) -> torch.device:
    return next(blackbox.parameters()).device


def median_seconds(ctx: Context, fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median seconds of ``repeats`` synchronised calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(ctx.stopwatch.time(fn)[1] for _ in range(repeats))


def mask_predictor(result: dict, ctx: Context) -> None:
    """Training-step time and peak memory of the ImageNet-geometry CT predictor per batch size."""
    scale, device = ctx.scale, ctx.device
    dtype, precision, reason = bf16_precision(device)
    result.update(blackbox=ctx.blackbox_name, image_size=scale.image_size,
                  mode="ct", precision=precision, precision_reason=reason, warmup_steps=scale.warmup_steps,
                  timed_steps=scale.timed_steps, rows=[],
                  memory_measure="CUDA max_memory_allocated" if device.type == "cuda"
                  else "process peak resident set (VmHWM)")
    module, optimizer = build_predictor(ctx.new_blackbox(), mode="ct", channels_last=True)
    for batch in scale.predictor_batches:
        row = dict.fromkeys(PREDICTOR_ROW_KEYS)
        row["batch_size"] = batch
        result["rows"].append(row)
        try:
            step = predictor_training_step(module, optimizer, ctx.images(batch, scale.image_size), dtype)
            for _ in range(scale.warmup_steps):
                step()
            reset_peak_memory(device)
            seconds = median_seconds(ctx, step, 0, scale.timed_steps)
            row.update(step_seconds=round(seconds, 5), images_per_second=round(batch / seconds, 1),
                       peak_memory_mib=peak_memory_mib(device))
        except SectionTimeout:
            raise
        except Exception as error:  # e.g. out of memory at the largest batch: the other rows stand
            row["error"] = error_text(error)
        finally:
            optimizer.zero_grad(set_to_none=True)
            free_memory(device)


def explainer_batching(name: str, result: dict, ctx: Context) -> None:
    """``name`` on a batch of B images vs the same B images one call each: seconds, ratio, map agreement."""
    from saliency_lab import explainers

    scale = ctx.scale
    blackbox = ctx.blackbox()
    images = ctx.images(scale.explainer_images, scale.image_size, seed=1)
    indices = torch.arange(images.shape[0])
    with torch.no_grad():
        targets = blackbox.logits(images).argmax(1)
    hparams = dict(scale.explainer_hparams.get(name, {}))
    explainer = explainers.build(name, blackbox, **hparams)
    result.update(blackbox=ctx.blackbox_name, image_size=scale.image_size, images=int(images.shape[0]),
                  hparams=hparams or "defaults", tolerance=MAP_TOLERANCE,
                  precision=f"BlackBox precision {blackbox.precision!r} (no autocast around the explainer)")
    if scale.explainer_warmup:  # kernel selection, allocator growth: on one image and on the batch, one iteration
        warm = explainers.build(name, blackbox, **{**hparams, "iterations": 1})
        warm(images[:1], targets[:1], indices[:1])
        warm(images, targets, indices)
        del warm

    def single(b: int) -> tuple[float, torch.Tensor]:
        saliency, seconds = ctx.stopwatch.time(lambda: explainer(images[b:b + 1], targets[b:b + 1], indices[b:b + 1]))
        return seconds, saliency

    singles = [single(0)]  # one single call first: what the rest will cost
    batched, batch_seconds = ctx.stopwatch.time(lambda: explainer(images, targets, indices))
    result.update(batch_seconds=round(batch_seconds, 4), batch_forwards=int(explainer.cost.forwards))
    for b in range(1, images.shape[0]):
        typical = statistics.median(seconds for seconds, _ in singles)
        if ctx.remaining() < 1.5 * typical + 1.0:
            break  # not enough of the time box left: the rest is extrapolated
        singles.append(single(b))
    measured = len(singles)
    single_total = sum(seconds for seconds, _ in singles)
    single_total += (images.shape[0] - measured) * single_total / measured
    diff = max((saliency[0] - batched[b]).abs().max().item() for b, (_, saliency) in enumerate(singles))
    peak = batched[:measured].abs().max().item()
    relative = diff / peak if peak > 0 else diff
    result.update(single_seconds=round(single_total, 4), singles_measured=measured,
                  singles_extrapolated=measured < images.shape[0], ratio=round(single_total / batch_seconds, 3),
                  max_abs_diff=float(f"{diff:.3g}"), relative_diff=float(f"{relative:.3g}"),
                  maps_agree=bool(relative <= MAP_TOLERANCE))


def causal_metrics(result: dict, ctx: Context) -> None:
    """Deletion + insertion throughput (images/s) under the RISE and the iGOS++ protocols."""
    from saliency_lab.metrics import CausalProtocol, causal_curves

    scale = ctx.scale
    blackbox = ctx.blackbox()
    images = ctx.images(scale.metric_images, scale.image_size, seed=2)
    generator = torch.Generator().manual_seed(3)
    saliency = torch.rand(images.shape[0], 1, *images.shape[-2:], generator=generator).to(ctx.device)
    with torch.no_grad():
        targets = blackbox.logits(images).argmax(1)
    result.update(blackbox=ctx.blackbox_name, image_size=scale.image_size, images=int(images.shape[0]),
                  repeats=scale.metric_repeats, rows=[])
    for name in ("rise", "igos"):
        row = dict.fromkeys(METRIC_ROW_KEYS)
        row["protocol"] = name
        result["rows"].append(row)
        try:
            steps = {} if scale.metric_steps is None else {"steps": scale.metric_steps}
            protocol = getattr(CausalProtocol, name)(scale.image_size, **steps)
            row["forwards_per_image"] = 2 * (protocol.steps + 1)
            seconds = median_seconds(ctx, lambda: causal_curves(blackbox, images, saliency, targets, protocol,
                                                                return_curves=False), scale.warmup_steps,
                                     scale.metric_repeats)
            row.update(seconds=round(seconds, 4), images_per_second=round(images.shape[0] / seconds, 2))
        except SectionTimeout:
            raise
        except Exception as error:
            row["error"] = error_text(error)


def embedded_predictor(result: dict, ctx: Context) -> None:
    """Training throughput of the embedded game recipe vs the black box's forward + backward at that batch."""
    from saliency_lab.core.blackbox import BlackBox

    scale, device = ctx.scale, ctx.device
    dtype, precision, reason = bf16_precision(device)
    batch = scale.embedded_batch
    result.update(blackbox="embedded (assets/embedded_blackbox.pt)", image_size=scale.embedded_image_size,
                  batch_size=batch, recipe="embedded_predictor_game.yaml: " + json.dumps(GAME_RECIPE),
                  precision=precision, precision_reason=reason, warmup_steps=scale.warmup_steps,
                  timed_steps=scale.timed_steps)
    blackbox = BlackBox("embedded").to(device)
    module, optimizer = build_predictor(blackbox, **GAME_RECIPE)
    images = ctx.images(batch, scale.embedded_image_size, seed=4)
    train = predictor_training_step(module, optimizer, images, dtype)
    with torch.no_grad():
        targets = blackbox.logits(images).argmax(1)
    inputs = module._images({"image": images})

    def forward_backward() -> None:
        x = inputs.detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(blackbox.logits(x).float(), targets)
        loss.backward()

    train_seconds = median_seconds(ctx, train, scale.warmup_steps, scale.timed_steps)
    result.update(train_step_seconds=round(train_seconds, 5), train_images_per_second=round(batch / train_seconds, 1))
    bare_seconds = median_seconds(ctx, forward_backward, scale.warmup_steps, scale.timed_steps)
    result.update(forward_backward_seconds=round(bare_seconds, 5),
                  forward_backward_images_per_second=round(batch / bare_seconds, 1),
                  ratio=round(bare_seconds / train_seconds, 3))


RUNNERS: dict[str, Callable[[dict, Context], None]] = {
    "environment": environment, "mask_predictor": mask_predictor,
    "igos_pp": lambda result, ctx: explainer_batching("igos_pp", result, ctx),
    "iassa": lambda result, ctx: explainer_batching("iassa", result, ctx),
    "causal_metrics": causal_metrics, "embedded_predictor": embedded_predictor,
}


# -- the report ----------------------------------------------------------------------------------------------
def third_party_modules() -> list[str]:
    """Top-level modules now imported that come from neither the standard library nor this repository."""
    stdlib = {Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "platstdlib")}
    names = set()
    for name, module in list(sys.modules.items()):
        if "." in name or module is None or name in sys.stdlib_module_names or name in sys.builtin_module_names:
            continue
        location = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or []), None)
        if not location:
            continue  # made at run time (Cython's helper modules, generated code)
        path = Path(location).resolve()
        if path.is_relative_to(ROOT) and "site-packages" not in path.parts and not any(
                part.startswith("gpu_deps") for part in path.parts):
            continue  # this project: src/, benchmarks/
        if any(path.is_relative_to(base) for base in stdlib) and "site-packages" not in path.parts:
            continue
        names.add(name)
    return sorted(names)


def commit_of(given: str | None) -> str:
    """``given``, else this checkout's commit (``+ local changes`` when the tracked files differ), else unknown."""
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=ROOT, capture_output=True,
                               timeout=10).returncode
        return head.stdout.strip() + (" + local changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(argv: list[str]) -> str:
    path = os.environ.get("PYTHONPATH")
    prefix = f"PYTHONPATH={shlex.quote(path)} " if path else ""
    return f"{prefix}python -m benchmarks.gpu_check {shlex.join(argv)}".rstrip()


def _value(value, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}{unit}"
    return f"{value}{unit}"


def short(blackbox: str | None) -> str:
    """The black box's spec without its parenthesised description (a dash when unknown)."""
    return blackbox.split(" (")[0] + " (random)" if blackbox else "—"


def markdown(report: dict) -> str:
    """The report as markdown: the date, commit, machine and command, then one table (the same rows at every
    scale; a missing figure is a dash, errors are rows of their own)."""
    env, pred = report["environment"], report["mask_predictor"]
    lines = ["# GPU check", "", f"- date: {report['date']}", f"- commit: {report['commit']}",
             f"- machine: {report['machine']}", f"- command: `{report['command']}`",
             f"- scale: {report['scale']}, device: {report['device']}", "",
             "| section | measurement | setting | result |", "|---|---|---|---|"]

    def row(*cells) -> None:
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")

    versions = env.get("versions") or {}
    row("environment", "software", f"Python {_value(env['python'])}",
        f"torch {_value(env['torch'])} (CUDA {_value(env['cuda'])}, cuDNN {_value(env['cudnn'])}), "
        + ", ".join(f"{k} {_value(v)}" for k, v in versions.items()))
    gpus = env.get("gpus")
    row("environment", "GPU", f"CUDA available: {_value(env['cuda_available'])}",
        "; ".join(f"{g['name']}, {g['memory_gib']} GiB, compute {g['capability']}, bf16 {g['bf16']}" for g in gpus)
        if gpus else "none")
    row("environment", "CPU", f"{_value(env['logical_cores'])} logical cores",
        f"{_value(env['cpu'])}, {_value(env['cpu_capability'])}, bf16 native {_value(env['cpu_bf16_native'])}")
    setting = (f"{short(pred['blackbox'])}, {_value(pred['image_size'])} px, CT, {_value(pred['precision'])}, "
               f"median of {_value(pred['timed_steps'])} after {_value(pred['warmup_steps'])}")
    for r in pred.get("rows") or []:
        result = (f"error: {r['error']}" if r["error"] else "—" if r["step_seconds"] is None else
                  f"{r['step_seconds'] * 1e3:.1f} ms/step, {_value(r['images_per_second'])} images/s, "
                  f"peak {_value(r['peak_memory_mib'], ' MiB', 5)}")
        row("mask_predictor", f"training step, batch {r['batch_size']}", setting, result)
    for name in ("igos_pp", "iassa"):
        e = report[name]
        hparams = e["hparams"] if isinstance(e["hparams"], str) else json.dumps(e["hparams"])
        result = "—"
        if e["ratio"] is not None:
            result = (f"{e['batch_seconds']:.3g} s vs {e['single_seconds']:.3g} s "
                      f"({e['singles_measured']} measured{', rest extrapolated' if e['singles_extrapolated'] else ''})"
                      f" -> {e['ratio']:.3g}x; maps agree: {e['maps_agree']} (max diff {e['max_abs_diff']:.3g}, "
                      f"relative {e['relative_diff']:.3g} <= {e['tolerance']:g}?)")
        row(name, f"batch of {_value(e['images'])} vs one at a time",
            f"{short(e['blackbox'])}, {_value(e['image_size'])} px, {hparams}", result)
    m = report["causal_metrics"]
    for r in m.get("rows") or []:
        result = f"error: {r['error']}" if r["error"] else f"{_value(r['images_per_second'])} images/s"
        row("causal_metrics", f"deletion + insertion, {r['protocol']} protocol",
            f"{short(m['blackbox'])}, {_value(m['image_size'])} px, {_value(m['images'])} images, "
            f"{_value(r['forwards_per_image'])} forwards/image", result)
    e = report["embedded_predictor"]
    result = "—"
    if e["ratio"] is not None:
        result = (f"{e['train_images_per_second']:.4g} vs {e['forward_backward_images_per_second']:.4g} images/s "
                  f"-> ratio {e['ratio']:.3g}")
    row("embedded_predictor", "training vs black-box forward + backward",
        f"game recipe, {_value(e['image_size'])} px, batch {_value(e['batch_size'])}, {_value(e['precision'])}",
        result)
    row("imports", "third-party modules", "", ", ".join(report["imported_modules"]))
    for section, message in report["errors"].items():
        row("errors", section, "", message)
    return "\n".join(lines) + "\n"


def empty_report() -> dict:
    """Every key of the report, before any section ran."""
    report = {"date": None, "commit": None, "machine": None, "command": None, "scale": None, "device": None,
              "budget_seconds": None, "section_seconds": {}, "errors": {}, "imported_modules": []}
    for section in SECTIONS:
        report[section] = dict.fromkeys(SECTION_KEYS[section])
    return report


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    stopwatch = stopwatch_from_args(args)
    scale_name = args.scale or ("full" if stopwatch.device.type == "cuda" else "quick")
    scale = SCALES[scale_name]
    budget = args.budget or scale.budget_seconds
    report = empty_report()
    report.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=commit_of(args.commit), machine=stopwatch.header(), command=command_line(argv),
                  scale=scale_name, device=str(stopwatch.device), budget_seconds=budget)
    print(report["machine"], flush=True)
    ctx = Context(stopwatch, scale)
    chosen = [s for s in SECTIONS if not args.sections or s in args.sections]
    for section in chosen:
        seconds = max(SECTION_SHARES[section] * budget, MIN_SECTION_SECONDS)
        started = time.monotonic()
        ctx.deadline = started + seconds
        print(f"{section} (time box {seconds:.0f} s) ...", flush=True)
        try:
            with time_box(seconds):
                RUNNERS[section](report[section], ctx)
        except Exception as error:  # the section's message is kept, the other sections still run
            report["errors"][section] = error_text(error)
            ctx.drop_blackbox()
            if not isinstance(error, SectionTimeout):
                traceback.print_exc()
        finally:
            report["section_seconds"][section] = round(time.monotonic() - started, 2)
            free_memory(ctx.device)
        print(f"  {json.dumps(report[section], default=str)[:400]}", flush=True)
    report["imported_modules"] = third_party_modules()
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.md (created)")
    parser.add_argument("--scale", choices=sorted(SCALES), default=None,
                        help="full (default on CUDA) or quick (default elsewhere): every size of the check")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all sections together (default: the scale's, 400 at full, 600 at quick)")
    parser.add_argument("--sections", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--commit", default=None, help="the commit to name in the report (default: git's, if any)")
    parser.add_argument("--print-deps", action="store_true",
                        help="print the packages build/gpu_deps is built from, one per line, and exit")
    add_timing_arguments(parser, threads=min(8, os.cpu_count() or 1), clock="wall")
    args = parser.parse_args(argv)
    if args.print_deps:
        print("\n".join(GPU_DEPS))
        return
    if args.out is None:
        parser.error("--out DIR is required")
    unknown = sorted(set(args.sections or ()) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    report = run(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
