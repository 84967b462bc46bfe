"""Tests for metrics/causal.py: closed-form curves on a toy model, properties, chunking, M_F, min-max."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from saliency_lab.metrics import CausalProtocol, causal_curves, explained_class, faithfulness_mf, minmax_across_methods
from saliency_lab.metrics.causal import normalised_area, rank_units, step_counts, trapezoid_area

HYPOTHESIS = settings(max_examples=20, deadline=None)


class RegionFraction(nn.Module):
    """Toy black box: p_0(x) = mean over a fixed region R of x's channel mean; 2 classes.

    Logits [log p, log(1 - p)] make the softmax probability of class 0 exactly p (clamped away from
    0 and 1). On images that are 1 on R with a zero substrate, p_0 = the fraction of R still (or already)
    showing the image, so deletion / insertion areas have closed forms.
    """

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region)

    def forward(self, x):
        p = x.mean(1)[:, self.region].mean(1).clamp(1e-7, 1 - 1e-7)
        return torch.stack([p.log(), (1 - p).log()], 1)


class Counting(nn.Module):
    """Wraps a model and records the number of calls, images and the largest batch."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.images, self.largest = model, 0, 0, 0

    def forward(self, x):
        self.calls, self.images, self.largest = self.calls + 1, self.images + len(x), max(self.largest, len(x))
        return self.model(x)


def _region(height, width, top, left, rows, cols):
    region = torch.zeros(height, width, dtype=torch.bool)
    region[top:top + rows, left:left + cols] = True
    return region


def _images_for(region, batch):
    """Images equal to 1 on R (and random elsewhere, which the toy model ignores)."""
    images = torch.rand(batch, 3, *region.shape, generator=torch.Generator().manual_seed(0))
    images[:, :, region] = 1.0
    return images


def _zero_protocol(**fields):
    return CausalProtocol(**{"units": "pixel", "deletion_substrate": "zero", "insertion_substrate": "zero",
                             **fields})


def _expected_insertion_curve(region_size, num_units, steps, perfect):
    """Closed form of i_k: R units revealed among the top ceil(k U / n) units, over |R|."""
    curve = []
    for k in range(steps + 1):
        changed = math.ceil(k * num_units / steps)
        revealed = min(changed, region_size) if perfect else max(0, changed - (num_units - region_size))
        curve.append(revealed / region_size)
    return torch.tensor(curve)


TARGETS_ZERO = torch.zeros(3, dtype=torch.long)


# --- closed forms -----------------------------------------------------------------------------------


def test_perfect_and_reversed_maps_on_the_toy_model():
    region = _region(8, 8, 0, 0, 4, 4)  # |R| = 16 of U = 64 pixels; n = 64 so step k changes k pixels
    images = _images_for(region, 2)
    saliency = torch.stack([region, ~region]).float().unsqueeze(1)  # perfect, reversed
    result = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO[:2], _zero_protocol(steps=64))
    # Hand computation: perfect insertion (sum_{k=1..16} k/16 + 48 - 1/2) / 64 = 56 / 64.
    torch.testing.assert_close(result.insertion, torch.tensor([0.875, 0.125]))
    torch.testing.assert_close(result.deletion, torch.tensor([0.125, 0.875]))
    torch.testing.assert_close(result.insertion_curve[0], _expected_insertion_curve(16, 64, 64, True))
    torch.testing.assert_close(result.deletion_curve[1], 1 - _expected_insertion_curve(16, 64, 64, False))
    assert result.insertion_curve[0, 0] == pytest.approx(0, abs=1e-6)  # starts from the substrate
    assert result.deletion_curve[0, 0] == pytest.approx(1, abs=1e-6)  # starts from the image
    torch.testing.assert_close(result.fractions, torch.arange(65) / 64)
    assert result.forwards == 2 * 65 * 2


def test_step_counts_use_the_ceiling():
    assert step_counts(64, 5).tolist() == [0, 13, 26, 39, 52, 64]
    assert step_counts(3, 6).tolist() == [0, 1, 1, 2, 2, 3, 3]


def test_trapezoid_area():
    curve = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(trapezoid_area(curve), torch.tensor([2 / 3, 1.0]))


def test_normalised_area_by_hand():
    # Deletion curve 0.8 -> 0.2 over 4 steps: A = (0.8/2 + 0.5 + 0.3 + 0.2 + 0.2/2) / 4 = 0.375;
    # (A - v_n) / (v_0 - v_n) = (0.375 - 0.2) / 0.6 = 0.291666...
    deletion = torch.tensor([[0.8, 0.5, 0.3, 0.2, 0.2], [0.9, 0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.49, 0.48, 0.47]])
    expected = torch.tensor([(0.375 - 0.2) / 0.6, (0.9 / 2 + 0.2 * 3 + 0.1 - 4 * 0.2) / 4 / 0.7, math.nan])
    torch.testing.assert_close(normalised_area(deletion, start_at_zero=False), expected, equal_nan=True)
    # The class vanishing at the first step scores 1 / (2n): only the trapezoid's first half step remains.
    assert normalised_area(deletion, start_at_zero=False)[1].item() == pytest.approx(1 / 8)
    # Insertion 0.1 -> 0.9, all gained at step 1: (A - v_0) / (v_n - v_0) = (0.1/2 + 0.9 * 3 + 0.9/2 - 0.4) / 0.8
    insertion = torch.tensor([[0.1, 0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1, 0.9]])
    area = torch.tensor([(0.05 + 2.7 + 0.45) / 4, (0.05 + 0.3 + 0.45) / 4])
    torch.testing.assert_close(normalised_area(insertion, start_at_zero=True), (area - 0.1) / 0.8)
    assert normalised_area(insertion, start_at_zero=True)[0] > 0.85  # near the ideal 1
    assert normalised_area(insertion, start_at_zero=True)[1] < 0.15  # near the worst 0
    # The excluded-image rule is |v_0 - v_n| <= eps, for either sign of the span
    flat = torch.tensor([[0.3, 0.9, 0.34], [0.3, 0.9, 0.36], [0.36, 0.0, 0.3]])
    assert normalised_area(flat, start_at_zero=True, eps=0.05).isnan().tolist() == [True, False, False]


def test_causal_curves_report_the_normalised_areas_of_their_curves():
    region = _region(8, 8, 0, 0, 4, 4)
    images = _images_for(region, 2)
    saliency = torch.stack([region, ~region]).float().unsqueeze(1)
    result = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO[:2], _zero_protocol(steps=64))
    torch.testing.assert_close(result.deletion_norm, normalised_area(result.deletion_curve, False))
    torch.testing.assert_close(result.insertion_norm, normalised_area(result.insertion_curve, True))
    # curves go 1 -> 0 (deletion) and 0 -> 1 (insertion): normalised = raw areas here
    torch.testing.assert_close(result.deletion_norm, result.deletion, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.insertion_norm, result.insertion, atol=1e-5, rtol=0)


def test_constant_map_ranks_row_major():
    assert torch.equal(rank_units(torch.zeros(2, 6)), torch.arange(6).expand(2, 6))
    # Observable: with R = the first two rows, a constant map is as good as the perfect map.
    region = _region(6, 6, 0, 0, 2, 6)
    images = _images_for(region, 2)
    saliency = torch.stack([torch.full((6, 6), 0.5), region.float()]).unsqueeze(1)
    result = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO[:2], _zero_protocol(steps=9))
    assert torch.equal(result.insertion_curve[0], result.insertion_curve[1])
    assert torch.equal(result.deletion_curve[0], result.deletion_curve[1])


def test_rank_units_breaks_ties_by_the_secondary_key_then_index():
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    tie_break = torch.tensor([[0.1, 0.3, 0.9, 0.2, 0.2]])
    # Order: 2 (highest score), then zeros by tie_break 1 (0.3), 3 and 4 (0.2, index order), 0.
    assert rank_units(scores, tie_break).tolist() == [[4, 1, 0, 2, 3]]
    assert rank_units(scores).tolist() == [[1, 2, 0, 3, 4]]


@HYPOTHESIS
@given(
    height=st.integers(3, 7), width=st.integers(3, 7), steps=st.integers(1, 12), seed=st.integers(0, 2**16),
    corner=st.tuples(st.integers(0, 2), st.integers(0, 2)), extent=st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_properties_perfect_random_reversed(height, width, steps, seed, corner, extent):
    region = _region(height, width, *corner, *extent)
    images = _images_for(region, 3)
    random_map = torch.rand(height, width, generator=torch.Generator().manual_seed(seed))
    saliency = torch.stack([region.float(), random_map, (~region).float()]).unsqueeze(1)
    result = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO, _zero_protocol(steps=steps))
    for area in (result.deletion, result.insertion):
        assert ((area >= -1e-6) & (area <= 1 + 1e-6)).all()
    perfect, random, reversed_ = result.insertion
    assert perfect >= random - 1e-6 and random >= reversed_ - 1e-6
    perfect, random, reversed_ = result.deletion
    assert perfect <= random + 1e-6 and random <= reversed_ + 1e-6
    expected = _expected_insertion_curve(int(region.sum()), height * width, steps, perfect=True)
    torch.testing.assert_close(result.insertion_curve[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.deletion_curve[0], 1 - expected, atol=1e-6, rtol=0)


# --- machinery --------------------------------------------------------------------------------------


class TinyConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_chunking_does_not_change_results_and_forward_count_is_exact():
    region = _region(8, 8, 2, 2, 3, 4)
    images, steps, batch = _images_for(region, 3), 7, 3
    saliency = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    results = {}
    for max_forward_batch in (1, 5, 1000):
        model = Counting(RegionFraction(region))
        protocol = _zero_protocol(steps=steps, max_forward_batch=max_forward_batch)
        results[max_forward_batch] = causal_curves(model, images, saliency, TARGETS_ZERO, protocol)
        total = 2 * (steps + 1) * batch
        assert model.images == total == results[max_forward_batch].forwards
        assert model.calls == math.ceil(total / max_forward_batch)
        assert model.largest == min(max_forward_batch, total)
    for other in (5, 1000):
        for field in ("deletion", "insertion", "deletion_curve", "insertion_curve"):
            assert torch.equal(getattr(results[1], field), getattr(results[other], field))


def test_chunking_invariance_with_a_conv_net_and_real_substrates():
    model = TinyConvNet().eval()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    saliency = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([1, 3])
    small = causal_curves(model, images, saliency, targets, CausalProtocol.rise(8, max_forward_batch=1))
    large = causal_curves(model, images, saliency, targets, CausalProtocol.rise(8, max_forward_batch=1000))
    torch.testing.assert_close(small.deletion_curve, large.deletion_curve, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(small.insertion_curve, large.insertion_curve, atol=1e-6, rtol=1e-5)
    # Curve end points: deletion starts at p_c(I), insertion ends at p_c(I).
    clean = torch.softmax(model(images), -1)[torch.arange(2), targets]
    torch.testing.assert_close(small.deletion_curve[:, 0], clean)
    torch.testing.assert_close(small.insertion_curve[:, -1], clean)


def test_works_inside_inference_mode_and_without_curves():
    region = _region(6, 6, 1, 1, 2, 2)
    images, saliency = _images_for(region, 1), region.float().view(1, 1, 6, 6)
    expected = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO[:1], _zero_protocol(steps=4))
    with torch.inference_mode():
        result = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO[:1], _zero_protocol(steps=4),
                               return_curves=False)
    assert result.deletion_curve is None and result.insertion_curve is None
    assert torch.equal(result.deletion, expected.deletion) and torch.equal(result.insertion, expected.insertion)


def test_grid_units_pool_the_saliency():
    region = _region(8, 8, 0, 0, 4, 4)  # 4 of the 16 cells of a 4 x 4 grid (2 x 2 pixel cells)
    images = _images_for(region, 2)
    saliency = region.float().clone()
    saliency[7, 7] = 3.0  # the top pixel, but its cell averages 0.75 < 1: the R cells still come first
    saliency = saliency.view(1, 1, 8, 8).expand(2, 1, 8, 8)
    grid = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO[:2],
                         _zero_protocol(units=4, steps=16, upsample="nearest"))
    # Same closed form as pixels, with U = 16 cells and |R| = 4 cells: (sum_{k=1..4} k/4 + 12 - 1/2) / 16.
    torch.testing.assert_close(grid.insertion, torch.full((2,), 0.875))
    torch.testing.assert_close(grid.deletion, torch.full((2,), 0.125))
    pixel = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO[:2], _zero_protocol(steps=16))
    assert pixel.insertion[0] < 0.875  # ranked by pixel, (7, 7) outside R comes first
    bilinear = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO[:2],
                             _zero_protocol(units=4, steps=16, upsample="bilinear"))
    assert ((bilinear.insertion > 0.5) & (bilinear.insertion <= 1)).all()
    torch.testing.assert_close(bilinear.insertion_curve[:, -1], torch.ones(2))


def test_tensor_substrate():
    region = _region(8, 8, 0, 0, 4, 4)
    images = _images_for(region, 1)
    saliency = region.float().view(1, 1, 8, 8)
    model = RegionFraction(region)
    as_zero = causal_curves(model, images, saliency, TARGETS_ZERO[:1],
                            _zero_protocol(steps=64, insertion_substrate=torch.zeros(3, 8, 8)))
    zero = causal_curves(model, images, saliency, TARGETS_ZERO[:1], _zero_protocol(steps=64))
    assert torch.equal(as_zero.insertion_curve, zero.insertion_curve)
    grey = causal_curves(model, images, saliency, TARGETS_ZERO[:1],
                         _zero_protocol(steps=64, insertion_substrate=torch.full((1, 3, 8, 8), 0.5)))
    revealed = _expected_insertion_curve(16, 64, 64, True)
    torch.testing.assert_close(grey.insertion_curve[0], revealed + 0.5 * (1 - revealed))


def test_input_validation():
    region = _region(4, 4, 0, 0, 2, 2)
    images, model = _images_for(region, 1), RegionFraction(region)
    with pytest.raises(ValueError, match="saliency"):
        causal_curves(model, images, torch.rand(1, 1, 2, 2), TARGETS_ZERO[:1], _zero_protocol(steps=2))
    with pytest.raises(ValueError, match="targets"):
        causal_curves(model, images, torch.rand(1, 1, 4, 4), TARGETS_ZERO[:2], _zero_protocol(steps=2))
    with pytest.raises(ValueError, match="NaN"):
        causal_curves(model, images, torch.full((1, 1, 4, 4), math.nan), TARGETS_ZERO[:1], _zero_protocol(steps=2))
    with pytest.raises(ValueError, match="grid size"):
        causal_curves(model, images, torch.rand(1, 1, 4, 4), TARGETS_ZERO[:1], _zero_protocol(units=8, steps=2))
    with pytest.raises(ValueError, match="tensor substrate"):
        causal_curves(model, images, torch.rand(1, 1, 4, 4), TARGETS_ZERO[:1],
                      _zero_protocol(steps=2, deletion_substrate=torch.zeros(3, 8, 8)))


# --- protocol ---------------------------------------------------------------------------------------


def test_presets_and_record():
    rise = CausalProtocol.rise(224)
    assert (rise.units, rise.steps, rise.deletion_substrate, rise.insertion_substrate) == ("pixel", 224, "mean", "blur")
    assert (rise.blur_kernel, rise.blur_sigma) == (11, 5.0)
    assert CausalProtocol() == rise
    small = CausalProtocol.rise(64)
    assert (small.steps, small.blur_kernel) == (64, 3)
    igos = CausalProtocol.igos(224)
    assert (igos.units, igos.steps, igos.blur_kernel, igos.blur_sigma) == (28, 50, 51, 50.0)
    assert igos.deletion_substrate == igos.insertion_substrate == "blur"
    assert (CausalProtocol.igos(64).units, CausalProtocol.igos(64).blur_kernel) == (8, 15)
    assert CausalProtocol.igos(16).units == 2
    assert CausalProtocol.igos(64, steps=20, upsample="nearest").steps == 20
    record = CausalProtocol.rise(64, insertion_substrate=torch.zeros(3, 64, 64), mean=[0.5, 0.5, 0.5]).to_dict()
    assert record["insertion_substrate"] == "tensor" and record["mean"] == [0.5, 0.5, 0.5]
    assert json.loads(json.dumps(record)) == record


@pytest.mark.parametrize("fields, message", [
    ({"units": "cell"}, "units"), ({"units": 0}, "units"), ({"units": True}, "units"),
    ({"steps": 0}, "steps"), ({"deletion_substrate": "random"}, "deletion_substrate"),
    ({"insertion_substrate": torch.full((3, 4, 4), 2.0)}, r"\[0, 1\]"), ({"blur_kernel": 4}, "blur_kernel"),
    ({"blur_sigma": 0.0}, "blur_sigma"), ({"upsample": "bicubic"}, "upsample"), ({"target": "top1"}, "target"),
    ({"max_forward_batch": 0}, "max_forward_batch"), ({"mean": (0.5, 0.5)}, "mean"),
])
def test_protocol_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        CausalProtocol(**fields)


def test_explained_class():
    model = TinyConvNet().eval()
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    predicted = explained_class(model, images, max_forward_batch=2)
    assert torch.equal(predicted, model(images).argmax(-1))
    labels = torch.tensor([0, 1, 2, 3, 4])
    assert torch.equal(explained_class(model, images, labels, rule="label"), labels)
    with pytest.raises(ValueError):
        explained_class(model, images, rule="label")


# --- M_F --------------------------------------------------------------------------------------------


def _mf_from_curve(curve):
    steps = curve.shape[1] - 1
    return curve[:, 1:].sum(1) / steps / (curve[:, -1] - curve[:, 0]) * 100


def test_mf_equals_eq9_on_the_blur_insertion_curve():
    region = _region(16, 16, 4, 6, 6, 5)
    images = torch.zeros(2, 3, 16, 16)
    images[:, :, region] = 1.0
    saliency = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))  # no ties
    model = Counting(RegionFraction(region))
    result = faithfulness_mf(model, images, saliency, TARGETS_ZERO[:2], steps=32, blur_kernel=5, blur_sigma=2.0,
                             max_forward_batch=7)
    assert model.images == 33 * 2  # (n + 1) B forwards
    protocol = _zero_protocol(steps=32, insertion_substrate="blur", blur_kernel=5, blur_sigma=2.0)
    curve = causal_curves(RegionFraction(region), images, saliency, TARGETS_ZERO[:2], protocol).insertion_curve
    assert result.valid.all()
    torch.testing.assert_close(result.mf, _mf_from_curve(curve))
    torch.testing.assert_close(result.q_original, torch.ones(2))
    torch.testing.assert_close(result.q_blurred, curve[:, 0])


def test_mf_orders_zero_saliency_by_the_smoothed_map():
    region = _region(16, 16, 10, 10, 6, 6)  # bottom right: row-major order reaches it last
    images = torch.zeros(1, 3, 16, 16)
    images[:, :, region] = 1.0
    sparse = torch.zeros(1, 1, 16, 16)
    sparse[0, 0, 13, 13] = 1.0  # one salient pixel inside R; every other pixel ties at 0
    result = faithfulness_mf(RegionFraction(region), images, sparse, TARGETS_ZERO[:1], blur_kernel=5, blur_sigma=2.0)
    protocol = _zero_protocol(steps=32, insertion_substrate="blur", blur_kernel=5, blur_sigma=2.0)
    row_major = causal_curves(RegionFraction(region), images, sparse, TARGETS_ZERO[:1], protocol).insertion_curve
    assert result.mf[0] > _mf_from_curve(row_major)[0] + 10  # the smoothed order reveals R's neighbours first


def test_mf_guard_marks_images_whose_blur_does_not_change_the_score():
    region = _region(8, 8, 2, 2, 3, 3)
    images = torch.zeros(2, 3, 8, 8)
    images[0, :, region] = 1.0  # blurring spreads R's brightness: q_F < q_O
    images[1] = 0.5  # a constant image is its own blur: q_O == q_F
    saliency = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    result = faithfulness_mf(RegionFraction(region), images, saliency, TARGETS_ZERO[:2], steps=4,
                             blur_kernel=5, blur_sigma=2.0)
    assert result.valid.tolist() == [True, False]
    assert torch.isfinite(result.mf[0]) and torch.isnan(result.mf[1])
    torch.testing.assert_close(result.q_original[1], result.q_blurred[1])


def test_mf_perfect_beats_reversed():
    region = _region(16, 16, 3, 3, 6, 6)
    images = torch.zeros(2, 3, 16, 16)
    images[:, :, region] = 1.0
    saliency = torch.stack([region, ~region]).float().unsqueeze(1)
    result = faithfulness_mf(RegionFraction(region), images, saliency, TARGETS_ZERO[:2], blur_kernel=5, blur_sigma=2.0)
    assert result.valid.all() and result.mf[0] > result.mf[1]


# --- min-max across methods -------------------------------------------------------------------------


def test_minmax_across_methods_by_hand():
    result = minmax_across_methods({
        "a": torch.tensor([10.0, 5.0, math.nan, 3.0]),
        "b": torch.tensor([20.0, 5.0, 1.0, 6.0]),
        "c": torch.tensor([15.0, 5.0, 2.0, 0.0]),
    })
    assert result.excluded == 2  # image 1: all equal; image 2: a NaN
    nan = math.nan
    torch.testing.assert_close(result.normalised["a"], torch.tensor([0.0, nan, nan, 0.5]), equal_nan=True)
    torch.testing.assert_close(result.normalised["b"], torch.tensor([1.0, nan, nan, 1.0]), equal_nan=True)
    torch.testing.assert_close(result.normalised["c"], torch.tensor([0.5, nan, nan, 0.0]), equal_nan=True)
    with pytest.raises(ValueError):
        minmax_across_methods({})
