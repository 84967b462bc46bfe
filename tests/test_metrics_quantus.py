"""Our metrics against Quantus where the definitions coincide (docs/protocols.md says where they differ on purpose):
the pointing game at tolerance 0 (Quantus' PointingGame: a hit when any maximum lies in the mask), the deletion
curve in pixel units on a black substrate (Quantus' PixelFlipping) and on a grid of cells (Quantus'
RegionPerturbation, which reports the drop from the clean score). ROAD's imputation: tests/test_metrics_road.py.

Maps are continuous random values, so no two units tie (the libraries break ties differently: Quantus by
numpy's argsort, we by the lower flat index). The model is a small float64 network, so both sides see the same
probabilities to rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from saliency_lab.metrics import CausalProtocol, causal_curves
from saliency_lab.metrics.localisation import pointing_game

quantus = pytest.importorskip("quantus")
SIZE = 16


class TinyNet(nn.Module):
    """Float64 logits of a fixed random conv net, for (B, 3, 16, 16) inputs; 4 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                  nn.Linear(24, 4)).double().eval()

    def forward(self, x):
        return self.body(x.double())


def random_batch(seed: int, batch: int = 3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)
    maps = torch.rand(batch, 1, SIZE, SIZE, generator=generator, dtype=torch.float64)
    images[:, :, 0, 0] = 0.0  # Quantus' "black" is each image's minimum: with a 0 in it, our "zero" substrate
    return images, maps


@pytest.mark.parametrize("seed", range(3))
def test_pointing_game_at_tolerance_zero_matches_quantus(seed):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(16, 1, SIZE, SIZE, generator=generator)
    masks = torch.rand(16, 1, SIZE, SIZE, generator=generator) < 0.3
    maps[0, 0, 2:4, 2:4] = 2.0  # an exact plateau of 4 maxima, one of them inside the mask only
    masks[0] = False
    masks[0, 0, 3, 3] = True
    ours = pointing_game(maps, masks, tolerance=0.0).numpy()
    theirs = np.asarray(quantus.PointingGame(disable_warnings=True).evaluate_batch(
        a_batch=maps.numpy(), s_batch=masks.numpy()), dtype=bool)
    assert ours[0] and (ours == theirs).all()


def test_deletion_in_pixel_units_on_black_matches_pixel_flipping():
    images, maps = random_batch(1)
    model = TinyNet().eval()
    targets = model(images).argmax(1)
    pixels_per_step = 8
    steps = SIZE * SIZE // pixels_per_step
    protocol = CausalProtocol(units="pixel", steps=steps, deletion_substrate="zero", insertion_substrate="zero")
    ours = causal_curves(model, images.float(), maps.float(), targets, protocol).deletion_curve.double().numpy()
    # Quantus flips channel values (the map broadcast to the 3 channels; the 3 values of a pixel tie, so they
    # are adjacent in its order): with 8 values a step, every 3rd step has removed whole pixels, 8 more each time.
    metric = quantus.PixelFlipping(features_in_step=pixels_per_step, perturb_baseline="black", normalise=False,
                                   abs=False, disable_warnings=True)
    theirs = np.asarray(metric(model=model, x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=maps.numpy(),
                               softmax=True, device="cpu"))
    assert theirs.shape == (3, 3 * steps)  # Quantus leaves out step 0, the clean image
    assert np.abs(ours[:, 1:] - theirs[:, 2::3]).max() < 1e-5


def test_deletion_on_a_grid_matches_region_perturbation():
    images, maps = random_batch(2)
    model = TinyNet().eval()
    targets = model(images).argmax(1)
    patch = 4
    cells = SIZE // patch
    protocol = CausalProtocol(units=cells, steps=cells * cells, deletion_substrate="zero", insertion_substrate="zero")
    ours = causal_curves(model, images.float(), maps.float(), targets, protocol).deletion_curve.double().numpy()
    metric = quantus.RegionPerturbation(patch_size=patch, order="morf", regions_evaluation=cells * cells,
                                        perturb_baseline="black", normalise=False, abs=False, disable_warnings=True)
    drops = np.asarray(metric(model=model, x_batch=images.numpy(), y_batch=targets.numpy(),
                              a_batch=maps.numpy(), softmax=True, device="cpu"))
    assert drops.shape == (3, cells * cells)  # Quantus: p(clean) - p(after k regions), k = 1..n
    assert np.abs((ours[:, :1] - ours[:, 1:]) - drops).max() < 1e-5


@pytest.mark.parametrize("levels", [None, 5])
def test_randomisation_rank_correlation_matches_quantus_spearman(levels):
    """The similarity of the model-randomisation check (Quantus' MPRT uses the same Spearman correlation between
    a map and its map on the randomised network): per image, ties (``levels``: maps quantised to 5 values) by
    average ranks in both."""
    from quantus.functions.similarity_func import correlation_spearman

    from saliency_lab.metrics.sanity import rank_correlation

    generator = torch.Generator().manual_seed(4)
    maps = torch.rand(5, 1, SIZE, SIZE, generator=generator)
    reference = 0.5 * maps + torch.rand(5, 1, SIZE, SIZE, generator=generator)
    if levels:
        maps, reference = (maps * levels).floor(), (reference * levels).floor()
    ours = rank_correlation(maps, reference).numpy()
    theirs = correlation_spearman(maps.flatten(1).numpy(), reference.flatten(1).numpy(), batched=True)
    assert np.abs(ours - theirs).max() < 1e-5
