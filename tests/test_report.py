"""metrics/report.py: the paired comparison of two methods."""
from __future__ import annotations

import math

import pytest

from saliency_lab.metrics.report import PAIRED_KEYS, paired_difference


def _rows(method, values, nan_at=None):
    rows = []
    for i, v in enumerate(values):
        row = {key: v for key in PAIRED_KEYS}
        if i == nan_at:
            row["mf"] = math.nan
        rows.append({"index": i, "method": method, **row})
    return rows


def test_paired_difference_mean_interval_and_pairing():
    a = _rows("a", [0.5, 0.6, 0.7, 0.8], nan_at=1)
    b = _rows("b", [0.4, 0.4, 0.7, 0.6, 9.9])  # image 4 has no row of "a": not paired
    table = paired_difference(a + b, "a", "b", resamples=500, seed=1)
    assert table["iou"]["images"] == 4 and table["mf"]["images"] == 3  # the NaN image is left out of mf
    assert table["iou"]["mean"] == pytest.approx((0.1 + 0.2 + 0.0 + 0.2) / 4)
    assert 0.0 <= table["iou"]["low"] <= table["iou"]["mean"] <= table["iou"]["high"] <= 0.2 + 1e-9
    assert table == paired_difference(a + b, "a", "b", resamples=500, seed=1)  # seeded
    same = paired_difference(a + _rows("c", [0.5, 0.6, 0.7, 0.8]), "a", "c")
    assert same["deletion"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "images": 4}
    with pytest.raises(ValueError, match="no image was scored for both"):
        paired_difference(a, "a", "zzz")
