"""train.py end to end in subprocesses: fast_dev_run, resume from last.ckpt, saved config, clear config errors,
and a 2-process DDP run on CPU."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.conftest import ROOT, subprocess_env

EXPERIMENT = "configs/train/embedded_classifier.yaml"
SMALL = ["--data.init_args.image_size=32", "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
         "--data.init_args.num_train=32", "--data.init_args.num_val=16", "--data.init_args.num_test=16",
         "--model.init_args.blackbox.init_args.model_kwargs={channels: [8, 16, 24, 32]}"]


def run_train(repo_root, *args, timeout=300):
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=repo_root, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.mark.slow
def test_fast_dev_run_of_the_experiment_config(repo_root, tmp_path):
    proc = run_train(repo_root, "fit", "--config", EXPERIMENT, "--trainer.fast_dev_run=true",
                     f"--run_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_steps=1" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(repo_root, tmp_path):
    """SIGKILL after the first epoch's checkpoint, then ``--ckpt_path last`` finishes the same schedule."""
    args = ["fit", "--config", EXPERIMENT, *SMALL, "--data.init_args.num_train=96", f"--run_dir={tmp_path}",
            "--trainer.max_epochs=3"]  # 12 steps an epoch
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=repo_root, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = torch.load(last, weights_only=True)  # our checkpoints are plain data
    assert interrupted["global_step"] < 36, "the run finished before it could be killed"
    assert "blackbox" in interrupted and (tmp_path / "config.yaml").is_file()
    assert "inference_mode: false" in (tmp_path / "config.yaml").read_text()

    second = run_train(repo_root, *args, "--ckpt_path=last")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in second.stdout + second.stderr
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 36  # 3 epochs x 12 steps: continued where it stopped
    assert resumed["lr_schedulers"][0]["last_epoch"] == 36
    assert all(int(s["step"]) == 36 for s in resumed["optimizer_states"][0]["state"].values())

    test = run_train(repo_root, "test", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path}", "--ckpt_path=last")
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/acc" in (tmp_path / "test_metrics.json").read_text()


def test_config_typo_fails_before_any_data_loads(repo_root, tmp_path, monkeypatch, capsys):
    """train.py's main in this process (a parse error exits before anything is built, so no child is needed)."""
    from saliency_lab.cli import train

    bad = tmp_path / "typo.yaml"
    bad.write_text("trainer:\n  max_epoch: 3\n")
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    # data_dir points nowhere: loading data would fail with a different (FileNotFoundError) message
    with pytest.raises(SystemExit) as exited:
        train.main(["fit", "--config", EXPERIMENT, "--config", str(bad),
                    f"--data.init_args.data_dir={tmp_path / 'none'}", f"--run_dir={tmp_path}"])
    assert exited.value.code not in (0, None)
    stderr = capsys.readouterr().err
    assert "max_epoch" in stderr and "Fashion-MNIST" not in stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_two_process_ddp_on_cpu(repo_root, tmp_path):
    proc = run_train(repo_root, "fit", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path}",
                     "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "MEMBER: 2/2" in out or "distributed_backend=gloo" in out
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2  # 32 scenes / (8 per batch x 2 processes)


def checkpoint_callbacks(path, entries=None):
    """Every ModelCheckpoint's init_args in a config's trainer.callbacks (following file references, and the
    config a file includes with ``config:`` when it sets no callbacks of its own)."""
    if entries is None:
        cfg = yaml.safe_load(path.read_text()) or {}
        entries = (cfg.get("trainer") or {}).get("callbacks") or cfg.get("trainer.callbacks") or []
        if not entries and "config" in cfg:
            return checkpoint_callbacks(path.parent / cfg["config"])
    if isinstance(entries, str):
        return checkpoint_callbacks(path.parent / entries, yaml.safe_load((path.parent / entries).read_text()))
    if isinstance(entries, dict):
        entries = [entries]
    found = []
    for entry in entries:
        if isinstance(entry, str):
            target = path.parent / entry
            found += checkpoint_callbacks(target, yaml.safe_load(target.read_text()))
        elif str(entry.get("class_path", "")).endswith("ModelCheckpoint"):
            found.append(entry.get("init_args") or {})
    return found


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs" / "train").glob("*.yaml")))
def test_every_training_config_refreshes_last_ckpt_unconditionally(config):
    """A monitored ModelCheckpoint writes last.ckpt only when the metric improves (a stale last.ckpt); every
    training config needs an unmonitored one with save_last, and no monitored one may write last.ckpt."""
    found = checkpoint_callbacks(ROOT / "configs" / "train" / config)
    assert not [c for c in found if c.get("save_last") and c.get("monitor")], config
    assert [c for c in found if c.get("save_last") and not c.get("monitor") and c.get("save_top_k", 1) != 0], config


@pytest.mark.slow
def test_uninterrupted_fit_leaves_the_final_step_in_last_ckpt(repo_root, tmp_path):
    proc = run_train(repo_root, "fit", "--config", EXPERIMENT, *SMALL, f"--run_dir={tmp_path}", "--trainer.max_epochs=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 12 and state["epoch"] == 2  # 3 epochs x 32 scenes / 8
