"""experiments/iassa_iterations.py: one explanation for every k, scored through evaluate.py exactly as a fresh
k-iteration run, resumable, with paired intervals against the default k."""
import contextlib
import io
import json

import pytest
import torch

from experiments import frontier
from experiments import iassa_iterations as study
from saliency_lab.metrics import RowStore

TINY = ["--num_images", "2", "--iterations", "1,3", "--default", "2", "--stride", "32", "--window", "90",
        "--batch_size", "2", "--resamples", "200", "--threads", "1"]


def test_plan_and_dry_run(capsys):
    settings = study.plan((1, 2, 25), 5, {"stride": 16.0})
    assert [s.label for s in settings] == ["iassa-k5", "iassa-k1", "iassa-k2", "iassa-k25"]
    assert settings[0].default and not any(s.default for s in settings[1:])
    assert settings[3].spec == {"name": "iassa", "alias": "iassa-k25", "stride": 16.0, "iterations": 25}
    study.main(["--dry_run", "--iterations", "1,25"])
    out = capsys.readouterr().out
    assert out.count("python evaluate.py") == 3 and "road_fractions=[]" in out and "--split=test" in out
    with pytest.raises(SystemExit):
        study.parse_args(["--hparams", '{"iterations": 3}'])


def test_snapshots_score_as_fresh_runs_and_the_study_resumes(tmp_path):
    out = tmp_path / "study"
    result = study.main([*TINY, "--out", str(out)])
    assert sorted(e["k"] for e in result.values()) == [1, 2, 3]
    # every k's rows came from the snapshot (its cost), and match a fresh evaluate.py run of the same spec
    fresh = tmp_path / "fresh"
    setting = next(s for s in study.plan((1, 3), 2, {"stride": 32.0, "window": 90.0}) if s.label == "iassa-k3")
    args = study.parse_args([*TINY, "--out", str(fresh)])
    from saliency_lab.cli import evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        evaluate.main(frontier.evaluate_argv(setting, "rise", fresh, args))
    folder = "settings/iassa-k3/rise"
    keys = json.loads((out / folder / "run.json").read_text())["row_keys"]
    assert keys == json.loads((fresh / folder / "run.json").read_text())["row_keys"]
    mine = {r["index"]: r for r in RowStore(out / folder / "rows").scan(keys).of("iassa-k3")}
    theirs = {r["index"]: r for r in RowStore(fresh / folder / "rows").scan(keys).of("iassa-k3")}
    assert sorted(mine) == sorted(theirs) == [0, 1]
    for i in (0, 1):
        assert torch.equal(torch.load(out / folder / "maps/iassa-k3" / f"{i}.pt"),
                           torch.load(fresh / folder / "maps/iassa-k3" / f"{i}.pt"))  # bit for bit
        for key in ("deletion", "insertion", "iou", "f1", "iou_pixel", "f1_pixel", "pointing_game", "forwards"):
            assert mine[i][key] == theirs[i][key], key
    # the default (k = 2) is the reference; the others carry causal and localisation intervals
    reference = result["iassa-k2"]
    assert reference["intervals"] == {}
    intervals = result["iassa-k1"]["intervals"]
    for key in ("rise/deletion", "rise/insertion", "pointing_game", "iou", "f1", "iou_pixel", "f1_pixel"):
        assert intervals[key]["low"] <= intervals[key]["mean"] <= intervals[key]["high"], key
    passes = [result[f"iassa-k{k}"]["summary"]["passes"] for k in (1, 2, 3)]
    assert passes[0] < passes[1] < passes[2]
    text = (out / "iassa_iterations.md").read_text()
    assert "| 2 (default) | 2 |" in text and "3 − 2" in text and "Command: `python -m experiments.iassa_iterations" in text
    # the same command again explains nothing and scores nothing new
    lines = {p: p.read_text() for p in out.rglob("*.jsonl")}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        again = study.main([*TINY, "--out", str(out)])
    assert "0 of 2 images to explain" in log.getvalue()
    assert {p: p.read_text() for p in out.rglob("*.jsonl")} == lines
    assert again["iassa-k1"]["summary"] == result["iassa-k1"]["summary"]
