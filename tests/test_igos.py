"""iGOS++ / I-GOS specifics: the objective and direction against the equations, a toy model with a known
answer, batch independence, the per-image line search, exact cost formulas, NAG, BTV symmetry, validation,
the iGOS++ paper's ablations (insertion-only and naive I-GOS + insertion objectives, the Mx / My / Mx*My
outputs, plain TV instead of BTV), and a Lightning validation loop through ExplainerEvaluation."""
from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from saliency_lab import explainers
import saliency_lab.explainers.igos  # noqa: F401  registers igos_pp, igos and their ablations
from saliency_lab.explainers.igos import BTV_SIGMA, NOISE_STD, bilateral_total_variation, bilateral_weights, tv_norm
from saliency_lab.core.perturbation import gaussian_blur, perturb, scaled_blur
from saliency_lab.core.seeding import derive_seeds

SIZE = 32
REGION = (slice(8, 20), slice(12, 24))  # what the toy black box looks at
TINY = {"iterations": 3, "ig_steps": 4, "resolution": 8, "scale_with_image": False}


class RegionBox(nn.Module):
    """Class 0's logit = gain * (mean over REGION of channel 0, 3x3 box-filtered, - offset); class 1's = 0.

    So p_0 is the fraction of the region's brightness preserved, squashed. Records the rows of every forward.
    """

    num_classes = 2

    def __init__(self, offset: float, gain: float = 60.0):
        super().__init__()
        self.register_buffer("kernel", torch.full((1, 1, 3, 3), 1 / 9))
        self.offset, self.gain = offset, gain
        self.rows: list[int] = []

    def logits(self, x):
        self.rows.append(x.shape[0])
        region = F.conv2d(x[:, :1], self.kernel, padding=1)[:, 0, REGION[0], REGION[1]].mean(dim=(1, 2))
        score = self.gain * (region - self.offset)
        return torch.stack([score, torch.zeros_like(score)], dim=1)

    def forward(self, x):  # the metrics call the model itself
        return self.logits(x)


def scenes(count: int) -> torch.Tensor:
    """Channel 0: a bright REGION on a dim textured background (different per image); 1, 2: smooth ramps."""
    images = torch.empty(count, 3, SIZE, SIZE)
    for b in range(count):
        texture = torch.rand(1, 1, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(b))
        images[b, 0] = 0.25 * F.interpolate(texture, size=(SIZE, SIZE), mode="bilinear")[0, 0]
    images[:, 0, REGION[0], REGION[1]] = 1.0
    images[:, 1] = torch.linspace(0, 1, SIZE).view(1, 1, -1)
    images[:, 2] = torch.linspace(0, 1, SIZE).view(1, -1, 1)
    return images


def region_box(images: torch.Tensor) -> RegionBox:
    """A RegionBox whose offset lies halfway between the images' and their (iGOS baseline) blur's region mean,
    so deleting the region flips the class."""
    kernel, sigma = scaled_blur(51, 50.0, SIZE)
    probe = RegionBox(0.0, gain=1.0)
    clean, blurred = probe.logits(images)[:, 0].mean(), probe.logits(gaussian_blur(images, kernel, sigma))[:, 0].mean()
    return RegionBox(float(clean + blurred) / 2)


def region_contrast(saliency: torch.Tensor) -> torch.Tensor:
    """(B,): mean saliency inside REGION minus mean outside."""
    inside = torch.zeros_like(saliency, dtype=torch.bool)
    inside[..., REGION[0], REGION[1]] = True
    flat, where = saliency.flatten(1), inside.flatten(1)
    return (flat * where).sum(1) / where.sum(1) - (flat * ~where).sum(1) / (~where).sum(1)


# ---------------------------------------------------------------------------------------------------------
# Settings


def test_defaults_grid_scaling_and_l1_rule():
    box = RegionBox(0.5)
    pp = explainers.build("igos_pp", box)
    hp = pp.hparams
    assert (hp["resolution"], hp["iterations"], hp["ig_steps"], hp["l1"], hp["l2"]) == (28, 15, 20, None, 20.0)
    assert (hp["btv_beta"], hp["btv_sigma"], hp["btv_mix"], hp["noise_std"]) == (2.0, BTV_SIGMA, 0.5, NOISE_STD)
    assert (hp["ls_alpha0"], hp["ls_shrink"], hp["ls_c"], hp["ls_min_alpha"]) == (1000.0, 0.2, 1e-4, 1e-5)
    assert (hp["blur_kernel"], hp["blur_sigma"], hp["optimizer"]) == (51, 50.0, "line_search")
    assert hp["model_grad_scale"] == 0.5
    assert BTV_SIGMA == pytest.approx(0.1 * 0.226, abs=1e-4) and NOISE_STD == pytest.approx(0.2 * 0.226, abs=1e-3)
    assert explainers.build("igos", box).hparams["model_grad_scale"] == 1.0
    assert pp.max_trials == 13  # 1000 * 0.2^k for k = 0..11 are >= 1e-5, then one below
    assert pp.points_per_evaluation == 80 and explainers.build("igos", box).points_per_evaluation == 20
    # r given at 224 and scaled: 8 px cells stay 8 px cells (the igos causal protocol's rule).
    assert pp.grid_size(224, 224) == (28, 28) and pp.grid_size(64, 64) == (8, 8) and pp.grid_size(64, 32) == (8, 4)
    assert explainers.build("igos_pp", box, resolution=7).grid_size(64, 64) == (2, 2)
    assert pp.l1_weight((8, 8), (64, 64)) == 1.0
    full = explainers.build("igos_pp", box, resolution="full")
    assert full.grid_size(64, 48) == (64, 48) and full.l1_weight((64, 48), (64, 48)) == 10.0
    absolute = explainers.build("igos", box, resolution=6, scale_with_image=False)
    assert absolute.grid_size(64, 64) == (6, 6)
    with pytest.raises(ValueError, match="finer than the image"):
        absolute(torch.rand(1, 3, 4, 4), torch.zeros(1, dtype=torch.long))


def test_noise_and_btv_sigma_use_the_black_box_own_std(tiny_blackbox_path):
    """The released code's normalised-unit constants (noise 0.2, BTV s = 0.01 = sigma^2) are converted with the
    black box's std: 0.25 for the embedded one, not ImageNet's 0.226."""
    from saliency_lab.core.blackbox import BlackBox

    embedded = BlackBox(f"ckpt:{tiny_blackbox_path}")  # std 0.25 per channel, like assets/embedded_blackbox.pt
    hp = explainers.build("igos_pp", embedded).hparams
    assert hp["noise_std"] == pytest.approx(0.2 * 0.25) and hp["btv_sigma"] == pytest.approx(0.1 * 0.25)
    assert explainers.build("igos", embedded).hparams["noise_std"] == pytest.approx(0.05)
    imagenet = BlackBox("timm:resnet10t", num_classes=3, model_kwargs={"channels": [8, 16, 24, 32]})
    hp = explainers.build("igos_pp", imagenet).hparams
    assert hp["noise_std"] == pytest.approx(0.2 * 0.226, abs=1e-6) and hp["btv_sigma"] == pytest.approx(0.0226, abs=1e-6)
    given = explainers.build("igos_pp", embedded, noise_std=0.1, btv_sigma=0.03).hparams  # explicit: pixel units
    assert (given["noise_std"], given["btv_sigma"]) == (0.1, 0.03)


@pytest.mark.parametrize("name, bad, message", [
    ("igos_pp", {"resolution": 1}, "resolution"),
    ("igos_pp", {"resolution": "half"}, "resolution"),
    ("igos", {"resolution": True}, "resolution"),
    ("igos_pp", {"scale_with_image": 1}, "scale_with_image"),
    ("igos_pp", {"iterations": 0}, "iterations"),
    ("igos", {"ig_steps": 2.5}, "ig_steps"),
    ("igos_pp", {"l1": -1.0}, "l1 and l2"),
    ("igos", {"l2": -1.0}, "l1 and l2"),
    ("igos_pp", {"noise_std": -0.1}, "noise_std"),
    ("igos_pp", {"optimizer": "adam"}, "unknown optimizer"),
    ("igos_pp", {"ls_alpha0": 0.0}, "line search"),
    ("igos_pp", {"ls_shrink": 1.0}, "line search"),
    ("igos", {"ls_c": -1e-4}, "line search"),
    ("igos_pp", {"ls_min_alpha": 0.0}, "line search"),
    ("igos_pp", {"nag_step": -1.0}, "nag_step"),
    ("igos_pp", {"blur_kernel": 50}, "blur_kernel"),
    ("igos", {"blur_sigma": 0.0}, "blur_kernel"),
    ("igos_pp", {"model_grad_scale": 0.0}, "model_grad_scale"),
    ("igos_pp", {"btv_beta": 0.5}, "btv_beta"),
    ("igos_pp", {"btv_sigma": 0.0}, "btv_sigma"),
    ("igos_pp", {"btv_mix": 1.5}, "btv_mix"),
    ("igos", {"tv_beta": 0.5}, "tv_beta"),
    ("igos_pp", {"smoothness": "bilateral_tv"}, "smoothness"),
    ("igos_pp", {"mask": "xx"}, "mask"),
    ("igos_pp_insertion", {"btv_mix": -0.5}, "btv_mix"),
    ("igos_naive_insertion", {"tv_beta": 0.5}, "tv_beta"),
])
def test_hyperparameter_validation(name, bad, message):
    with pytest.raises(ValueError, match=message):
        explainers.build(name, RegionBox(0.5), **bad)


def test_unknown_hyperparameters_are_refused():
    with pytest.raises(TypeError, match=r"unknown hyper-parameters \['btv_sigma'\].*tv_beta"):
        explainers.build("igos", RegionBox(0.5), btv_sigma=0.1)  # BTV belongs to iGOS++ only


# ---------------------------------------------------------------------------------------------------------
# Regularisers


def test_bilateral_weights_are_the_same_formula_in_both_directions():
    images = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    vertical, horizontal = bilateral_weights(images, 0.3)
    t_vertical, t_horizontal = bilateral_weights(images.transpose(-1, -2), 0.3)
    assert torch.allclose(t_vertical, horizontal.transpose(-1, -2))
    assert torch.allclose(t_horizontal, vertical.transpose(-1, -2))
    masks = torch.rand(2, 1, 9, 7, generator=torch.Generator().manual_seed(1))
    direct = bilateral_total_variation(masks, (vertical, horizontal))
    transposed = bilateral_total_variation(masks.transpose(-1, -2), (t_vertical, t_horizontal))
    assert torch.allclose(direct, transposed)
    # A grey step of height d across rows gets exp(-d^2 / sigma^2) on its row boundary, 1 elsewhere.
    step = torch.zeros(1, 3, 4, 4)
    step[:, :, 2:] = 0.02
    vertical, horizontal = bilateral_weights(step, BTV_SIGMA)
    assert torch.allclose(vertical[0, 0, 1], torch.full((4,), torch.tensor(-(0.02 / BTV_SIGMA) ** 2).exp().item()))
    assert torch.equal(vertical[0, 0, [0, 2]], torch.ones(2, 4)) and torch.equal(horizontal, torch.ones(1, 1, 4, 3))


def test_total_variation_by_hand():
    mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(1, 1, 2, 2)
    # vertical pairs: (0,1), (1,1) -> mean of squares 0.5; horizontal: (0,1), (1,1) -> 0.5.
    assert tv_norm(mask).item() == pytest.approx(1.0)
    assert tv_norm(mask, beta=1.0).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# The objective and its direction, against an independent transcription of the equations


def _explicit_objective(name, explainer, box, images, blur, targets, masks):
    """(model terms (B,), regulariser (B,)) straight from docs/methods.md §2, with phi = perturb, no noise."""
    n, size = explainer.ig_steps, images.shape[-2:]

    def score(first, second, mask):  # (1/n) sum_k p_c(phi(first, second, k/n * mask))
        total = 0
        for k in range(1, n + 1):
            probs = box.logits(perturb(first, k / n * mask, second)).softmax(1)
            total = total + probs.gather(1, targets[:, None]).squeeze(1)
        return total / n

    def tv(m):
        return ((m[..., 1:, :] - m[..., :-1, :]) ** 2).flatten(1).mean(1) + \
               ((m[..., :, 1:] - m[..., :, :-1]) ** 2).flatten(1).mean(1)

    up = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    if name in ("igos", "igos_naive_insertion"):  # one mask, I-GOS's regulariser
        l1_tv = 1.0 * (1 - masks).abs().flatten(1).mean(1) + explainer.l2 * tv(masks)
        if name == "igos":
            return score(images, blur, up), l1_tv
        return score(images, blur, up) - score(blur, images, up), l1_tv  # + an insertion term on the same mask
    if name == "igos_pp_insertion":  # the insertion term alone, iGOS++'s regulariser on the one mask
        model, combined = -score(blur, images, up), masks
    else:
        mx, my = up[:, :1], up[:, 1:]
        model = (score(images, blur, mx) - score(blur, images, my)
                 + score(images, blur, mx * my) - score(blur, images, mx * my))
        combined = masks[:, :1] * masks[:, 1:]
    big = F.interpolate(combined, size=size, mode="bilinear", align_corners=False)
    sigma2 = explainer.btv_sigma ** 2 if explainer.smoothness == "bilateral" else float("inf")  # plain: w = 1
    w_v = (-((images[..., 1:, :] - images[..., :-1, :]) ** 2).mean(1, keepdim=True) / sigma2).exp()
    w_h = (-((images[..., :, 1:] - images[..., :, :-1]) ** 2).mean(1, keepdim=True) / sigma2).exp()
    btv = (w_v * (big[..., 1:, :] - big[..., :-1, :]) ** 2).flatten(1).mean(1) + \
          (w_h * (big[..., :, 1:] - big[..., :, :-1]) ** 2).flatten(1).mean(1)
    regulariser = 1.0 * (1 - combined).abs().flatten(1).mean(1) + explainer.l2 * (0.5 * tv(combined) + 0.5 * btv)
    return model, regulariser


@pytest.mark.parametrize("name, extra", [("igos_pp", {}), ("igos", {}), ("igos_pp", {"smoothness": "plain"}),
                                         ("igos_pp_insertion", {}), ("igos_naive_insertion", {})])
def test_objective_and_direction_follow_the_equations(name, extra):
    images = scenes(2)
    box = region_box(images)
    targets = torch.tensor([0, 1])
    explainer = explainers.build(name, box, **TINY, **extra, noise_std=0.0, max_forward_batch=7)
    batch = explainer._prepare(images, targets, derive_seeds(0, torch.arange(2)))
    masks = 0.2 + 0.8 * torch.rand(2, explainer._MASKS, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        objective = explainer._objective(batch, masks, torch.arange(2))
    leaf = masks.clone().requires_grad_(True)
    model, regulariser = _explicit_objective(name, explainer, box, images, batch.blur, targets, leaf)
    assert torch.allclose(objective, (model + regulariser).detach(), rtol=1e-5, atol=1e-6)
    (model_grad,) = torch.autograd.grad(model.sum(), leaf)
    (reg_grad,) = torch.autograd.grad(regulariser.sum(), leaf)
    with torch.enable_grad():
        direction = explainer._direction(batch, masks)
    expected = explainer.model_grad_scale * model_grad + reg_grad
    assert model_grad.abs().max() > 1e-3  # the toy model's terms really contribute
    assert torch.allclose(direction, expected, rtol=1e-4, atol=1e-6 * expected.abs().max())
    # The released code's halving of the model terms (igos_pp, kept by its insertion-only ablation) is the
    # default; the paper's Eq. 6 (and I-GOS) is 1.
    assert explainer.model_grad_scale == (0.5 if name.startswith("igos_pp") else 1.0)


# ---------------------------------------------------------------------------------------------------------
# The paper's ablations: Table 3's objectives, Table 5's masks, BTV against plain TV


def _ig_score(box, first, second, mask, targets, n):
    """(1/n) sum_k p_c(phi(first, second, k/n * mask)) (B,), no noise: one IG score by hand."""
    return sum(box.logits(perturb(first, k / n * mask, second)).softmax(1).gather(1, targets[:, None]).squeeze(1)
               for k in range(1, n + 1)) / n


def _setup(name, **extra):
    images, targets = scenes(2), torch.tensor([0, 1])
    box = region_box(images)
    explainer = explainers.build(name, box, **TINY, **extra, noise_std=0.0, max_forward_batch=7)
    batch = explainer._prepare(images, targets, derive_seeds(0, torch.arange(2)))
    masks = 0.2 + 0.8 * torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    return images, targets, box, explainer, batch, masks


def test_insertion_only_objective_has_no_deletion_term():
    """igos_pp_insertion: L = -ins(M) + R(M), nothing else; a deletion term of either sign would show."""
    images, targets, box, explainer, batch, masks = _setup("igos_pp_insertion")
    assert [deletion for _, deletion in explainer._TERMS] == [False] and explainer.points_per_evaluation == 4
    up = F.interpolate(masks, size=images.shape[-2:], mode="bilinear", align_corners=False)
    n = explainer.ig_steps
    insertion = _ig_score(box, batch.blur, images, up, targets, n)
    deletion = _ig_score(box, images, batch.blur, up, targets, n)
    assert deletion.abs().min() > 0.05  # the term that is absent is not negligible here
    with torch.no_grad():
        objective = explainer._objective(batch, masks, torch.arange(2))
        regulariser = explainer._regulariser(batch, masks, torch.arange(2))
    assert torch.allclose(objective, -insertion + regulariser, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(objective, deletion - insertion + regulariser, atol=1e-3)
    # The same regulariser as iGOS++ on Mx * My with Mx = 1 (iGOS++'s BTV mix on the one mask).
    full = explainers.build("igos_pp", box, **TINY, noise_std=0.0)
    both = torch.cat([torch.ones_like(masks), masks], dim=1)
    assert torch.allclose(full._regulariser(full._prepare(images, targets, derive_seeds(0, torch.arange(2))), both,
                                            torch.arange(2)), regulariser)


def test_naive_insertion_is_igos_plus_an_integrated_insertion_term():
    """igos_naive_insertion: I-GOS's objective minus ins(M) on the same mask; the insertion direction is the
    integrated gradient along k/n * M, not the plain gradient at M."""
    images, targets, box, explainer, batch, masks = _setup("igos_naive_insertion")
    igos = explainers.build("igos", box, **TINY, noise_std=0.0, max_forward_batch=7)
    size, n, ids = images.shape[-2:], explainer.ig_steps, torch.arange(2)
    leaf = masks.clone().requires_grad_(True)
    insertion = _ig_score(box, batch.blur, images, F.interpolate(leaf, size=size, mode="bilinear"), targets, n)
    (integrated,) = torch.autograd.grad(insertion.sum(), leaf)
    with torch.no_grad():
        assert torch.allclose(explainer._objective(batch, masks, ids),
                              igos._objective(batch, masks, ids) - insertion.detach(), rtol=1e-5, atol=1e-6)
    with torch.enable_grad():
        direction, igos_direction = explainer._direction(batch, masks), igos._direction(batch, masks)
    assert explainer.model_grad_scale == igos.model_grad_scale == 1.0
    assert torch.allclose(direction, igos_direction - integrated, rtol=1e-4, atol=1e-6 * direction.abs().max())
    # The plain gradient of p_c(phi(B, I, M)) at M itself is another direction.
    leaf = masks.clone().requires_grad_(True)
    plain = box.logits(perturb(batch.blur, F.interpolate(leaf, size=size, mode="bilinear"), images)).softmax(1)
    (plain_grad,) = torch.autograd.grad(plain.gather(1, targets[:, None]).sum(), leaf)
    assert integrated.abs().max() > 1e-3
    assert not torch.allclose(direction, igos_direction - plain_grad, atol=0.1 * integrated.abs().max())


def test_mask_option_returns_the_combined_map_or_either_component():
    """mask: "xy" (default) is the output before the option existed, 1 - up(Mx * My), bit for bit; "x" / "y"
    return 1 - up(Mx) / 1 - up(My) of the very same optimisation."""
    images, targets, indices = scenes(2), torch.tensor([0, 1]), torch.tensor([3, 5])
    box = region_box(images)
    size, seeds = images.shape[-2:], derive_seeds(4, indices)
    reference = explainers.build("igos_pp", box, **TINY, seed=4)
    masks = reference._optimise(images, targets, seeds)  # (B, 2, h, w): Mx, My
    assert masks.shape == (2, 2, 8, 8) and not torch.equal(masks[:, 0], masks[:, 1])
    expected = {"xy": 1 - F.interpolate(masks[:, :1] * masks[:, 1:], size=size, mode="bilinear"),
                "x": 1 - F.interpolate(masks[:, :1], size=size, mode="bilinear"),
                "y": 1 - F.interpolate(masks[:, 1:], size=size, mode="bilinear")}
    assert torch.equal(reference(images, targets, indices), expected["xy"])  # the default
    for mask, maps in expected.items():
        explainer = explainers.build("igos_pp", box, **TINY, seed=4, mask=mask)
        assert torch.equal(explainer(images, targets, indices), maps), mask
        assert explainer.cost == reference.cost and torch.equal(explainer.last_trials, reference.last_trials)
    with pytest.raises(ValueError, match="mask must be one of"):
        explainers.build("igos_pp", box, mask="z")


def test_plain_smoothness_is_bilateral_tv_with_unit_weights():
    """smoothness="plain" replaces every bilateral weight by 1: the same maps as BTV with sigma -> infinity
    (exp(-dI^2 / sigma^2) == 1 in float32), other maps than BTV on a textured image."""
    images, targets = scenes(2), torch.tensor([0, 0])
    box = region_box(images)
    plain = explainers.build("igos_pp", box, **TINY, smoothness="plain")(images, targets)
    flat = explainers.build("igos_pp", box, **TINY, btv_sigma=1e6)(images, targets)
    bilateral = explainers.build("igos_pp", box, **TINY)(images, targets)
    assert torch.equal(plain, flat)
    assert (plain - bilateral).abs().max() > 1e-3
    insertion = explainers.build("igos_pp_insertion", box, **TINY, smoothness="plain")(images, targets)
    assert torch.equal(insertion, explainers.build("igos_pp_insertion", box, **TINY, btv_sigma=1e6)(images, targets))
    with pytest.raises(ValueError, match="smoothness must be one of"):
        explainers.build("igos_pp", box, smoothness="tv")


def test_ablation_variants_refuse_the_knobs_they_do_not_have():
    box = RegionBox(0.5)
    with pytest.raises(TypeError, match=r"unknown hyper-parameters \['mask'\]"):
        explainers.build("igos_pp_insertion", box, mask="y")  # one mask only
    with pytest.raises(TypeError, match=r"unknown hyper-parameters \['smoothness'\].*tv_beta"):
        explainers.build("igos_naive_insertion", box, smoothness="plain")  # I-GOS's TV
    assert explainers.build("igos_naive_insertion", box).points_per_evaluation == 40  # del + ins, n = 20 each
    assert explainers.build("igos_pp_insertion", box).points_per_evaluation == 20


# ---------------------------------------------------------------------------------------------------------
# Behaviour


@pytest.mark.parametrize("name", ["igos_pp", "igos", "igos_pp_insertion", "igos_naive_insertion"])
def test_masks_concentrate_on_the_region_the_model_reads(name):
    images = scenes(2)
    box = region_box(images)
    # On an 8 x 8 grid one region edge is a large share of the TV pairs: I-GOS's plain TV at L2 = 20 then
    # outweighs its single model term and keeps the mask faint (contrast ~0.04), so it gets L2 = 2 here. The
    # one-term insertion-only ablation is in the same place (contrast ~0.02 at L2 = 20), and so gets 2 as well.
    l2 = 20.0 if name == "igos_pp" else 2.0
    explainer = explainers.build(name, box, iterations=6, ig_steps=8, resolution=8, scale_with_image=False, l2=l2)
    saliency = explainer(images, torch.tensor([0, 0]))
    assert saliency.shape == (2, 1, SIZE, SIZE) and saliency.min() >= 0 and saliency.max() <= 1
    contrast = region_contrast(saliency)
    assert (contrast > 0.3).all(), contrast


def test_nag_runs_costs_one_pass_per_point_and_finds_the_region():
    images = scenes(2)
    box = region_box(images)
    explainer = explainers.build("igos_pp", box, iterations=6, ig_steps=8, resolution=8, scale_with_image=False,
                                 optimizer="nag", nag_step=1.0)  # the fixed step; 1000 oscillates here
    saliency = explainer(images, torch.tensor([0, 0]))
    points = explainer.points_per_evaluation
    assert (explainer.cost.forwards, explainer.cost.backwards) == (points * 6 * 2, points * 6 * 2)
    assert not explainer.last_trials.any()
    assert torch.isfinite(saliency).all() and saliency.min() >= 0 and saliency.max() <= 1
    assert (region_contrast(saliency) > 0.15).all(), region_contrast(saliency)


@pytest.mark.parametrize("name", ["igos_pp", "igos", "igos_pp_insertion", "igos_naive_insertion"])
def test_batch_gives_each_image_its_single_image_map(name):
    images, targets, indices = scenes(3), torch.tensor([0, 1, 0]), torch.tensor([4, 0, 9])
    box = region_box(images)
    explainer = explainers.build(name, box, **TINY, seed=5, max_forward_batch=11)
    together = explainer(images, targets, indices)
    trials = explainer.last_trials.clone()
    for b in range(3):
        alone = explainer(images[b:b + 1], targets[b:b + 1], indices[b:b + 1])
        assert torch.equal(explainer.last_trials[0], trials[b])  # the same line search, step for step
        assert torch.allclose(alone[0], together[b], atol=1e-5), (b, (alone[0] - together[b]).abs().max())
    rechunked = explainers.build(name, box, **TINY, seed=5, max_forward_batch=64)(images, targets, indices)
    assert torch.allclose(rechunked, together, atol=1e-5)
    # The noise really is per image: another index (or seed) gives another map.
    other = explainer(images[:1], targets[:1], torch.tensor([5]))
    assert not torch.allclose(other[0], together[0], atol=1e-4)


class _Recorder:
    """Wraps an explainer's _model_scores: records (image ids, grad) of every evaluation."""

    def __init__(self, explainer):
        self.calls, self.inner = [], explainer._model_scores
        explainer._model_scores = self

    def __call__(self, batch, masks, ids, *, grad):
        self.calls.append((ids.tolist(), grad))
        return self.inner(batch, masks, ids, grad=grad)


def test_line_search_is_per_image_and_finished_images_cost_nothing():
    images = scenes(2)
    images[0, 0] = 1.0  # image 0: nothing to delete (its blur is itself), zero direction, accepted at once
    box = region_box(images[1:])
    explainer = explainers.build("igos_pp", box, **TINY, noise_std=0.0, max_forward_batch=13)
    recorder = _Recorder(explainer)
    explainer(images, torch.tensor([0, 0]))
    trials = explainer.last_trials
    assert trials[0].tolist() == [1] * TINY["iterations"]
    assert trials[1].max() > 1, trials  # image 1 backtracks
    # Per iteration: IG pass and base evaluation on both images, the first trial on both, then image 1 only.
    per_iteration = [[([0, 1], True), ([0, 1], False)] + [([0, 1], False)] + [([1], False)] * (t - 1)
                     for t in trials[1].tolist()]
    assert recorder.calls == [call for calls in per_iteration for call in calls]
    points, iterations = explainer.points_per_evaluation, TINY["iterations"]
    assert explainer.cost.forwards == points * (2 * iterations * 2 + trials.sum().item()) == sum(box.rows)
    assert explainer.cost.backwards == points * iterations * 2
    assert max(box.rows) <= 13  # memory: never more than max_forward_batch images at once


@pytest.mark.parametrize("name, terms", [("igos_pp", 4), ("igos", 1), ("igos_pp_insertion", 1),
                                         ("igos_naive_insertion", 2)])
def test_cost_is_exactly_the_formula(name, terms):
    images = scenes(2)
    box = region_box(images)
    n, iterations = TINY["ig_steps"], TINY["iterations"]
    # One line-search evaluation per iteration (ls_min_alpha above alpha0): forwards = P * T * (2 + 1).
    one_trial = explainers.build(name, box, **TINY, ls_min_alpha=2000.0, max_forward_batch=9)
    one_trial(images, torch.tensor([0, 1]))
    assert one_trial.max_trials == 1 and one_trial.last_trials.eq(1).all()
    assert one_trial.cost.forwards == terms * n * iterations * 3 * 2
    assert one_trial.cost.backwards == terms * n * iterations * 2
    # Defaults of the line search: forwards = P (2T + sum of trials) per image, i.e. docs/methods.md's
    # 4 n T (2 + trials) with trials = the mean number of line-search evaluations per iteration.
    explainer = explainers.build(name, box, **TINY, max_forward_batch=9)
    explainer(images, torch.tensor([0, 1]))
    trials = explainer.last_trials
    assert ((1 <= trials) & (trials <= explainer.max_trials)).all()
    for b in range(2):
        mean_trials = trials[b].double().mean().item()
        exact = terms * n * (2 * iterations + trials[b].sum().item())
        assert terms * n * iterations * (2 + mean_trials) == pytest.approx(exact)
    assert explainer.cost.forwards == terms * n * (2 * iterations * 2 + trials.sum().item())
    assert explainer.cost.backwards == terms * n * iterations * 2


# ---------------------------------------------------------------------------------------------------------
# In a Lightning validation loop, through the evaluation callback


class _Scenes(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
        mask[0, REGION[0], REGION[1]] = True
        return {"image": scenes(2)[i], "label": torch.tensor(0), "mask": mask,
                "boxes": torch.tensor([[12.0, 8.0, 24.0, 20.0]]), "index": torch.tensor(i)}


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.blackbox = region_box(scenes(2))

    def validation_step(self, batch, batch_idx):
        pass

    def val_dataloader(self):
        from saliency_lab.datamodules.common import collate_samples

        return DataLoader(_Scenes(), batch_size=2, collate_fn=collate_samples)


def test_explainer_evaluation_runs_both_methods_in_validation(tmp_path):
    from saliency_lab.callbacks import ExplainerEvaluation

    tiny = {**TINY, "iterations": 2}
    evaluation = ExplainerEvaluation([{"name": "igos_pp", **tiny}, {"name": "igos", **tiny}], num_images=2,
                                     overlay_images=1, stages=("validate",))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=True,
                         limit_val_batches=1, default_root_dir=str(tmp_path), callbacks=[evaluation])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(_Module(), verbose=False)
    for key in ("igos_pp", "igos"):
        results = evaluation.last_results[key]
        assert results["images"] == 2 and results["forwards_per_image"] > 0 and results["backwards_per_image"] > 0
        assert f"val/{key}/insertion" in trainer.callback_metrics


# ---------------------------------------------------------------------------------------------------------
# Per-image convergence


def test_converged_images_stop_and_cost_nothing_more():
    """converge_tol: an image stops after converge_patience iterations that moved no cell by more than the tol.

    Image 0 has nothing to delete (zero direction: its masks never move), so it stops after 2 iterations;
    image 1 keeps optimising. Stopping reads only the image's own trajectory: alone, each image gets the map,
    the iterations and the line search it gets in the batch.
    """
    images = scenes(2)
    images[0, 0] = 1.0
    box = region_box(images[1:])
    settings = {**TINY, "iterations": 5, "noise_std": 0.0, "converge_tol": 1e-6, "converge_patience": 2}
    explainer = explainers.build("igos_pp", box, **settings, max_forward_batch=13)
    recorder = _Recorder(explainer)
    together = explainer(images, torch.tensor([0, 0]))
    assert explainer.last_iterations.tolist() == [2, 5]
    trials, ran = explainer.last_trials.clone(), explainer.last_iterations.clone()
    assert trials[0, 2:].eq(0).all() and trials[0, :2].eq(1).all() and trials[1].ge(1).all()
    # after its second iteration image 0 is in no evaluation
    first_of_iteration_3 = recorder.calls.index(([1], True))
    assert all(0 not in ids for ids, _ in recorder.calls[first_of_iteration_3:])
    points = explainer.points_per_evaluation
    assert explainer.cost.forwards == points * (2 * int(ran.sum()) + int(trials.sum())) == sum(box.rows)
    assert explainer.cost.backwards == points * int(ran.sum())
    plain = explainers.build("igos_pp", box, **{**settings, "converge_tol": None}, max_forward_batch=13)
    full = plain(images, torch.tensor([0, 0]))
    assert plain.last_iterations.tolist() == [5, 5]
    assert torch.allclose(full[0], together[0], atol=1e-6)  # image 0 did not move anyway
    assert torch.allclose(full[1], together[1], atol=1e-5)  # image 1 never stopped: the same trajectory
    for b in range(2):
        alone = explainer(images[b:b + 1], torch.tensor([0]), torch.tensor([b]))
        assert explainer.last_iterations.tolist() == [ran[b].item()]
        assert torch.equal(explainer.last_trials[0], trials[b])
        assert torch.allclose(alone[0], together[b], atol=1e-5)


@pytest.mark.parametrize("bad", [{"converge_tol": -1.0}, {"converge_patience": 0}, {"converge_patience": 1.5}])
def test_convergence_settings_are_validated(bad):
    with pytest.raises(ValueError, match="converge"):
        explainers.build("igos", region_box(scenes(1)), **bad)
