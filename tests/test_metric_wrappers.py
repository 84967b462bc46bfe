"""Tests for metrics/accumulators.py: values by hand, and two simulated ranks reduce to one process.

DDP reduction of states added with dist_reduce_fx="sum" is a sum over ranks; ``merge_state`` applies
exactly those reduction functions, so merging two instances simulates two ranks without processes.
"""

import math

import pytest
import torch

from saliency_lab.metrics import CausalMetric, CausalResult, FaithfulnessMetric, IoUF1Metric, PointingGameMetric, PRAUCMetric

NAN = math.nan


def _assert_same(left: dict, right: dict):
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], equal_nan=True, check_dtype=False)


def _two_ranks_equal_one(make, batches):
    """Rank 0 gets even batches, rank 1 odd ones; merged states must compute what one process does."""
    single, rank0, rank1 = make(), make(), make()
    for i, batch in enumerate(batches):
        single.update(*batch)
        (rank0 if i % 2 == 0 else rank1).update(*batch)
    rank0.merge_state(rank1)
    _assert_same(rank0.compute(), single.compute())
    return single.compute()


def test_causal_metric_means_and_curves():
    deletion_curve = torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 0.0], [0.8, 0.4, 0.2]])
    insertion_curve = 1 - deletion_curve
    batches = [
        (torch.tensor([0.1, 0.3]), torch.tensor([0.9, 0.5]), deletion_curve[:2], insertion_curve[:2]),
        (torch.tensor([0.2]), torch.tensor([0.4]), deletion_curve[2:], insertion_curve[2:]),
    ]
    result = _two_ranks_equal_one(lambda: CausalMetric(steps=2), batches)
    assert result["deletion"].item() == pytest.approx(0.2)
    assert result["insertion"].item() == pytest.approx(0.6)
    assert result["count"].item() == 3 and result["excluded"].item() == 0
    torch.testing.assert_close(result["deletion_curve"], deletion_curve.mean(0))
    torch.testing.assert_close(result["insertion_curve"], insertion_curve.mean(0))
    from_result = CausalMetric(steps=2)
    from_result.update(*CausalResult(batches[0][0], batches[0][1], deletion_curve[:2], insertion_curve[:2],
                                     torch.linspace(0, 1, 3), 12)[:4])
    torch.testing.assert_close(from_result.compute()["deletion_curve"], deletion_curve[:2].mean(0))
    without_curves = CausalMetric()
    without_curves.update(torch.tensor([0.1, 0.3]), torch.tensor([0.9, 0.5]))
    assert set(without_curves.compute()) == {"deletion", "insertion", "count", "excluded"}
    with pytest.raises(ValueError, match="needs the curves"):
        CausalMetric(steps=2).update(torch.tensor([0.1]), torch.tensor([0.2]))


def test_faithfulness_metric_excludes_invalid_images():
    batches = [
        (torch.tensor([80.0, NAN, 120.0]), torch.tensor([True, False, True])),
        (torch.tensor([50.0, 70.0]), torch.tensor([True, False])),  # 70 flagged invalid: excluded
    ]
    result = _two_ranks_equal_one(FaithfulnessMetric, batches)
    assert result["mf"].item() == pytest.approx((80 + 120 + 50) / 3)
    assert result["count"].item() == 3 and result["excluded"].item() == 2
    normalised = FaithfulnessMetric()
    normalised.update(torch.tensor([0.0, 1.0, NAN]))  # min-max output: NaN marks excluded images
    assert normalised.compute()["mf"].item() == pytest.approx(0.5)


def test_pr_auc_metric():
    batches = [(torch.tensor([50.0, NAN]),), (torch.tensor([100.0, 30.0]),), (torch.tensor([20.0]),)]
    result = _two_ranks_equal_one(PRAUCMetric, batches)
    assert result["pr_auc"].item() == pytest.approx(50.0)
    assert result["count"].item() == 4 and result["excluded"].item() == 1


def test_iou_f1_metric():
    batches = [
        (torch.tensor([0.5, NAN]), torch.tensor([0.6, NAN])),
        (torch.tensor([0.25]), torch.tensor([0.4])),
    ]
    result = _two_ranks_equal_one(IoUF1Metric, batches)
    assert result["iou"].item() == pytest.approx(0.375) and result["f1"].item() == pytest.approx(0.5)
    assert result["count"].item() == 2 and result["excluded"].item() == 1


def test_pointing_game_metric_class_mean_and_hit_rate():
    # Class 0: 2 hits, 1 miss; class 1: 1 miss; class 2: not evaluated; class 3: 1 hit.
    batches = [
        (torch.tensor([True, False]), torch.tensor([0, 1])),
        (torch.tensor([True, False]), torch.tensor([0, 0])),
        (torch.tensor([True]), torch.tensor([3])),
    ]
    result = _two_ranks_equal_one(lambda: PointingGameMetric(num_classes=4), batches)
    assert result["accuracy"].item() == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert result["hit_rate"].item() == pytest.approx(3 / 5)
    assert result["classes_evaluated"].item() == 3 and result["count"].item() == 5
    with pytest.raises(ValueError, match="targets must lie"):
        PointingGameMetric(num_classes=2).update(torch.tensor([True]), torch.tensor([2]))


def test_states_are_sum_reduced():
    # What DDP will do: every state is summed over ranks.
    for metric in (CausalMetric(steps=3), FaithfulnessMetric(), PRAUCMetric(), IoUF1Metric(), PointingGameMetric(3)):
        assert metric._reductions and all(fx is not None and fx.__name__ == "dim_zero_sum"
                                          for fx in metric._reductions.values())


def test_reset():
    metric = PointingGameMetric(num_classes=2)
    metric.update(torch.tensor([True]), torch.tensor([1]))
    metric.reset()
    assert metric.hits.sum() == 0 and metric.misses.sum() == 0
