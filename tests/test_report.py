"""metrics/report.py: the paired comparison of two methods, non-finite rows, strict JSON, Markdown cells."""
from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

from saliency_lab.metrics import EvaluationSettings
from saliency_lab.metrics.report import (PAIRED_KEYS, markdown_cell, paired_difference, percentile_interval, summarise,
                                          write_reports)


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


def _scored(index, method, **values):
    row = {"index": index, "method": method, "label": 0, "target": 0, "seconds": 0.5, "forwards": 1.0,
           "backwards": 1.0, "deletion": 0.2, "insertion": 0.6, "mf": 10.0, "mi": 50.0, "pointing_game": 1.0,
           "iou": 0.5, "f1": 0.5}
    return {**row, **values}


def _strict(text: str):
    """json.loads that refuses NaN / Infinity tokens (strict JSON, as browsers and jq read it)."""
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_non_finite_rows_are_excluded_named_and_results_json_is_strict(tmp_path):
    """A row whose deletion is NaN and one whose insertion is inf (a black box that returned NaN / inf) do
    not shadow the good rows of their method: left out of every mean, counted, named in a warning by method
    and image; results.json parses as strict JSON."""
    rows = [_scored(0, "a", deletion=0.1), _scored(1, "a", deletion=math.nan, mi=0.0),
            _scored(2, "a", deletion=0.3, insertion=math.inf, seconds=math.inf), _scored(3, "a", deletion=0.5),
            *(_scored(i, "b", mf=20.0) for i in range(4))]
    header = {"protocol": EvaluationSettings().resolve(32).to_dict(32), "blackbox": "timm:x",
              "data": {"name": "d", "split": "test"}}
    with pytest.warns(RuntimeWarning, match=r"counted as excluded 'non_finite': a: images \[1, 2\]"):
        results = write_reports(rows, ["a", "b"], header, tmp_path)
    saved = _strict((tmp_path / "results.json").read_text())
    a = saved["methods"]["a"]
    assert a["deletion"] == pytest.approx(0.3) and a["insertion"] == pytest.approx(0.6)  # rows 0 and 3
    assert a["mi"] == pytest.approx(50.0) and a["seconds_per_image"] == pytest.approx(0.5) and a["images"] == 4
    assert saved["excluded"]["non_finite"] == {"a": 2, "b": 0} and saved["non_finite_rows"] == {"a": [1, 2]}
    assert saved["methods"]["b"]["deletion"] == pytest.approx(0.2) and saved == results
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    with warnings.catch_warnings(record=True) as caught:  # the callback's aggregation: the same numbers
        warnings.simplefilter("always")
        summary, excluded = summarise(rows, ["a", "b"])
    assert summary["a"]["deletion"] == pytest.approx(0.3) and excluded["non_finite"] == {"a": 2, "b": 0}
    assert any("a: images [1, 2]" in str(w.message) for w in caught)


def test_percentile_interval_is_the_central_95_percent_of_the_draws():
    low, high = percentile_interval(torch.linspace(0, 1, 1001))
    assert low == pytest.approx(0.025) and high == pytest.approx(0.975)
    assert percentile_interval(torch.full((50,), 0.3)) == pytest.approx((0.3, 0.3))


def test_markdown_cells_escape_pipes_and_html():
    assert markdown_cell("a|b") == "a\\|b"
    assert markdown_cell("<b>bold</b> & co") == "&lt;b&gt;bold&lt;/b&gt; &amp; co"
    assert markdown_cell("two\nlines") == "two lines"
    class_name = "Class|<script>alert(1)</script>"
    cell = markdown_cell(class_name)
    assert "|" not in cell.replace("\\|", "") and "<" not in cell and ">" not in cell


def test_paired_difference_skips_a_metric_that_older_rows_do_not_have():
    """Rows written before a metric existed (e.g. ROAD) have no value for it: the comparison leaves that metric
    out instead of failing."""
    from saliency_lab.metrics.report import paired_difference

    rows = [{"index": i, "method": m, "deletion": 0.1 * i + (0.05 if m == "a" else 0.0)}
            for i in range(4) for m in ("a", "b")]
    out = paired_difference(rows, "a", "b", keys=("deletion", "road_morf"))
    assert set(out) == {"deletion"} and abs(out["deletion"]["mean"] - 0.05) < 1e-9


def _evaluation_folder(path, rows, split="test", blackbox_sha256="aa" * 32, deletion_steps=10):
    """A minimal evaluate.py --out folder: rows and the run.json fields that decide comparability."""
    from saliency_lab.metrics.rows import RowStore

    path.mkdir()
    record = {"data": {"name": "ClutteredFashionMNIST", "split": split, "init_args": {"num_test": 4}},
              "protocol": {"protocol": {"steps": deletion_steps, "max_forward_batch": 64}},
              "blackbox_sha256": blackbox_sha256}
    (path / "run.json").write_text(json.dumps(record))
    RowStore(path / "rows").append(rows)
    return path


@pytest.mark.parametrize("change, named", [
    ({"split": "val"}, "data.split: 'test' -> 'val'"),
    ({"deletion_steps": 20}, "protocol.protocol.steps: 10 -> 20"),
    ({"blackbox_sha256": "bb" * 32}, "blackbox_sha256: "),
])
def test_report_against_a_folder_of_other_data_protocol_or_black_box_is_refused_unless_forced(
        tmp_path, capsys, change, named):
    from saliency_lab.cli import report

    mine = _evaluation_folder(tmp_path / "mine", [_scored(i, "a", deletion=0.1 * i) for i in range(4)])
    other = _evaluation_folder(tmp_path / "other", [_scored(i, "a", deletion=0.1 * i + 0.05) for i in range(4)],
                               **change)
    with pytest.raises(ValueError, match=r"--against .*cannot be paired.*--force true") as refused:
        report.main([str(mine), "--compare", "a", "a", "--against", str(other), "--resamples", "50"])
    assert named in str(refused.value)
    table = report.main([str(mine), "--compare", "a", "a", "--against", str(other), "--resamples", "50",
                         "--force", "true"])
    assert table["deletion"]["mean"] == pytest.approx(-0.05) and table["deletion"]["images"] == 4
    assert "compared anyway (--force true)" in capsys.readouterr().out


def test_report_against_a_comparable_folder_runs_and_a_folder_without_records_is_refused(tmp_path):
    from saliency_lab.cli import report

    mine = _evaluation_folder(tmp_path / "mine", [_scored(i, "a", deletion=0.2) for i in range(4)])
    same = _evaluation_folder(tmp_path / "same", [_scored(i, "a", deletion=0.1) for i in range(4)])
    # only the memory knob differs: comparable
    record = json.loads((same / "run.json").read_text())
    record["protocol"]["protocol"]["max_forward_batch"] = 8
    (same / "run.json").write_text(json.dumps(record))
    table = report.main([str(mine), "--compare", "a", "a", "--against", str(same), "--resamples", "50"])
    assert table["deletion"]["mean"] == pytest.approx(0.1)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match=r"bare has no run.json or results.json"):
        report.main([str(mine), "--compare", "a", "a", "--against", str(bare)])


def test_report_compares_the_metrics_named_by_keys_and_prints_pixel_level_ones_per_mille(tmp_path, capsys):
    from saliency_lab.cli import report

    rows = [_scored(i, m, iou_pixel=1e-3 * (i + (m == "a"))) for i in range(4) for m in ("a", "b")]
    mine = _evaluation_folder(tmp_path / "mine", rows)
    table = report.main([str(mine), "--compare", "a", "b", "--keys", "iou_pixel", "--resamples", "50"])
    assert set(table) == {"iou_pixel"} and table["iou_pixel"]["mean"] == pytest.approx(1e-3)
    assert re.search(r"iou_pixel x1e3 +\+1\.000 +\[ +\+1\.000", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        report.main([str(mine), "--compare", "a", "b", "--keys", "iou_pixels"])
    assert "--keys: unknown metric(s) ['iou_pixels']" in capsys.readouterr().err
