"""experiments/frontier.py: the equal-quality rule and the cheapest-budget choice on hand-built cases, and a tiny
end-to-end sweep (2 images, tiny budgets) with its table, figure and resumption."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from experiments import frontier
from experiments.frontier import cheapest_equal, equal_quality, paired_against_default


def interval(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "images": 10}


def test_equal_quality_rule():
    criteria = ("rise/deletion", "rise/insertion", "igos/deletion_norm", "igos/insertion_norm")
    # every interval includes zero
    same = {c: interval(0.0, -0.01, 0.01) for c in criteria}
    assert equal_quality(same, criteria) is True
    # better: deletion lower (interval below zero), insertion higher (above zero)
    better = {**same, "rise/deletion": interval(-0.05, -0.08, -0.02), "rise/insertion": interval(0.04, 0.01, 0.07)}
    assert equal_quality(better, criteria) is True
    # worse deletion (interval above zero), everything else equal
    assert equal_quality({**same, "rise/deletion": interval(0.03, 0.01, 0.05)}, criteria) is False
    # worse normalised insertion under the other preset (interval below zero)
    assert equal_quality({**same, "igos/insertion_norm": interval(-0.03, -0.05, -0.001)}, criteria) is False
    # a criterion without an interval (no common images) is not tested; none at all -> None
    assert equal_quality({"rise/deletion": interval(0, -1, 1)}, criteria) is True
    assert equal_quality({}, criteria) is None


def test_cheapest_equal_picks_fewest_passes_among_matching():
    candidates = [
        {"label": "n250", "passes": 250, "seconds": 0.1, "equal": False},   # cheapest, but worse
        {"label": "n1000", "passes": 1000, "seconds": 0.4, "equal": True},
        {"label": "n500", "passes": 500, "seconds": 0.2, "equal": None},    # not tested: never chosen
        {"label": "n2000", "passes": 2000, "seconds": 0.8, "equal": True},
        {"label": "default", "passes": 8000, "seconds": 3.0, "equal": True},
    ]
    assert cheapest_equal(candidates)["label"] == "n1000"
    # ties in passes go to the fewer seconds
    tie = candidates + [{"label": "n1000-fast", "passes": 1000, "seconds": 0.3, "equal": True}]
    assert cheapest_equal(tie)["label"] == "n1000-fast"
    # only the default matches -> the default
    assert cheapest_equal([{**c, "equal": c["label"] == "default"} for c in candidates])["label"] == "default"
    assert cheapest_equal([{**c, "equal": False} for c in candidates]) is None


def rows(values: dict[str, list[float]]) -> list[dict]:
    count = len(next(iter(values.values())))
    return [{"index": i, "method": "m", **{k: v[i] for k, v in values.items()}} for i in range(count)]


def test_paired_against_default_on_hand_built_rows():
    base = {"deletion": [0.1, 0.2, 0.3, 0.15, 0.25, 0.12], "insertion": [0.8, 0.7, 0.9, 0.85, 0.75, 0.82],
            "deletion_norm": [0.1] * 6, "insertion_norm": [0.9] * 6}
    default = {"rise": rows(base)}
    # a budget equal to the default on every image: all intervals are [0, 0]
    same = paired_against_default({"rise": rows(base)}, default, resamples=200)
    assert set(same) == {f"rise/{k}" for k in frontier.QUALITY_KEYS}
    assert all(s["low"] == s["high"] == 0 for s in same.values())
    assert equal_quality(same, tuple(same)) is True
    # a budget whose deletion is 0.05 worse on every image: deletion fails, the rest pass
    worse = paired_against_default({"rise": rows({**base, "deletion": [v + 0.05 for v in base["deletion"]]})},
                                   default, resamples=200)
    assert math.isclose(worse["rise/deletion"]["mean"], 0.05) and worse["rise/deletion"]["low"] > 0
    assert equal_quality(worse, tuple(worse)) is False
    assert equal_quality(worse, ("rise/insertion",)) is True


@pytest.fixture(scope="module")
def tiny_config(tiny_blackbox_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("frontier_cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "blackbox": {"class_path": "saliency_lab.core.blackbox.BlackBox", "init_args": {"model": f"ckpt:{tiny_blackbox_path}"}},
        "data": {"class_path": "saliency_lab.datamodules.ClutteredFashionMNISTDataModule",
                 "init_args": {"image_size": 32, "num_test": 64, "num_workers": 0, "cache": False}},
        "split": "test", "target": "predicted", "batch_size": 2, "settings": {"mf_steps": 4}}))
    return path


def test_tiny_sweep_table_figure_and_resume(tiny_config, tmp_path, monkeypatch):
    sweep = {"rise": {"default": {"n_masks": 12}, "budgets": [{"n_masks": 3}, {"n_masks": 6}]}}
    argv = ["--config", str(tiny_config), "--num_images", "2", "--methods", "rise,gradient", "--out", str(tmp_path),
            "--sweep", json.dumps(sweep), "--resamples", "100"]
    result = frontier.main(argv)

    assert list(result) == ["rise", "gradient"]
    rise = sorted(result["rise"]["settings"], key=lambda r: r["passes"])
    assert [r["passes"] for r in rise] == [3, 6, 12]  # RISE: N forwards, no backward
    assert [r["setting"].default for r in rise] == [False, False, True]
    assert all(r["images"] == 2 for r in rise)
    assert result["gradient"]["settings"][0]["passes"] == 2  # one forward + one backward
    for row in rise[:2]:  # budgets were compared with the default under both presets (the raw areas always
        # exist; a normalised one is missing only where every image's curve is flat)
        assert {f"{p}/{k}" for p in frontier.PRESETS for k in ("deletion", "insertion")} <= set(row["intervals"])
        assert row["equal"] == equal_quality(row["intervals"], tuple(row["intervals"]))
    recommended = result["rise"]["recommended"]
    assert recommended is not None and recommended["equal"]
    assert all(not r["equal"] for r in rise if r["passes"] < recommended["passes"])

    # both presets scored the same maps: the igos folder's rows carry the rise folder's cost, CPU seconds too
    for r in rise:
        for key in ("forwards", "seconds", "cpu_seconds"):
            assert [x[key] for x in r["rows"]["igos"]] == [x[key] for x in r["rows"]["rise"]]
        assert len(r["rows"]["igos"]) == 2
        assert r["seconds"] > 0 and r["wall_seconds"] > 0  # CPU and wall seconds per image
    table = (tmp_path / "frontier.md").read_text()
    body = [line for line in table.splitlines() if line.startswith("| rise |") or line.startswith("| gradient |")]
    assert len(body) == 3 + 1 + 1  # three RISE settings, gradient, one recommendation row for RISE
    assert "n_masks 12 (default)" in table
    assert (tmp_path / "frontier.png").stat().st_size > 10_000

    # a rerun resumes from the rows: nothing is explained again
    from saliency_lab import explainers

    def refuse(*args, **kwargs):
        raise AssertionError("a finished setting was explained again")

    monkeypatch.setattr(explainers.rise.RISE, "_explain", refuse)
    monkeypatch.setattr(explainers.gradients.Gradient, "_explain", refuse)
    again = frontier.main(argv)
    assert [r["passes"] for r in sorted(again["rise"]["settings"], key=lambda r: r["passes"])] == [3, 6, 12]
    assert (tmp_path / "frontier.md").read_text() == table

    # a report at a smaller scale reads only the first images' rows (as evaluate.py does)
    smaller = frontier.main([*argv[:3], "1", *argv[4:], "--report_only", "--table", str(tmp_path / "one.md")])
    assert all(r["images"] == 1 for entry in smaller.values() for r in entry["settings"])


def test_bad_arguments_are_refused(tiny_config, tmp_path):
    with pytest.raises(SystemExit):
        frontier.parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        frontier.parse_args(["--config", str(tiny_config), "--presets", "rise,nope"])
    with pytest.raises(SystemExit):
        frontier.parse_args(["--config", str(tiny_config), "--ckpt_path", "predictor_ct=/no/such.ckpt"])


def test_a_swept_setting_that_is_not_a_budget_is_named_in_label_and_table():
    sweep = {"igos_pp": {"default": {}, "budgets": [{"l2": 2.5}, {"iterations": 5, "ig_steps": 5}]}}
    settings = frontier.plan(["igos_pp"], sweep, {})
    labels = [s.label for s in settings]
    assert labels == ["igos_pp-l2=2.5", "igos_pp-iterations=5-ig_steps=5", "igos_pp-default"]
    recorded = {"iterations": 15, "ig_steps": 20, "l2": 2.5}
    assert frontier.budget_text(settings[0], recorded) == "iterations 15, ig_steps 20, l2 2.5"
    assert frontier.budget_text(settings[1], {"iterations": 5, "ig_steps": 5}) == "iterations 5, ig_steps 5"
