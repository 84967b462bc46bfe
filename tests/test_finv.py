"""Feature Inversion: stage 1 reduces the feature-reconstruction error, stage 2 stays inside the stage-1 mask,
the guide maps and masks follow their definitions, exact cost."""
from __future__ import annotations

import pytest
import torch

from saliency_lab import explainers
from saliency_lab.explainers.finv import feature_error, guide_maps, guided_mask
from saliency_lab.core.blackbox import BlackBox


@pytest.fixture(scope="module")
def blackbox():
    torch.manual_seed(0)
    return BlackBox("timm:resnet10t", num_classes=5, model_kwargs={"channels": [8, 16, 24, 32]})


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))


def test_stage_one_reduces_the_feature_reconstruction_error(blackbox, images):
    explainer = explainers.build("finv", blackbox, class_iterations=0, record_errors=True)
    explainer(images, torch.tensor([0, 1, 2]))
    errors = explainer.last_inversion_errors
    assert errors.shape == (3, 10 + 1) and (errors >= 0).all()
    assert (errors[:, -1] < 0.9 * errors[:, 0]).all(), errors
    # With no area price the inversion only chases the error, and gets closer still.
    free = explainers.build("finv", blackbox, class_iterations=0, record_errors=True, l1=0.0)
    free(images, torch.tensor([0, 1, 2]))
    assert (free.last_inversion_errors[:, -1] <= errors[:, -1] + 1e-6).all()


def test_class_mask_lies_inside_the_stage_one_mask(blackbox, images):
    targets = torch.tensor([0, 1, 2])
    # Without stage-2 steps the gate stays at its start s = sigmoid(0) = 0.5: the map is m1 / 2.
    untrained_gate = explainers.build("finv", blackbox, class_iterations=0)(images, targets)
    stage_one = 2 * untrained_gate
    both = explainers.build("finv", blackbox, class_iterations=5)
    saliency = both(images, targets)
    assert saliency.min() >= 0 and (saliency <= stage_one + 1e-6).all()
    assert not torch.allclose(saliency, untrained_gate, atol=1e-3), "stage 2 moved away from s = 0.5"
    assert (both.cost.forwards, both.cost.backwards) == (3 * (1 + 10 + 2 * 5), 3 * (10 + 2 * 5))


def test_guide_maps_masks_and_error():
    features = torch.tensor([[[[1.0, -2.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    guide = guide_maps(features)
    assert torch.allclose(guide[0, 0], torch.tensor([[1 / 3, 0.0], [1.0, 0.0]])) and (guide[0, 1] == 0).all()
    mask = guided_mask(torch.tensor([[2.0, 5.0]]), torch.tensor([-1.0]), guide)
    assert mask.shape == (1, 1, 2, 2)
    assert torch.allclose(mask[0, 0], torch.sigmoid(2 * guide[0, 0] - 1))
    reference = torch.ones(2, 4)
    assert torch.allclose(feature_error(torch.zeros(2, 4), reference), torch.ones(2))
    assert torch.allclose(feature_error(reference, reference), torch.zeros(2))


def test_needs_features_and_valid_levels(blackbox):
    class LogitsOnly(torch.nn.Module):
        num_classes = 2

        def logits(self, x):
            return x.mean((1, 2, 3))[:, None].repeat(1, 2)

    with pytest.raises(TypeError, match="feature levels"):
        explainers.build("finv", LogitsOnly())
    with pytest.raises(ValueError, match="guide_level"):
        explainers.build("finv", blackbox, guide_level=7)
    with pytest.raises(ValueError, match="inversion_iterations"):
        explainers.build("finv", blackbox, inversion_iterations=-1)
