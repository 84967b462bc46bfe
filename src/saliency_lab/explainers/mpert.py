"""Meaningful Perturbation (Fong & Vedaldi, "Interpretable Explanations of Black Boxes by Meaningful
Perturbation", ICCV 2017), batched over images: the deletion game on a smooth low-resolution mask.

A mask m on an r x r grid (1 = keep the image, 0 = delete it) is optimised with Adam to minimise the
paper's Eq. 5 with the blur perturbation:

    L(m) = l1 * sum|1 - m| + tv * sum_u (|d_x m(u)|^beta + |d_y m(u)|^beta) + E_tau[ p_c(Phi(x0(. - tau), M)) ]
    M = g_{sigma_m} * up(clamp(m + eps, 0, 1)),      Phi(x, M) = x * M + blur_{sigma_0}(x) * (1 - M)

p_c is the softmax probability of the explained class; up is bilinear upsampling to H x W; g_{sigma_m}
smooths the upsampled mask (the paper's "blurring the upsampled mask"); tau is an integer jitter of the
image, uniform in [0, jitter)^2 per iteration, and eps ~ N(0, mask_noise^2) per cell per iteration (the
expectation of Eq. 5 is estimated by one draw per iteration, as stochastic gradient; the clamp of the noisy
mask passes the gradient straight through). The regularisers act on m itself (no noise). After each Adam step
m is clamped to [0, 1]. Output saliency = 1 - M (without noise or jitter), (B, 1, H, W) in [0, 1]: high where
deleting the image removes the evidence for class c.

The paper's settings (Sec. 4), our defaults at 224 px: Adam, learning rate 0.1, 300 iterations, a 28 x 28
mask (upsampled x 8), lambda_1 = 1e-4, lambda_2 = 1e-2, beta = 3, sigma_m = 5, jitter tau = 4 px and the blur
perturbation with sigma_0 = 10 px.

Deliberate deviations, and why:

- Blur perturbation: the paper writes a spatially varying blur, Phi(x, m)(u) = (g_{sigma_0 (1 - m(u))} * x)(u);
  we blend the image with one blurred copy through the shared perturbation operator
  (:func:`core.perturbation.perturb`), which equals it at m in {0, 1} and is what every other method and
  metric of the project uses.
- Initialisation: the paper starts from the smallest centred circle that suppresses the score by 99%, found
  by a search costing extra forwards; we start from m = 1 (nothing deleted) and let the deletion grow where
  the gradient of p_c points.
- Mask noise: the paper motivates stochastic perturbations against adversarial artefacts but gives no noise
  level for the mask; ``mask_noise`` = 0.05 (docs/methods.md §4 asks for jitter and mask noise).
- Regulariser scale: the paper's sums run over a 28 x 28 grid. When the grid is scaled to smaller images
  (``scale_with_image``: r = max(2, round(28 * side / 224)), 8 x 8 at 64 px, the rule of iGOS++), the weights
  are rescaled so that a mask covering the same fraction of the image with the same shape costs the same:
  l1 * (28 / r)^2 (an area is r^2 cells) and tv * 28 / r (an outline is ~r cell edges).
- Jitter at small sizes: tau = ceil(4 * side / 224), so at least shifts of 0 and 1 px remain at 64 px
  (rounding would leave tau = 1, i.e. no jitter at all). Shifted images are padded by replicating the border.

Batching (docs/architecture.md contract): all images' masks are one (B, 1, r, r) parameter of one Adam optimiser;
Adam is element-wise and the loss is a sum of per-image terms, so image b's trajectory is that of b alone.
Each iteration sends the B perturbed images through the black box in chunks of ``max_forward_batch`` (each
chunk back-propagated at once). Image b's noise and jitter come from its own generator (seeded by
(seed, index_b)), one draw per iteration in a fixed order. Cost per image: ``iterations`` forwards and as
many backwards.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from saliency_lab.core.perturbation import gaussian_blur, perturb, scaled_blur
from saliency_lab.core.seeding import seeded_generator
from saliency_lab.explainers.base import Explainer
from saliency_lab.explainers.igos import resize_masks
from saliency_lab.explainers.registry import register

REFERENCE_SIZE = 224
REFERENCE_GRID = 28  # the paper's mask side at 224 px: the regulariser weights are given for it


def scaled_grid(resolution: int, height: int, width: int, scale_with_image: bool) -> tuple[int, int]:
    """Mask cells (rows, cols) of a grid given as ``resolution`` cells per side at 224 px.

    With ``scale_with_image``: max(2, round(resolution * side / 224)) per side, so cells keep their size in
    pixels (28 -> 8 at 64 px), as iGOS++ scales its grid; else ``resolution`` cells per side as given.
    """
    if not scale_with_image:
        grid = (resolution, resolution)
    else:
        grid = tuple(max(2, round(resolution * side / REFERENCE_SIZE)) for side in (height, width))
    if grid[0] > height or grid[1] > width:
        raise ValueError(f"mask grid {grid} is finer than the image {(height, width)}")
    return grid


def total_variation_sum(masks: Tensor, beta: float) -> Tensor:
    """sum_u |d_y m(u)|^beta + |d_x m(u)|^beta of masks (N, 1, h, w) -> (N,) (forward differences)."""
    vertical = (masks[..., 1:, :] - masks[..., :-1, :]).abs().pow(beta).flatten(1).sum(1)
    horizontal = (masks[..., :, 1:] - masks[..., :, :-1]).abs().pow(beta).flatten(1).sum(1)
    return vertical + horizontal


def class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    """p_c (N,) from logits (N, K), the softmax taken in float64 so that a confident black box (a logit margin
    above ~17, where float32 rounds p_c to exactly 1) still has a gradient (returned in the logits' dtype)."""
    return logits.double().softmax(dim=1).gather(1, targets[:, None]).squeeze(1).to(logits.dtype)


def jitter_images(images: Tensor, shifts: Tensor, pad: int) -> Tensor:
    """x(. - tau): images (N, C, H, W) shifted down / right by shifts (N, 2) integer pixels in [0, pad].

    Each image is padded by replicating its border and cropped, so no content wraps around.
    """
    if pad == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (pad, 0, pad, 0), mode="replicate")
    return torch.stack([padded[n, :, pad - dy:pad - dy + height, pad - dx:pad - dx + width]
                        for n, (dy, dx) in enumerate(shifts.tolist())])


@register("mpert")
class MeaningfulPerturbation(Explainer):
    """Meaningful Perturbation: the smallest smooth deletion that removes the class (module docstring, Eq. 5).

    Args:
        iterations: Adam steps (300, the paper's and the seed's setting).
        lr: Adam's learning rate (0.1).
        resolution: mask cells per side at 224 px (28); see ``scale_with_image``.
        scale_with_image: True (default): r = max(2, round(resolution * side / 224)) cells per side and the
            regulariser weights rescaled to the 28-cell grid (module docstring); False: r = resolution as given.
        l1: lambda_1, the weight of sum|1 - m| on the 28 x 28 grid (1e-4).
        tv: lambda_2, the weight of the TV term on the 28 x 28 grid (1e-2).
        tv_beta: beta (3).
        mask_sigma: sigma_m of the smoothing of the upsampled mask at 224 px (5), scaled to the image.
        blur_sigma: sigma_0 of the blur perturbation at 224 px (10), scaled to the image; the kernel is
            2 * ceil(3 sigma) + 1.
        jitter: tau at 224 px (4): shifts uniform in [0, ceil(tau * side / 224)); 0 turns jitter off.
        mask_noise: std of the gaussian noise added to the mask cells each iteration (0.05; 0 = off).
        seed, max_forward_batch: see :class:`saliency_lab.explainers.base.Explainer`.

    Output (B, 1, H, W) in [0, 1]. Cost: ``iterations`` forwards and backwards per image.
    """

    needs_grad = True

    def __init__(self, blackbox, *, iterations: int = 300, lr: float = 0.1, resolution: int = 28,
                 scale_with_image: bool = True, l1: float = 1e-4, tv: float = 1e-2, tv_beta: float = 3.0,
                 mask_sigma: float = 5.0, blur_sigma: float = 10.0, jitter: int = 4, mask_noise: float = 0.05,
                 **common):
        super().__init__(blackbox, **common)
        for name, value in (("iterations", iterations), ("resolution", resolution)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if resolution < 2:
            raise ValueError(f"resolution must be >= 2 cells per side, got {resolution}")
        if lr <= 0 or l1 < 0 or tv < 0 or tv_beta < 1:
            raise ValueError(f"need lr > 0, l1 >= 0, tv >= 0 and tv_beta >= 1, got {lr}, {l1}, {tv}, {tv_beta}")
        if mask_sigma < 0 or blur_sigma <= 0 or mask_noise < 0:
            raise ValueError(f"need mask_sigma >= 0, blur_sigma > 0 and mask_noise >= 0, got {mask_sigma}, "
                             f"{blur_sigma}, {mask_noise}")
        if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
            raise ValueError(f"jitter must be an int >= 0 (pixels at 224), got {jitter!r}")
        self.iterations = iterations
        self.lr = float(lr)
        self.resolution = resolution
        self.scale_with_image = bool(scale_with_image)
        self.l1 = float(l1)
        self.tv = float(tv)
        self.tv_beta = float(tv_beta)
        self.mask_sigma = float(mask_sigma)
        self.blur_sigma = float(blur_sigma)
        self.jitter = jitter
        self.mask_noise = float(mask_noise)

    # -- derived settings ---------------------------------------------------------------------------
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Mask cells (rows, cols) for an image of height x width."""
        return scaled_grid(self.resolution, height, width, self.scale_with_image)

    def weights(self, grid: tuple[int, int]) -> tuple[float, float]:
        """(L1 weight, TV weight) on a grid of ``grid`` cells (rescaled from the 28 x 28 grid when scaling)."""
        if not self.scale_with_image:
            return self.l1, self.tv
        ratio = REFERENCE_GRID / math.sqrt(grid[0] * grid[1])
        return self.l1 * ratio ** 2, self.tv * ratio

    def jitter_range(self, size: int) -> int:
        """tau at an image side of ``size`` px: shifts are drawn from [0, tau)."""
        return 0 if self.jitter == 0 else math.ceil(self.jitter * size / REFERENCE_SIZE)

    # -- the method ---------------------------------------------------------------------------------
    def render(self, masks: Tensor, size: tuple[int, int]) -> Tensor:
        """M = g_{sigma_m} * up(masks): (N, 1, h, w) -> (N, 1, H, W) in [0, 1]."""
        full = resize_masks(masks, size)
        if self.mask_sigma == 0:
            return full
        kernel, sigma = scaled_blur(2 * math.ceil(3 * self.mask_sigma) + 1, self.mask_sigma, min(size))
        return gaussian_blur(full, kernel, sigma)

    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        size = tuple(images.shape[-2:])
        grid = self.grid_size(*size)
        l1, tv = self.weights(grid)
        kernel, sigma = scaled_blur(2 * math.ceil(3 * self.blur_sigma) + 1, self.blur_sigma, min(size))
        blurred = gaussian_blur(images, kernel, sigma)
        tau = self.jitter_range(min(size))
        generators = [seeded_generator(images.device, seed) for seed in seeds.tolist()]
        masks = images.new_ones(images.shape[0], 1, *grid).requires_grad_(True)
        optimizer = torch.optim.Adam([masks], lr=self.lr)
        for _ in range(self.iterations):
            noise, shifts = self._draw(generators, grid, tau, images)
            optimizer.zero_grad()
            for part in self._chunks(images.shape[0]):
                self._objective(masks[part], noise[part], shifts[part], max(tau - 1, 0), images[part],
                                blurred[part], targets[part], l1, tv).sum().backward()
            optimizer.step()
            with torch.no_grad():
                masks.clamp_(0, 1)
        return 1 - self.render(masks.detach(), size)

    def _draw(self, generators: list, grid: tuple[int, int], tau: int, images: Tensor) -> tuple[Tensor, Tensor]:
        """One iteration's randomness: noise (B, 1, h, w) and shifts (B, 2) long, image b from generators[b]."""
        noise = images.new_zeros(len(generators), 1, *grid)
        shifts = torch.zeros(len(generators), 2, dtype=torch.long)
        for b, generator in enumerate(generators):
            if self.mask_noise > 0:
                noise[b].normal_(generator=generator)
            if tau > 1:
                shifts[b] = torch.randint(0, tau, (2,), generator=generator, device=images.device).cpu()
        return noise * self.mask_noise, shifts

    def _objective(self, masks: Tensor, noise: Tensor, shifts: Tensor, pad: int, images: Tensor, blurred: Tensor,
                   targets: Tensor, l1: float, tv: float) -> Tensor:
        """L (N,) of masks (N, 1, h, w) for their images: regularisers + p_c of the jittered deletion."""
        size = tuple(images.shape[-2:])
        noisy = masks + noise
        # Clamp the value, not the gradient: torch's clamp has zero gradient *at* its bounds, which would
        # freeze the cells of a mask that starts at 1 (straight-through: the step's clamp keeps m in [0, 1]).
        noisy = noisy - (noisy - noisy.clamp(0, 1)).detach()
        perturbed = perturb(jitter_images(images, shifts, pad), self.render(noisy, size),
                            jitter_images(blurred, shifts, pad))
        probs = class_probability(self._logits(perturbed), targets)
        regulariser = l1 * (1 - masks).abs().flatten(1).sum(1) + tv * total_variation_sum(masks, self.tv_beta)
        return regulariser + probs
