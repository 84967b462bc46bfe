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
    from saliency_lab.core.blackbox import blackbox_record, create_network

    torch.manual_seed(0)
    kwargs = {"channels": [8, 16, 24, 32]}
    net = create_network("timm:resnet10t", 10, kwargs)
    path = tmp_path_factory.mktemp("bb") / "tiny.pt"
    torch.save(blackbox_record("timm:resnet10t", net, 10, kwargs, (0.5,) * 3, (0.25,) * 3), path)
    return path


@pytest.fixture(scope="session")
def tiny_predictor_path(tiny_blackbox_path, tmp_path_factory) -> Path:
    """A CT mask-predictor checkpoint on the tiny black box, as ``MaskPredictor`` saves it (random weights,
    batch-norm statistics perturbed so that no layer is an identity: enough for loading and export tests)."""
    import warnings

    from saliency_lab.core.blackbox import BlackBox
    from saliency_lab.lightning_modules.mask_predictor import MaskPredictor

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained filter
        model = MaskPredictor(blackbox=BlackBox(f"ckpt:{tiny_blackbox_path}"), filter_checkpoint=None, mode="ct")
    with torch.no_grad():
        for module in model.net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    path = tmp_path_factory.mktemp("predictor") / "predictor.ckpt"
    torch.save(checkpoint, path)
    return path


# -- scheduling under xdist (`make test` = pytest -n 2) ---------------------------------------------------------
# The slow end-to-end tests (subprocesses: demo.py, train.py, DDP) take most of the suite's time, the demo alone
# several minutes. Run them first, longest first, so that the other worker is never left waiting at the end for
# one long test that started late; and let an idle worker take pending tests from the busy one (xdist's
# "worksteal") instead of the fixed chunks of plain "-n 2".
FIRST = ("tests/test_demo.py::",)  # the longest single test: it starts at once on one worker


def _order(item) -> int:
    if item.nodeid.startswith(FIRST):
        return 0
    return 1 if item.get_closest_marker("slow") else 2


def pytest_collection_modifyitems(config, items):
    items.sort(key=_order)  # stable: within each group, files and tests keep their order


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent when running with -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "load":  # plain -n N; an explicit --dist MODE is left alone
        from xdist.scheduler import WorkStealingScheduling

        return WorkStealingScheduling(config, log)
    return None
