"""experiments/igos_ablation.py: the plan of the three studies (shared settings, the default grid reused), the
interval notes on hand-built intervals, and a smoke run (2 images, tiny iterations) with its tables, the
provenance header docs/results needs, and resumption."""
from __future__ import annotations

import pytest
import yaml

from experiments import igos_ablation
from experiments.igos_ablation import REFERENCE, default_grid, interval_note, plan, unique_settings


def test_plan_shares_settings_and_reuses_the_default_grid():
    studies = plan(("resolution", "table3", "table5"), (4, 8, 16, 32, 64), 64, {"iterations": 5, "ig_steps": 10})
    assert default_grid(64) == 8 and default_grid(224) == 28 and default_grid(32) == 4
    resolution = {(row.what, row.grid): row.setting for row in studies["resolution"]}
    assert len(resolution) == 15
    # the default grid of iGOS++ and I-GOS is their default setting itself, the one Tables 3 and 5 use
    assert resolution[("igos_pp", 8)].label == REFERENCE and resolution[("igos", 8)].label == "igos"
    assert resolution[("igos_pp", 8)].spec == {"name": "igos_pp", "alias": "igos_pp", "iterations": 5, "ig_steps": 10}
    assert resolution[("igos_pp", 64)].spec == {"name": "igos_pp", "alias": "igos_pp-r64", "iterations": 5,
                                                "ig_steps": 10, "resolution": 64, "scale_with_image": False}
    assert resolution[("igos_pp_plain", 8)].spec == {"name": "igos_pp", "alias": "igos_pp_plain-r8", "iterations": 5,
                                                     "ig_steps": 10, "smoothness": "plain"}
    table3 = [row.setting.spec["name"] for row in studies["table3"]]
    assert table3 == ["igos_pp", "igos_pp_insertion", "igos_naive_insertion", "igos"]
    assert [row.setting.spec.get("mask") for row in studies["table5"]] == ["x", "y", None]
    settings = unique_settings(studies)
    assert settings[0].label == REFERENCE and settings[0].default
    # 15 resolution settings + insertion-only + naive + Mx + My; iGOS++ and I-GOS are shared
    assert len(settings) == 19 and len({s.label for s in settings}) == 19


def test_interval_note_names_better_and_worse_criteria():
    zero = {"mean": 0.0, "low": -0.01, "high": 0.01, "images": 5}
    intervals = {"rise/deletion": {"mean": -0.05, "low": -0.08, "high": -0.02, "images": 5},   # better
                 "igos/insertion": {"mean": -0.04, "low": -0.06, "high": -0.01, "images": 5},  # worse
                 "igos/deletion": zero}
    note = interval_note(intervals)
    assert note.startswith("better: rise/deletion -0.050 [-0.080, -0.020]")
    assert "worse: igos/insertion -0.040 [-0.060, -0.010]" in note and "igos/deletion" not in note
    assert interval_note({"rise/deletion": zero}) == "no interval excludes 0"
    rounding = {"mean": -1e-5, "low": -2e-5, "high": -1e-6, "images": 5}  # off zero, but it prints as -0.000
    assert interval_note({"igos/insertion": rounding}) == "no interval excludes 0"
    assert interval_note({}) == "–"


@pytest.fixture(scope="module")
def tiny_config(tiny_blackbox_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("igos_ablation_cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "blackbox": {"class_path": "saliency_lab.core.blackbox.BlackBox",
                     "init_args": {"model": f"ckpt:{tiny_blackbox_path}"}},
        "data": {"class_path": "saliency_lab.datamodules.ClutteredFashionMNISTDataModule",
                 "init_args": {"image_size": 32, "num_test": 64, "num_val": 64, "num_workers": 0, "cache": False}},
        "split": "test", "target": "predicted", "batch_size": 2, "settings": {"mf_steps": 4}}))
    return path


@pytest.mark.slow
def test_smoke_run_writes_every_table_and_resumes(tiny_config, tmp_path, monkeypatch):
    argv = ["--config", str(tiny_config), "--num_images", "2", "--iterations", "1", "--ig_steps", "2",
            "--grids", "4,8", "--image_size", "32", "--resamples", "100", "--out", str(tmp_path),
            "--evaluate_args", "--settings.road_fractions=[]"]
    result = igos_ablation.main(argv)
    labels = {"igos_pp", "igos_pp-r8", "igos", "igos-r8", "igos_pp_plain-r4", "igos_pp_plain-r8",
              "igos_pp_insertion", "igos_naive_insertion", "igos_pp_mx", "igos_pp_my"}
    assert set(result) == labels
    for label, entry in result.items():
        assert entry["summary"]["images"] == 2 and all(len(rows) == 2 for rows in entry["rows"].values())
        if label != REFERENCE:  # every criterion of both presets paired with the reference (raw areas at least)
            assert {f"{p}/{k}" for p in ("rise", "igos") for k in ("deletion", "insertion")} <= set(entry["intervals"])
    # Table 5's three maps come from one optimisation: the same passes; the one-mask variants cost less per image
    passes = {label: entry["summary"]["passes"] for label, entry in result.items()}
    assert passes["igos_pp_mx"] == passes["igos_pp_my"] == passes[REFERENCE]
    assert passes["igos_pp_insertion"] < passes["igos_naive_insertion"] < passes[REFERENCE]
    # the maps differ: Mx, My and Mx * My are three maps
    rows = {label: result[label]["rows"]["rise"] for label in ("igos_pp_mx", "igos_pp_my", REFERENCE)}
    assert len({tuple(round(r["deletion"], 6) for r in v) for v in rows.values()}) > 1

    text = (tmp_path / "igos_ablation.md").read_text()
    for title in igos_ablation.TITLES.values():
        assert f"## {title}" in text
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")]
    assert len(starts) == 4  # resolution, its BTV - plain table, Table 3, Table 5
    for start in starts:  # the header tests/test_docs.py asks of docs/results (date, commit, machine, command)
        header = "\n".join(lines[max(0, start - 15):start])
        assert "Measured 20" in header and "commit `" in header and "machine:" in header and "Command:" in header
    assert "| 4 × 4 | igos_pp | `igos_pp` |" in text and "`igos_pp_plain-r8`" in text
    assert (tmp_path / "igos_ablation.json").is_file()

    # a rerun explains nothing again: every finished row is reused
    from saliency_lab.explainers import igos

    def refuse(*args, **kwargs):
        raise AssertionError("a finished variant was explained again")

    monkeypatch.setattr(igos._IntegratedGradientOptimizedSaliency, "_explain", refuse)
    again = igos_ablation.main(argv)
    assert {k: v["summary"] for k, v in again.items()} == {k: v["summary"] for k, v in result.items()}


def test_bad_arguments_are_refused(tiny_config, tmp_path):
    for bad in (["--studies", "table4"], ["--grids", "4,128"], ["--num_images", "0"],
                ["--config", str(tmp_path / "missing.yaml")]):
        with pytest.raises(SystemExit):
            igos_ablation.parse_args(["--config", str(tiny_config), *bad])
