"""The explainer contract (docs/architecture.md) as a base class, and the black-box state guard.

Every explainer is called the same way::

    saliency = explainer(images, targets, indices=None)
    # images  (B, 3, H, W) float in [0, 1]; targets (B,) long in [0, K); indices (B,) long >= 0
    # -> saliency (B, 1, H, W) float on images.device, higher = more salient
    explainer.cost   # Cost(forwards, backwards, images) of that call

A subclass implements only :meth:`Explainer._explain`. The base class validates the inputs, derives one
seed per image from ``(seed, index)``, runs ``_explain`` with the black box's state guarded (see
:func:`preserved_state`), with autograd available even inside Lightning's ``inference_mode`` loops
when the method needs gradients, and counts every image that goes through the black box. Subclasses
reach the black box only through :meth:`Explainer._logits` / :meth:`Explainer._forward` /
:meth:`Explainer._class_probs` / :meth:`Explainer._features` so the counting is uniform (no explainer counts
by hand), and send at most ``max_forward_batch`` images through it at once (the single memory knob).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from saliency_lab.core.blackbox import fast_passes
from saliency_lab.core.inputs import check_explained_batch, dtype_name, resolve_image_dtype
from saliency_lab.core.seeding import derive_seeds

# Module attributes holding hook handles (torch 2.x). `_full_backward_hooks` existed in older releases;
# a missing attribute is skipped, so the list can name every spelling.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_full_backward_hooks",
)


@dataclasses.dataclass
class Cost:
    """Black-box passes used by the last call, counted in images (a batch of 32 through the model = 32).

    Attributes:
        forwards: images sent forward through the black box.
        backwards: images whose black-box output a gradient flowed back through.
        images: images explained (B).
    """

    forwards: int = 0
    backwards: int = 0
    images: int = 0


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[nn.Module]:
    """Restore ``module``'s parameters' ``requires_grad`` and ``.grad``, every submodule's ``training`` flag,
    and remove every module hook registered inside the block — also when the block raises.

    Hooks that existed before the block are kept; only new handles are removed, so a caller's own
    instrumentation survives an explainer call.
    """
    params = list(module.parameters())
    modules = list(module.modules())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    training = [m.training for m in modules]
    full_backward = [getattr(m, "_is_full_backward_hook", None) for m in modules]
    hooks = [{name: set(getattr(m, name, {})) for name in _HOOK_DICTS} for m in modules]
    try:
        yield module
    finally:
        for p, flag, grad in zip(params, requires_grad, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, flag, full, before in zip(modules, training, full_backward, hooks):
            m.training = flag  # the attribute, not m.train(): BlackBox.train() is a deliberate no-op
            if full is not None:
                m._is_full_backward_hook = full
            for name, keys in before.items():
                table = getattr(m, name, None)
                for key in [k for k in (table or {}) if k not in keys]:
                    del table[key]


def rebatch(parts: Iterable[tuple[Tensor, ...]], size: int) -> Iterator[tuple[Tensor, ...]]:
    """Regroup a stream of row-aligned tensor tuples into tuples of exactly ``size`` rows (the last: fewer).

    E.g. per-(image, block) mask draws of any length become forward batches of max_forward_batch, so
    batches stay full across image and block boundaries and the draws never depend on the batching.
    """
    pending: list[tuple[Tensor, ...]] = []
    rows = 0
    for part in parts:
        pending.append(part)
        rows += part[0].shape[0]
        while rows >= size:
            merged = [torch.cat(column) for column in zip(*pending)]
            yield tuple(t[:size] for t in merged)
            pending = [tuple(t[size:] for t in merged)]
            rows -= size
    if rows:
        yield tuple(torch.cat(column) for column in zip(*pending))


def device_of(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer; None for a module that has neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


class Explainer:
    """Base class of every explainer: validation, per-image seeds, state guard, cost counting.

    Args:
        blackbox: a :class:`saliency_lab.core.blackbox.BlackBox` (or any ``nn.Module`` with
            ``logits(x)`` for x (B, 3, H, W) in [0, 1] and an int ``num_classes``).
        seed: run seed in [0, 2**31); image b's randomness comes from ``derive_seeds(seed, indices[b])``.
        max_forward_batch: the most images sent through the black box at once, in one forward (and its
            backward). Bounds memory; results do not depend on it beyond float rounding.
        image_dtype: the dtype images must have ("float32"; "float16", "bfloat16" or "float64" only on
            purpose, with a black box computing in it): any other dtype is refused (``core.inputs``).
        **hparams: the subclass's own keyword arguments; any left over here are unknown and refused.

    Subclass convention (as scikit-learn's ``get_params``): store every keyword argument of ``__init__``
    under its own name, so :attr:`hparams` can report the full configuration next to every result.
    Set ``needs_grad = True`` on methods that back-propagate through the black box. A *trained* method
    (``trained = True``, e.g. the learned mask predictor) is built from the checkpoint of its training run by
    :meth:`from_checkpoint`, which ``explainers.build(name, blackbox, checkpoint=PATH)`` calls.
    """

    name: ClassVar[str] = "explainer"  # set by @register
    needs_grad: ClassVar[bool] = False
    trained: ClassVar[bool] = False
    # Passes inside BlackBox.fast(): bf16 for a precision="auto" black box on bf16 hardware. True only for
    # methods whose maps were measured faithful to float32 (benchmarks/fast_blackbox.py, tests/test_fast_blackbox.py).
    fast_passes: ClassVar[bool] = False

    def __init__(self, blackbox: nn.Module, *, seed: int = 0, max_forward_batch: int = 256,
                 image_dtype: str | torch.dtype = "float32", **hparams):
        if hparams:
            raise TypeError(f"{type(self).__name__} got unknown hyper-parameters {sorted(hparams)}; it accepts "
                            f"{sorted(self._hparam_names())}")
        if not hasattr(blackbox, "logits") or not hasattr(blackbox, "num_classes"):
            raise TypeError(f"blackbox must provide logits(x) and num_classes, got {type(blackbox).__name__}")
        if not 0 <= int(seed) < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {seed}")
        if int(max_forward_batch) < 1:
            raise ValueError(f"max_forward_batch must be >= 1, got {max_forward_batch}")
        self.blackbox = blackbox
        self.seed = int(seed)
        self.max_forward_batch = int(max_forward_batch)
        self.image_dtype = dtype_name(resolve_image_dtype(image_dtype))
        self.cost = Cost()

    @classmethod
    def from_checkpoint(cls, checkpoint, blackbox: nn.Module | None = None, **hparams) -> "Explainer":
        """A trained method from ``checkpoint`` (a path, read with ``weights_only=True``, or the loaded dict);
        ``blackbox`` None rebuilds the black box the checkpoint records. Only trained methods implement it."""
        raise TypeError(f"{cls.name!r} is not a trained method: build it without a checkpoint")

    # -- configuration ------------------------------------------------------------------------------
    @classmethod
    def _hparam_names(cls) -> list[str]:
        names = ["seed", "max_forward_batch", "image_dtype"]
        for klass in cls.__mro__:
            if klass is Explainer or "__init__" not in vars(klass):
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind == p.KEYWORD_ONLY and p.name not in names:
                    names.append(p.name)
        return names

    @property
    def hparams(self) -> dict:
        """Every hyper-parameter of this explainer (defaults included), e.g. to write next to results."""
        return {name: getattr(self, name) for name in self._hparam_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({self.name!r}, {args})"

    # -- the contract -------------------------------------------------------------------------------
    def __call__(self, images: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        """Explain ``targets`` (B,) on ``images`` (B, 3, H, W) in [0, 1] -> saliency (B, 1, H, W).

        ``indices`` (B,) are the images' dataset indices (default ``arange(B)``); they only seed the
        per-image randomness, so the same image gets the same map in any batch.
        """
        seeds = derive_seeds(self.seed, self._check_inputs(images, targets, indices))
        self.cost = Cost(images=images.shape[0])
        # Lightning's validation/test loops run under inference_mode (or no_grad): lift both, and clone the
        # inputs here, because inference tensors cannot be saved for backward.
        with preserved_state(self.blackbox), fast_passes(self.blackbox, self.fast_passes), \
                torch.inference_mode(False), torch.set_grad_enabled(self.needs_grad):
            saliency = self._explain(images.clone(), targets.clone(), seeds)
        expected = (images.shape[0], 1, *images.shape[-2:])
        if tuple(saliency.shape) != expected:
            raise RuntimeError(f"{type(self).__name__} returned saliency {tuple(saliency.shape)}, expected {expected}")
        return saliency.detach().to(device=images.device, dtype=images.dtype)

    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        """The method itself. images (B, 3, H, W) in [0, 1], targets (B,) long, seeds (B,) int64 on the CPU
        (one per image) -> saliency (B, 1, H, W). Runs inside the state guard, with grad mode = needs_grad."""
        raise NotImplementedError

    # -- input validation ---------------------------------------------------------------------------
    def _check_inputs(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> Tensor:
        """Raise ValueError on malformed inputs (``core.inputs``, shared with the metrics, plus the device);
        return the indices as a CPU int64 tensor (B,)."""
        if isinstance(images, Tensor):
            device = device_of(self.blackbox)
            if device is not None and device != images.device:
                raise ValueError(f"images are on {images.device} but the black box is on {device}")
        batch = check_explained_batch(images, targets, int(self.blackbox.num_classes), image_dtype=self.image_dtype)
        if indices is None:
            return torch.arange(batch)
        indices = torch.as_tensor(indices)
        if indices.shape != (batch,) or indices.is_floating_point():
            raise ValueError(f"indices must be an integer tensor of shape ({batch},), got {indices.dtype} "
                             f"{tuple(indices.shape)}")
        return indices.to(device="cpu", dtype=torch.long)

    # -- black-box access (counted) -----------------------------------------------------------------
    def _logits(self, x: Tensor) -> Tensor:
        """One black-box call: x (N, 3, H, W) in pixel space -> logits (N, K), counted.

        The caller keeps N <= max_forward_batch (captum's internal batching, chunk loops). When autograd
        records the call, a tensor hook on the output counts the backward pass once the gradient reaches
        it — a tensor hook, not a module hook, so it dies with the graph.
        """
        logits = self.blackbox.logits(x)
        count = x.shape[0]
        self.cost.forwards += count
        if logits.requires_grad:
            def count_backward(grad: Tensor) -> None:
                self.cost.backwards += count

            logits.register_hook(count_backward)
        return logits

    def _features(self, x: Tensor) -> list[Tensor]:
        """One counted black-box call returning its feature maps: x (N, 3, H, W) in pixel space -> the
        ``blackbox.features(x)`` list (shallow to deep, (N, C_l, H_l, W_l)).

        N <= max_forward_batch is the caller's job, as for :meth:`_logits`. The backward pass is counted on
        the *input*: a tensor hook on x fires once when a gradient has flowed back through the network to
        the image, whichever levels the loss used (x must then require grad, e.g. a masked image).
        """
        if not hasattr(self.blackbox, "features"):
            raise TypeError(f"{type(self).__name__} needs a black box with features(x), got "
                            f"{type(self.blackbox).__name__}")
        count = x.shape[0]
        if x.requires_grad and torch.is_grad_enabled():
            def count_backward(grad: Tensor) -> None:
                self.cost.backwards += count

            x.register_hook(count_backward)
        maps = list(self.blackbox.features(x))
        self.cost.forwards += count
        return maps

    def _chunks(self, total: int, size: int | None = None) -> Iterator[slice]:
        """Consecutive slices covering range(total), each at most ``size`` (default max_forward_batch) long."""
        size = size or self.max_forward_batch
        return (slice(start, min(start + size, total)) for start in range(0, total, size))

    def _forward(self, x: Tensor) -> Tensor:
        """Logits (N, K) of any number of images, in chunks of max_forward_batch (for scoring without grad)."""
        return torch.cat([self._logits(x[part]) for part in self._chunks(x.shape[0])])

    def _class_probs(self, x: Tensor, classes: Tensor) -> Tensor:
        """p_c(x): softmax probability (N,) of class ``classes[n]`` (N,) for image x[n] (N, 3, H, W)."""
        return self._forward(x).softmax(dim=1).gather(1, classes[:, None]).squeeze(1)

