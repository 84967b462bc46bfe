"""Extremal Perturbation: the area constraint holds at each area, the masks preserve a toy black box's
evidence, and the pieces (smooth-max generator, blur pyramid, ranking penalty) match their definitions."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from saliency_lab import explainers
from saliency_lab.core.perturbation import gaussian_blur
from saliency_lab.explainers.xpert import (SmoothMaskGenerator, area_penalty, axis_neighbours, blur_pyramid, pyramid_perturb,
                               smooth_max)
from tests.test_igos import REGION, SIZE, RegionBox, scenes

AREAS = (0.05, 0.1, 0.2)


class TextureBox(nn.Module):
    """Class 0's logit = gain * mean over REGION of |x_0 - 3x3 box(x_0)| (the fine detail of channel 0); class 1's
    = 0. Blur removes the detail, so every pixel of REGION is evidence (a flat bright region would only be
    evidence along its edges)."""

    num_classes = 2

    def __init__(self, gain: float = 60.0):
        super().__init__()
        self.register_buffer("kernel", torch.full((1, 1, 3, 3), 1 / 9))
        self.gain = gain

    def logits(self, x):
        detail = (x[:, :1] - F.conv2d(x[:, :1], self.kernel, padding=1)).abs()
        score = self.gain * detail[:, 0, REGION[0], REGION[1]].mean(dim=(1, 2))
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def textured(count: int) -> torch.Tensor:
    """scenes() with a 1-px checkerboard (0.1 / 0.9) in REGION of channel 0: the TextureBox's evidence."""
    images = scenes(count)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    checker = ((rows + cols) % 2).float()[REGION]
    images[:, 0, REGION[0], REGION[1]] = 0.1 + 0.8 * checker
    return images


@pytest.fixture(scope="module")
def explained():
    """The toy explained at the defaults (300 iterations, areas {0.05, 0.1, 0.2})."""
    explainer = explainers.build("xpert", TextureBox())
    saliency = explainer(textured(2), torch.zeros(2, dtype=torch.long))
    return explainer, saliency


def test_area_constraint_holds_within_one_percent_at_each_area(explained):
    explainer, saliency = explained
    assert explainer.areas == AREAS and explainer.iterations == 300
    masks = explainer.last_masks
    assert masks.shape == (2, 3, SIZE, SIZE) and masks.min() >= 0 and masks.max() <= 1
    areas = masks.flatten(2).mean(2)  # the paper's area: sum(m) / |image|
    assert torch.allclose(areas, torch.tensor(AREAS).expand(2, -1), atol=0.01), areas
    assert torch.allclose(saliency[:, 0], masks.sum(1))


def test_masks_preserve_the_evidence(explained):
    explainer, _ = explained
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[REGION] = True
    masks = explainer.last_masks
    # The region covers 14% of the image: the 5% and 10% masks should lie almost entirely inside it.
    inside = (masks[:, :2] * region).flatten(2).sum(2) / masks[:, :2].flatten(2).sum(2)
    assert (inside > 0.8).all(), inside
    # And the 20% mask covers most of it.
    assert ((masks[:, 2] * region).flatten(1).sum(1) / region.sum() > 0.6).all()


def test_smooth_masks_and_their_generator():
    generate = SmoothMaskGenerator((32, 32), step=2.0, sigma=6.0, temperature=0.05)
    assert generate.grid == (16, 16)
    full = generate(torch.ones(1, 1, 16, 16))
    # Flat top: every pixel has points within sigma / 2 (the smooth max averages in the lower neighbours a little).
    assert full.min() > 0.98 and full.max() <= 1
    single = torch.zeros(1, 1, 16, 16)
    single[..., 8, 8] = 1.0  # one point at (17, 17): between pixels 16 and 17 (centres 16.5, 17.5)
    bump = generate(single)[0, 0]
    # Flat within sigma / 2 = 3 px of the point along an axis (pixels 14..19), then exp(-2 (d / sigma - 1/2)^2).
    assert torch.allclose(bump[17, 14:20], torch.ones(6), atol=1e-6) and bump[17, 20] < 0.99
    assert bump[17, 23].item() == pytest.approx(math.exp(-2 * (6.5 / 6 - 0.5) ** 2), abs=1e-3)  # d = 6.5
    index, weight = axis_neighbours(10, 2.0, 1.0)
    assert index.shape == (10, 2 * 2 + 1) and (weight[:, 2] == 1).all() and weight[0, 0] == 0  # off-grid
    values = torch.tensor([0.1, 0.9, 0.2])
    assert smooth_max(values, 1e-3).item() == pytest.approx(0.9, abs=1e-4)
    assert smooth_max(values, 1e3).item() == pytest.approx(values.mean().item(), abs=1e-3)


def test_blur_pyramid_interpolates_between_levels():
    images = torch.rand(2, 3, 16, 16)
    pyramid = blur_pyramid(images, levels=5, max_blur=3.0)
    assert pyramid.shape == (2, 5, 3, 16, 16) and torch.equal(pyramid[:, -1], images)
    assert torch.allclose(pyramid[:, 0], gaussian_blur(images, 19, 3.0))
    ones, zeros = torch.ones(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    assert torch.equal(pyramid_perturb(pyramid, ones), images)
    assert torch.allclose(pyramid_perturb(pyramid, zeros), pyramid[:, 0])
    half = pyramid_perturb(pyramid, torch.full((2, 1, 16, 16), 0.625))  # 0.625 * 4 = 2.5: halfway 2 -> 3
    assert torch.allclose(half, (pyramid[:, 2] + pyramid[:, 3]) / 2, atol=1e-6)


def test_ranking_area_penalty():
    binary = torch.zeros(2, 1, 10, 10)
    binary[0, ..., :2, :5] = 1  # area 0.1
    binary[1, ..., :4, :5] = 1  # area 0.2
    assert torch.allclose(area_penalty(binary, torch.tensor([0.1, 0.2])), torch.zeros(2))
    assert area_penalty(binary, torch.tensor([0.2, 0.2]))[0].item() == pytest.approx(0.1)  # 10 pixels short
    grey = torch.full((1, 1, 10, 10), 0.5)
    assert area_penalty(grey, torch.tensor([0.5])).item() == pytest.approx(0.25)


def test_cost_and_rows():
    model = RegionBox(0.5)
    explainer = explainers.build("xpert", model, iterations=4, areas=(0.1, 0.3), max_forward_batch=5)
    explainer(scenes(3), torch.zeros(3, dtype=torch.long))
    assert (explainer.cost.forwards, explainer.cost.backwards) == (3 * 2 * 4, 3 * 2 * 4)
    assert model.rows == [5, 1] * 4


@pytest.mark.parametrize("bad, message", [({"areas": []}, "areas"), ({"areas": [0.0]}, "areas"),
                                          ({"iterations": 0}, "iterations"), ({"levels": 1}, "levels"),
                                          ({"sigma": 0.0}, "sigma"), ({"area_growth": 0.9}, "area_growth")])
def test_bad_hyper_parameters_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        explainers.build("xpert", RegionBox(0.5), **bad)
