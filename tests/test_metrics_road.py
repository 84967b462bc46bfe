"""ROAD (metrics/road.py): the imputation against pytorch-grad-cam's and Quantus' to 1e-5, the removal order,
scores that behave as the definition says, and independence from the batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saliency_lab.metrics.road import (ROAD_FRACTIONS, check_fractions, impute, noise_field,
                                       removal_masks, road_scores)


def random_case(seed: int, size: int = 20, fraction: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=generator)
    removed = torch.rand(size, size, generator=generator) < fraction
    return image, removed


@pytest.mark.parametrize("seed", range(4))
def test_imputation_matches_quantus_and_grad_cam(seed):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from quantus.functions.perturb_func import noisy_linear_imputation

    image, removed = random_case(seed, fraction=0.1 + 0.2 * seed)
    ours = impute(image, removed)
    quantus = noisy_linear_imputation(image.double().numpy(), np.flatnonzero(removed.numpy().reshape(-1)), noise=0.0)
    grad_cam = NoisyLinearImputer(noise=0.0)(image, (~removed).float())
    assert np.abs(ours.numpy() - quantus).max() < 1e-5
    assert (ours - grad_cam).abs().max() < 1e-5
    assert torch.equal(ours[:, ~removed], image[:, ~removed])  # known pixels untouched


def test_imputed_pixels_are_the_weighted_mean_of_their_neighbours():
    """The linear system's defining property, on a pixel removed alone inside the image: 1/6 for the 4 direct
    neighbours, 1/12 for the diagonals."""
    image = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(3))
    removed = torch.zeros(7, 7, dtype=torch.bool)
    removed[3, 3] = True
    direct = image[:, 2, 3] + image[:, 4, 3] + image[:, 3, 2] + image[:, 3, 4]
    diagonal = image[:, 2, 2] + image[:, 2, 4] + image[:, 4, 2] + image[:, 4, 4]
    assert torch.allclose(impute(image, removed)[:, 3, 3], direct / 6 + diagonal / 12, atol=1e-6)


def test_noise_is_one_fixed_field_on_the_removed_pixels_only():
    image, removed = random_case(0)
    field = 0.01 * noise_field(image.shape, seed=5)
    noisy = impute(image, removed, field)
    assert torch.allclose(noisy - impute(image, removed), field * removed, atol=1e-6)
    assert torch.equal(noise_field(image.shape, 5), noise_field(image.shape, 5))


def test_removal_order_and_counts():
    saliency = torch.arange(16.0).view(1, 1, 4, 4)  # pixel 15 most salient
    morf = removal_masks(saliency, (0.25, 0.5), most_relevant_first=True)
    lerf = removal_masks(saliency, (0.25, 0.5), most_relevant_first=False)
    assert morf.shape == (1, 2, 4, 4) and morf[0, 0].flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]
    assert lerf[0, 0].flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert morf[0, 1].sum() == lerf[0, 1].sum() == 8
    ties = torch.zeros(1, 1, 4, 4)  # a constant map: ties broken by the lower flat index, both ways
    assert removal_masks(ties, (0.25,), True)[0, 0].flatten().nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert removal_masks(ties, (0.25,), False)[0, 0].flatten().nonzero().flatten().tolist() == [12, 13, 14, 15]


def test_bad_fractions_are_refused():
    for bad in ([], [0.0, 0.5], [1.0], [1.5]):
        with pytest.raises(ValueError, match="ROAD fractions"):
            check_fractions(bad)


class BrightCentre(torch.nn.Module):
    """Class 1's logit is the mean brightness of the central 8x8 square minus the rest's: evidence sits there."""

    def forward(self, x):
        centre = torch.zeros(x.shape[-2:], dtype=torch.bool)
        centre[8:16, 8:16] = True
        gray = x.mean(1)
        evidence = 20 * (gray[:, centre].mean(1) - gray[:, ~centre].mean(1))
        return torch.stack([-evidence, evidence], 1)


def test_a_map_on_the_evidence_beats_its_inverse():
    generator = torch.Generator().manual_seed(0)
    images = 0.3 * torch.rand(3, 3, 24, 24, generator=generator)
    images[:, :, 8:16, 8:16] += 0.6
    good = torch.zeros(3, 1, 24, 24)
    good[:, :, 8:16, 8:16] = 1.0
    good += 0.01 * torch.rand(good.shape, generator=generator)
    targets = torch.ones(3, dtype=torch.long)
    right = road_scores(BrightCentre(), images, good, targets, fractions=(0.1, 0.2, 0.4))
    wrong = road_scores(BrightCentre(), images, -good, targets, fractions=(0.1, 0.2, 0.4))
    assert (right.morf < wrong.morf).all() and (right.lerf > wrong.lerf).all()
    assert torch.allclose(right.gap, right.lerf - right.morf)
    assert right.morf_curve.shape == (3, 3) and torch.equal(right.fractions, torch.tensor([0.1, 0.2, 0.4]))


def test_scores_do_not_depend_on_the_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 24, 24, generator=generator)
    maps = torch.rand(4, 1, 12, 12, generator=generator)  # a coarser map: resized like the causal metrics do
    targets = torch.tensor([0, 1, 1, 0])
    together = road_scores(BrightCentre(), images, maps, targets, max_forward_batch=5)
    for b in range(4):
        alone = road_scores(BrightCentre(), images[b:b + 1], maps[b:b + 1], targets[b:b + 1])
        assert torch.allclose(alone.morf_curve[0], together.morf_curve[b], atol=1e-6)
        assert torch.allclose(alone.lerf_curve[0], together.lerf_curve[b], atol=1e-6)
    assert len(ROAD_FRACTIONS) == together.morf_curve.shape[1]
