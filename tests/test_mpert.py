"""Meaningful Perturbation: the mask deletes the evidence of a toy black box, the L1 and TV regularisers do
what they are for, the pieces (TV sum, jitter, weight rescaling) match their definitions, exact cost."""
from __future__ import annotations

import pytest
import torch

from saliency_lab import explainers
from saliency_lab.core.perturbation import gaussian_blur, perturb, scaled_blur
from saliency_lab.explainers.mpert import jitter_images, scaled_grid, total_variation_sum
from tests.test_igos import REGION, SIZE, RegionBox, scenes

# On an 8 x 8 grid of the toy: an L1 price that makes deleting everything cost 0.13 (the paper's weights are
# given for 28 x 28 sums) and a light TV, so the region (3 x 3 cells) is worth deleting on its own.
TOY = {"iterations": 60, "resolution": 8, "scale_with_image": False, "mask_noise": 0.0, "jitter": 0, "seed": 0,
       "l1": 2e-3, "tv": 1e-3}
BLUR = scaled_blur(61, 10.0, SIZE)  # MPert's sigma_0 = 10 px at 224 (kernel 2 * 30 + 1), at SIZE


def toy_box(images):
    """A RegionBox whose offset lies halfway between the images' region mean and that of their MPert blur, so
    deleting the region (blurring it) flips the class."""
    probe = RegionBox(0.0, gain=1.0)
    clean, blurred = probe.logits(images)[:, 0].mean(), probe.logits(gaussian_blur(images, *BLUR))[:, 0].mean()
    return RegionBox(float(clean + blurred) / 2)


def run(**overrides):
    images = scenes(2)
    model = toy_box(images)
    explainer = explainers.build("mpert", model, **{**TOY, **overrides})
    saliency = explainer(images, torch.zeros(2, dtype=torch.long))
    return model, explainer, images, saliency


def inside(maps):
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[REGION] = True
    return maps[:, 0, region].mean(1), maps[:, 0, ~region].mean(1)


def test_the_mask_moves_toward_deleting_the_evidence():
    model, explainer, images, saliency = run()
    assert saliency.shape == (2, 1, SIZE, SIZE) and saliency.min() >= 0 and saliency.max() <= 1
    within, outside = inside(saliency)
    assert (within > 0.5).all() and (within > outside + 0.3).all(), (within, outside)
    # The deletion it found removes the class: p_c of the perturbed image falls far below the original's.
    kept = 1 - saliency
    blurred = gaussian_blur(images, *BLUR)
    with torch.no_grad():
        before = model.logits(images).softmax(1)[:, 0]
        after = model.logits(perturb(images, kept, blurred)).softmax(1)[:, 0]
    # The toy is confident (p_c ~0.92, its offset lies halfway to the blurred image); the deletion flips it.
    assert (before > 0.9).all() and (after < 0.2).all(), (before, after)


def test_l1_limits_what_is_deleted():
    _, _, _, cheap = run(l1=1e-5)
    _, _, _, costly = run(l1=1.0)  # deleting a cell costs more than the whole probability can gain
    assert costly.max() < 0.05, "a strong L1 keeps the whole image"
    assert cheap.mean() > costly.mean() + 0.1


def test_tv_makes_the_mask_smoother():
    grid = (8, 8)
    _, _, _, rough = run(tv=0.0)
    _, _, _, smooth = run(tv=0.03)
    # The TV of the deletions, measured on the 8 x 8 grid of the optimised masks (cell means of the maps).
    def grid_tv(saliency):
        return total_variation_sum(torch.nn.functional.adaptive_avg_pool2d(1 - saliency, grid), 2.0)
    assert (grid_tv(smooth) < 0.5 * grid_tv(rough)).all()
    within, outside = inside(smooth)
    assert (within > outside).all(), "a smoother deletion still centred on the evidence"


def test_total_variation_sum_and_scaled_weights():
    mask = torch.zeros(1, 1, 3, 4)
    mask[..., :, 2:] = 1.0  # one vertical edge of height 3
    assert total_variation_sum(mask, 3.0).item() == pytest.approx(3.0)
    mask[..., 0, 0] = 0.5
    assert total_variation_sum(mask, 2.0).item() == pytest.approx(3.0 + 2 * 0.25)
    assert scaled_grid(28, 64, 64, True) == (8, 8) and scaled_grid(28, 224, 224, True) == (28, 28)
    assert scaled_grid(28, 64, 64, False) == (28, 28)
    with pytest.raises(ValueError, match="finer than the image"):
        scaled_grid(28, 16, 16, False)
    model = RegionBox(offset=0.5)
    explainer = explainers.build("mpert", model)
    assert explainer.weights((28, 28)) == pytest.approx((1e-4, 1e-2))
    l1, tv = explainer.weights((8, 8))  # same image fraction, same shape -> same cost
    assert l1 * 64 == pytest.approx(1e-4 * 784) and tv * 8 == pytest.approx(1e-2 * 28)
    assert explainer.jitter_range(224) == 4 and explainer.jitter_range(64) == 2


def test_jitter_shifts_without_wrapping():
    images = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    shifted = jitter_images(images, torch.tensor([[1, 0], [0, 2]]), pad=2)
    assert torch.equal(shifted[0, :, 1:], images[0, :, :-1]) and torch.equal(shifted[0, :, 0], images[0, :, 0])
    assert torch.equal(shifted[1, ..., 2:], images[1, ..., :-2])
    assert torch.equal(shifted[1, ..., 0], images[1, ..., 0]) and torch.equal(shifted[1, ..., 1], images[1, ..., 0])


def test_cost_noise_and_jitter_are_per_image():
    images = scenes(4)
    model = toy_box(images)  # a black box the deletion can move (p_c of RegionBox(0.5) is saturated at 1)
    explainer = explainers.build("mpert", model, iterations=5, resolution=4, scale_with_image=False,
                                 max_forward_batch=3)
    targets = torch.zeros(4, dtype=torch.long)
    together = explainer(images, targets, torch.tensor([5, 6, 7, 8]))
    assert (explainer.cost.forwards, explainer.cost.backwards) == (5 * 4, 5 * 4)
    assert model.rows == [3, 1] * 5  # chunks of max_forward_batch, one forward (and backward) per iteration
    alone = explainer(images[2:3], targets[2:3], torch.tensor([7]))
    assert together.std() > 0.1 and torch.allclose(together[2:3], alone, atol=1e-5)
    other_seed = explainers.build("mpert", model, iterations=5, resolution=4, scale_with_image=False, seed=1)
    assert not torch.equal(other_seed(images, targets, torch.tensor([5, 6, 7, 8])), together)


def test_bad_hyper_parameters_are_named():
    model = RegionBox(offset=0.5)
    for hparams, message in (({"iterations": 0}, "iterations"), ({"resolution": 1}, "resolution"),
                             ({"tv_beta": 0.5}, "tv_beta"), ({"jitter": -1}, "jitter"),
                             ({"mask_noise": -0.1}, "mask_noise")):
        with pytest.raises(ValueError, match=message):
            explainers.build("mpert", model, **hparams)
