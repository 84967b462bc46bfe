"""Extremal Perturbation: the area constraint holds at each area, the masks preserve a toy black box's
evidence, and the pieces (smooth-max generator, blur pyramid, ranking penalty) match their definitions."""
from __future__ import annotations

import pytest
import torch

import explainers
from explainers.perturbation import gaussian_blur
from explainers.xpert import SmoothMaskGenerator, area_penalty, axis_neighbours, blur_pyramid, pyramid_perturb, smooth_max
from tests.test_igos import REGION, SIZE, RegionBox, scenes

AREAS = (0.05, 0.1, 0.2)


@pytest.fixture(scope="module")
def explained():
    """The toy explained at the defaults (300 iterations, areas {0.05, 0.1, 0.2})."""
    images = scenes(2)
    explainer = explainers.build("xpert", RegionBox(0.5))
    saliency = explainer(images, torch.zeros(2, dtype=torch.long))
    return explainer, saliency


def test_area_constraint_holds_within_one_percent_at_each_area(explained):
    explainer, saliency = explained
    assert explainer.areas == AREAS and explainer.iterations == 300
    masks = explainer.last_masks
    assert masks.shape == (2, 3, SIZE, SIZE) and masks.min() >= 0 and masks.max() <= 1
    areas = masks.flatten(2).mean(2)
    assert torch.allclose(areas, torch.tensor(AREAS).expand(2, -1), atol=0.01), areas
    assert torch.allclose(saliency[:, 0], masks.sum(1))


def test_masks_preserve_the_evidence(explained):
    explainer, _ = explained
    region = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    region[REGION] = True
    masks = explainer.last_masks
    # The region covers 19% of the image: the two smaller masks should lie almost entirely inside it.
    inside = (masks[:, :2] * region).flatten(2).sum(2) / masks[:, :2].flatten(2).sum(2)
    assert (inside > 0.8).all(), inside


def test_smooth_masks_and_their_generator():
    generate = SmoothMaskGenerator((32, 32), step=2.0, sigma=6.0, temperature=0.05)
    assert generate.grid == (16, 16)
    full = generate(torch.ones(1, 1, 16, 16))
    assert full.min() > 0.95 and full.max() <= 1  # flat top: the nearest point is within step / sqrt(2)
    single = torch.zeros(1, 1, 16, 16)
    single[..., 8, 8] = 1.0  # one point at pixel centre (17, 17)
    bump = generate(single)[0, 0]
    assert bump.argmax() == 17 * 32 + 17 and bump[17, 17] == pytest.approx(1.0, abs=1e-6)
    # Far from the point the mask follows the gaussian g(d) = exp(-d^2 / (2 sigma^2)) along an axis.
    assert bump[17, 17 + 6].item() == pytest.approx(torch.exp(torch.tensor(-0.5)).item(), abs=1e-3)
    index, weight = axis_neighbours(10, 2.0, 1.0)
    assert index.shape == (10, 2 * 2 + 1) and (weight[:, 2] > 0.8).all() and weight[0, 0] == 0  # off-grid
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
