"""A user's own classifier (an ``nn.Module`` defined here: its own stem, blocks and head, not timm, not torchvision)
as a black box: every registered method explains it, the metrics and ``saliency-lab evaluate`` score it, and the
mask predictor trains on it."""
from __future__ import annotations

import json
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from saliency_lab import explainers
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.lightning_modules.mask_predictor import MaskPredictor
from saliency_lab.metrics import EvaluationSettings, score_saliency
from tests.test_explainers_conformance import COMMON, FAST_HPARAMS, TRAINED_FROM

LAYERS = ["block1", "block2", "block3", "block4"]
SIZE = 64


def conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UserNet(nn.Module):
    """A small CNN as a user would write it: stride-4 stem, four blocks at strides 4/8/16/32, pooled linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv(3, 8, 2), conv(8, 8, 2))
        self.block1, self.block2 = conv(8, 16, 1), conv(16, 24, 2)
        self.block3, self.block4 = conv(24, 32, 2), conv(32, 40, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block4(self.block3(self.block2(self.block1(self.stem(x))))))


def user_net(seed: int = 0) -> UserNet:
    torch.manual_seed(seed)
    net = UserNet()
    with torch.no_grad():  # batch-norm statistics that are not an identity
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def blackbox() -> BlackBox:
    return BlackBox.from_module(user_net(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), feature_layers=LAYERS,
                                input_size=SIZE)


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(2)
    return torch.rand(3, 3, SIZE, SIZE, generator=generator), torch.tensor([0, 3, 9])


def test_a_module_describes_its_levels_classes_and_weights(blackbox):
    assert blackbox.num_classes == 10  # read from the output
    assert blackbox.feature_channels == [16, 24, 32, 40] and blackbox.feature_strides == [4, 8, 16, 32]
    assert blackbox.feature_modules == LAYERS and blackbox.spec == f"module:{UserNet.__module__}.UserNet"
    images = torch.rand(2, 3, SIZE, SIZE)
    features, logits = blackbox.features_and_logits(images)
    assert [tuple(f.shape[1:]) for f in features] == [(16, 16, 16), (24, 8, 8), (32, 4, 4), (40, 2, 2)]
    assert torch.allclose(logits, blackbox.logits(images), atol=1e-6)
    assert not any(module._forward_hooks for module in blackbox.net.modules())  # hooks live for one pass only
    other = BlackBox.from_module(user_net(seed=1), mean=(0.5,) * 3, std=(0.25,) * 3, feature_layers=LAYERS)
    assert other.content_hash() != blackbox.content_hash()  # the rows of another model are keyed apart
    with pytest.raises(ValueError, match="in memory"):  # a checkpoint cannot rebuild weights that are in no file
        BlackBox.from_config(blackbox.config())


def test_a_module_without_feature_layers_is_refused_by_name_where_levels_are_needed(batch):
    bare = BlackBox.from_module(user_net(), input_size=SIZE)
    images, targets = batch
    assert explainers.build("rise", bare, n_masks=8)(images, targets).shape == (3, 1, SIZE, SIZE)
    for method in ("gradcam", "iassa", "finv"):
        with pytest.raises(ValueError, match="feature_layers"):
            explainers.build(method, bare, **FAST_HPARAMS[method])(images, targets)
    with pytest.raises(ValueError, match="feature_layers"):
        MaskPredictor(blackbox=bare, filter_checkpoint=None)
    with pytest.raises(ValueError, match="not modules of the network"):
        BlackBox.from_module(user_net(), feature_layers=["block9"])


@pytest.fixture(scope="module")
def predictor_checkpoints(blackbox, tmp_path_factory):
    folder, paths = tmp_path_factory.mktemp("user_predictors"), {}
    for mode in sorted(set(TRAINED_FROM.values())):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # untrained filter
            module = MaskPredictor(blackbox=blackbox, filter_checkpoint=None, mode=mode)
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        paths[mode] = folder / f"{mode}.ckpt"
        torch.save(checkpoint, paths[mode])
    return paths


@pytest.mark.parametrize("name", explainers.available())
def test_every_method_explains_a_user_module(name, blackbox, batch, predictor_checkpoints):
    images, targets = batch
    trained = {"checkpoint": predictor_checkpoints[TRAINED_FROM[name]]} if explainers.is_trained(name) else {}
    explainer = explainers.build(name, blackbox, **trained, **{**COMMON, **FAST_HPARAMS[name]})
    saliency = explainer(images, targets)
    assert saliency.shape == (3, 1, SIZE, SIZE) and torch.isfinite(saliency).all()
    assert explainer.cost.forwards > 0


def test_the_metrics_score_a_user_module(blackbox, batch):
    images, targets = batch
    saliency = explainers.build("gradient", blackbox)(images, targets)
    scores = score_saliency(blackbox, images, saliency, targets, torch.ones(3, 1, SIZE, SIZE, dtype=torch.bool),
                            EvaluationSettings.default(SIZE))
    for value in (scores.values["deletion"], scores.values["insertion"]):
        assert value.shape == (3,) and ((0 <= value) & (value <= 1)).all()
    assert scores.values["pointing_game"].shape == (3,)


def test_evaluate_cli_on_a_user_module_class(tmp_path):
    """``--blackbox module:PKG.CLASS`` with its init args and a local weights file, as a config names it."""
    from saliency_lab.cli import evaluate

    weights = tmp_path / "user_net.pt"
    torch.save(user_net().state_dict(), weights)
    evaluate.main([
        "--blackbox", "module:tests.test_user_model.UserNet", f"--blackbox.init_args.weights={weights}",
        "--blackbox.init_args.model_kwargs={classes: 10}", f"--blackbox.init_args.feature_layers={json.dumps(LAYERS)}",
        "--blackbox.init_args.mean=[0.5, 0.5, 0.5]", "--blackbox.init_args.std=[0.25, 0.25, 0.25]",
        "--data.class_path=saliency_lab.datamodules.ClutteredFashionMNISTDataModule",
        f"--data.init_args.image_size={SIZE}", "--data.init_args.num_test=2",
        "--explainers=gradient,gradcam,iassa", "--method_hparams={iassa: {iterations: 1, stride: 32.0}}",
        "--num_images=2", "--batch_size=2", "--wandb=false", f"--out={tmp_path / 'evaluation'}",
        "--trainer.enable_progress_bar=false"])
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    assert set(results["methods"]) == {"gradient", "gradcam", "iassa"}
    assert all(stats["images"] == 2 for stats in results["methods"].values())


@pytest.mark.slow
def test_the_mask_predictor_trains_on_a_user_module(blackbox, tmp_path):
    from saliency_lab.datamodules import ClutteredFashionMNISTDataModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = MaskPredictor(blackbox=blackbox, filter_checkpoint=None, mode="ct")
    data = ClutteredFashionMNISTDataModule(image_size=SIZE, batch_size=4, num_train=8, num_val=4, num_test=4)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    changed = [k for k, v in module.net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "two optimiser steps changed no weight of the generator"
    path = tmp_path / "predictor.ckpt"
    trainer.save_checkpoint(path)
    maps = explainers.build("predictor_ct", blackbox, checkpoint=path)(torch.rand(2, 3, SIZE, SIZE),
                                                                        torch.tensor([1, 2]))
    assert maps.shape == (2, 1, SIZE, SIZE) and torch.isfinite(maps).all()
