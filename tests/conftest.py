"""Shared test setup: offline, deterministic, small."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # on sys.path through pyproject's pytest pythonpath = ["."]
os.environ["HF_HUB_OFFLINE"] = "1"       # any attempt to reach a model hub fails loudly
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)                 # xdist runs one worker per core


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def subprocess_env() -> dict:
    """Environment for child processes (train.py, evaluate.py): offline, one thread each, repo importable."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="session")
def tiny_blackbox_path(tmp_path_factory) -> Path:
    """A random-weight 10-class narrow resnet10t saved as a project black-box record (``ckpt:PATH``)."""
    from core.blackbox import blackbox_record, create_network

    torch.manual_seed(0)
    kwargs = {"channels": [8, 16, 24, 32]}
    net = create_network("timm:resnet10t", 10, kwargs)
    path = tmp_path_factory.mktemp("bb") / "tiny.pt"
    torch.save(blackbox_record("timm:resnet10t", net, 10, kwargs, (0.5,) * 3, (0.25,) * 3), path)
    return path
