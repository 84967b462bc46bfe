"""demo.py (``make demo``) end to end on tiny data: every stage runs, the predictors' checkpoints reach the
evaluation (also as the post-hoc variant), and a re-run reuses every finished stage."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from tests.conftest import subprocess_env

TINY_DATA = ("--data.init_args.image_size=32 --data.init_args.batch_size=8 --data.init_args.num_workers=0 "
             "--data.init_args.num_train=32 --data.init_args.num_val=16 --data.init_args.num_test=16 "
             "--data.init_args.cache=false")
TRAIN = (f"{TINY_DATA} --trainer.max_epochs=1 --trainer.limit_train_batches=2 --trainer.limit_val_batches=1 "
         "--trainer.limit_test_batches=1")
EVALUATE = (f"{TINY_DATA} --explainers=rise,gradient --method_hparams='{{rise: {{n_masks: 16}}}}' --batch_size=4 "
            "--settings.mf_steps=4 --wandb=false")


def run_demo(repo_root, out, blackbox):
    cmd = [sys.executable, "demo.py", f"--out={out}", f"--blackbox={blackbox}", "--num_images=4",
           f"--train_args={TRAIN}", f"--evaluate_args={EVALUATE}"]
    return subprocess.run(cmd, cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_demo_runs_every_stage_and_reuses_them(repo_root, tmp_path, tiny_blackbox_path):
    assert shlex.split(EVALUATE)  # quoting stays valid for the subprocess
    proc = run_demo(repo_root, tmp_path, tiny_blackbox_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("classifier", "filter", "predictor_ct", "predictor_bt", "mgnet"):
        assert (tmp_path / stage / "test_metrics.json").is_file(), stage
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    assert set(results["methods"]) == {"rise", "gradient", "predictor_ct", "predictor_bt", "mgnet",
                                       "predictor_ct_posthoc"}
    assert all(stats["images"] == 4 for stats in results["methods"].values())
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings) == {"classifier", "filter", "predictor_ct", "predictor_bt", "mgnet", "evaluation"}

    again = run_demo(repo_root, tmp_path, tiny_blackbox_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, reusing") == 4  # filter and the three predictors
    assert "train.py" not in again.stdout  # no training or testing ran again
