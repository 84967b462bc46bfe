"""core/adversarial.py: MI-FGSM reaches its goal within its L_inf budget, deterministically."""
from __future__ import annotations

import pytest
import torch

from saliency_lab.core.adversarial import mi_fgsm
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.datamodules import embedded_batch


@pytest.fixture(scope="module")
def embedded():
    blackbox = BlackBox("embedded", precision="32")
    images = embedded_batch(8)["image"]
    with torch.no_grad():
        predicted = blackbox(images).argmax(1)
    return blackbox, images, predicted


def test_untargeted_attack_flips_the_prediction_within_the_budget(embedded):
    blackbox, images, predicted = embedded
    eps = 8 / 255
    adversarial = mi_fgsm(blackbox, images, predicted, eps=eps, steps=10)
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        flipped = (blackbox(adversarial).argmax(1) != predicted).float().mean()
    assert flipped >= 0.75, flipped
    assert torch.equal(adversarial, mi_fgsm(blackbox, images, predicted, eps=eps, steps=10))  # deterministic


def test_targeted_attack_reaches_its_target(embedded):
    blackbox, images, predicted = embedded
    target = (predicted + 1) % blackbox.num_classes
    adversarial = mi_fgsm(blackbox, images, target, eps=16 / 255, steps=20, targeted=True)
    with torch.no_grad():
        reached = (blackbox(adversarial).argmax(1) == target).float().mean()
    assert reached >= 0.75, reached


def test_bad_settings_are_refused(embedded):
    blackbox, images, predicted = embedded
    with pytest.raises(ValueError, match="eps > 0"):
        mi_fgsm(blackbox, images, predicted, eps=0.0)


@pytest.mark.slow
def test_the_adversarial_experiment_writes_its_table(tmp_path):
    from experiments import adversarial

    result = adversarial.main(["--num_images", "6", "--methods", "gradient,rise", "--method_hparams",
                               '{"rise": {"n_masks": 16}}', "--out", str(tmp_path)])
    assert result["attacked"] >= 2 and set(result["methods"]) == {"gradient", "rise"}
    assert result["precision"] == "32"  # the default: the same numbers on every CPU
    for r in result["methods"].values():
        for score in ("insertion", "deletion"):
            s = r[score]
            assert 0.0 <= s["auroc_low"] <= s["auroc"] <= s["auroc_high"] <= 1.0
            assert s["difference_low"] <= s["difference"] <= s["difference_high"]
            assert len(s["per_scene_natural"]) == len(s["per_scene_adversarial"]) == result["attacked"]
            assert s["difference"] == pytest.approx(s["adversarial"] - s["natural"], abs=1e-6)
    assert "| gradient |" in (tmp_path / "adversarial.md").read_text()
    assert adversarial.auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.2]), higher_is_natural=True) == 1.0
    assert adversarial.auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.8]), higher_is_natural=False) == 1.0


def test_the_experiments_targeted_attack_reaches_drawn_targets_other_than_the_prediction(embedded):
    from experiments.adversarial import attack, attack_targets

    blackbox, images, predicted = embedded
    targets = attack_targets(predicted, blackbox.num_classes, seed=0)
    assert (targets != predicted).all() and targets.max() < blackbox.num_classes
    assert torch.equal(targets, attack_targets(predicted, blackbox.num_classes, seed=0))
    adversarial, natural, fooled, success = attack(blackbox, images, eps=16 / 255, steps=20, target_seed=0)
    assert torch.equal(natural, predicted)
    assert torch.equal(success, fooled == targets)
    assert success.float().mean() >= 0.75, success


def test_predictor_specs_name_the_checkpoints_method_or_another_trained_one(tiny_predictor_path, tmp_path):
    import shutil

    from experiments.adversarial import trained_method

    path = str(tiny_predictor_path)
    assert trained_method(path) == ("predictor_ct", path)
    lightning_name = str(shutil.copy(path, tmp_path / "epoch=0-step=300.ckpt"))
    assert trained_method(lightning_name) == ("predictor_ct", lightning_name)
    assert trained_method(f"predictor_ct_posthoc={path}") == ("predictor_ct_posthoc", path)
    with pytest.raises(SystemExit, match="'rise' is not a trained method"):
        trained_method(f"rise={path}")
    with pytest.raises(ValueError, match="unknown explainer 'nope'"):
        trained_method(f"nope={path}")


def test_score_summary_gives_paired_intervals_over_scenes():
    from experiments.adversarial import scene_resamples, score_summary

    natural = torch.linspace(0.5, 0.9, 40)
    shifted = score_summary(natural, natural + 0.1, higher_is_natural=True, draws=scene_resamples(40, 200, seed=0))
    assert shifted["difference"] == pytest.approx(0.1) and shifted["difference_low"] == pytest.approx(0.1)
    assert shifted["difference_high"] == pytest.approx(0.1)  # a constant shift has no spread
    assert shifted["auroc_low"] <= shifted["auroc"] <= shifted["auroc_high"] < 0.5  # adversarial scores higher
    separated = score_summary(natural, natural - 1.0, higher_is_natural=True, draws=scene_resamples(40, 200, seed=0))
    assert separated["auroc"] == separated["auroc_low"] == separated["auroc_high"] == 1.0
    noisy = torch.rand(40, generator=torch.Generator().manual_seed(1))
    again = score_summary(natural, noisy, True, scene_resamples(40, 200, seed=3))
    assert again == score_summary(natural, noisy, True, scene_resamples(40, 200, seed=3))  # seeded
    assert again["auroc_low"] < again["auroc"] < again["auroc_high"]


def test_the_experiment_refuses_no_resamples(capsys):
    from experiments import adversarial

    with pytest.raises(SystemExit):
        adversarial.main(["--resamples", "0"])
    assert "--resamples must be >= 1, got 0" in capsys.readouterr().err
