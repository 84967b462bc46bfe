"""``saliency-lab cost`` and its pieces (``core/cost.py``): passes counted on a real training step, FLOPs against
a hand count, the explainers' own counters on an evaluation config, GPU-hours arithmetic, and the files written.
Embedded configs and tiny images only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from saliency_lab.cli.cost import SCORING, config_kind, main
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.cost import (GPUS, PassCounter, count_flops, gpu_hours, parse_gpus, slope,
                                    stand_in_blackbox)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "configs" / "train"


# -- the pieces -------------------------------------------------------------------------------------------
def test_pass_counter_counts_images_forward_and_backward(tiny_blackbox_path):
    blackbox = BlackBox(f"ckpt:{tiny_blackbox_path}")
    x = torch.rand(3, 3, 32, 32)
    with PassCounter(blackbox) as counter:
        with torch.no_grad():
            blackbox.logits(x)                                    # 3 forwards, nothing to back-propagate
        y = x.clone().requires_grad_(True)
        features, logits = blackbox.features_and_logits(y[:2])    # 2 forwards; a loss on both outputs
        (logits.sum() + features[-1].sum()).backward()            # is still one backward per image
        blackbox.probs(x.clone().requires_grad_(True))            # 3 forwards, never back-propagated
    assert (counter.forwards, counter.backwards, counter.calls) == (8, 2, 3)
    assert "_run" not in blackbox.__dict__                        # the black box is itself again
    with blackbox.fast(), PassCounter(blackbox) as fast:
        blackbox.logits(x)
    assert fast.bf16_fraction == (1.0 if blackbox.precision in ("auto", "bf16") else 0.0)


def test_flops_of_a_tiny_network_match_a_hand_count():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    linear = nn.Linear(4 * 8 * 8, 5, bias=False)
    net = nn.Sequential(conv, nn.Flatten(), linear)
    x = torch.rand(2, 3, 8, 8)
    conv_flops = 2 * (2 * 8 * 8) * 4 * (3 * 3 * 3)   # 2 per multiply-add: B*H*W outputs x C_out x (C_in * k * k)
    linear_flops = 2 * 2 * (4 * 8 * 8) * 5           # B x in x out
    assert count_flops(lambda: net(x))[1] == conv_flops + linear_flops
    # backward: the weight gradients of both layers and the linear layer's input gradient (the image needs none)
    assert count_flops(lambda: net(x).sum().backward())[1] == 2 * conv_flops + 3 * linear_flops


def test_gpu_hours_and_the_gpu_table():
    a100 = GPUS["A100"]
    one_hour_bf16 = a100.bf16 * 1e12 * 0.4 * 3600
    assert gpu_hours(one_hour_bf16, a100, 1.0, 0.4) == pytest.approx(1.0)
    assert gpu_hours(one_hour_bf16, a100, 0.0, 0.4) == pytest.approx(a100.bf16 / a100.tf32)
    assert gpu_hours(one_hour_bf16, a100, 1.0, 0.8) == pytest.approx(0.5)
    assert [g.name for g in parse_gpus("a100,H100")] == ["A100", "H100"]
    assert GPUS["A100"].bf16 == 312 and GPUS["H100"].bf16 == 989 and all(g.source for g in GPUS.values())
    with pytest.raises(ValueError, match="unknown GPU.*known: A100"):
        parse_gpus("A100,V100")
    assert slope((2, 100.0), (4, 300.0)) == 100.0 and slope((1, 5.0), (2, 4.0)) == 0.0


def test_stand_in_has_the_black_box_geometry(tiny_blackbox_path):
    blackbox = BlackBox(f"ckpt:{tiny_blackbox_path}")
    stand_in = stand_in_blackbox(blackbox, 64)
    assert stand_in.feature_strides == blackbox.feature_strides
    assert stand_in.feature_channels == blackbox.feature_channels
    assert stand_in.num_classes == blackbox.num_classes
    assert torch.equal(stand_in.mean, blackbox.mean) and torch.equal(stand_in.std, blackbox.std)
    features = stand_in.features(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == blackbox.feature_channels


def test_config_kind(tmp_path):
    assert config_kind(TRAIN / "embedded_predictor_ct.yaml") == "fit"
    assert config_kind(ROOT / "configs" / "evaluate" / "embedded_evaluate.yaml") == "evaluate"
    odd = tmp_path / "odd.yaml"
    odd.write_text("seed: 1\n")
    with pytest.raises(ValueError, match="odd.yaml: neither a training config"):
        config_kind(odd)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        config_kind(tmp_path / "missing.yaml")


# -- training configs -------------------------------------------------------------------------------------
# Black-box passes of MaskPredictor._step, per image, read from the code: the clean pass (features and logits,
# no grad) + one masked batch per loss term that needs one (preserved image for Preservation, destroyed image for
# Destruction, the game's deletion and insertion images), all of which are back-propagated.
PREDICTOR_PASSES = {
    "embedded_predictor_ct.yaml": (2, 1),     # clean + preserved (CE only)
    "embedded_predictor_game.yaml": (3, 2),   # clean + deletion + insertion (no Preservation term)
    "embedded_mgnet.yaml": (3, 2),            # clean + preserved + destroyed (ce 0.3, bg 1)
}


@pytest.fixture(scope="module")
def training_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost_train")
    configs = [arg for name in PREDICTOR_PASSES for arg in ("--config", str(TRAIN / name))]
    report = main([*configs, "--out", str(out), "--measure_batch", "2", "--gpus", "A100,H100"])
    return out, report


def test_predictor_passes_per_step_match_the_training_step(training_report):
    _, report = training_report
    for entry in report["configs"]:
        measured = entry["measured"]
        forwards, backwards = PREDICTOR_PASSES[Path(entry["config"]).name]
        assert (measured["forwards_per_image"], measured["backwards_per_image"]) == (forwards, backwards)
        batch = measured["batch_size"]
        assert (measured["forwards_per_step"], measured["backwards_per_step"]) == (forwards * batch, backwards * batch)
        assert measured["flops_per_step"] == pytest.approx(measured["flops_per_image"] * batch)
        # the black box's passes are most of a step; the generator and the perturbations are the rest
        expected = forwards * measured["blackbox_forward_flops"] + backwards * measured["blackbox_backward_flops"]
        assert 0 < expected <= measured["flops_per_image"] * 1.0001
        assert measured["memory_per_image_bytes"] > 0
        hours = entry["gpu_hours"]["A100"]["epoch"]
        assert hours == pytest.approx(gpu_hours(measured["flops_per_image"] * 1_281_167, GPUS["A100"],
                                                measured["bf16_fraction"]))


def test_cost_writes_json_and_markdown(training_report):
    out, report = training_report
    saved = json.loads((out / "cost.json").read_text())
    assert saved["gpus"] == ["A100", "H100"] and saved["utilisation"] == 0.4
    assert [Path(c["config"]).name for c in saved["configs"]] == list(PREDICTOR_PASSES)
    text = (out / "cost.md").read_text()
    assert "| embedded_predictor_game.yaml |" in text and "A100 h / epoch" in text
    assert f"commit `{report['commit']}`" in text and "Command: `saliency-lab cost" in text


# -- evaluation configs -----------------------------------------------------------------------------------
def _evaluation_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_evaluate.yaml"
    path.write_text(
        "blackbox: {class_path: saliency_lab.core.blackbox.BlackBox, init_args: {model: embedded}}\n"
        "data: {class_path: saliency_lab.datamodules.ClutteredFashionMNISTDataModule, init_args: {image_size: 32}}\n"
        "explainers: [{name: rise, n_masks: 40}, gradient]\n"
        "num_images: 10\nbatch_size: 4\nsettings: {protocol: rise, road_fractions: [], mf_steps: 4}\n")
    return path


@pytest.mark.parametrize("limit", [0.0, 100.0], ids=["stand-in", "black-box"])
def test_evaluation_counts_rise_masks_and_gradient_passes(tmp_path, limit):
    config = _evaluation_config(tmp_path)
    report = main(["--config", str(config), "--out", str(tmp_path / "out"), "--predictors", "",
                   "--real_limit_gflops", str(limit), "--gpus", "A100"])
    measured = report["configs"][0]["measured"]
    methods = measured["methods"]
    assert (methods["rise"]["forwards"], methods["rise"]["backwards"]) == (40, 0)   # n_masks forwards per image
    assert (methods["gradient"]["forwards"], methods["gradient"]["backwards"]) == (1, 1)
    assert methods["rise"]["counted_on"] == ("stand-in" if limit == 0 else "black box")
    assert methods["rise"]["flops_per_image"] >= 40 * measured["forward_flops"]
    assert methods[SCORING]["forwards"] > 0 and methods[SCORING]["images"] == 20   # 2 methods x 10 images
    hours = report["configs"][0]["gpu_hours"]
    assert hours["rise"]["A100"] == pytest.approx(gpu_hours(methods["rise"]["flops_per_image"] * 10, GPUS["A100"],
                                                            methods["rise"]["bf16_fraction"]))
    text = (tmp_path / "out" / "cost.md").read_text()
    assert "## Evaluation: tiny_evaluate.yaml" in text and "| rise |" in text and "**total**" in text
