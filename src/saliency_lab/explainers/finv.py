"""Feature Inversion (Du, Liu, Song & Hu, "Towards Explanation of DNN-based Prediction with Guided Feature
Inversion", KDD 2018), batched over images: a mask guided by the black box's own features, in two stages.

Masks are built from the feature maps of a guide level (default: the second-lowest resolution level of
``blackbox.features()``, stride 16 on a ResNet), computed once from the clean image and normalised per channel
by its spatial maximum, A_k in [0, 1] (h x w). A mask is a per-image linear combination of those channels,

    m_{w,b} = sigmoid(sum_k w_k A_k + b)       (h x w, bilinearly upsampled to H x W),

so it follows the object parts the network itself separates, with as many parameters as guide channels.
Phi(x, m) = x * m + P * (1 - m) is the shared perturbation operator with a blurred copy P of the image.

Stage 1, guided feature inversion (``inversion_iterations`` = 10): the mask whose masked image reproduces
the black box's lowest-resolution features f_L (the deepest level) with the least area,

    m1 = argmin  ||f_L(Phi(x, m)) - f_L(x)||^2 / ||f_L(x)||^2 + l1 * mean(m)

Stage 2, class-discriminative inversion (``class_iterations`` = 70): inside m1, the part that carries class c,
m_c = m1 * s with s = m_{w', b'}, maximising the class probability of the kept part and minimising it on the
rest of the foreground,

    m_c = argmin  - p_c(Phi(x, m1 * s)) + p_c(Phi(x, m1 * (1 - s))) + l2 * mean(m1 * s)

Both stages use Adam (torch.optim, learning rate ``lr``) from w = 0, b = 0 (m = 0.5). Output saliency =
up(m_c), (B, 1, H, W) in [0, 1]. The stage-1 feature error of every iterate of the last call is kept in
:attr:`last_inversion_errors` (B, T1): the error before each step (B, T1 + 1 with ``record_errors``: and after
the last).

Where the paper leaves the choice open, or we choose differently:

- The guide and reconstructed levels are chosen by position (``guide_level``, ``target_level``) among the
  black box's ``features()`` levels, so any CNN the project wraps works; the paper uses VGG's
  intermediate layers.
- Error normalised by ||f_L(x)||^2, so ``l1`` does not depend on the feature scale of the network.
- The background P: a gaussian blur of the image (sigma 10 px at 224, as Meaningful Perturbation's), scaled
  to the image; the weights l1 = 0.5 and l2 = 0.2 and the learning rate 0.1 are ours (not given by the paper
  for this parameterisation).
- Class scores are softmax probabilities (bounded, the quantity the causal metrics measure).

Batching: every image has its own parameters (rows of one tensor of one optimiser; Adam is element-wise), so
an image's masks do not depend on its batch mates; the black box sees rows in chunks of
``max_forward_batch``. Deterministic (``seed`` has no effect). Cost per image: 1 forward of the clean image's
features, then 1 forward + 1 backward per stage-1 iteration and 2 of each per stage-2 iteration:
forwards = 1 + T1 + 2 T2 (151 at the defaults), backwards = T1 + 2 T2 (150). The forward after the last
stage-1 step that completes :attr:`last_inversion_errors` is not needed by the method and is not taken when
``record_errors`` is False.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from saliency_lab.core.blackbox import require_feature_levels
from saliency_lab.core.perturbation import gaussian_blur, perturb, scaled_blur
from saliency_lab.explainers.base import Explainer
from saliency_lab.explainers.igos import resize_masks
from saliency_lab.explainers.registry import register


def guide_maps(features: Tensor) -> Tensor:
    """Per-channel max-normalised guide maps (N, C, h, w) in [0, 1] (negative activations are clipped)."""
    positive = features.clamp_min(0)
    return positive / positive.flatten(2).amax(2).clamp_min(1e-6)[..., None, None]


def guided_mask(weights: Tensor, bias: Tensor, guide: Tensor) -> Tensor:
    """sigmoid(sum_k w_k A_k + b): weights (N, C), bias (N,), guide (N, C, h, w) -> (N, 1, h, w)."""
    return torch.sigmoid(torch.einsum("nc,nchw->nhw", weights, guide) + bias[:, None, None]).unsqueeze(1)


def feature_error(features: Tensor, reference: Tensor) -> Tensor:
    """||f - f_ref||^2 / ||f_ref||^2 per image (N,)."""
    return (features - reference).pow(2).flatten(1).sum(1) / reference.pow(2).flatten(1).sum(1).clamp_min(1e-12)


@register("finv")
class FeatureInversion(Explainer):
    """Guided Feature Inversion: stage 1 inverts the deepest features, stage 2 keeps what carries the class.

    Args:
        inversion_iterations: T1, stage-1 Adam steps (10).
        class_iterations: T2, stage-2 Adam steps (70).
        lr: Adam's learning rate on (w, b) (0.1).
        l1: weight of mean(m) in stage 1 (0.5).
        l2: weight of mean(m1 * s) in stage 2 (0.2).
        guide_level, target_level: positions in ``blackbox.features()`` of the guide maps (-2: the second-lowest
            resolution) and of the features stage 1 reconstructs (-1: the lowest resolution).
        blur_sigma: sigma of the background blur at 224 px (10), scaled to the image; kernel 2 ceil(3 sigma) + 1.
        record_errors: also measure the feature error after the last stage-1 step (one more forward per
            image), completing :attr:`last_inversion_errors` (False).
        seed, max_forward_batch: see :class:`saliency_lab.explainers.base.Explainer`.

    Output (B, 1, H, W) in [0, 1]. Cost: module docstring.
    """

    needs_grad = True

    def __init__(self, blackbox, *, inversion_iterations: int = 10, class_iterations: int = 70, lr: float = 0.1,
                 l1: float = 0.5, l2: float = 0.2, guide_level: int = -2, target_level: int = -1,
                 blur_sigma: float = 10.0, record_errors: bool = False, **common):
        super().__init__(blackbox, **common)
        for name, value in (("inversion_iterations", inversion_iterations), ("class_iterations", class_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if lr <= 0 or l1 < 0 or l2 < 0 or blur_sigma <= 0:
            raise ValueError(f"need lr > 0, l1 >= 0, l2 >= 0 and blur_sigma > 0, got {lr}, {l1}, {l2}, {blur_sigma}")
        require_feature_levels(blackbox, "finv (its guide and reconstructed levels)")
        levels = len(getattr(blackbox, "feature_channels", [])) or None
        for name, value in (("guide_level", guide_level), ("target_level", target_level)):
            if levels is not None and not -levels <= value < levels:
                raise ValueError(f"{name} = {value} is not one of the black box's {levels} feature levels")
        self.inversion_iterations = inversion_iterations
        self.class_iterations = class_iterations
        self.lr = float(lr)
        self.l1 = float(l1)
        self.l2 = float(l2)
        self.guide_level = int(guide_level)
        self.target_level = int(target_level)
        self.blur_sigma = float(blur_sigma)
        self.record_errors = bool(record_errors)
        self.last_inversion_errors: Tensor | None = None

    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        size = tuple(images.shape[-2:])
        kernel, sigma = scaled_blur(2 * math.ceil(3 * self.blur_sigma) + 1, self.blur_sigma, min(size))
        background = gaussian_blur(images, kernel, sigma)
        guide, reference = self._clean_features(images)
        foreground = self._invert(images, background, guide, reference)
        return resize_masks(self._discriminate(images, background, guide, foreground, targets), size)

    def _clean_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(guide maps (B, C, h, w), reference features f_L(x)) of the clean images: one forward each."""
        guides, references = [], []
        with torch.no_grad():
            for part in self._chunks(images.shape[0]):
                maps = self._features(images[part])
                guides.append(guide_maps(maps[self.guide_level]))
                references.append(maps[self.target_level])
        return torch.cat(guides), torch.cat(references)

    def _optimise(self, guide: Tensor, iterations: int, loss_of_masks, rows_per_image: int) -> Tensor:
        """Adam on (w, b) of every image for ``iterations`` steps; ``loss_of_masks(masks (n, 1, h, w), part,
        iteration)`` returns the per-image losses (n,) of the images ``part`` and sends ``rows_per_image``
        rows per image through the black box. Returns the final masks (B, 1, h, w)."""
        count, channels = guide.shape[:2]
        weights = guide.new_zeros(count, channels).requires_grad_(True)
        bias = guide.new_zeros(count).requires_grad_(True)
        optimizer = torch.optim.Adam([weights, bias], lr=self.lr)
        images_per_chunk = max(1, self.max_forward_batch // rows_per_image)
        for iteration in range(iterations):
            optimizer.zero_grad()
            for part in self._chunks(count, images_per_chunk):
                loss_of_masks(guided_mask(weights[part], bias[part], guide[part]), part, iteration).sum().backward()
            optimizer.step()
        with torch.no_grad():
            return guided_mask(weights, bias, guide)

    def _invert(self, images: Tensor, background: Tensor, guide: Tensor, reference: Tensor) -> Tensor:
        """Stage 1 -> m1 (B, 1, h, w); records the feature error of every iterate."""
        size = tuple(images.shape[-2:])
        errors = guide.new_zeros(guide.shape[0], self.inversion_iterations + self.record_errors)

        def error_of(masks: Tensor, part: slice) -> Tensor:
            features = self._features(perturb(images[part], resize_masks(masks, size), background[part]))
            return feature_error(features[self.target_level], reference[part])

        def loss(masks: Tensor, part: slice, iteration: int) -> Tensor:
            error = error_of(masks, part)
            errors[part, iteration] = error.detach()
            return error + self.l1 * masks.flatten(1).mean(1)

        masks = self._optimise(guide, self.inversion_iterations, loss, rows_per_image=1)
        if self.record_errors:
            with torch.no_grad():
                for part in self._chunks(images.shape[0]):
                    errors[part, -1] = error_of(masks[part], part)
        self.last_inversion_errors = errors
        return masks

    def _discriminate(self, images: Tensor, background: Tensor, guide: Tensor, foreground: Tensor,
                      targets: Tensor) -> Tensor:
        """Stage 2 -> m_c = m1 * s (B, 1, h, w)."""
        size = tuple(images.shape[-2:])

        def loss(gates: Tensor, part: slice, iteration: int) -> Tensor:
            kept = foreground[part] * gates
            rest = foreground[part] * (1 - gates)
            x = perturb(images[part].repeat(2, 1, 1, 1), resize_masks(torch.cat([kept, rest]), size),
                        background[part].repeat(2, 1, 1, 1))
            classes = targets[part].repeat(2)
            probs = self._logits(x).softmax(dim=1).gather(1, classes[:, None]).squeeze(1)
            preserved, removed = probs.chunk(2)
            return removed - preserved + self.l2 * kept.flatten(1).mean(1)

        return foreground * self._optimise(guide, self.class_iterations, loss, rows_per_image=2)
