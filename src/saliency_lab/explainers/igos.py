"""iGOS++ (Khorram, Lawson & Fuxin, ACM CHIL 2021) and I-GOS (Qi, Khorram & Fuxin, AAAI 2020), batched.

Both optimise masks on an r x r grid, upsampled bilinearly to H x W, with 1 = keep the image and 0 = replace
it by the baseline B (the image blurred). The model terms are integrated-gradient (IG) scores along n points
k/n * M, k = 1..n, each with gaussian noise (docs/methods.md §2), with phi(X, A, M) = X * M + A * (1 - M):

    deletion(M)  = 1/n sum_k p_c(phi(I, B, k/n * M) + noise)       (M = 1: the image itself)
    insertion(M) = 1/n sum_k p_c(phi(B, I, k/n * M) + noise)       (M = 1: the baseline)

The IG direction of a score is its gradient w.r.t. M along those n points (autograd through all n points).

iGOS++ (``igos_pp``, paper Eq. 4) optimises a deletion mask Mx and an insertion mask My:

    L = del(Mx) - ins(My) + del(Mx*My) - ins(Mx*My) + L1 * mean|1 - Mx*My| + L2 * R(Mx*My)
    R(M) = (1 - mix) * TV(M) + mix * BTV(up(M))                       (released code: mix = 0.5)

where the model terms use the product of the *upsampled* masks, TV is at r x r and BTV (Eq. 7) at H x W:
BTV(U) = mean_u w(u) |dU(u)|^beta per direction, summed over the two directions, with
w(u) = exp(-mean_ch (dI(u))^2 / sigma^2). Total gradient (Eq. 6): IG of the four model terms (scaled by
``model_grad_scale``, 0.5 in the released code) plus the plain gradient of the regulariser.
Saliency = 1 - up(Mx * My).

I-GOS (``igos``) optimises one mask: L = del(M) + L1 * mean|1 - M| + L2 * TV(M); saliency = 1 - up(M).

The iGOS++ paper's ablations, as registered methods and options (docs/methods.md §2, "Ablations"):

- Table 3, ``igos_pp_insertion``: iGOS++ with only its insertion term, one mask M (the insertion mask):
  L = -ins(M) + L1 * mean|1 - M| + L2 * R(M), iGOS++'s IG direction (``model_grad_scale`` 0.5), R and line
  search; saliency = 1 - up(M). No deletion term at all.
- Table 3, ``igos_naive_insertion`` ("naive I-GOS + insertion"): I-GOS with an insertion term on its one mask,
  L = del(M) - ins(M) + L1 * mean|1 - M| + L2 * TV(M), both model terms by IG (I-GOS's direction), I-GOS's TV
  and ``model_grad_scale`` 1; saliency = 1 - up(M). *Deviation / reading:* the design notes do not define this
  variant; it is the released code's one-mask ``iGOS_p`` (``--method iGOS+`` in its main.py) with I-GOS's TV in
  place of that code's BTV mix, so that it differs from ``igos`` by the insertion term alone.
- Table 5, ``igos_pp`` with ``mask``: "xy" (default) returns 1 - up(Mx * My), "x" the deletion mask
  1 - up(Mx), "y" the insertion mask 1 - up(My), all three from the same optimisation (the option changes
  only what is returned).
- BTV against plain TV, ``smoothness`` of ``igos_pp`` / ``igos_pp_insertion``: "bilateral" (default) or
  "plain": the H x W term of R with every weight w(u) = 1, i.e. R = (1 - mix) * TV(M) + mix * TV(up(M)); on
  an image without edges (w = 1 everywhere) both give the same maps bit for bit. ``btv_mix=0`` is the other
  way to drop BTV (TV at r x r only).

Step: backtracking line search (Eq. 8) per image: alpha from ``ls_alpha0``, times ``ls_shrink`` while the
objective (model terms + regulariser, fresh noise) fails L(clamp(M - a g)) <= L(M) - ls_c * a * |g|^2 and
a >= ``ls_min_alpha``; then M <- clamp(M - a g, 0, 1) with the last a tried (also when it failed, as the
released code). Masks of iGOS++ share one alpha. Option ``optimizer="nag"``: the authors' Nesterov variant,
theta_i = M - step * g, M <- clamp(theta_i + i/(i+3) * (theta_i - theta_{i-1}), 0, 1), no line search.

Batching (docs/architecture.md contract): every IG point of every image of the batch is one row; rows of all
images go through the black box together, ``max_forward_batch`` at a time, each chunk back-propagated at
once, so memory is bounded by that knob. The line search is per image: each image its own alpha, and each
trial re-evaluates only the images whose search is still running. Noise for image b comes from its own
generator (seeded by (seed, index_b)), one draw per row in a fixed order, so an image's map does not depend
on its batch mates or on the chunking (up to float rounding of batched convolutions). Speed: one image
alone already sends its P = 4n points per evaluation together; on 2 CPU cores at 64 px that fills the cores,
so batching images does not speed things up there (benchmarks/igos.py), and chunks of ~80-128 rows are
slightly faster per row than 256 (cache). It pays where P rows leave the device idle (GPUs).

Convergence (``converge_tol``, off by default): image b stops optimising once ``converge_patience``
consecutive iterations each changed none of its mask cells by more than ``converge_tol`` (max_cells
|M_i - M_{i-1}| <= tol, masks in [0, 1] at r x r); its masks are then final and it costs no more passes.
The rule reads only the image's own trajectory, so stopping does not depend on the batch. Iterations run per
image: :attr:`last_iterations` (B,); their trials are the non-zero entries of :attr:`last_trials`.

Cost per image (exact, :attr:`Explainer.cost`): with P = 4n (igos_pp), 2n (igos_naive_insertion) or n (igos,
igos_pp_insertion) rows per evaluation, T_b <= T the iterations the image ran and t_i the line-search
evaluations of iteration i (1 <= t_i <= :attr:`max_trials`, recorded in :attr:`last_trials`):

    forwards = P * (2 T_b + sum_i t_i),   backwards = P * T_b     (line search)
    forwards = backwards = P * T_b                                 (nag)

one IG pass (forward + backward) and one fresh evaluation of L(M) per iteration plus the trials. With the
mean t = sum_i t_i / T this is docs/methods.md's "4 n T backward and 4 n T (2 + trials) forward passes".

Where we depart from the released code (github.com/khorrams/IGOS_pp) and why:

- T = 15 iterations and n = 20 IG steps as the paper (the released main.py swaps the two arguments).
- BTV weights: the same formula in both directions. The released code uses exp(-(mean_ch dI)^2 / s) for
  one direction and mean_ch exp(-dI^2 / s) for the other; both equal ours on grey edges.
- sigma and the noise in [0, 1] pixel units, converted from the released code's normalised units with the
  black box's OWN std (its mean over the channels, s_bb; a model without a ``std`` is taken to use
  ImageNet's, 0.226): the released code divides the squared difference of normalised images by s = 0.01, so
  s plays sigma^2: sigma_pixel = sqrt(0.01) * s_bb (0.0226 for ImageNet's std, 0.025 for the embedded
  black box's 0.25; an edge of ~6/255 gets weight 1/e). Reading the paper's sigma = 0.01 literally gives
  a tenth of that.
- noise_std = 0.2 in normalised units * s_bb (0.0452 for ImageNet's std, 0.05 for the embedded black box).
- Bilinear upsampling with align_corners=False (the project's perturbation convention); the released code
  uses align_corners=True (UpsamplingBilinear2d).
- Noise from per-image seeded generators instead of torch's global stream (batch independence).

Small images: hyper-parameters are given at 224 px. ``resolution`` r (default 28) becomes
max(2, round(r * side / 224)) cells per side when ``scale_with_image`` (the rule of
:meth:`saliency_lab.metrics.CausalProtocol.igos`, so a 28 grid keeps 8 px cells: 8 x 8 at 64 px); "full" is one cell per
pixel. ``scale_with_image=False`` takes r as an absolute number of cells. The blur (kernel 51, sigma 50 at
224) is scaled by :func:`core.perturbation.scaled_blur` (15 / 14.3 at 64). L1 defaults to 1, or 10
when the grid is the full image resolution (docs/methods.md: 10 at r = 224).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from saliency_lab.core.perturbation import gaussian_blur, scaled_blur
from saliency_lab.core.seeding import seeded_generator
from saliency_lab.explainers.base import Explainer
from saliency_lab.explainers.registry import register

REFERENCE_SIZE = 224
FULL = "full"
PAPER_RESOLUTIONS = (7, 14, 28, 56, FULL)  # the paper's; any int >= 2 is accepted
OPTIMIZERS = ("line_search", "nag")
SMOOTHNESS = ("bilateral", "plain")  # the H x W term of iGOS++'s R: bilateral TV (Eq. 7) or TV with weights 1
MASK_OUTPUTS = ("xy", "x", "y")  # what iGOS++ returns: 1 - up(Mx * My), 1 - up(Mx) or 1 - up(My)
# The released code's constants are in normalised units (image - mean) / std; they become [0, 1] pixel units
# times the black box's own std (normalised_to_pixel). ImageNet's mean std serves models that declare none.
NOISE_STD_NORMALISED = 0.2
BTV_SIGMA_NORMALISED = math.sqrt(0.01)
_IMAGENET_STD = (0.229 + 0.224 + 0.225) / 3
NOISE_STD = NOISE_STD_NORMALISED * _IMAGENET_STD  # 0.0452: the pixel-unit default for an ImageNet black box
BTV_SIGMA = BTV_SIGMA_NORMALISED * _IMAGENET_STD  # 0.0226

Resolution = Union[int, str]


def normalised_to_pixel(value: float, blackbox) -> float:
    """A constant in the black box's normalised units -> [0, 1] pixel units: value * mean_c std_c of the
    black box (``blackbox.std``; ImageNet's 0.226 for a model without one)."""
    std = getattr(blackbox, "std", None)
    scale = _IMAGENET_STD if std is None else float(torch.as_tensor(std, dtype=torch.float64).mean())
    return value * scale


# ---------------------------------------------------------------------------------------------------------
# Regularisers (pure functions, per image)


def tv_norm(masks: Tensor, beta: float = 2.0) -> Tensor:
    """TV of masks (N, C, h, w) -> (N,): mean |vertical diff|^beta + mean |horizontal diff|^beta.

    Means over all pairs (the released ``tv_norm``, hence the name), so the value does not grow with the
    resolution. (Not ``lightning_modules.mask_predictor.total_variation``: that one is Dabkowski's squared
    smoothness with a border term.)
    """
    vertical = (masks[..., 1:, :] - masks[..., :-1, :]).abs().pow(beta).flatten(1).mean(1)
    horizontal = (masks[..., :, 1:] - masks[..., :, :-1]).abs().pow(beta).flatten(1).mean(1)
    return vertical + horizontal


def bilateral_weights(images: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """Edge-stopping weights of BTV (Eq. 7) for images (N, 3, H, W) in [0, 1], sigma in pixel units.

    Returns (vertical (N, 1, H-1, W), horizontal (N, 1, H, W-1)): w = exp(-mean_ch (dI)^2 / sigma^2), the same
    formula in both directions (so the weights of a transposed image are the transposed weights).
    """
    vertical = images[..., 1:, :] - images[..., :-1, :]
    horizontal = images[..., :, 1:] - images[..., :, :-1]
    scale = float(sigma) ** 2
    return ((-vertical.pow(2).mean(1, keepdim=True) / scale).exp(),
            (-horizontal.pow(2).mean(1, keepdim=True) / scale).exp())


def bilateral_total_variation(masks: Tensor, weights: tuple[Tensor, Tensor], beta: float = 2.0) -> Tensor:
    """BTV of full-resolution masks (N, 1, H, W) with :func:`bilateral_weights` -> (N,).

    mean_u w_v(u) |M(u + down) - M(u)|^beta + mean_u w_h(u) |M(u + right) - M(u)|^beta.
    """
    vertical = (masks[..., 1:, :] - masks[..., :-1, :]).abs().pow(beta) * weights[0]
    horizontal = (masks[..., :, 1:] - masks[..., :, :-1]).abs().pow(beta) * weights[1]
    return vertical.flatten(1).mean(1) + horizontal.flatten(1).mean(1)


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (align_corners=False) of masks (N, C, h, w) to size; identity at full resolution.

    Plain ``F.interpolate``, not ``networks.mask_generator.upsample``: that one computes the same values by a
    channels-last layout that is faster for one-channel maps but may differ in the last float bit.
    """
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------------------
# The shared optimiser


@dataclasses.dataclass
class _Batch:
    """What one call optimises over: per-image constants, generators and the term tables."""

    images: Tensor  # (B, 3, H, W)
    blur: Tensor  # (B, 3, H, W), the baseline
    difference: Tensor  # (B, 3, H, W), images - blur
    targets: Tensor  # (B,)
    generators: list  # one torch.Generator per image
    size: tuple[int, int]
    l1: float
    weights: tuple[Tensor, Tensor] | None  # bilateral weights (iGOS++ with mix > 0)


class _IntegratedGradientOptimizedSaliency(Explainer):
    """Shared machinery of I-GOS and iGOS++ (module docstring). Subclasses set the term table
    ``_TERMS`` = ((uses mask j for each j), is_deletion) per model term, ``_MASKS`` and the regulariser."""

    needs_grad = True
    _TERMS: ClassVar[tuple[tuple[tuple[int, ...], bool], ...]] = ()
    _MASKS: ClassVar[int] = 1

    def __init__(self, blackbox, *, resolution: Resolution, scale_with_image: bool, iterations: int,
                 ig_steps: int, l1: float | None, l2: float, noise_std: float | None, optimizer: str,
                 ls_alpha0: float, ls_shrink: float, ls_c: float, ls_min_alpha: float, nag_step: float | None,
                 blur_kernel: int, blur_sigma: float, model_grad_scale: float, converge_tol: float | None,
                 converge_patience: int, **common):
        super().__init__(blackbox, **common)
        valid = resolution == FULL or (isinstance(resolution, int) and resolution >= 2)
        if isinstance(resolution, bool) or not valid:
            raise ValueError(f"resolution must be an int >= 2 (cells per side; the paper uses "
                             f"{PAPER_RESOLUTIONS[:-1]} at 224 px) or {FULL!r}, got {resolution!r}")
        if not isinstance(scale_with_image, bool):
            raise ValueError(f"scale_with_image must be a bool, got {scale_with_image!r}")
        for name, value in (("iterations", iterations), ("ig_steps", ig_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (l1 is not None and l1 < 0) or l2 < 0:
            raise ValueError(f"l1 and l2 must be >= 0, got {l1}, {l2}")
        if noise_std is None:
            noise_std = normalised_to_pixel(NOISE_STD_NORMALISED, blackbox)
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
        if ls_alpha0 <= 0 or not 0 < ls_shrink < 1 or ls_c < 0 or ls_min_alpha <= 0:
            raise ValueError(f"line search needs ls_alpha0 > 0, 0 < ls_shrink < 1, ls_c >= 0 and ls_min_alpha > 0, "
                             f"got {ls_alpha0}, {ls_shrink}, {ls_c}, {ls_min_alpha}")
        if nag_step is not None and nag_step <= 0:
            raise ValueError(f"nag_step must be > 0 (or None: ls_alpha0), got {nag_step}")
        if blur_kernel < 1 or blur_kernel % 2 == 0 or blur_sigma <= 0:
            raise ValueError(f"blur_kernel must be odd >= 1 and blur_sigma > 0, got {blur_kernel}, {blur_sigma}")
        if model_grad_scale <= 0:
            raise ValueError(f"model_grad_scale must be > 0, got {model_grad_scale}")
        if converge_tol is not None and converge_tol < 0:
            raise ValueError(f"converge_tol must be >= 0 (or None: run every iteration), got {converge_tol}")
        if isinstance(converge_patience, bool) or not isinstance(converge_patience, int) or converge_patience < 1:
            raise ValueError(f"converge_patience must be an int >= 1, got {converge_patience!r}")
        self.resolution = resolution
        self.scale_with_image = scale_with_image
        self.iterations = iterations
        self.ig_steps = ig_steps
        self.l1 = None if l1 is None else float(l1)
        self.l2 = float(l2)
        self.noise_std = float(noise_std)
        self.optimizer = optimizer
        self.ls_alpha0 = float(ls_alpha0)
        self.ls_shrink = float(ls_shrink)
        self.ls_c = float(ls_c)
        self.ls_min_alpha = float(ls_min_alpha)
        self.nag_step = None if nag_step is None else float(nag_step)
        self.blur_kernel = int(blur_kernel)
        self.blur_sigma = float(blur_sigma)
        self.model_grad_scale = float(model_grad_scale)
        self.converge_tol = None if converge_tol is None else float(converge_tol)
        self.converge_patience = int(converge_patience)
        self.last_trials: Tensor | None = None  # (B, T) line-search evaluations of the last call (0: not run)
        self.last_iterations: Tensor | None = None  # (B,) iterations each image ran in the last call

    # -- derived settings ---------------------------------------------------------------------------
    @property
    def points_per_evaluation(self) -> int:
        """P: rows (black-box images) per image in one evaluation of the model terms (terms x ig_steps)."""
        return len(self._TERMS) * self.ig_steps

    @property
    def max_trials(self) -> int:
        """Most line-search evaluations in one iteration: every alpha0 * shrink^k >= ls_min_alpha, plus the
        first one below it (13 at the defaults: 1000 ... 2.048e-5, then 4.1e-6)."""
        above = 0
        alpha = self.ls_alpha0
        while alpha >= self.ls_min_alpha:
            above += 1
            alpha *= self.ls_shrink
        return above + 1

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Mask cells (rows, cols) for an image of height x width (module docstring, "Small images")."""
        if self.resolution == FULL:
            return height, width
        if self.scale_with_image:
            grid = tuple(max(2, round(self.resolution * side / REFERENCE_SIZE)) for side in (height, width))
        else:
            grid = (self.resolution, self.resolution)
        if grid[0] > height or grid[1] > width:
            raise ValueError(f"mask grid {grid} is finer than the image {(height, width)}; use resolution={FULL!r}")
        return grid

    def l1_weight(self, grid: tuple[int, int], size: tuple[int, int]) -> float:
        """L1: as given, else 10 when the grid is the full image resolution and 1 otherwise."""
        if self.l1 is not None:
            return self.l1
        return 10.0 if tuple(grid) == tuple(size) else 1.0

    # -- the method ---------------------------------------------------------------------------------
    def _prepare(self, images: Tensor, targets: Tensor, seeds: Tensor) -> _Batch:
        """The per-call constants: baseline blur, one generator per image, L1 weight, bilateral weights."""
        size = tuple(images.shape[-2:])
        kernel, sigma = scaled_blur(self.blur_kernel, self.blur_sigma, min(size))
        blur = gaussian_blur(images, kernel, sigma)
        return _Batch(images=images, blur=blur, difference=images - blur, targets=targets,
                      generators=[seeded_generator(images.device, seed) for seed in seeds.tolist()], size=size,
                      l1=self.l1_weight(self.grid_size(*size), size), weights=self._bilateral_weights(images))

    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        masks = self._optimise(images, targets, seeds)
        return 1 - resize_masks(self._final_mask(masks), tuple(images.shape[-2:]))

    def _optimise(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        """The optimised masks (B, MASKS, h, w) in [0, 1] at r x r (1 = keep the image) of images (B, 3, H, W)
        in [0, 1], targets (B,) and per-image seeds (B,); sets :attr:`last_trials` and :attr:`last_iterations`."""
        size = tuple(images.shape[-2:])
        batch = self._prepare(images, targets, seeds)
        count = images.shape[0]
        masks = images.new_ones(count, self._MASKS, *self.grid_size(*size))
        trials = torch.zeros(count, self.iterations, dtype=torch.long)
        done = torch.zeros(count, dtype=torch.long)  # iterations run per image
        calm = torch.zeros(count, dtype=torch.long)  # consecutive iterations that moved no cell > converge_tol
        theta = torch.zeros_like(masks)
        for iteration in range(self.iterations):
            ids = (calm < self.converge_patience).nonzero().squeeze(1)  # the images still optimising
            if len(ids) == 0:
                break
            rows = ids.to(masks.device)
            current = masks[rows]
            direction = self._direction(batch, current, ids)
            if self.optimizer == "line_search":
                alpha, trials[ids, iteration] = self._line_search(batch, current, direction, ids)
                updated = (current - alpha.view(-1, 1, 1, 1) * direction).clamp(0, 1)
            else:
                momentum = iteration / (iteration + 3)
                previous, theta[rows] = theta[rows], current - (self.nag_step or self.ls_alpha0) * direction
                updated = (theta[rows] + momentum * (theta[rows] - previous)).clamp(0, 1)
            masks[rows] = updated
            done[ids] += 1
            if self.converge_tol is not None:
                still = ((updated - current).flatten(1).abs().amax(1) <= self.converge_tol).cpu()
                calm[ids] = torch.where(still, calm[ids] + 1, 0)
        self.last_trials, self.last_iterations = trials, done
        return masks

    def _direction(self, batch: _Batch, masks: Tensor, ids: Tensor | None = None) -> Tensor:
        """Total gradient (Eq. 6) of masks (len(ids), MASKS, h, w) of images ``ids`` (None: all, in order):
        model_grad_scale * IG of the model terms + gradient of the regulariser."""
        ids = torch.arange(masks.shape[0]) if ids is None else ids
        leaf = masks.detach().requires_grad_(True)
        self._model_scores(batch, leaf, ids, grad=True)
        model = leaf.grad if leaf.grad is not None else torch.zeros_like(masks)
        leaf = masks.detach().requires_grad_(True)
        (regulariser,) = torch.autograd.grad(self._regulariser(batch, leaf, ids).sum(), leaf)
        return self.model_grad_scale * model + regulariser

    def _line_search(self, batch: _Batch, masks: Tensor, direction: Tensor,
                     ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Backtracking line search (Eq. 8) per image for masks (len(ids), ...) of images ``ids`` (None: all)
        -> (alpha (len(ids),) on the masks' device, trials (len(ids),) long).

        Each trial evaluates only the images still searching; a finished image costs nothing more.
        """
        ids = torch.arange(masks.shape[0]) if ids is None else ids
        count, device = masks.shape[0], masks.device
        with torch.no_grad():
            base = self._objective(batch, masks, ids)
            slope = -self.ls_c * direction.flatten(1).pow(2).sum(1)
            alpha = torch.full((count,), self.ls_alpha0, dtype=masks.dtype, device=device)
            searching = torch.ones(count, dtype=torch.bool)
            trials = torch.zeros(count, dtype=torch.long)
            while searching.any():
                local = searching.nonzero().squeeze(1)
                rows = local.to(device)
                step = alpha[rows]
                trial = (masks[rows] - step.view(-1, 1, 1, 1) * direction[rows]).clamp(0, 1)
                loss = self._objective(batch, trial, ids[local])
                trials[local] += 1
                fails = (loss > base[rows] + step * slope[rows]) & (step >= self.ls_min_alpha)
                searching[local] = fails.cpu()
                alpha[searching.to(device)] *= self.ls_shrink
        return alpha, trials

    def _objective(self, batch: _Batch, masks: Tensor, ids: Tensor) -> Tensor:
        """L (len(ids),) of masks (len(ids), MASKS, h, w) of images ``ids``: model terms + regulariser."""
        signs = torch.tensor([1.0 if deletion else -1.0 for _, deletion in self._TERMS], dtype=masks.dtype,
                             device=masks.device).repeat_interleave(self.ig_steps)
        scores = self._model_scores(batch, masks, ids, grad=False)
        return (scores * signs).sum(1) / self.ig_steps + self._regulariser(batch, masks, ids)

    def _model_scores(self, batch: _Batch, masks: Tensor, ids: Tensor, *, grad: bool) -> Tensor:
        """p_c of every row (len(ids), P) for masks of images ``ids``; with ``grad``, also back-propagates
        sum_rows sign * p_c / n chunk by chunk, accumulating the IG direction into ``masks.grad``.

        Rows are image-major, then term, then step k; chunks of max_forward_batch rows cut anywhere.
        """
        points, steps = self.points_per_evaluation, self.ig_steps
        deletion = torch.tensor([term[1] for term in self._TERMS], device=masks.device)
        signs = torch.where(deletion, 1.0, -1.0).to(masks.dtype)
        device_ids = ids.to(masks.device)
        scores = masks.new_empty(len(ids) * points)
        for part in self._chunks(len(ids) * points):
            rows = torch.arange(part.start, part.stop, device=masks.device)
            slot, within = rows // points, rows % points
            term, k = within // steps, within % steps + 1
            with torch.set_grad_enabled(grad):
                x = self._points(batch, masks, slot, device_ids[slot], term, k / steps)
                classes = batch.targets[device_ids[slot]].unsqueeze(1)
                probs = self._logits(x).softmax(dim=1).gather(1, classes).squeeze(1)
                if grad:
                    (probs * signs[term]).sum().div(steps).backward()
            scores[part] = probs.detach()
        return scores.view(len(ids), points)

    def _points(self, batch: _Batch, masks: Tensor, slot: Tensor, image: Tensor, term: Tensor,
                fraction: Tensor) -> Tensor:
        """The perturbed images of a chunk of rows (N, 3, H, W).

        slot (N,): row -> index into ``masks``; image (N,): row -> image of the batch; term (N,): row -> index
        into ``_TERMS`` (which masks it multiplies; phi(I, B, .) or phi(B, I, .)); fraction (N,): k / n.
        """
        # Each mask of the chunk is upsampled once and each term's product prod_j M_j formed once per image
        # (O images x TERMS maps), then gathered per row: the per-row work is one gather and one multiply-add.
        owners, inverse = torch.unique_consecutive(slot, return_inverse=True)
        up = resize_masks(masks[owners], batch.size)  # (O, MASKS, H, W)
        uses = torch.tensor([t[0] for t in self._TERMS], dtype=up.dtype, device=up.device)[:, :, None, None]
        # prod_j (1 - u_j + u_j * M_j): exactly M_j where used, 1 where not -> (O, TERMS, H, W)
        products = (1 - uses + uses * up[:, None]).prod(dim=2)
        mask = products[inverse, term].unsqueeze(1)  # (N, 1, H, W)
        # phi(I, B, m) = B + m (I - B) (deletion) and phi(B, I, m) = B + (1 - m) (I - B) (insertion), m = k/n M:
        # the one-channel weight f M (deletion) or 1 - f M (insertion) as offset + scale * M in one operation,
        # then one broadcast multiply-add per run of an image's rows (no per-row gathers of images and
        # baselines: building the rows this way costs about half of the per-row form).
        deletion = torch.tensor([t[1] for t in self._TERMS], device=up.device)[term]
        fraction = fraction.to(up.dtype)
        weight = torch.addcmul((~deletion).to(up.dtype).view(-1, 1, 1, 1), mask,
                               torch.where(deletion, fraction, -fraction).view(-1, 1, 1, 1))
        runs, counts = torch.unique_consecutive(image, return_counts=True)
        parts, start = [], 0
        for owner, count in zip(runs.tolist(), counts.tolist()):
            rows = slice(start, start + count)
            if self.noise_std > 0:
                # the noise drawn straight into the rows' buffer (scaled by the draw), then I - B and B added in
                # place: no separate noise tensor
                part = self._noise(batch, owner, count, batch.blur)
                parts.append(part.addcmul_(weight[rows], batch.difference[owner]).add_(batch.blur[owner]))
            else:
                parts.append(torch.addcmul(batch.blur[owner], weight[rows], batch.difference[owner]))
            start += count
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _noise(self, batch: _Batch, owner: int, count: int, like: Tensor) -> Tensor:
        """N(0, noise_std^2) noise (count, 3, H, W) for ``count`` consecutive rows of image ``owner``, drawn from
        its generator one row at a time, in row order, so an image's stream is the same whatever the batch and
        the chunking (a chunk may start or end inside an image's rows)."""
        noise = torch.empty((count, *like.shape[1:]), dtype=like.dtype, device=like.device)
        generator = batch.generators[owner]
        for row in range(count):
            noise[row].normal_(0.0, self.noise_std, generator=generator)
        return noise

    # -- per-method pieces --------------------------------------------------------------------------
    def _bilateral_weights(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        return None

    def _regulariser(self, batch: _Batch, masks: Tensor, ids: Tensor) -> Tensor:
        raise NotImplementedError

    def _final_mask(self, masks: Tensor) -> Tensor:
        """The mask (B, 1, h, w) the saliency is 1 - up(.) of, from the optimised masks (B, MASKS, h, w)."""
        raise NotImplementedError


class _BilateralSmoothed(_IntegratedGradientOptimizedSaliency):
    """iGOS++'s regulariser on the product of its masks M = prod_j M_j (r x r), shared by ``igos_pp`` and
    ``igos_pp_insertion``: L1 * mean|1 - M| + L2 * ((1 - mix) * TV(M) + mix * BTV(up(M))), BTV's weights from
    the image (Eq. 7), or all 1 with ``smoothness="plain"`` (module docstring)."""

    def __init__(self, blackbox, *, btv_beta: float, btv_sigma: float | None, btv_mix: float, smoothness: str,
                 **rest):
        super().__init__(blackbox, **rest)
        if btv_sigma is None:
            btv_sigma = normalised_to_pixel(BTV_SIGMA_NORMALISED, blackbox)
        if btv_beta < 1 or btv_sigma <= 0 or not 0 <= btv_mix <= 1:
            raise ValueError(f"need btv_beta >= 1, btv_sigma > 0 and 0 <= btv_mix <= 1, got {btv_beta}, "
                             f"{btv_sigma}, {btv_mix}")
        if smoothness not in SMOOTHNESS:
            raise ValueError(f"smoothness must be one of {SMOOTHNESS}, got {smoothness!r}")
        self.btv_beta = float(btv_beta)
        self.btv_sigma = float(btv_sigma)
        self.btv_mix = float(btv_mix)
        self.smoothness = smoothness

    def _bilateral_weights(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """The H x W term's weights (vertical (N, 1, H-1, W), horizontal (N, 1, H, W-1)); None without that term."""
        if self.btv_mix == 0:
            return None
        if self.smoothness == "plain":  # TV at H x W: BTV with every weight 1
            count, _, height, width = images.shape
            return (images.new_ones(count, 1, height - 1, width), images.new_ones(count, 1, height, width - 1))
        return bilateral_weights(images, self.btv_sigma)

    def _regulariser(self, batch: _Batch, masks: Tensor, ids: Tensor) -> Tensor:
        combined = masks.prod(dim=1, keepdim=True)  # Mx * My at r x r, as the released code (M for one mask)
        smooth = (1 - self.btv_mix) * tv_norm(combined, self.btv_beta)
        if batch.weights is not None:
            rows = ids.to(masks.device)
            weights = (batch.weights[0][rows], batch.weights[1][rows])
            smooth = smooth + self.btv_mix * bilateral_total_variation(resize_masks(combined, batch.size), weights,
                                                                       self.btv_beta)
        return batch.l1 * (1 - combined).abs().flatten(1).mean(1) + self.l2 * smooth


@register("igos_pp")
class IGOSPP(_BilateralSmoothed):
    """iGOS++: a deletion mask and an insertion mask optimised with integrated gradients and bilateral TV.

    Paper: Khorram, Lawson & Fuxin, "iGOS++: Integrated Gradient Optimized Saliency by Bilateral
    Perturbations", ACM CHIL 2021 (arXiv:2012.15783). Objective, step and cost in the module docstring.
    Output (B, 1, H, W) = 1 - up(Mx * My) in [0, 1]: higher = removing it hurts / keeping it helps class c
    (``mask`` "x" / "y": 1 - up(Mx) / 1 - up(My), the paper's Table 5).

    Args:
        resolution: mask cells per side at 224 px: 7, 14, 28 (default), 56 or "full"; see ``scale_with_image``.
        scale_with_image: True (default): r -> max(2, round(r * side / 224)) per side (8 at 64 px for 28);
            False: r cells per side as given.
        iterations: T, optimisation steps (15).
        ig_steps: n, points of each IG score (20).
        l1: weight of mean|1 - Mx*My| (None: 1, or 10 when the grid is the full image resolution).
        l2: weight of the smoothness term R (20).
        btv_beta: beta, the exponent of TV and BTV (2).
        btv_sigma: sigma of the bilateral weights in [0, 1] pixel units (None: sqrt(0.01) normalised units
            times the black box's std, 0.0226 for ImageNet's; see module docstring).
        btv_mix: R = (1 - mix) * TV at r x r + mix * BTV at H x W (0.5 as the released code; 1 = pure BTV).
        smoothness: "bilateral" (default): the H x W term is BTV (Eq. 7); "plain": TV with weights 1 there
            (the BTV-vs-TV ablation; ``btv_sigma`` then unused).
        mask: what the map is made of: "xy" (default, the paper's output) 1 - up(Mx * My); "x" the deletion
            mask 1 - up(Mx); "y" the insertion mask 1 - up(My). The optimisation is the same for all three.
        noise_std: std of the gaussian noise added to every IG point, pixel units (None: 0.2 normalised
            units times the black box's std, 0.0452 for ImageNet's).
        optimizer: "line_search" (default, Eq. 8) or "nag" (fixed step ``nag_step``, Nesterov momentum).
        ls_alpha0, ls_shrink, ls_c, ls_min_alpha: line search: first alpha (1000), shrink factor (0.2),
            sufficient-decrease constant c (1e-4), smallest alpha tried further (1e-5).
        nag_step: NAG's step (None: ls_alpha0, as the released code uses its alpha).
        blur_kernel, blur_sigma: the baseline blur at 224 px (51, 50), scaled to the image.
        model_grad_scale: factor on the IG of the model terms in the total gradient (0.5: the released code
            halves it "to balance out the terms with the regularization terms"; the paper's Eq. 6 is 1).
        converge_tol, converge_patience: per-image early stop (module docstring, "Convergence"): an image stops
            once ``converge_patience`` (2) consecutive iterations moved none of its mask cells by more than
            ``converge_tol``; None (default) runs all T iterations.
        seed, max_forward_batch: see :class:`saliency_lab.explainers.base.Explainer`.
    """

    _TERMS = (((1, 0), True), ((0, 1), False), ((1, 1), True), ((1, 1), False))  # del Mx, ins My, del/ins MxMy
    _MASKS = 2

    def __init__(self, blackbox, *, resolution: Resolution = 28, scale_with_image: bool = True,
                 iterations: int = 15, ig_steps: int = 20, l1: float | None = None, l2: float = 20.0,
                 btv_beta: float = 2.0, btv_sigma: float | None = None, btv_mix: float = 0.5,
                 smoothness: str = "bilateral", mask: str = "xy",
                 noise_std: float | None = None, optimizer: str = "line_search", ls_alpha0: float = 1000.0,
                 ls_shrink: float = 0.2, ls_c: float = 1e-4, ls_min_alpha: float = 1e-5,
                 nag_step: float | None = None, blur_kernel: int = 51, blur_sigma: float = 50.0,
                 model_grad_scale: float = 0.5, converge_tol: float | None = None,
                 converge_patience: int = 2, **common):
        super().__init__(blackbox, resolution=resolution, scale_with_image=scale_with_image, iterations=iterations,
                         ig_steps=ig_steps, l1=l1, l2=l2, btv_beta=btv_beta, btv_sigma=btv_sigma, btv_mix=btv_mix,
                         smoothness=smoothness, noise_std=noise_std, optimizer=optimizer,
                         ls_alpha0=ls_alpha0, ls_shrink=ls_shrink, ls_c=ls_c, ls_min_alpha=ls_min_alpha,
                         nag_step=nag_step, blur_kernel=blur_kernel, blur_sigma=blur_sigma,
                         model_grad_scale=model_grad_scale, converge_tol=converge_tol,
                         converge_patience=converge_patience, **common)
        if mask not in MASK_OUTPUTS:
            raise ValueError(f"mask must be one of {MASK_OUTPUTS} (Mx * My, Mx, My), got {mask!r}")
        self.mask = mask

    def _final_mask(self, masks: Tensor) -> Tensor:
        if self.mask == "x":
            return masks[:, :1]
        if self.mask == "y":
            return masks[:, 1:]
        return masks.prod(dim=1, keepdim=True)


@register("igos_pp_insertion")
class IGOSPPInsertion(_BilateralSmoothed):
    """iGOS++ with its insertion term only (the iGOS++ paper's Table 3 ablation): one mask M,

        L = -ins(M) + L1 * mean|1 - M| + L2 * R(M),     R as iGOS++'s (module docstring),

    optimised by iGOS++'s integrated-gradient direction (``model_grad_scale`` 0.5), BTV mix and line search;
    output (B, 1, H, W) = 1 - up(M) in [0, 1], higher = revealing it restores class c. There is no deletion
    term: the objective does not read phi(I, B, .) at all. Cost: as iGOS++ with P = n rows per evaluation.

    Args: as :class:`IGOSPP` without ``mask`` (there is one mask). ``model_grad_scale`` keeps iGOS++'s 0.5 so
    that this method differs from ``igos_pp`` by the removed terms only.
    """

    _TERMS = (((1,), False),)
    _MASKS = 1

    def __init__(self, blackbox, *, resolution: Resolution = 28, scale_with_image: bool = True,
                 iterations: int = 15, ig_steps: int = 20, l1: float | None = None, l2: float = 20.0,
                 btv_beta: float = 2.0, btv_sigma: float | None = None, btv_mix: float = 0.5,
                 smoothness: str = "bilateral", noise_std: float | None = None, optimizer: str = "line_search",
                 ls_alpha0: float = 1000.0, ls_shrink: float = 0.2, ls_c: float = 1e-4, ls_min_alpha: float = 1e-5,
                 nag_step: float | None = None, blur_kernel: int = 51, blur_sigma: float = 50.0,
                 model_grad_scale: float = 0.5, converge_tol: float | None = None,
                 converge_patience: int = 2, **common):
        super().__init__(blackbox, resolution=resolution, scale_with_image=scale_with_image, iterations=iterations,
                         ig_steps=ig_steps, l1=l1, l2=l2, btv_beta=btv_beta, btv_sigma=btv_sigma, btv_mix=btv_mix,
                         smoothness=smoothness, noise_std=noise_std, optimizer=optimizer,
                         ls_alpha0=ls_alpha0, ls_shrink=ls_shrink, ls_c=ls_c, ls_min_alpha=ls_min_alpha,
                         nag_step=nag_step, blur_kernel=blur_kernel, blur_sigma=blur_sigma,
                         model_grad_scale=model_grad_scale, converge_tol=converge_tol,
                         converge_patience=converge_patience, **common)

    def _final_mask(self, masks: Tensor) -> Tensor:
        return masks


@register("igos")
class IGOS(_IntegratedGradientOptimizedSaliency):
    """I-GOS: one deletion mask optimised with integrated gradients, L1 and TV (same line search as iGOS++).

    Paper: Qi, Khorram & Fuxin, "Visualizing Deep Networks by Optimizing with Integrated Gradients",
    AAAI 2020. L = del(M) + L1 * mean|1 - M| + L2 * TV(M) (TV at r x r, exponent ``tv_beta``);
    output (B, 1, H, W) = 1 - up(M). Cost: as iGOS++ with P = n rows per evaluation (module docstring).

    Args: as :class:`IGOSPP`, without the BTV, mix, smoothness and mask knobs, plus ``tv_beta`` (2, the released
    ``tv_norm``); ``model_grad_scale`` defaults to 1 (the released I-GOS does not halve its IG).
    """

    _TERMS = (((1,), True),)
    _MASKS = 1

    def __init__(self, blackbox, *, resolution: Resolution = 28, scale_with_image: bool = True,
                 iterations: int = 15, ig_steps: int = 20, l1: float | None = None, l2: float = 20.0,
                 tv_beta: float = 2.0, noise_std: float | None = None, optimizer: str = "line_search",
                 ls_alpha0: float = 1000.0, ls_shrink: float = 0.2, ls_c: float = 1e-4, ls_min_alpha: float = 1e-5,
                 nag_step: float | None = None, blur_kernel: int = 51, blur_sigma: float = 50.0,
                 model_grad_scale: float = 1.0, converge_tol: float | None = None,
                 converge_patience: int = 2, **common):
        super().__init__(blackbox, resolution=resolution, scale_with_image=scale_with_image, iterations=iterations,
                         ig_steps=ig_steps, l1=l1, l2=l2, noise_std=noise_std, optimizer=optimizer,
                         ls_alpha0=ls_alpha0, ls_shrink=ls_shrink, ls_c=ls_c, ls_min_alpha=ls_min_alpha,
                         nag_step=nag_step, blur_kernel=blur_kernel, blur_sigma=blur_sigma,
                         model_grad_scale=model_grad_scale, converge_tol=converge_tol,
                         converge_patience=converge_patience, **common)
        if tv_beta < 1:
            raise ValueError(f"tv_beta must be >= 1, got {tv_beta}")
        self.tv_beta = float(tv_beta)

    def _regulariser(self, batch: _Batch, masks: Tensor, ids: Tensor) -> Tensor:
        return batch.l1 * (1 - masks).abs().flatten(1).mean(1) + self.l2 * tv_norm(masks, self.tv_beta)

    def _final_mask(self, masks: Tensor) -> Tensor:
        return masks


@register("igos_naive_insertion")
class IGOSNaiveInsertion(IGOS):
    """"Naive I-GOS + insertion" (the iGOS++ paper's Table 3 ablation): I-GOS's one mask with an insertion term,

        L = del(M) - ins(M) + L1 * mean|1 - M| + L2 * TV(M),

    both model terms on the same mask M, each by its integrated gradient (I-GOS's direction, ``model_grad_scale``
    1), I-GOS's TV at r x r and the same line search; output (B, 1, H, W) = 1 - up(M). Cost: as iGOS++ with
    P = 2n rows per evaluation.

    *Reading of the paper / deviation:* the design notes do not define this row; we take the released code's
    one-mask ``iGOS_p`` (its main.py's ``--method iGOS+``), whose model terms are exactly these, but keep
    I-GOS's plain TV instead of that code's BTV mix, so that this method differs from ``igos`` by the
    insertion term alone (and from ``igos_pp`` by the single mask, the missing combined terms and the
    smoothness term).

    Args: as :class:`IGOS`.
    """

    _TERMS = (((1,), True), ((1,), False))  # del M, ins M
