"""Gradient baselines through captum: vanilla gradient, SmoothGrad, Integrated Gradients.

All three differentiate the target class's logit y_c (pre-softmax score, as Simonyan et al. and captum's
examples do) with respect to the [0, 1] input image; the black box's normalisation is part of the model.
Each gives per-channel attributions (B, 3, H, W), reduced to a map (B, 1, H, W) by ``channel_reduction``:

- "abs_max": max_ch |a| (Simonyan et al. 2014, Sec. 3.1) — default of gradient and SmoothGrad;
- "abs_sum": sum_ch |a| — default of Integrated Gradients, whose attributions add up per pixel;
- "sum":     sum_ch a (signed: evidence against the class ranks lowest).
"""

from __future__ import annotations

import torch
from torch import Tensor

from saliency_lab.core.perturbation import make_substrate, scaled_blur
from saliency_lab.core.seeding import seeded_generator
from saliency_lab.explainers.base import Explainer
from saliency_lab.explainers.registry import register

CHANNEL_REDUCTIONS = ("abs_max", "abs_sum", "sum")
IG_BASELINES = ("zero", "blur", "mean")


def reduce_channels(attributions: Tensor, mode: str) -> Tensor:
    """(B, C, H, W) attributions -> (B, 1, H, W) map, by one of :data:`CHANNEL_REDUCTIONS`."""
    if mode == "abs_max":
        return attributions.abs().amax(dim=1, keepdim=True)
    if mode == "abs_sum":
        return attributions.abs().sum(dim=1, keepdim=True)
    if mode == "sum":
        return attributions.sum(dim=1, keepdim=True)
    raise ValueError(f"unknown channel_reduction {mode!r}; expected one of {CHANNEL_REDUCTIONS}")


def _leaf(x: Tensor) -> Tensor:
    """x as a fresh autograd leaf that requires grad (so captum does not warn and no graph leaks in)."""
    return x.detach().requires_grad_(True)


class _CaptumAttribution(Explainer):
    """Shared loop of the captum baselines: chunks of images -> attributions -> channel reduction."""

    needs_grad = True

    def __init__(self, blackbox, *, channel_reduction: str, **common):
        super().__init__(blackbox, **common)
        if channel_reduction not in CHANNEL_REDUCTIONS:
            raise ValueError(f"unknown channel_reduction {channel_reduction!r}; expected one of {CHANNEL_REDUCTIONS}")
        self.channel_reduction = channel_reduction

    def _images_per_chunk(self) -> int:
        """Images attributed per captum call so that one forward holds at most max_forward_batch images."""
        return self.max_forward_batch

    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        maps = [reduce_channels(self._attribute(images[part], targets[part], seeds[part]), self.channel_reduction)
                for part in self._chunks(images.shape[0], self._images_per_chunk())]
        return torch.cat(maps)

    def _attribute(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        """Per-channel attributions (b, 3, H, W) of ``targets`` (b,) for ``images`` (b, 3, H, W)."""
        raise NotImplementedError


@register("gradient")
class Gradient(_CaptumAttribution):
    """Vanilla gradient (Simonyan, Vedaldi & Zisserman, ICLR-W 2014): M = max_ch |dy_c / dI|.

    captum ``Saliency``; one forward and one backward per image.
    """

    def __init__(self, blackbox, *, channel_reduction: str = "abs_max", **common):
        super().__init__(blackbox, channel_reduction=channel_reduction, **common)

    def _attribute(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        from captum.attr import Saliency  # captum (and its matplotlib) only where a captum method runs

        return Saliency(self._logits).attribute(_leaf(images), target=targets, abs=False)


@register("smoothgrad")
class SmoothGrad(_CaptumAttribution):
    """SmoothGrad (Smilkov et al. 2017, Eq. 2): the gradient averaged over noisy copies of the image,

        M_c(I) = (1/n) sum_{k=1..n} dy_c / dI (I + N(0, sigma^2)),   then max_ch |.|

    Args:
        n_samples: n (default 25; the paper finds 20-50 enough).
        noise_std: sigma in [0, 1] pixel units. Default 0.15 = 15% of the pixel range x_max - x_min = 1
            (the paper's recommended 10-20%). The noisy images are not clipped to [0, 1] (as in the paper).
        channel_reduction: see the module docstring; applied after averaging the signed gradients (the
            paper averages gradients, captum's Saliency(abs=True) would average their magnitudes).

    Deviation from captum's ``NoiseTunnel(Saliency)``: NoiseTunnel draws the noise of the whole batch from
    torch's global generator, so an image's noise would depend on its batch mates. Here image b's n noise
    images come from its own generator (seed from (seed, index_b)) on the device; the gradients are
    still captum's ``Saliency``, on all noisy images of several images at once (<= max_forward_batch).
    Cost: n forwards and n backwards per image.
    """

    def __init__(self, blackbox, *, n_samples: int = 25, noise_std: float = 0.15,
                 channel_reduction: str = "abs_max", **common):
        super().__init__(blackbox, channel_reduction=channel_reduction, **common)
        if n_samples < 1 or noise_std < 0:
            raise ValueError(f"need n_samples >= 1 and noise_std >= 0, got {n_samples}, {noise_std}")
        self.n_samples = int(n_samples)
        self.noise_std = float(noise_std)

    def _images_per_chunk(self) -> int:
        # Whole images per chunk, so an image's noise is drawn once; n > max_forward_batch is split below.
        return max(1, self.max_forward_batch // self.n_samples)

    def _attribute(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        from captum.attr import Saliency

        noisy = torch.cat([self._noisy_copies(image, int(seed)) for image, seed in zip(images, seeds.tolist())])
        classes = targets.repeat_interleave(self.n_samples)
        saliency = Saliency(self._logits)
        grads = torch.cat([saliency.attribute(_leaf(noisy[part]), target=classes[part], abs=False)
                           for part in self._chunks(noisy.shape[0])])
        return grads.view(images.shape[0], self.n_samples, *images.shape[1:]).mean(dim=1)

    def _noisy_copies(self, image: Tensor, seed: int) -> Tensor:
        """(n, 3, H, W): image (3, H, W) plus n gaussian noise images from the image's own generator."""
        noise = torch.randn((self.n_samples, *image.shape), generator=seeded_generator(image.device, seed),
                            device=image.device, dtype=image.dtype)
        return image + self.noise_std * noise


@register("integrated_gradients")
class IntegratedGradients(_CaptumAttribution):
    """Integrated Gradients (Sundararajan, Taly & Yan, ICML 2017, Eq. 1), captum's implementation:

        IG_i(I) = (I_i - B_i) * integral_0^1 dy_c / dI_i (B + a (I - B)) da,   then sum_ch |.|

    Args:
        n_steps: points of the path integral (default 50). ``method``: captum's quadrature, default
            "gausslegendre" (captum's default; the paper's Riemann sum is "riemann_trapezoid" etc.).
        baseline: B, "zero" (black image, the paper's choice for images), "blur" (the image blurred:
            ``blur_kernel`` / ``blur_sigma`` at 224 px, default 51 / 50 as the iGOS++ baseline, scaled
            to the image size) or "mean" (ImageNet's mean colour).
        channel_reduction: default "abs_sum" (attributions of a pixel's channels add up).

    Chunks of at most max_forward_batch images, with captum's ``internal_batch_size`` = max_forward_batch
    so that each forward holds at most that many path points. Cost: n_steps forwards and backwards per image.
    """

    def __init__(self, blackbox, *, n_steps: int = 50, baseline: str = "zero", blur_kernel: int = 51,
                 blur_sigma: float = 50.0, method: str = "gausslegendre", channel_reduction: str = "abs_sum",
                 **common):
        super().__init__(blackbox, channel_reduction=channel_reduction, **common)
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if baseline not in IG_BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; expected one of {IG_BASELINES}")
        self.n_steps = int(n_steps)
        self.baseline = baseline
        self.blur_kernel = int(blur_kernel)
        self.blur_sigma = float(blur_sigma)
        self.method = method

    def _attribute(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        kernel, sigma = scaled_blur(self.blur_kernel, self.blur_sigma, min(images.shape[-2:]))
        baselines = make_substrate(self.baseline, images, blur_kernel=kernel, blur_sigma=sigma)
        from captum.attr import IntegratedGradients as CaptumIntegratedGradients

        return CaptumIntegratedGradients(self._logits).attribute(
            images, baselines=baselines, target=targets, n_steps=self.n_steps, method=self.method,
            internal_batch_size=self.max_forward_batch)
