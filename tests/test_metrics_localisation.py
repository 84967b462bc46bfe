"""Tests for metrics/localisation.py against sklearn / torchmetrics and hand-computed masks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score
from torchmetrics.functional.classification import binary_average_precision

from saliency_lab.metrics import default_pointing_tolerance, iou_f1, iou_f1_pixel_level, pointing_game, pr_auc
from saliency_lab.metrics.localisation import saliency_region


def _mask(rows):
    """(1, 1, H, W) bool from a list of 0/1 rows."""
    return torch.tensor(rows, dtype=torch.bool).view(1, 1, len(rows), len(rows[0]))


def _map(rows):
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), len(rows[0]))


# --- M_I --------------------------------------------------------------------------------------------


def test_pr_auc_by_hand():
    # Ranked scores 4 3 2 1 with truth 1 0 1 0: AP = 1 * 1/2 + 2/3 * 1/2 = 5/6.
    value = pr_auc(_map([[4.0, 3.0], [2.0, 1.0]]), _mask([[1, 0], [1, 0]]))
    assert value.item() == pytest.approx(100 * 5 / 6)
    # A constant map admits every pixel at once: AP = the positive rate.
    value = pr_auc(_map([[1.0, 1.0], [1.0, 1.0]]), _mask([[1, 0], [0, 0]]))
    assert value.item() == pytest.approx(25.0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), size=st.integers(2, 12), levels=st.sampled_from([2, 3, 5, 1000]),
       batch=st.integers(1, 3))
def test_pr_auc_equals_sklearn_and_torchmetrics(seed, size, levels, batch):
    generator = torch.Generator().manual_seed(seed)
    # Few levels create many ties, where AP definitions differ most.
    saliency = torch.randint(0, levels, (batch, 1, size, size), generator=generator).float() / levels
    gt = torch.rand(batch, 1, size, size, generator=generator) < 0.3
    gt[:, 0, 0, 0] = True  # at least one positive per image
    values = pr_auc(saliency, gt)
    for b in range(batch):
        scores, truth = saliency[b].flatten(), gt[b].flatten()
        expected = 100 * average_precision_score(truth.numpy(), scores.numpy())
        assert values[b].item() == pytest.approx(expected, abs=1e-4)
        reference = 100 * binary_average_precision(scores, truth.long()).item()
        assert values[b].item() == pytest.approx(reference, abs=1e-3)


def test_pr_auc_without_ground_truth_is_nan_and_resizes():
    saliency = torch.rand(2, 1, 4, 4)
    gt = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    gt[0, 0, 1, 1] = True
    values = pr_auc(saliency, gt)
    assert not math.isnan(values[0]) and math.isnan(values[1])
    coarse = _map([[1.0, 0.0], [0.0, 0.0]])  # bilinear to 4 x 4: the top-left block ranks first
    top_left = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    top_left[..., 0, 0] = True
    assert pr_auc(coarse, top_left).item() == pytest.approx(100.0)


# --- pointing game ----------------------------------------------------------------------------------


def test_pointing_game_by_hand():
    gt = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    gt[0, 0, 0, 0] = True
    saliency = torch.zeros(1, 1, 6, 6)
    saliency[0, 0, 3, 4] = 1.0  # distance to the gt pixel: sqrt(3^2 + 4^2) = 5
    assert not pointing_game(saliency, gt, 5.0).item()  # strict <
    assert pointing_game(saliency, gt, 5.01).item()
    assert not pointing_game(saliency, gt, 0.0).item()
    saliency[0, 0, 0, 0] = 1.0  # ties with (3, 4); the first maximum row-major is (0, 0)
    assert pointing_game(saliency, gt, 0.0).item()


def test_pointing_game_batch_and_resize():
    gt = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    gt[:, 0, 6:, 6:] = True  # bottom-right 2 x 2
    coarse = torch.zeros(3, 1, 4, 4)
    coarse[0, 0, 3, 3] = 1.0  # bilinear to 8 x 8 peaks at (7, 7): inside
    coarse[1, 0, 0, 0] = 1.0  # peaks at (0, 0): distance to (6, 6) is sqrt(72) ~ 8.49
    coarse[2, 0, 0, 3] = 1.0  # peaks at (0, 7): distance to (6, 7) is 6
    assert pointing_game(coarse, gt, 1.0).tolist() == [True, False, False]
    assert pointing_game(coarse, gt, 6.5).tolist() == [True, False, True]
    assert pointing_game(coarse, gt, 8.6).tolist() == [True, True, True]
    empty = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    assert not pointing_game(coarse[:1], empty, 100.0).item()


def test_pointing_game_tie_rule_is_robust_to_float_noise():
    """A plateau of maxima, one inside the ground truth and one far outside: whichever of the two a 1e-7
    perturbation makes the strict argmax, or neither, the hit is the same (any tied maximum counts)."""
    gt = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    gt[0, 0, 12:, 12:] = True
    base = torch.full((1, 1, 16, 16), 0.25)
    base[0, 0, 1, 1] = base[0, 0, 14, 14] = 0.9  # outside first in row-major order, then inside
    hits = []
    for outside, inside in [(0, 0), (1e-7, 0), (0, 1e-7), (-1e-7, 0), (0, -1e-7), (1e-7, -1e-7)]:
        noisy = base.clone()
        noisy[0, 0, 1, 1] += outside
        noisy[0, 0, 14, 14] += inside
        hits.append(pointing_game(noisy, gt, 1.0).item())
    assert hits == [True] * 6
    # a real gap (far above the 1e-5 band) still decides: the inside peak lower is a miss
    lower = base.clone()
    lower[0, 0, 14, 14] -= 1e-3
    assert not pointing_game(lower, gt, 1.0).item()
    # the band is relative to the map's magnitude: the same map scaled by 1e4 gives the same answers
    assert pointing_game(base * 1e4 + 1e-3, gt, 1.0).item() and not pointing_game(lower * 1e4, gt, 1.0).item()


def test_pointing_game_constant_map_points_nowhere():
    gt = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    flat = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.5) + 1e-8 * torch.rand(1, 8, 8)])
    assert pointing_game(flat, gt, 3.0).tolist() == [False, False]


def test_default_pointing_tolerance():
    assert default_pointing_tolerance(224) == 15.0
    assert default_pointing_tolerance(64) == pytest.approx(15 * 64 / 224)


# --- IoU and F1 -------------------------------------------------------------------------------------


SALIENCY = _map([[0.0, 0.2, 0.4, 1.0],
                 [0.0, 0.1, 0.5, 0.9],
                 [0.0, 0.0, 0.3, 0.2],
                 [0.0, 0.0, 0.0, 0.0]])
GT = _mask([[0, 0, 1, 1],
            [0, 0, 1, 1],
            [0, 0, 0, 0],
            [0, 1, 0, 0]])


def test_iou_f1_by_hand():
    # Normalised map = the map (min 0, max 1); >= 0.3: (0,2) (0,3) (1,2) (1,3) (2,2) -> |R| = 5.
    # |G| = 5, |R and G| = 4, |R or G| = 6.
    iou, f1 = iou_f1(SALIENCY, GT)
    assert iou.item() == pytest.approx(4 / 6)
    assert f1.item() == pytest.approx(2 * 4 / 10)
    # Top 25% = 4 pixels: 1.0, 0.9, 0.5, 0.4 -> exactly the top-right gt block: |R and G| = 4.
    iou, f1 = iou_f1(SALIENCY, GT, top_fraction=0.25)
    assert iou.item() == pytest.approx(4 / 5) and f1.item() == pytest.approx(8 / 9)


def test_iou_f1_normalises_per_image():
    shifted = torch.cat([SALIENCY, 10 + 5 * SALIENCY])  # affine maps binarise alike
    iou, f1 = iou_f1(shifted, GT.expand(2, 1, 4, 4))
    assert iou[0] == iou[1] and f1[0] == f1[1]


def test_iou_f1_pixel_level_divides_by_the_region_size():
    iou, f1 = iou_f1_pixel_level(SALIENCY, GT)
    assert iou.item() == pytest.approx(4 / 6 / 5) and f1.item() == pytest.approx(0.8 / 5)
    iou, f1 = iou_f1_pixel_level(SALIENCY, GT, top_fraction=0.25)
    assert iou.item() == pytest.approx(4 / 5 / 4)


def test_region_tie_breaks_and_constant_maps():
    constant = torch.full((1, 1, 4, 4), 0.7)
    top = saliency_region(constant, top_fraction=0.25)
    assert top[0, 0, 0].all() and top.sum() == 4  # ties: row-major, the first row
    assert saliency_region(constant).sum() == 0  # no pixel stands out
    iou, f1 = iou_f1(constant, GT)
    assert iou.item() == 0 and f1.item() == 0
    iou, f1 = iou_f1(constant, torch.zeros(1, 1, 4, 4, dtype=torch.bool))
    assert math.isnan(iou.item()) and math.isnan(f1.item())
    assert saliency_region(constant, top_fraction=0.1).sum() == 2  # ceil(0.1 * 16)


def test_shape_validation():
    with pytest.raises(ValueError, match="gt_mask must be bool"):
        iou_f1(SALIENCY, GT.float())
    with pytest.raises(ValueError, match="batch sizes differ"):
        pr_auc(SALIENCY.expand(2, 1, 4, 4), GT)
    with pytest.raises(ValueError, match="saliency must be"):
        pointing_game(SALIENCY[0], GT, 1.0)
    with pytest.raises(ValueError, match="top_fraction"):
        iou_f1(SALIENCY, GT, top_fraction=0.0)
    with pytest.raises(ValueError, match="NaN"):
        pr_auc(torch.full_like(SALIENCY, math.nan), GT)

