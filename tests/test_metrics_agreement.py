"""metrics/agreement.py: Kendall's W against its textbook values, orientation of lower-is-better metrics, and the
agreement of evaluation rows."""
from __future__ import annotations

import math

import numpy as np
import pytest

from saliency_lab.metrics.agreement import agreement_markdown, kendalls_w, metric_agreement


def test_kendalls_w_extremes_and_a_worked_example():
    assert kendalls_w(np.array([[1, 2, 3, 4], [1, 2, 3, 4], [10, 20, 30, 40]])) == pytest.approx(1.0)
    assert kendalls_w(np.array([[1, 2, 3, 4], [4, 3, 2, 1]])) == pytest.approx(0.0)
    # 3 raters, 4 items, ranks without ties: rank sums 4, 8, 9, 9 around 7.5 -> S = 17, W = 12 * 17 / (9 * 60)
    ranks = np.array([[1, 2, 3, 4], [1, 3, 2, 4], [2, 3, 4, 1]])
    assert kendalls_w(ranks) == pytest.approx(12 * 17 / (9 * 60))
    assert math.isnan(kendalls_w(np.array([[1, 2, 3]])))  # one rater: nothing to agree on


def test_kendalls_w_tie_correction():
    """Two raters with a tie each: T = 2 * (2^3 - 2) = 12, W = 12 S / (m^2 (n^3 - n) - m T)."""
    scores = np.array([[1, 1, 2], [1, 2, 2]])  # ranks (1.5, 1.5, 3) and (1, 2.5, 2.5): sums 2.5, 4, 5.5
    spread = (2.5 - 4) ** 2 + 0 + (5.5 - 4) ** 2
    assert kendalls_w(scores) == pytest.approx(12 * spread / (4 * 24 - 2 * 12))


def rows_for(values: dict[str, dict[str, list[float]]]) -> list[dict]:
    """metric -> method -> per-image values, as evaluation rows."""
    methods = next(iter(values.values())).keys()
    count = len(next(iter(next(iter(values.values())).values())))
    return [{"index": i, "method": m, **{metric: values[metric][m][i] for metric in values}}
            for i in range(count) for m in methods]


def test_lower_is_better_metrics_are_turned_around():
    """A method with low deletion and high insertion is best on both: the metrics agree (W = 1)."""
    rows = rows_for({"deletion": {"a": [0.1, 0.2], "b": [0.5, 0.6], "c": [0.9, 0.8]},
                     "insertion": {"a": [0.9, 0.8], "b": [0.5, 0.6], "c": [0.1, 0.2]}})
    result = metric_agreement(rows, ["a", "b", "c"], ["deletion", "insertion"])
    assert result["w_per_image"] == pytest.approx(1.0) and result["w_of_means"] == pytest.approx(1.0)
    assert result["spearman"]["deletion"]["insertion"] == pytest.approx(1.0)
    assert result["means"]["deletion"]["a"] == pytest.approx(0.15)  # reported as measured, not negated


def test_a_gamed_metric_shows_as_disagreement_and_undefined_values_are_skipped():
    """'game' tops deletion only; an image where a metric is NaN for one method leaves that metric out there."""
    rows = rows_for({"deletion": {"game": [0.05, 0.05, 0.05], "rise": [0.2, 0.2, 0.2], "grad": [0.3, 0.3, 0.3]},
                     "insertion": {"game": [0.2, 0.2, 0.2], "rise": [0.9, 0.9, 0.9], "grad": [0.5, 0.5, 0.5]},
                     "mf": {"game": [10.0, 10.0, math.nan], "rise": [80.0, 80.0, 80.0], "grad": [40.0, 40.0, 40.0]}})
    result = metric_agreement(rows, ["game", "rise", "grad"], ["deletion", "insertion", "mf"])
    assert result["spearman"]["insertion"]["mf"] == pytest.approx(1.0)
    assert result["spearman"]["deletion"]["insertion"] == pytest.approx(-0.5)
    assert result["images"] == 3 and result["w_per_image_images"] == 3
    assert 0 < result["w_per_image"] < 1
    text = agreement_markdown(result)
    assert "| deletion | +1.00 | -0.50 | -0.50 |" in text
