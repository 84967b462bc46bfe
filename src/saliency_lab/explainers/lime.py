"""LIME on superpixels (Ribeiro, Singh & Guestrin, "Why Should I Trust You?", KDD 2016), via captum's ``Lime``.

The image is cut into superpixels by scikit-image's SLIC; an interpretable sample z in {0, 1}^K turns
superpixel k off (z_k = 0: its pixels replaced by the substrate) or keeps it. The explanation is the weighted
linear model g(z) = w . z + w_0 fitted to the class probability of the perturbed images (paper Eq. 1-2 with
the locally weighted square loss and no complexity term beyond ridge shrinkage):

    w = argmin_w  sum_z pi(z) (p_c(h(z)) - g(z))^2 + alpha ||w||^2,     pi(z) = exp(-D(1, z)^2 / (2 width^2))

D is the cosine distance between z and the all-ones vector (the unperturbed image), width = 0.25 and
alpha = 1 (ridge) as in the authors' released ``lime_image``; every superpixel enters the model (lime_image's
default keeps 100000 features, i.e. no feature selection). Samples: each superpixel kept with probability
0.5, ``n_samples`` = 1000 per image. Saliency (B, 1, H, W): w_k on every pixel of superpixel k (signed:
evidence against the class is negative, ranked lowest).

What captum does and what we add: captum's ``Lime`` draws the samples (with our seeded sampling function),
builds the perturbed images from the feature mask and the baseline, evaluates the black box
``max_forward_batch`` samples at a time and fits captum's ``SkLearnRidge`` (scikit-learn's ``Ridge``) with the
kernel weights. We add the superpixels (SLIC on the CPU: scikit-image works on numpy arrays; one image at a
time, as captum's Lime fits one model per image), the substrate, and per-image generators seeded by
(seed, index), so an image's samples do not depend on its batch mates (captum's default sampler uses torch's
global generator).

Segments at other sizes: SLIC's ``n_segments`` (50 at 224 px) is a count relative to the image, so the
superpixels cover the same fraction of the image at every resolution and it is not rescaled (the rule of
RISE's grid); SLIC's pre-smoothing ``slic_sigma`` is in pixels (1 at 224) and is scaled by side / 224.

Substrates: "segment_mean" (default: each superpixel filled with its own mean colour, lime_image's
``hide_color=None``), "mean" (ImageNet's mean colour), "zero", "blur" (the image blurred, sigma 10 px at
224, scaled), all from or beside the shared :mod:`core.perturbation` substrates.

Cost per image: ``n_samples`` forwards, no backward.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from saliency_lab.core.perturbation import make_substrate, scaled_blur
from saliency_lab.core.seeding import seeded_generator
from saliency_lab.explainers.base import Explainer
from saliency_lab.explainers.registry import register

REFERENCE_SIZE = 224
LIME_SUBSTRATES = ("segment_mean", "mean", "zero", "blur")


def superpixels(image: Tensor, n_segments: int, compactness: float, sigma: float) -> Tensor:
    """SLIC superpixels of one image (3, H, W) in [0, 1] -> labels (H, W) long in [0, K), every label used."""
    from skimage.segmentation import slic

    pixels = image.detach().permute(1, 2, 0).cpu().double().numpy()
    labels = slic(pixels, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0,
                  channel_axis=-1)
    _, dense = np.unique(labels, return_inverse=True)  # contiguous 0..K-1, as captum's feature mask needs
    return torch.from_numpy(dense.reshape(labels.shape)).long().to(image.device)


def segment_means(image: Tensor, labels: Tensor) -> Tensor:
    """Each superpixel filled with its mean colour: image (C, H, W), labels (H, W) in [0, K) -> (C, H, W)."""
    flat = labels.flatten()
    channels = image.shape[0]
    sums = image.new_zeros(int(flat.max()) + 1, channels).index_add_(0, flat, image.flatten(1).T)
    counts = torch.bincount(flat).to(image.dtype).unsqueeze(1)
    return (sums / counts)[flat].T.reshape(image.shape)


def cosine_kernel(width: float):
    """captum similarity function: exp(-D^2 / (2 width^2)), D = cosine distance of the interpretable sample z
    (1, K) to the all-ones vector, i.e. 1 - sqrt(|z| / K) (lime_image's kernel)."""

    def similarity(original, perturbed, interpretable: Tensor, **kwargs) -> float:
        kept = float(interpretable.sum())
        distance = 1 - math.sqrt(kept / interpretable.numel())
        return math.exp(-distance ** 2 / (2 * width ** 2))

    return similarity


def seeded_sampler(generator: torch.Generator, keep_prob: float):
    """captum perturb function: one interpretable sample (1, K) long in {0, 1} per call, z_k = 1 with
    probability keep_prob, drawn from ``generator`` (so the n-th sample of an image is always the same)."""

    def sample(original: Tensor, num_interp_features: int, **kwargs) -> Tensor:
        draws = torch.rand((1, num_interp_features), generator=generator, device=generator.device)
        return (draws < keep_prob).long()

    return sample


@register("lime")
class LIME(Explainer):
    """LIME with SLIC superpixels and captum's ``Lime`` (module docstring).

    Args:
        n_samples: perturbed images per image (1000).
        n_segments: SLIC's target number of superpixels (50, at every image size).
        compactness: SLIC's colour / space trade-off (10, scikit-image's default).
        slic_sigma: SLIC's gaussian pre-smoothing in pixels at 224 px (1), scaled to the image.
        keep_prob: probability that a superpixel is kept in a sample (0.5).
        kernel_width: width of the exponential kernel on the cosine distance (0.25).
        alpha: ridge regularisation of the linear model (1).
        substrate: "segment_mean" (default), "mean", "zero" or "blur" (module docstring).
        blur_sigma: sigma of the "blur" substrate at 224 px (10), scaled to the image.
        seed, max_forward_batch: see :class:`saliency_lab.explainers.base.Explainer`.

    Output (B, 1, H, W), signed linear weights (probability units). Cost: ``n_samples`` forwards per image.
    """

    def __init__(self, blackbox, *, n_samples: int = 1000, n_segments: int = 50, compactness: float = 10.0,
                 slic_sigma: float = 1.0, keep_prob: float = 0.5, kernel_width: float = 0.25, alpha: float = 1.0,
                 substrate: str = "segment_mean", blur_sigma: float = 10.0, **common):
        super().__init__(blackbox, **common)
        for name, value in (("n_samples", n_samples), ("n_segments", n_segments)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if compactness <= 0 or slic_sigma < 0 or not 0 < keep_prob < 1 or kernel_width <= 0 or alpha < 0:
            raise ValueError(f"need compactness > 0, slic_sigma >= 0, 0 < keep_prob < 1, kernel_width > 0 and "
                             f"alpha >= 0, got {compactness}, {slic_sigma}, {keep_prob}, {kernel_width}, {alpha}")
        if substrate not in LIME_SUBSTRATES:
            raise ValueError(f"unknown LIME substrate {substrate!r}; expected one of {LIME_SUBSTRATES}")
        if blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {blur_sigma}")
        self.n_samples = n_samples
        self.n_segments = n_segments
        self.compactness = float(compactness)
        self.slic_sigma = float(slic_sigma)
        self.keep_prob = float(keep_prob)
        self.kernel_width = float(kernel_width)
        self.alpha = float(alpha)
        self.substrate = substrate
        self.blur_sigma = float(blur_sigma)
        self.last_segments: Tensor | None = None

    def segments(self, images: Tensor) -> Tensor:
        """Superpixel labels (B, H, W) long of images (B, 3, H, W)."""
        sigma = self.slic_sigma * min(images.shape[-2:]) / REFERENCE_SIZE
        return torch.stack([superpixels(image, self.n_segments, self.compactness, sigma) for image in images])

    def baselines(self, images: Tensor, segments: Tensor) -> Tensor:
        """The substrate (B, 3, H, W) that replaces the superpixels turned off."""
        if self.substrate == "segment_mean":
            return torch.stack([segment_means(image, labels) for image, labels in zip(images, segments)])
        kernel, sigma = scaled_blur(2 * math.ceil(3 * self.blur_sigma) + 1, self.blur_sigma, min(images.shape[-2:]))
        return make_substrate(self.substrate, images, blur_kernel=kernel, blur_sigma=sigma)

    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        # captum (and its matplotlib) only where LIME runs, not for every user of the explainer registry
        from captum._utils.models.linear_model import SkLearnRidge
        from captum.attr import Lime as CaptumLime

        segments = self.segments(images)
        baselines = self.baselines(images, segments)
        self.last_segments = segments
        maps = []
        for b, seed in enumerate(seeds.tolist()):
            lime = CaptumLime(lambda x: self._logits(x).softmax(dim=1),
                              interpretable_model=SkLearnRidge(alpha=self.alpha),
                              similarity_func=cosine_kernel(self.kernel_width),
                              perturb_func=seeded_sampler(seeded_generator(images.device, seed), self.keep_prob))
            attribution = lime.attribute(images[b:b + 1], baselines=baselines[b:b + 1], target=int(targets[b]),
                                         feature_mask=segments[b][None, None], n_samples=self.n_samples,
                                         perturbations_per_eval=min(self.max_forward_batch, self.n_samples),
                                         return_input_shape=True)
            maps.append(attribution[:, :1].to(images.dtype))
        return torch.cat(maps)
