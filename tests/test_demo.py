"""``saliency-lab demo`` (``make demo``, the README's first task) end to end on tiny data: every stage runs, the
predictors' checkpoints reach the evaluation (also as the post-hoc variant), the files the README's demo block opens
exist, and a re-run reuses every finished stage. The committed predictor_game
checkpoint: it stands in for training only with the black box it records, and it loads and scores as documented."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import unittest.mock
from pathlib import Path

import pytest
import torch

from saliency_lab.cli import demo
from saliency_lab.cli import evaluate
from saliency_lab.cli import train
from tests.conftest import subprocess_env
from tests.test_readme import demo_block_files

TINY_DATA = ("--data.init_args.image_size=32 --data.init_args.batch_size=8 --data.init_args.num_workers=0 "
             "--data.init_args.num_train=32 --data.init_args.num_val=16 --data.init_args.num_test=16 "
             "--data.init_args.cache=false")
TRAIN = (f"{TINY_DATA} --trainer.max_epochs=1 --trainer.limit_train_batches=2 --trainer.limit_val_batches=1 "
         "--trainer.limit_test_batches=1")
EVALUATE = (f"{TINY_DATA} --explainers=rise,gradient --method_hparams='{{rise: {{n_masks: 16}}}}' --batch_size=4 "
            "--settings.mf_steps=4 --wandb=false")


def run_demo(repo_root, out, blackbox, game):
    cmd = [sys.executable, "-m", "saliency_lab.cli", "demo", f"--out={out}", f"--blackbox={blackbox}", f"--game_checkpoint={game}",
           "--num_images=4", f"--train_args={TRAIN}", f"--evaluate_args={EVALUATE}"]
    return subprocess.run(cmd, cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=1500)


@pytest.fixture
def tiny_game_checkpoint(repo_root, tiny_blackbox_path, tmp_path, monkeypatch):
    """A predictor_game checkpoint on the tiny black box, written by train.py itself (in this process, at the
    demo test's tiny settings): the stand-in of assets/embedded_predictor_game.ckpt, which only fits the committed
    black box. train.py records the resolved model config in it, which ``train.py test --ckpt_path`` reads back.
    CSV logging: no W&B run is left behind in this process."""
    run_dir = tmp_path / "game_run"
    monkeypatch.chdir(repo_root)
    with unittest.mock.patch.object(sys, "argv", ["train.py"]):
        train.main(["fit", "--config", "configs/train/embedded_predictor_game.yaml", f"--run_dir={run_dir}",
                    f"--model.init_args.blackbox.init_args.model=ckpt:{tiny_blackbox_path}",
                    "--model.init_args.filter_checkpoint=null", *shlex.split(TRAIN),
                    "--trainer.logger=configs/logger/csv.yaml", f"--trainer.logger.init_args.save_dir={run_dir}"])
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_them(repo_root, tmp_path, tiny_blackbox_path, tiny_game_checkpoint):
    assert shlex.split(EVALUATE)  # quoting stays valid for the subprocess
    out = tmp_path / "demo"
    proc = run_demo(repo_root, out, tiny_blackbox_path, tiny_game_checkpoint)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("classifier", "filter", "predictor_ct", "predictor_bt", "mgnet", "predictor_game"):
        assert (out / stage / "test_metrics.json").is_file(), stage
    assert not (out / "predictor_game" / "checkpoints").exists()  # tested, not trained
    assert f"--ckpt_path={tiny_game_checkpoint}" in proc.stdout
    results = json.loads((out / "evaluation" / "results.json").read_text())
    assert set(results["methods"]) == {"rise", "gradient", "predictor_ct", "predictor_bt", "mgnet",
                                       "predictor_ct_posthoc", "predictor_game"}
    assert all(stats["images"] == 4 for stats in results["methods"].values())
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"classifier", "filter", "predictor_ct", "predictor_bt", "mgnet", "predictor_game",
                            "evaluation"}
    for name in demo_block_files():  # what the README's demo block tells a user to open
        assert (out / name).stat().st_size > 0, name

    again = run_demo(repo_root, out, tiny_blackbox_path, tiny_game_checkpoint)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, reusing") == 5  # filter and the four predictors
    assert "train.py" not in again.stdout  # no training or testing ran again


def test_the_demo_trains_every_predictor_config_and_names_them_apart():
    assert set(demo.PREDICTOR_CONFIGS) == {"predictor_ct", "predictor_bt", "mgnet", "predictor_game"}
    assert demo.PREDICTOR_CONFIGS["predictor_game"] == "configs/train/embedded_predictor_game.yaml"


def test_a_committed_game_checkpoint_stands_in_only_for_its_black_box(repo_root, monkeypatch, tmp_path,
                                                                      tiny_predictor_path, tiny_blackbox_path):
    """demo.game_checkpoint: a checkpoint is tested instead of trained only when it is a predictor_game one of the
    black box it records; a user's file that does not fit is an error, the committed one that does not fit is
    trained instead (None)."""
    monkeypatch.chdir(repo_root)
    game = tmp_path / "game.ckpt"  # the tiny predictor under the game's name: what a predictor_game fit records
    ckpt = torch.load(tiny_predictor_path, map_location="cpu", weights_only=True)
    ckpt["explainer"] = {**ckpt["explainer"], "name": "predictor_game"}
    torch.save(ckpt, game)
    assert demo.game_checkpoint(game, tiny_blackbox_path) == game
    with pytest.raises(ValueError, match=re.escape(f"was trained on the black box ckpt:{tiny_blackbox_path}, not on ")):
        demo.game_checkpoint(game, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is a predictor_ct checkpoint, not a predictor_game one"):
        demo.game_checkpoint(tiny_predictor_path, tiny_blackbox_path)
    with pytest.raises(ValueError, match="no such file"):
        demo.game_checkpoint(tmp_path / "missing.ckpt", tiny_blackbox_path)
    assert demo.game_checkpoint(demo.COMMITTED_GAME, tiny_blackbox_path) is None
    assert demo.game_checkpoint(demo.COMMITTED_GAME, demo.COMMITTED_BLACKBOX) == demo.COMMITTED_GAME


def documented_scores(repo_root) -> dict[str, float]:
    """The scores assets/README.md documents for the committed predictor_game on the first 8 test scenes."""
    text = (repo_root / "assets" / "README.md").read_text()
    found = re.search(r"first 8 test scenes[^\n]*?: deletion ([0-9.]+), insertion ([0-9.]+), pointing game ([0-9.]+)",
                      text)
    assert found, "assets/README.md documents no scores of the first 8 test scenes"
    return dict(zip(("deletion", "insertion", "pointing_game"), map(float, found.groups())))


def test_the_committed_game_checkpoint_loads_and_scores_as_documented(repo_root, monkeypatch, tmp_path):
    """assets/embedded_predictor_game.ckpt, as make demo evaluates it (a plain --ckpt_path PATH: the name it records),
    on the committed black box in float32: the first 8 embedded test scenes score what assets/README.md states."""
    monkeypatch.chdir(repo_root)
    results = evaluate.main([
        "--config", "configs/evaluate/embedded_evaluate.yaml", "--explainers=[]", f"--ckpt_path=[{demo.COMMITTED_GAME}]",
        "--blackbox.init_args.precision=32", "--num_images=8", "--batch_size=8", "--data.init_args.num_test=8",
        "--data.init_args.num_workers=0", "--data.init_args.cache=false", "--overlay_images=0", "--wandb=false",
        f"--out={tmp_path}"])
    assert list(results["methods"]) == ["predictor_game"]
    stats = results["methods"]["predictor_game"]
    assert stats["images"] == 8 and stats["forwards_per_image"] == 1.0
    for key, value in documented_scores(repo_root).items():
        assert stats[key] == pytest.approx(value, abs=2e-3), key


def test_a_stage_switches_between_the_committed_checkpoint_and_training(tmp_path, monkeypatch):
    """demo.train_stage: a finished stage is reused, but a folder that only tested a committed checkpoint is
    trained when training is asked for (e.g. --train_game after a default run into the same --out)."""
    calls = []

    def fake_call(cmd):
        calls.append(cmd[len(demo.CLI)])  # fit / test
        run_dir = Path(next(a for a in cmd if a.startswith("--run_dir=")).split("=", 1)[1])
        (run_dir / f"{cmd[len(demo.CLI)]}_metrics.json").write_text("{}")

    monkeypatch.setattr(demo, "_call", fake_call)
    run_dir = tmp_path / "predictor_game"
    run_dir.mkdir()
    committed = tmp_path / "committed.ckpt"
    demo.train_stage("game.yaml", run_dir, [], committed)
    assert calls == ["test"]  # the committed checkpoint: tested, not trained
    demo.train_stage("game.yaml", run_dir, [], committed)
    assert calls == ["test"]  # reused
    demo.train_stage("game.yaml", run_dir, [])
    assert calls == ["test", "fit", "test"]  # training asked for: that folder had only tested
    demo.train_stage("game.yaml", run_dir, [])
    assert calls == ["test", "fit", "test"]  # reused
