"""demo.py (``make demo``) end to end on tiny data: every stage runs, the predictors' checkpoints reach the
evaluation (also as the post-hoc variant), and a re-run reuses every finished stage. The committed predictor_game
checkpoint: it stands in for training only with the black box it records, and it loads and scores as documented."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

import demo
import evaluate
from core.blackbox import BlackBox
from datamodules import ClutteredFashionMNIST, collate_samples
from lightning_modules.mask_predictor import MaskPredictor
from tests.conftest import subprocess_env

TINY_DATA = ("--data.init_args.image_size=32 --data.init_args.batch_size=8 --data.init_args.num_workers=0 "
             "--data.init_args.num_train=32 --data.init_args.num_val=16 --data.init_args.num_test=16 "
             "--data.init_args.cache=false")
TRAIN = (f"{TINY_DATA} --trainer.max_epochs=1 --trainer.limit_train_batches=2 --trainer.limit_val_batches=1 "
         "--trainer.limit_test_batches=1")
EVALUATE = (f"{TINY_DATA} --explainers=rise,gradient --method_hparams='{{rise: {{n_masks: 16}}}}' --batch_size=4 "
            "--settings.mf_steps=4 --wandb=false")


def run_demo(repo_root, out, blackbox, game):
    cmd = [sys.executable, "demo.py", f"--out={out}", f"--blackbox={blackbox}", f"--game_checkpoint={game}",
           "--num_images=4", f"--train_args={TRAIN}", f"--evaluate_args={EVALUATE}"]
    return subprocess.run(cmd, cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=1500)


@pytest.fixture
def tiny_game_checkpoint(tiny_blackbox_path, tmp_path_factory):
    """A predictor_game checkpoint on the tiny black box, as train.py writes it (one step of the game at 32 px):
    the committed assets/embedded_predictor_game.ckpt's stand-in, which only fits the committed black box."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained filter
        model = MaskPredictor(blackbox=BlackBox(f"ckpt:{tiny_blackbox_path}"), filter_checkpoint=None, mode="ct",
                              method="predictor_game", ce_weight=0.0, deletion_weight=1.0, insertion_weight=1.0)
    scenes = ClutteredFashionMNIST("train", 32, num_scenes=4)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path_factory.mktemp("game"))
    trainer.fit(model, DataLoader([scenes[i] for i in range(4)], batch_size=4, collate_fn=collate_samples))
    path = tmp_path_factory.mktemp("game") / "game.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_them(repo_root, tmp_path, tiny_blackbox_path, tiny_game_checkpoint):
    assert shlex.split(EVALUATE)  # quoting stays valid for the subprocess
    proc = run_demo(repo_root, tmp_path, tiny_blackbox_path, tiny_game_checkpoint)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("classifier", "filter", "predictor_ct", "predictor_bt", "mgnet", "predictor_game"):
        assert (tmp_path / stage / "test_metrics.json").is_file(), stage
    assert not (tmp_path / "predictor_game" / "checkpoints").exists()  # tested, not trained
    assert f"--ckpt_path={tiny_game_checkpoint}" in proc.stdout
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    assert set(results["methods"]) == {"rise", "gradient", "predictor_ct", "predictor_bt", "mgnet",
                                       "predictor_ct_posthoc", "predictor_game"}
    assert all(stats["images"] == 4 for stats in results["methods"].values())
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings) == {"classifier", "filter", "predictor_ct", "predictor_bt", "mgnet", "predictor_game",
                            "evaluation"}

    again = run_demo(repo_root, tmp_path, tiny_blackbox_path, tiny_game_checkpoint)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, reusing") == 5  # filter and the four predictors
    assert "train.py" not in again.stdout  # no training or testing ran again


def test_the_demo_trains_every_predictor_config_and_names_them_apart():
    assert set(demo.PREDICTOR_CONFIGS) == {"predictor_ct", "predictor_bt", "mgnet", "predictor_game"}
    assert demo.PREDICTOR_CONFIGS["predictor_game"] == "configs/experiment/embedded_predictor_game.yaml"


def test_a_committed_game_checkpoint_stands_in_only_for_its_black_box(repo_root, monkeypatch, tmp_path,
                                                                      tiny_predictor_path, tiny_blackbox_path):
    """demo.game_checkpoint: a checkpoint is tested instead of trained only with the black box it records; a
    user's file that does not fit is an error, the committed one that does not fit is trained instead (None)."""
    monkeypatch.chdir(repo_root)
    assert demo.game_checkpoint(tiny_predictor_path, tiny_blackbox_path) == tiny_predictor_path
    with pytest.raises(ValueError, match=f"was trained on the black box ckpt:{tiny_blackbox_path}, not on "):
        demo.game_checkpoint(tiny_predictor_path, tmp_path / "other.pt")
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
    """assets/embedded_predictor_game.ckpt, as make demo evaluates it (a plain --ckpt PATH: the name it records),
    on the committed black box in float32: the first 8 embedded test scenes score what assets/README.md states."""
    monkeypatch.chdir(repo_root)
    results = evaluate.main([
        "--config", "configs/experiment/embedded_evaluate.yaml", "--explainers=[]", f"--ckpt=[{demo.COMMITTED_GAME}]",
        "--blackbox.init_args.precision=32", "--num_images=8", "--batch_size=8", "--data.init_args.num_test=8",
        "--data.init_args.num_workers=0", "--data.init_args.cache=false", "--overlay_images=0", "--wandb=false",
        f"--out={tmp_path}"])
    assert list(results["methods"]) == ["predictor_game"]
    stats = results["methods"]["predictor_game"]
    assert stats["images"] == 8 and stats["forwards_per_image"] == 1.0
    for key, value in documented_scores(repo_root).items():
        assert stats[key] == pytest.approx(value, abs=2e-3), key
