"""benchmarks/predictor_ablation.py --data: the scenes an ordering is checked on (configs/data/embedded_hard.yaml)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import predictor_ablation  # noqa: E402
from datamodules.scenes import Clutter  # noqa: E402


def evaluate_command(tmp_path, monkeypatch, data):
    commands = []
    monkeypatch.setattr(predictor_ablation, "run", commands.append)
    monkeypatch.setattr(predictor_ablation, "ROOT", tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")  # run() is captured: evaluate() reads what it would write
    args = argparse.Namespace(blackbox="ckpt:bb.pt", split="test", num_images=4, precision="auto", data=data)
    predictor_ablation.evaluate(Path("out"), "igos", args)
    return commands


def test_results_are_reused_without_running(tmp_path, monkeypatch):
    assert evaluate_command(tmp_path, monkeypatch, None) == []


def test_data_option_reaches_evaluate(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(predictor_ablation, "run", commands.append)
    monkeypatch.setattr(predictor_ablation, "ROOT", tmp_path)
    out = tmp_path / "out"

    def fake_run(cmd):
        commands.append(cmd)
        out.mkdir(exist_ok=True)
        (out / "results.json").write_text("{}")

    monkeypatch.setattr(predictor_ablation, "run", fake_run)
    for data in (None, "configs/data/embedded_hard.yaml"):
        if (out / "results.json").exists():
            (out / "results.json").unlink()
        args = argparse.Namespace(blackbox="ckpt:bb.pt", split="test", num_images=4, precision="auto", data=data)
        predictor_ablation.evaluate(Path("out"), "igos", args)
    default, hard = commands
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
    # everything else a scene is made of stays: same canvas and split sizes
    assert {k: v for k, v in hard.items() if k not in ("seed", "clutter")} == {k: v for k, v in base.items() if k != "seed"}
