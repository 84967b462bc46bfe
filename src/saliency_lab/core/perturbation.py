"""The perturbation operator phi(I, M, A) and its substrates A.

One implementation serves training (the mask predictor's loss), the perturbation explainers and the
causal metrics, so every part of the project perturbs images the same way.

All images live in [0, 1] pixel space, shaped (B, 3, H, W); the black box applies its own normalisation.
A *substrate* A is the image that replaces the pixels a mask removes:

- ``"mean"``   a constant per-channel colour (the dataset mean; ImageNet's by default),
- ``"zero"``   black,
- ``"blur"``   a gaussian blur of the image itself (torchvision, reflect padding),
- ``"random"`` a random constant colour per image plus gaussian noise, clamped to [0, 1],
- ``"noise"``  one fixed image of uniform [0, 1] noise (seed 0), the same for every image of a size: a held-out
               perturbation family of the metrics (docs/heldout.md), never a training substrate,
- a tensor     (3, H, W) or (B, 3, H, W) in [0, 1], used as given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from saliency_lab.core.blackbox import IMAGENET_MEAN
from saliency_lab.core.seeding import seeded_generator

SUBSTRATES: tuple[str, ...] = ("mean", "zero", "blur", "random", "noise")
NOISE_SUBSTRATE_SEED = 0
# docs/methods.md §1: std of the noise on the random-colour substrate, in [0, 1] pixel units.
NOISE_STD = 0.055


def perturb(image: Tensor, mask: Tensor, substrate: Tensor, *, mode: str = "bilinear") -> Tensor:
    """phi(I, M, A) = I * M + A * (1 - M): keep the image where the mask is 1, the substrate where 0.

    Args:
        image: (B, C, H, W) float in [0, 1] (C = 3 for RGB).
        mask: (B, 1, h, w) or (1, 1, h, w) float in [0, 1], 1 = keep the image. A mask smaller than the
            image (h <= H, w <= W) is resized to H x W with ``mode`` ("bilinear", align_corners=False,
            or "nearest"); a larger one is refused, because shrinking a mask silently would alias it.
        substrate: anything broadcastable to (B, C, H, W), e.g. (B, C, H, W), (C, H, W) or (C, 1, 1).
        mode: interpolation mode used to resize the mask.

    Returns:
        (B, C, H, W) perturbed image. Differentiable in image, mask and substrate; exact at M in {0, 1}
        (M = 1 gives I bit for bit, M = 0 gives A), which the causal metrics rely on for their end points.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, h, w), got shape {tuple(mask.shape)}")
    height, width = image.shape[-2:]
    if mask.shape[-2:] != (height, width):
        if mask.shape[-2] > height or mask.shape[-1] > width:
            raise ValueError(
                f"mask {tuple(mask.shape[-2:])} is larger than the image {(height, width)}; "
                "resize it explicitly if that is intended"
            )
        align = False if mode == "bilinear" else None
        mask = F.interpolate(mask, size=(height, width), mode=mode, align_corners=align)
    try:
        torch.broadcast_shapes(image.shape, mask.shape, substrate.shape)
    except RuntimeError as err:
        raise ValueError(
            f"image {tuple(image.shape)}, mask {tuple(mask.shape)} and substrate "
            f"{tuple(substrate.shape)} do not broadcast"
        ) from err
    # torch.lerp(A, I, M) = A + M (I - A) is the same equation in one fused kernel (about 3x faster than
    # the four-op form on CPU, which matters for the 2 (n + 1) B images of the causal metrics), and
    # torch computes it as I - (I - A)(1 - M) for M >= 0.5, so it is exact at both M = 0 and M = 1.
    return torch.lerp(substrate.to(image.dtype), image, mask.to(image.dtype))


def clip_kernel_size(kernel_size: int, height: int, width: int) -> tuple[int, int]:
    """(kernel_x, kernel_y): ``kernel_size`` clipped per axis to the largest odd size reflect padding allows.

    Reflect padding of k // 2 pixels needs k // 2 < side, so the largest usable odd kernel is 2 * side - 1.
    Clipping truncates the gaussian's tails; with such a kernel the blur already mixes the whole image
    (e.g. kernel 51, sigma 50 on a 64 x 64 image stays 51; on a 16 x 16 image it becomes 31).
    """
    return min(kernel_size, 2 * width - 1), min(kernel_size, 2 * height - 1)


def gaussian_blur(images: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Gaussian blur of (..., C, H, W) images with an odd square kernel, reflect padding (torchvision).

    The kernel is clipped per axis by :func:`clip_kernel_size` so kernels wider than the image work.
    Returns a tensor of the input's shape and dtype; values stay within the input's range.

    Computed in float32 with autocast off, whatever the input dtype and the surrounding autocast: a depthwise
    convolution with a large kernel in bf16 / fp16 has no fast CPU kernel (a 15 x 15 blur of 128 images at
    64 px took minutes under bf16 autocast, against milliseconds in float32).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    kernel_x, kernel_y = clip_kernel_size(kernel_size, *images.shape[-2:])
    with torch.autocast(images.device.type, enabled=False):
        blurred = TF.gaussian_blur(images.float(), kernel_size=[kernel_x, kernel_y], sigma=[float(sigma)] * 2)
    return blurred.to(images.dtype)


def scaled_blur(
    kernel_size: int, sigma: float, image_size: int, reference_size: int = 224
) -> tuple[int, float]:
    """Scale a blur specified at ``reference_size`` pixels to ``image_size``: (odd kernel >= 3, sigma).

    sigma' = sigma * s and kernel' = the odd integer nearest to kernel * s (at least 3), s = image_size /
    reference_size, so the blur covers the same fraction of the image at every resolution
    (e.g. kernel 11 / sigma 5 at 224 -> 3 / 1.43 at 64; kernel 51 / sigma 50 -> 15 / 14.3).
    """
    scale = image_size / reference_size
    kernel = 2 * round((kernel_size * scale - 1) / 2) + 1
    return max(3, kernel), sigma * scale


def _colour_noise(
    shape: tuple[int, ...], noise_std: float, generator: torch.Generator | None, like: Tensor
) -> Tensor:
    """(N, C, H, W): a random colour ~ U[0,1]^C per image + N(0, noise_std^2) noise, clamped to [0, 1]."""
    n, channels = shape[:2]
    kwargs = {"generator": generator, "device": like.device, "dtype": like.dtype}
    colour = torch.rand((n, channels, 1, 1), **kwargs)
    noise = torch.randn(shape, **kwargs)
    return (colour + noise_std * noise).clamp_(0, 1)


def random_colour_noise(images: Tensor, seeds: Tensor, noise_std: float = NOISE_STD) -> Tensor:
    """Random-colour substrate (B, C, H, W) with image b drawn from its own generator seeded by seeds[b].

    Args:
        images: (B, C, H, W); only its shape, device and dtype are used.
        seeds: (B,) integer seeds, e.g. from :func:`core.seeding.derive_seeds`, so image b's substrate is the same
            whichever batch it sits in.
        noise_std: std of the additive gaussian noise in [0, 1] pixel units (docs/methods.md: about 0.055).

    One generator per image is a python loop over the batch: torch generators cannot be vectorised, and
    the loop only draws random numbers (B small launches), it touches no model.
    """
    seeds = torch.as_tensor(seeds).reshape(-1)
    if seeds.numel() != images.shape[0]:
        raise ValueError(f"need one seed per image: {seeds.numel()} seeds for {images.shape[0]} images")
    single = (1, *images.shape[1:])
    draws = []
    for seed in seeds.tolist():
        generator = seeded_generator(images.device, seed)
        draws.append(_colour_noise(single, noise_std, generator, images))
    return torch.cat(draws)


def fixed_noise(images: Tensor, seed: int = NOISE_SUBSTRATE_SEED) -> Tensor:
    """(B, C, H, W): one (C, H, W) image of uniform [0, 1] noise drawn from ``seed`` on the CPU, repeated for every
    image: deterministic, and independent of the batch, the device and what ran before."""
    noise = torch.rand(tuple(images.shape[1:]), generator=torch.Generator().manual_seed(seed))
    return noise.to(images.device, images.dtype).expand_as(images).clone()


def _constant_colour(colour: Sequence[float] | Tensor, images: Tensor) -> Tensor:
    """(B, C, H, W) image filled with a per-channel colour given in [0, 1]."""
    colour = torch.as_tensor(colour, dtype=images.dtype, device=images.device).reshape(-1)
    if colour.numel() != images.shape[1]:
        raise ValueError(f"mean colour needs {images.shape[1]} values, got {colour.numel()}")
    if colour.min() < 0 or colour.max() > 1:
        raise ValueError(f"mean colour must lie in [0, 1], got {colour.tolist()}")
    return colour.view(1, -1, 1, 1).expand_as(images).clone()


def _check_tensor_substrate(substrate: Tensor, images: Tensor) -> Tensor:
    """Validate a user-given substrate (C, H, W) / (1 or B, C, H, W) in [0, 1]; return it as (B, C, H, W)."""
    expected = tuple(images.shape[1:])
    shape = tuple(substrate.shape)
    if not (
        (substrate.ndim == 3 and shape == expected)
        or (substrate.ndim == 4 and shape[1:] == expected and shape[0] in (1, images.shape[0]))
    ):
        raise ValueError(
            f"tensor substrate must be {expected} or (B or 1, *{expected}) for images "
            f"{tuple(images.shape)}, got {shape}"
        )
    if not substrate.is_floating_point():
        raise ValueError(f"tensor substrate must be floating point, got {substrate.dtype}")
    if substrate.min() < 0 or substrate.max() > 1:
        raise ValueError("tensor substrate values must lie in [0, 1] (pixel space)")
    substrate = substrate.to(device=images.device, dtype=images.dtype)
    return substrate.expand_as(images).clone()


def make_substrate(
    spec: str | Tensor,
    images: Tensor,
    *,
    blur_kernel: int | None = None,
    blur_sigma: float | None = None,
    mean: Sequence[float] | Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: Tensor | None = None,
    noise_std: float = NOISE_STD,
) -> Tensor:
    """The substrate A (B, C, H, W) for ``images`` (B, C, H, W) in [0, 1].

    Args:
        spec: "mean" | "zero" | "blur" | "random" | a tensor (see the module docstring).
        images: (B, C, H, W) float in [0, 1].
        blur_kernel, blur_sigma: odd kernel size and sigma in pixels, required by "blur".
        mean: per-channel colour for "mean"; ImageNet's (0.485, 0.456, 0.406) if None.
        generator: for "random": one generator draws the whole batch (results then depend on the batch
            composition); None uses torch's global generator.
        seeds: for "random": (B,) per-image seeds, preferred over ``generator`` because the result then
            does not depend on batch size (see :func:`random_colour_noise`).
        noise_std: noise std of "random".

    Returns:
        A new (B, C, H, W) tensor in [0, 1] on the images' device and dtype (safe to modify in place).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if isinstance(spec, Tensor):
        return _check_tensor_substrate(spec, images)
    if spec == "mean":
        return _constant_colour(IMAGENET_MEAN if mean is None else mean, images)
    if spec == "zero":
        return torch.zeros_like(images)
    if spec == "blur":
        if blur_kernel is None or blur_sigma is None:
            raise ValueError('substrate "blur" needs blur_kernel and blur_sigma')
        return gaussian_blur(images, blur_kernel, blur_sigma)
    if spec == "noise":
        return fixed_noise(images)
    if spec == "random":
        if seeds is not None:
            return random_colour_noise(images, seeds, noise_std)
        return _colour_noise(tuple(images.shape), noise_std, generator, images)
    raise ValueError(f"unknown substrate {spec!r}; expected one of {SUBSTRATES} or a tensor")
