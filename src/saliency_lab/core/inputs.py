"""The one input check of every public entry point that takes images: explainers and metrics.

    images    (B, 3, H, W) float32 (or the dtype asked for explicitly), finite, in [0, 1] (pixel space:
              the black box owns its normalisation)
    targets   (B,) torch.long class indices in [0, K) when the number of classes K is known
    saliency  (B, 1, h, w) floating point, finite

Each check raises ``ValueError`` naming the argument, what was expected and what it got, before any model
runs: a NaN image, a ×255 image, a half-precision image or an out-of-range target is refused at the door
instead of failing deep inside a convolution or scoring as a silent NaN.

Lower precisions are an explicit choice, never an accident: the image dtype defaults to float32 and a
caller who really wants to run in float16 / bfloat16 / float64 passes ``image_dtype`` (the explainers'
hyper-parameter and the metrics' keyword of that name), and must then give the black box that dtype too.
"""
from __future__ import annotations

import torch
from torch import Tensor

IMAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
"""The dtypes an ``image_dtype`` option may name; float32 is the default everywhere."""


def resolve_image_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"float16"`` / ``torch.float16`` -> ``torch.float16``; anything outside ``IMAGE_DTYPES`` is refused."""
    if isinstance(value, torch.dtype) and value in IMAGE_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in IMAGE_DTYPES:
        return IMAGE_DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"image_dtype must be one of {sorted(IMAGE_DTYPES)}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (how hyper-parameter records write a dtype)."""
    return str(dtype).removeprefix("torch.")


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def check_images(images: Tensor, *, image_dtype: str | torch.dtype = torch.float32, name: str = "images") -> int:
    """Validate a batch of images (see the module docstring); return the batch size B."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be a (B, 3, H, W) tensor, got {_shape(images)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    expected = resolve_image_dtype(image_dtype)
    if images.dtype != expected:
        hint = (f"convert them with .to({expected})" if not images.is_floating_point() else
                f"convert them with .to({expected}), or pass image_dtype='{dtype_name(images.dtype)}' to run in "
                f"{dtype_name(images.dtype)} on purpose (the black box must then compute in it too)")
        scale = " and scale them to [0, 1]" if not images.is_floating_point() else ""
        raise ValueError(f"{name} are {images.dtype}, expected {expected} pixels in [0, 1]: {hint}{scale}")
    finite = torch.isfinite(images).flatten(1).all(1)
    if not finite.all():
        raise ValueError(f"{name} contain NaN or Inf (batch positions {(~finite).nonzero().flatten().tolist()})")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        hint = "; they look like 0..255 values: divide by 255" if high > 1 and low >= 0 and high <= 255 else ""
        raise ValueError(f"{name} must lie in [0, 1] (pixel space, before normalisation); got [{low:.4g}, "
                         f"{high:.4g}]{hint}")
    return images.shape[0]


def check_targets(targets: Tensor, batch: int, num_classes: int | None = None, *, name: str = "targets",
                  device: torch.device | None = None) -> None:
    """Validate (B,) long class indices, in [0, ``num_classes``) when it is given, on ``device`` if given."""
    if not isinstance(targets, Tensor) or targets.shape != (batch,):
        raise ValueError(f"{name} must be a ({batch},) tensor, one class per image, got {_shape(targets)}")
    if targets.dtype != torch.long:
        raise ValueError(f"{name} must be torch.long (int64) class indices, got {targets.dtype}")
    if device is not None and targets.device != device:
        raise ValueError(f"{name} are on {targets.device} but images on {device}")
    if num_classes is not None:
        low, high = targets.min().item(), targets.max().item()
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}) for this black box, got [{low}, {high}]")


def check_saliency(saliency: Tensor, batch: int | None = None, *, name: str = "saliency") -> None:
    """Validate (B, 1, h, w) finite floating-point saliency maps (B = ``batch`` when given)."""
    if not isinstance(saliency, Tensor) or saliency.ndim != 4 or saliency.shape[1] != 1 or (
            batch is not None and saliency.shape[0] != batch):
        expected = f"(B, 1, h, w) with B = {batch}" if batch is not None else "(B, 1, h, w)"
        raise ValueError(f"{name} must be {expected}, got {_shape(saliency)}")
    if not saliency.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {saliency.dtype}")
    if not torch.isfinite(saliency).all():
        raise ValueError(f"{name} contains NaN or inf")


def num_classes_of(model) -> int | None:
    """The model's number of classes when it declares one (a ``BlackBox`` does), else None."""
    count = getattr(model, "num_classes", None)
    return int(count) if isinstance(count, int) and not isinstance(count, bool) else None


def check_explained_batch(images: Tensor, targets: Tensor, num_classes: int | None = None, *,
                          image_dtype: str | torch.dtype = torch.float32) -> int:
    """Images and their explained targets together, as every explainer and causal metric takes them."""
    batch = check_images(images, image_dtype=image_dtype)
    check_targets(targets, batch, num_classes, device=images.device)
    return batch
