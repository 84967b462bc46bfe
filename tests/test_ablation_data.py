"""experiments/predictor_ablation.py --data: the scenes an ordering is checked on (configs/data/embedded_hard.yaml)."""
from __future__ import annotations

import argparse

import yaml
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from experiments import predictor_ablation
from saliency_lab.datamodules.scenes import Clutter


def evaluate_commands(tmp_path, monkeypatch, datas) -> list[list[str]]:
    """The evaluate.py command lines predictor_ablation.evaluate runs into one folder, once per --data value (the
    command is captured; a fake results.json stands for what it would write)."""
    commands, out = [], tmp_path / "out"

    def fake_run(cmd):
        commands.append(cmd)
        out.mkdir(exist_ok=True)
        (out / "results.json").write_text('{"num_images": 4}')

    monkeypatch.setattr(predictor_ablation, "run", fake_run)
    monkeypatch.setattr(predictor_ablation, "ROOT", tmp_path)
    for data in datas:
        (out / "results.json").unlink(missing_ok=True)
        args = argparse.Namespace(blackbox="ckpt:bb.pt", split="test", num_images=4, precision="auto", data=data)
        predictor_ablation.evaluate(Path("out"), "igos", args)
    predictor_ablation.evaluate(Path("out"), "igos", args)  # a finished evaluation is reused, not run again
    return commands


def test_data_option_reaches_evaluate(tmp_path, monkeypatch):
    default, hard = evaluate_commands(tmp_path, monkeypatch, [None, "configs/data/embedded_hard.yaml"])
    assert not any(c.startswith("--data") for c in default)
    assert "--data=configs/data/embedded_hard.yaml" in hard
    assert "--settings.protocol=igos" in hard and "--num_images=4" in hard


def test_hard_scenes_are_other_scenes_with_heavier_clutter():
    base = yaml.safe_load((ROOT / "configs/data/embedded.yaml").read_text())["init_args"]
    hard = yaml.safe_load((ROOT / "configs/data/embedded_hard.yaml").read_text())["init_args"]
    assert hard["seed"] != base["seed"]
    default, heavy = Clutter(), Clutter.coerce(hard["clutter"])
    assert heavy.distractors > default.distractors
    assert heavy.distractor_opacity[0] > default.distractor_opacity[0]
    assert heavy.texture_strength > default.texture_strength
    # the rest of what a scene is made of stays: canvas and split sizes
    assert ({k: v for k, v in hard.items() if k not in ("seed", "clutter")}
            == {k: v for k, v in base.items() if k != "seed"})


def test_hard_scenes_parse_as_evaluate_reads_them(monkeypatch):
    """The config goes through evaluate.py's own parser into the data module's clutter (nothing is loaded)."""
    from saliency_lab.cli import evaluate

    monkeypatch.chdir(ROOT)
    cfg = evaluate.build_parser().parse_args(["--config", "configs/evaluate/embedded_evaluate.yaml",
                                              "--data", "configs/data/embedded_hard.yaml"])
    init = cfg.data.init_args
    assert init.seed == 1
    assert init.clutter.distractors == 4 and list(init.clutter.distractor_opacity) == [0.45, 0.7]


def test_road_is_computed_under_the_first_preset_only(tmp_path, monkeypatch):
    """The driver's table reads ROAD from the first preset's evaluation, so every later preset's evaluate.py call
    (the baseline scoring its saved maps, and each variant) skips ROAD's imputations, and the first one does not."""
    calls = []

    def fake_evaluate(out, preset, args, methods="[]", hparams="{}", ckpt=None, extra=(), num_images=None):
        calls.append((str(out), preset, tuple(extra)))
        return {}

    def fake_train(name, out, filter_ckpt, blackbox, seed=0):
        run_dir = out / name
        (tmp_path / run_dir).mkdir(parents=True, exist_ok=True)
        (tmp_path / run_dir / "fit_metrics.json").write_text("{}")
        return run_dir

    (tmp_path / "filter.ckpt").write_text("")
    monkeypatch.setattr(predictor_ablation, "ROOT", tmp_path)
    monkeypatch.setattr(predictor_ablation, "evaluate", fake_evaluate)
    monkeypatch.setattr(predictor_ablation, "train", fake_train)
    monkeypatch.setattr(predictor_ablation, "summarise", lambda folders, method, fit: {})
    monkeypatch.setattr(predictor_ablation, "paired_lines", lambda *args: [])
    monkeypatch.setattr("sys.argv", ["predictor_ablation", "--variants", "game", "--presets", "rise,igos,grid16",
                                     "--filter", "filter.ckpt", "--out", "out"])
    predictor_ablation.main()
    skip = "--settings.road_fractions=[]"
    by_preset = {}
    for out, preset, extra in calls:
        by_preset.setdefault(preset, []).append(skip in extra)
    assert by_preset == {"rise": [False, False], "igos": [True, True], "grid16": [True, True]}  # baseline, variant
    assert any("--save_maps=true" in extra for _, preset, extra in calls if preset == "rise")


def test_a_finished_evaluation_is_reused_for_the_same_image_count_only(tmp_path, monkeypatch):
    """An evaluation folder that holds results for 4 images stands for a 4-image request; a 6-image request runs
    evaluate.py again (which reuses its rows), instead of reporting the 4-image results as 6."""
    commands = evaluate_commands(tmp_path, monkeypatch, [None])
    assert len(commands) == 1  # the second 4-image call reused it
    args = argparse.Namespace(blackbox="ckpt:bb.pt", split="test", num_images=6, precision="auto", data=None)
    predictor_ablation.evaluate(Path("out"), "igos", args)
    assert len(commands) == 2 and "--num_images=6" in commands[-1]
