"""The held-out perturbation families (docs/heldout.md): declared as metric presets with the documented parameters,
scored by evaluate, and never named by a training config or accepted by a training objective."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from saliency_lab.core.perturbation import fixed_noise, make_substrate
from saliency_lab.metrics import HELDOUT_PRESETS, make_protocol

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "src" / "saliency_lab" / "configs"


def test_presets_have_the_documented_parameters():
    noise = make_protocol("noise", 64)
    assert (noise.units, noise.steps, noise.deletion_substrate, noise.insertion_substrate) == ("pixel", 64, "noise", "noise")
    wide = make_protocol("blur_wide", 64)
    assert (wide.blur_kernel, round(wide.blur_sigma, 2), wide.deletion_substrate) == (15, 3.43, "blur")
    assert make_protocol("blur_wide", 224).blur_sigma == 12.0 and make_protocol("blur_wide", 224).blur_kernel == 49
    grid = make_protocol("grid16", 64)
    igos = make_protocol("igos", 64)
    assert grid.units == 16 and make_protocol("grid16", 224).units == 56
    assert (grid.blur_kernel, grid.blur_sigma, grid.steps, grid.upsample) == (
        igos.blur_kernel, igos.blur_sigma, igos.steps, igos.upsample)
    assert set(HELDOUT_PRESETS) == {"noise", "blur_wide", "grid16"}
    assert all(f"`{name}`" in (ROOT / "docs" / "heldout.md").read_text() for name in (*HELDOUT_PRESETS, "road"))


def test_the_noise_substrate_is_one_fixed_image_independent_of_the_batch():
    images = torch.rand(3, 3, 16, 16)
    substrate = make_substrate("noise", images)
    assert torch.equal(substrate[0], substrate[2]) and 0 <= substrate.min() and substrate.max() <= 1
    assert torch.equal(make_substrate("noise", images[:1])[0], substrate[0])
    assert torch.equal(fixed_noise(images[:1]), fixed_noise(images[:1]))


def _training_configs() -> list[Path]:
    """Every config ``saliency-lab fit`` reads: configs/model/* and configs/train/** (the parts they include)."""
    return sorted((CONFIGS / "model").glob("*.yaml")) + sorted((CONFIGS / "train").rglob("*.yaml")) + sorted(
        (CONFIGS / "objectives").glob("*.yaml"))


HELDOUT_MARKERS = re.compile(r"\b(noise|blur_wide|grid16|road)\b|\bunits:\s*(16|56)\b|blur_sigma:\s*(12|3\.4)"
                             r"|\bgrids?:[^#]*\b16\b")


def test_no_training_config_names_a_held_out_family():
    configs = _training_configs()
    assert len(configs) >= 10  # the filter, classifier and predictor configs, embedded and ImageNet
    offending = {}
    for path in configs:
        values = [line.split("#", 1)[0] for line in path.read_text().splitlines()]  # comments may explain
        hits = [line.strip() for line in values if HELDOUT_MARKERS.search(line)]
        if hits:
            offending[path.name] = hits
    assert not offending, offending


@pytest.mark.parametrize("family", HELDOUT_PRESETS)
def test_the_training_objective_refuses_a_held_out_family(tiny_blackbox_path, family):
    from saliency_lab.lightning_modules.objectives import DeletionGame, FastSHAP, InsertionGame

    for game in (DeletionGame, InsertionGame):
        with pytest.raises(ValueError, match="held-out perturbation families"):
            game(protocols=["rise", family])
    with pytest.raises(ValueError, match="held-out"):  # the grid16 family's cells
        DeletionGame(grids=[0, 8, 16])
    with pytest.raises(ValueError, match="held-out"):
        FastSHAP(grid=16)
