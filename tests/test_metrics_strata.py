"""metrics/strata.py and ``saliency-lab report OUT --strata``: confidence quartiles from the clean-image probability,
correct vs misclassified images, means per stratum."""
from __future__ import annotations

import json

import pytest

from saliency_lab.metrics.strata import image_strata, strata_markdown, stratified_means


def rows(count: int = 8) -> list[dict]:
    """Image i: p(class | clean) = (i + 1) / 10, label == target for even i; method 'a' deletion = i, 'b' = 10 i."""
    out = []
    for i in range(count):
        for method, scale in (("a", 1.0), ("b", 10.0)):
            out.append({"index": i, "method": method, "label": 3, "target": 3 if i % 2 == 0 else 5,
                        "deletion": scale * i, "mi": float("nan") if i == 0 else 1.0,
                        "deletion_curve": [(i + 1) / 10, 0.0]})
    return out


def test_quartiles_follow_the_clean_image_probability_and_correctness_the_labels():
    strata = image_strata(rows())
    assert strata["confidence Q1"] == {0, 1} and strata["confidence Q4"] == {6, 7}
    assert set().union(*(strata[f"confidence Q{q}"] for q in range(1, 5))) == set(range(8))
    assert strata["correct"] == {0, 2, 4, 6} and strata["misclassified"] == {1, 3, 5, 7}


def test_means_per_stratum_skip_undefined_values():
    result = stratified_means(rows(), ["a", "b"], ["deletion", "mi"])
    q1 = result["strata"]["confidence Q1"]
    assert q1["images"] == 2 and q1["confidence"] == pytest.approx([0.1, 0.2])
    assert q1["methods"]["a"]["deletion"] == pytest.approx(0.5) and q1["methods"]["b"]["deletion"] == pytest.approx(5)
    assert q1["methods"]["a"]["mi"] == 1.0  # image 0's NaN left out
    assert result["strata"]["misclassified"]["methods"]["a"]["deletion"] == pytest.approx(4.0)
    assert "### confidence Q1 (2 images, p(class) 0.100–0.200)" in strata_markdown(result)


@pytest.mark.slow
def test_report_strata_of_an_evaluation_folder(tiny_blackbox_path, tmp_path):
    from saliency_lab.cli import evaluate, report
    from tests.test_evaluate import args_for

    evaluate.main(args_for(f"ckpt:{tiny_blackbox_path}", tmp_path, "--num_images=8"))
    result = report.main([str(tmp_path), "--strata"])
    assert sum(result["strata"][f"confidence Q{q}"]["images"] for q in range(1, 5)) == 8
    assert set(result["strata"]["correct"]["methods"]) == {"gradient", "rise"}
    saved = json.loads((tmp_path / "strata.json").read_text())
    assert saved["strata"]["confidence Q1"]["images"] == result["strata"]["confidence Q1"]["images"]
    assert (tmp_path / "strata.md").read_text().startswith("### confidence Q1")
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])  # neither --compare nor --strata
