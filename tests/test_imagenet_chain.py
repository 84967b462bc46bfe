"""The ImageNet recipe end to end at ImageNet geometry (224 px) on the CPU: ``experiments/imagenet_chain.py`` with
its tiny settings (8 training and 4 validation scenes exported in the ImageNet layout, the CNN built without
pretrained weights, 2 DDP processes): the filter, the CT predictor (for ResNet-50 killed after its first epoch and
resumed with ``--ckpt_path last``), and the evaluation with RISE, iGOS++, IASSA and the predictor.

ResNet-50 (timm) and GoogLeNet run here. VGG-19 costs 13x GoogLeNet's FLOPs per image (docs/results/cost.md) and
would add minutes to the suite on two cores: its chain is the documented run of docs/results/imagenet_chain.md
(the same code, ``--cnn vgg19``), and its filter and CT configs run at 32 px in tests/test_mask_predictor.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import imagenet_chain
from tests.conftest import subprocess_env

SIZE = 224


@pytest.fixture(scope="module")
def imagenet_224(tmp_path_factory) -> Path:
    """The first 8 training and 4 validation scenes in the ImageNet layout, 224 x 224, 10 class folders."""
    from saliency_lab.datamodules.scene_export import export_imagenet

    return export_imagenet(tmp_path_factory.mktemp("imagenet") / "imagenet", {"train": 8, "val": 4},
                           image_size=SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("cnn, resume", [("resnet50", True), ("googlenet", False)])
def test_the_imagenet_chain_at_224_px_with_two_ddp_processes(cnn, resume, imagenet_224, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    imagenet_chain.random_weights_file(cnn, weights)
    work = tmp_path / "work"  # outside the checkout: configs/... come from the installed package
    work.mkdir()
    env = {**subprocess_env(), "SALIENCY_LAB_WEIGHTS": str(weights)}
    result = imagenet_chain.run_chain(cnn, imagenet_224, work, env, processes=2, epochs=2 if resume else 1,
                                      kill_and_resume=resume, eval_images=2)

    assert result["steps_per_epoch"] == 2  # 8 images / (2 processes x batch 2)
    assert torch.load(result["filter_checkpoint"], weights_only=True)["global_step"] == 2
    checkpoints, steps = result["checkpoints"], 4 if resume else 2
    if resume:
        assert result["killed"], "the predictor finished before it could be killed"
        assert "Restoring states from the checkpoint path" in result["resumed_log"]
        assert (checkpoints / "epoch01-step000004.ckpt").is_file()
    final = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert final["global_step"] == steps
    assert all(int(s["step"]) == steps for s in final["optimizer_states"][0]["state"].values())

    out = result["evaluation"]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"rise", "igos_pp", "iassa", "predictor_ct"}, results["methods"]
    assert all(stats["images"] == 2 for stats in results["methods"].values())
    rows = [json.loads(line) for rank in (0, 1) for line in (out / "rows" / f"rows-rank{rank}.jsonl").open()]
    assert sorted({row["index"] for row in rows}) == [0, 1]  # each process explained its own image
    assert all(row["forwards"] >= 1 for row in rows)
