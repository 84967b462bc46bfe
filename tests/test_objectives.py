"""The mask predictor's loss terms (lightning_modules/objectives.py): configs, draws, and what each estimates."""
from __future__ import annotations

import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from saliency_lab.lightning_modules.objectives import (
    Area, AmortisedRISE, DeletionGame, Destruction, FastSHAP, InsertionGame, Objective, Preservation, Smoothness,
    TrainingBatch, build_objective, default_objectives, load_objectives)

SIZE, LOW = 32, 8


IMAGES = torch.rand(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def batch_of(scores: torch.Tensor, index=None, epoch=0, draw_seed=0) -> TrainingBatch:
    """A batch whose CT mask M^d = sigmoid(scores) (so its logit ranking scores are ``scores``), (B, 1, LOW, LOW);
    image b is IMAGES[index[b]]."""
    index = torch.arange(scores.shape[0]) if index is None else index
    images = IMAGES[index]
    mask_low = torch.sigmoid(scores)
    mask = F.interpolate(mask_low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return TrainingBatch(images, mask_low, mask, torch.zeros(len(index), dtype=torch.long), index, epoch, draw_seed,
                         "ct", torch.full((3, 1, 1), 0.5))


def logits_of(y: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose class-0 probability is ``y`` (B,)."""
    y = y.clamp(1e-6, 1 - 1e-6)
    return torch.stack([y.log(), (1 - y).log()], 1)


@pytest.mark.parametrize("term", [Preservation(0.3, loss="hinge"), Destruction(2.0, power=0.5), Area(8.0, power=0.3),
                                  Smoothness(0.5, "sum", 0.3), DeletionGame(protocols=["igos"], fraction_power=3.0),
                                  InsertionGame(substrates=["blur", "random"], grids=[0, 4, 8]),
                                  AmortisedRISE(samples=2, grid=4), FastSHAP(samples=3, grid=4)],
                         ids=lambda term: type(term).__name__)
def test_every_term_rebuilds_from_its_plain_config(term):
    config = term.config()
    assert all(isinstance(v, (int, float, str, list)) for v in config["init_args"].values()), config
    assert build_objective(config).config() == config


def test_configs_refuse_what_is_not_a_loss_term(tmp_path):
    with pytest.raises(ValueError, match="not a loss term"):
        build_objective({"class_path": "torch.nn.Linear", "init_args": {}})
    with pytest.raises(ValueError, match="no loss term 'saliency_lab.nothing.Here'"):
        build_objective({"class_path": "saliency_lab.nothing.Here"})
    with pytest.raises(ValueError, match="weight must be >= 0"):
        Area(-1.0)
    listed = tmp_path / "one.yaml"
    listed.write_text("class_path: saliency_lab.lightning_modules.objectives.Area\n")
    with pytest.raises(ValueError, match="one.yaml: expected a list"):
        load_objectives(listed)
    assert [type(o) for o in default_objectives("mgnet")] == [Preservation, Area, Smoothness, Destruction]
    assert [type(o) for o in default_objectives("ct")] == [Preservation]
    assert issubclass(AmortisedRISE, Objective) and issubclass(FastSHAP, Objective)


@pytest.mark.parametrize("term", [AmortisedRISE(samples=3, grid=4), FastSHAP(samples=2, grid=4),
                                  DeletionGame(grids=[0, 2, 4], substrates=["mean", "blur", "random"])],
                         ids=lambda term: type(term).__name__)
def test_per_image_draws_do_not_depend_on_the_batch(term):
    scores = torch.randn(6, 1, LOW, LOW, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([5, 9, 2, 7, 1, 3])
    together = torch.stack(term.perturbations(batch_of(scores, index))[0], 1)
    alone = torch.cat([torch.stack(term.perturbations(batch_of(scores[i:i + 1], index[i:i + 1]))[0], 1)
                       for i in range(6)])
    torch.testing.assert_close(together, alone)
    again = torch.stack(term.perturbations(batch_of(scores, index, epoch=1))[0], 1)
    assert not torch.equal(together, again)  # fresh draws every epoch


def test_amortised_rise_masks_are_rise_masks():
    term = AmortisedRISE(samples=64, grid=4, keep_prob=0.3)
    masks = term.keep_masks(batch_of(torch.zeros(4, 1, LOW, LOW)))
    assert masks.shape == (64, 4, 1, SIZE, SIZE) and masks.min() >= 0 and masks.max() <= 1 + 1e-6
    assert abs(masks.mean().item() - 0.3) < 0.05
    # bilinear upsampling of binary cells with a random shift: smooth ramps, not only 0 and 1
    assert ((masks > 0.05) & (masks < 0.95)).float().mean() > 0.2


def test_fastshap_coalitions_follow_the_shapley_kernel_and_come_in_pairs():
    term = FastSHAP(samples=200, grid=3)  # d = 9 players
    z = term.coalitions(batch_of(torch.zeros(40, 1, LOW, LOW)))
    sizes = z.sum(-1).flatten().long()
    d = 9
    kernel = torch.tensor([(d - 1) / (k * (d - k)) for k in range(1, d)])
    expected = kernel / kernel.sum() * sizes.numel()
    observed = torch.bincount(sizes, minlength=d)[1:d].float()
    assert sizes.min() >= 1 and sizes.max() <= d - 1
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3
    masks = term.keep_masks(batch_of(torch.zeros(2, 1, LOW, LOW)))
    half = masks.shape[0] // 2
    torch.testing.assert_close(masks[:half] + masks[half:], torch.ones_like(masks[:half]))  # z and 1 - z


def expected_target(term, value_of_masks, steps=100) -> torch.Tensor:
    """E[T] per unit (N,), averaged over ``steps`` epochs' draws for one image, against a black box whose class
    probability of a kept image is ``value_of_masks(keep masks (P, 1, SIZE, SIZE)) -> (P,)``."""
    total = 0
    for step in range(steps):
        batch = batch_of(torch.zeros(1, 1, LOW, LOW), torch.tensor([0]), epoch=step)
        _, masks = term.perturbations(batch)
        total = total + term.target(batch, [logits_of(value_of_masks(m)) for m in masks], masks)[0]
    return total / steps


def test_the_sampled_value_is_lowest_at_the_standardised_target():
    """-mean(Ŝ T) over standardised Ŝ is minimised by Ŝ proportional to T (Cauchy-Schwarz): the loss's optimum is the
    attribution the target estimates, whatever its scale and shift."""
    term = AmortisedRISE(samples=2, grid=4)
    batch = batch_of(torch.zeros(1, 1, LOW, LOW))
    _, masks = term.perturbations(batch)
    logits = [logits_of(m[:, 0, :8, :8].mean((1, 2))) for m in masks]
    target = term.target(batch, logits, masks)

    def value(scores):
        return term.value(batch_of(scores.view(1, 1, LOW, LOW)), logits, masks).item()

    best = value(3 * target + 1)  # any positive scale and shift of the target
    shuffled = target[0, torch.randperm(LOW * LOW, generator=torch.Generator().manual_seed(0))]
    assert best < value(shuffled) and best < value(target + 0.1 * torch.randn(target.shape))
    assert best == pytest.approx(value(target), abs=1e-6)


def test_amortised_rise_learns_where_the_class_evidence_is():
    """A black box that sees the class in the top-left quarter only: RISE's expectation E[y M_i] is largest
    there."""
    def evidence(masks):
        return masks[:, 0, :SIZE // 2, :SIZE // 2].mean((1, 2))

    target = expected_target(AmortisedRISE(samples=8, grid=4), evidence).view(LOW, LOW)
    inside = target[:LOW // 2, :LOW // 2]
    outside = torch.cat([target[LOW // 2:].flatten(), target[:LOW // 2, LOW // 2:].flatten()])
    assert inside.mean() > outside.mean() + 0.02 and inside.min() > outside.median(), target


def test_fastshap_recovers_the_shapley_values_of_an_additive_game():
    """For v(z) = sum_i w_i z_i the Shapley values are w: the target's cells follow w."""
    grid = 4
    weights = torch.linspace(0, 1, grid * grid)[torch.randperm(grid * grid, generator=torch.Generator().manual_seed(3))]

    def additive(masks):
        cells = F.adaptive_avg_pool2d(masks, grid).flatten(1)
        return 0.05 + 0.9 * (cells * weights).sum(1) / weights.sum()

    target = expected_target(FastSHAP(samples=16, grid=grid), additive, steps=200)
    rho = scipy.stats.spearmanr(target.numpy(), weights.numpy()).statistic
    assert rho > 0.9, (rho, target, weights)


def test_the_game_over_drawn_grids_selects_whole_cells():
    term = DeletionGame(grids=[4], temperature=1e-4)
    scores = torch.randn(3, 1, LOW, LOW, generator=torch.Generator().manual_seed(0))
    batch = batch_of(scores)
    soft = term.grid_game(batch, torch.full((3,), 0.25))
    cells = soft.view(3, 1, 4, SIZE // 4, 4, SIZE // 4)
    assert torch.allclose(cells, cells[:, :, :, :1, :, :1].expand_as(cells))  # constant over each 8 x 8 cell
    assert soft.flatten(1).mean(1).tolist() == pytest.approx([0.25] * 3, abs=1e-3)  # 4 of the 16 cells
