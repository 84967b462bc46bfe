"""The learned mask predictor: feature filter, generator, controllers, post-hoc tuning, loss, checkpoints, and
train.py runs of every filter / predictor config (fast_dev_run, SIGKILL + resume, 1 vs 2 DDP processes)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import unittest.mock
import warnings

import pytest
import pytorch_lightning as pl
import scipy.stats
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from saliency_lab import explainers
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.seeding import per_image_uniforms
from saliency_lab.datamodules import ClutteredFashionMNIST, collate_samples
from saliency_lab.lightning_modules.feature_filter import FeatureFilterModule
from saliency_lab.lightning_modules.mask_predictor import MaskDistribution, MaskPredictor
from saliency_lab.lightning_modules.objectives import (AmortisedRISE, Area, DeletionGame, Destruction, FastSHAP,
                                                       InsertionGame, Preservation, Smoothness, build_objective,
                                                       drawn_substrates, hinge_loss, load_objectives, top_fraction_mask,
                                                       total_variation)
from saliency_lab.networks.controllers import CTController, SquareController, make_controller, skewness, standardise
from saliency_lab.networks.feature_filter import FeatureFilter
from saliency_lab.networks.mask_generator import (GENERATOR_PRESETS, PRESET_RATIOS, MaskGenerator, MaskPredictorNet, derive_widths,
                                     generator_widths, upsample)
from tests.conftest import subprocess_env

SIZE = 32
# The paper's black boxes: feature channels (strides 4/8/16/32) and the generator widths of its appendix.
PAPER = {"torchvision:resnet50": ([256, 512, 1024, 2048], [256, 128, 64]),
         "torchvision:vgg19": ([128, 256, 512, 512], [256, 128, 64]),
         "torchvision:googlenet": ([192, 480, 832, 1024], [416, 240, 96])}


@pytest.fixture(scope="module")
def scenes():
    ds = ClutteredFashionMNIST("test", SIZE, num_scenes=8)
    return collate_samples([ds[i] for i in range(8)])


def predictor(path, mode="ct", **kwargs) -> MaskPredictor:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained filter
        return MaskPredictor(blackbox=BlackBox(f"ckpt:{path}"), filter_checkpoint=None, mode=mode, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Generator


@pytest.mark.parametrize("spec", sorted(PAPER))
def test_generator_presets_and_shapes_for_the_papers_black_boxes(spec):
    channels, widths = PAPER[spec]
    assert generator_widths(spec, channels) == widths
    name = spec.partition(":")[2]
    assert derive_widths(channels, PRESET_RATIOS[name]) == list(GENERATOR_PRESETS[name])  # the rule behind them
    generator = MaskGenerator(channels, widths)
    # 224 input: 56 / 28 / 14 / 7 -> a 56 x 56 map; and a small odd size (60 px -> 15 / 8 / 4 / 2)
    for sizes, out in (((56, 28, 14, 7), 56), ((15, 8, 4, 2), 15)):
        features = [torch.randn(1, c, s, s) for c, s in zip(channels, sizes)]
        assert generator(features).shape == (1, 1, out, out)


def test_generator_widths_for_other_cnns():
    assert generator_widths("timm:resnet10t", [32, 64, 128, 256]) == [64, 32, 16]  # half of the skips
    assert generator_widths("timm:resnet10t", [8, 16, 24, 32]) == [16, 16, 16]      # at least 16
    assert generator_widths("timm:x", [32, 64, 128, 256], width_ratio=1.0) == [128, 64, 32]
    assert generator_widths("timm:x", [32, 64, 128, 256], widths=[8, 8, 8]) == [8, 8, 8]
    # a "resnet50" spec with other channels (e.g. a narrow variant) falls back to the rule
    assert generator_widths("timm:resnet50", [32, 64, 128, 256]) == [64, 32, 16]
    with pytest.raises(ValueError):
        generator_widths("timm:x", [32, 64, 128, 256], widths=[8, 8])


def test_predictor_net_on_a_real_black_box(tiny_blackbox_path, scenes):
    blackbox = BlackBox(f"ckpt:{tiny_blackbox_path}")
    for controller, channels in (("ct", 1), ("bt", 1), ("none", 2)):
        net = MaskPredictorNet(blackbox.feature_channels, 10, [16, 16, 16], controller)
        features = blackbox.features(scenes["image"])
        assert net.raw(features, scenes["label"]).shape == (8, channels, SIZE // 4, SIZE // 4)
        mask = net.mask(features, scenes["label"], (SIZE, SIZE))
        assert mask.shape == (8, 1, SIZE, SIZE) and torch.isfinite(mask).all()
        assert not any(p.requires_grad for p in net.filter.parameters())
        rebuilt = MaskPredictorNet.from_config(net.config())
        rebuilt.load_state_dict(net.state_dict())
        assert torch.equal(rebuilt.eval()(features, scenes["label"]), net.eval()(features, scenes["label"]))
    finer = MaskPredictorNet(blackbox.feature_channels, 10, [16, 16, 16], "ct", extra_upsamples=1)
    assert finer.raw(features, scenes["label"]).shape == (8, 1, SIZE // 2, SIZE // 2)  # stride 2
    rebuilt = MaskPredictorNet.from_config(finer.config())
    rebuilt.load_state_dict(finer.state_dict())
    assert torch.equal(rebuilt.eval()(features, scenes["label"]), finer.eval()(features, scenes["label"]))


def test_upsample_equals_interpolate_in_values_and_gradients():
    maps = torch.rand(5, 2, 7, 9, requires_grad=True)
    ours = upsample(maps, (30, 40))
    reference = F.interpolate(maps, size=(30, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, reference)
    weights = torch.rand_like(reference)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), maps)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), maps)
    torch.testing.assert_close(grad_ours, grad_ref)


# ---------------------------------------------------------------------------------------------------------
# Controllers


def test_controller_ranges_and_monotonicity():
    raw = torch.randn(4, 1, 16, 16) * 3 + 5
    for kind in ("bt", "ct"):
        mask = make_controller(kind)(raw)
        flat_raw, flat = raw.flatten(1), mask.flatten(1)
        order = flat_raw.argsort(1)
        assert (flat.gather(1, order).diff(dim=1) >= 0).all(), f"{kind} is not monotone in its input"
        assert (mask >= 0).all()
        if kind == "ct":
            assert (mask <= 1).all()
        # per-image standardisation: invariant to the scale and offset of the raw map
        torch.testing.assert_close(make_controller(kind)(raw * 7 - 3), mask, atol=1e-5, rtol=1e-5)
    ratio = make_controller("none")(torch.randn(4, 2, 8, 8))
    assert ratio.shape == (4, 1, 8, 8) and (ratio >= 0).all() and (ratio <= 1).all()


def test_ct_eta_and_h_shape_a_right_skewed_mask():
    z = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    base = CTController(1.5, 2.5)(z)
    assert skewness(base) > 0.3  # right skew on gaussian input (the paper's claim by construction)
    assert 0.2 < base.mean() < 0.35
    # larger h: fewer pixels stay on (lower mean, more skew); larger eta: a harder, more binary mask
    higher_h = CTController(1.5, 5.0)(z)
    assert higher_h.mean() < base.mean() and skewness(higher_h) > skewness(base)
    steeper = CTController(5.0, 2.5)(z)
    middle = lambda m: ((m > 0.1) & (m < 0.9)).float().mean()  # noqa: E731
    assert middle(steeper) < middle(base)
    # BT on gaussian input: half the pixels off, also right-skewed
    bt = make_controller("bt")(z)
    assert abs((bt == 0).float().mean() - 0.5) < 0.02 and skewness(bt) > 0


def test_square_controller_values_range_non_monotonicity_and_gradient():
    # raw -2..2: mean 0, population std sqrt(2), so z^2 / max z^2 = raw^2 / 4 (the std and eps cancel)
    raw = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    controller = make_controller("square")
    assert isinstance(controller, SquareController) and controller.config() == {"kind": "square"}
    torch.testing.assert_close(controller(raw * 3 + 7), torch.tensor([1.0, 0.25, 0.0, 0.25, 1.0]).view(1, 1, 1, 5))
    # non-monotonic: along increasing raw values the mask first falls, then rises
    steps = controller(raw).flatten().diff()
    assert (steps[:2] < 0).all() and (steps[2:] > 0).all()
    noise = (torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 3 + 5).requires_grad_()
    mask = controller(noise)
    assert (mask >= 0).all() and (mask <= 1).all() and (mask.flatten(1).amax(1) == 1).all()
    (grad,) = torch.autograd.grad((mask * torch.rand_like(mask)).sum(), noise)
    assert torch.isfinite(grad).all() and (grad.abs().flatten(1).sum(1) > 0).all()
    assert torch.equal(controller(torch.ones(2, 1, 4, 4)), torch.zeros(2, 1, 4, 4))  # constant map: z = 0


def test_skewness_matches_scipy_and_the_accumulating_metric():
    values = torch.rand(6, 1, 8, 8) ** 3
    assert float(skewness(values)) == pytest.approx(scipy.stats.skew(values.flatten().numpy()), rel=1e-4)
    metric = MaskDistribution(bins=10)
    metric.update(values[:2])
    metric.update(values[2:])
    stats = metric.compute()
    assert float(stats["skewness"]) == pytest.approx(scipy.stats.skew(values.flatten().numpy()), rel=1e-4)
    assert float(stats["mean"]) == pytest.approx(float(values.mean()), rel=1e-5)
    assert float(stats["hist"].sum()) == values.numel()
    per_image = scipy.stats.skew(values.flatten(1).numpy(), axis=1).mean()
    assert float(stats["skewness_per_image"]) == pytest.approx(per_image, rel=1e-4)


def test_standardise_handles_a_constant_map():
    assert torch.isfinite(standardise(torch.ones(2, 1, 4, 4))).all()
    assert torch.isfinite(make_controller("ct")(torch.ones(2, 1, 4, 4))).all()


# ---------------------------------------------------------------------------------------------------------
# Feature filter


def test_filter_math():
    torch.manual_seed(0)
    filt = FeatureFilter(channels=5, num_classes=3, bias=0.0)
    x = torch.randn(2, 5, 3, 4)
    classes = torch.tensor([2, 0])
    expected = torch.empty_like(x)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                score = x[b, :, i, j] @ filt.embedding[classes[b]]
                expected[b, :, i, j] = x[b, :, i, j] * torch.sigmoid(score)
    torch.testing.assert_close(filt(x, classes), expected)
    # the bias b only lowers the gate; at inference it can be raised
    assert (filt.gate(x, classes, bias=2.0) < filt.gate(x, classes)).all()
    # init: N(0, 1/sqrt(C)) as a standard deviation
    big = FeatureFilter(channels=400, num_classes=50)
    assert big.embedding.std().item() == pytest.approx(1 / 20, rel=0.05)
    rebuilt = FeatureFilter.from_record(filt.record())
    assert torch.equal(rebuilt.embedding, filt.embedding)


def test_per_image_draws_do_not_depend_on_the_batch():
    index = torch.tensor([5, 9, 2, 7])
    together = per_image_uniforms(0, 3, 1, index, 2)
    alone = torch.cat([per_image_uniforms(0, 3, 1, index[i:i + 1], 2) for i in range(4)])
    assert torch.equal(together, alone)
    assert not torch.equal(together, per_image_uniforms(0, 4, 1, index, 2))  # new epoch, new draws


def test_filter_checkpoint_record_and_loading(tiny_blackbox_path, tmp_path):
    module = FeatureFilterModule(blackbox=BlackBox(f"ckpt:{tiny_blackbox_path}"))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("blackbox.") for k in checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "filter.ckpt")
    filt, record = FeatureFilter.from_checkpoint(str(tmp_path / "filter.ckpt"))
    assert torch.equal(filt.embedding, module.filter.embedding) and record["channels"] == 32
    model = MaskPredictor(blackbox=BlackBox(f"ckpt:{tiny_blackbox_path}"), filter_checkpoint=str(tmp_path / "filter.ckpt"))
    assert torch.equal(model.net.filter.embedding, module.filter.embedding)
    assert not model.net.filter.embedding.requires_grad


def test_filter_validation_logs_the_same_keys_whatever_the_fake_draws(tiny_blackbox_path, scenes, monkeypatch):
    """Under DDP every rank must log the same keys, or the ranks' all-reduces pair up wrongly and the run hangs:
    a batch whose images all keep their real class (no fake one) logs fake_gate too, and the epoch means weigh
    every image once."""
    module = FeatureFilterModule(blackbox=BlackBox(f"ckpt:{tiny_blackbox_path}"))
    logged: list[list[str]] = []
    monkeypatch.setattr(module, "log", lambda name, *a, **k: logged[-1].append(name))
    batch = {"image": scenes["image"][:4], "label": scenes["label"][:4], "index": scenes["index"][:4]}
    for fake_prob in (0.001, 0.999):  # (almost surely) no fake class, then only fake classes
        module.hparams.fake_prob = fake_prob
        logged.append([])
        module._step(batch, "val")
    assert logged[0] == logged[1] and {"val/real_gate", "val/fake_gate"} <= set(logged[0]), logged
    real, fake = (module.gate_means[f"val_{name}"] for name in ("real_gate", "fake_gate"))
    assert int(real.weight) == 4 and int(fake.weight) == 4  # each image counted once, in its own mean


# ---------------------------------------------------------------------------------------------------------
# Loss, substrates, explainer, post-hoc tuning


def training_batch(model: MaskPredictor, images, index, epoch=0, mask=None):
    """The loss terms' view of a batch, with a random mask M^d at a quarter of the image size unless given."""
    if mask is None:
        mask = torch.rand(images.shape[0], 1, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(0))
    return model.training_batch(images, mask, torch.zeros(images.shape[0], dtype=torch.long), index, epoch)


def test_substrates_are_per_image_and_mixed(tiny_blackbox_path, scenes):
    model, term = predictor(tiny_blackbox_path), Preservation()
    images, index = scenes["image"], scenes["index"]
    together = term.substrate(training_batch(model, images, index))
    alone = torch.cat([term.substrate(training_batch(model, images[i:i + 1], index[i:i + 1])) for i in range(8)])
    torch.testing.assert_close(together, alone)
    assert together.min() >= 0 and together.max() <= 1
    assert not torch.equal(together, term.substrate(training_batch(model, images, index, epoch=1)))
    many = term.substrate(training_batch(model, images.repeat(8, 1, 1, 1), torch.arange(64)))
    blurred = (many - images.repeat(8, 1, 1, 1)).abs().flatten(1).mean(1) < 0.1  # blur stays close to I
    assert 0.25 < blurred.float().mean() < 0.75


def test_draw_seed_changes_the_draws_and_does_not_collide_with_the_data_seed(tiny_blackbox_path, scenes):
    images, index = scenes["image"], scenes["index"]
    term = Preservation()

    def substrate(seed):
        return term.substrate(training_batch(predictor(tiny_blackbox_path, draw_seed=seed), images, index))

    first = substrate(0)
    assert torch.equal(first, substrate(0)) and not torch.equal(first, substrate(1))
    # Lightning merges the model's and the datamodule's hyper-parameters and refuses one name with two values:
    # the datamodule's `seed` (the scenes) and the model's draw seed must not share a name.
    assert "seed" not in predictor(tiny_blackbox_path, draw_seed=1).hparams


def dabkowski_code():
    return [Preservation(0.3, loss="hinge"), Area(8.0, power=0.3), Smoothness(0.5, "sum", 0.3),
            Destruction(1.0, loss="hinge")]


def game(mode="ct"):
    first = [Preservation(0.3), Area(8.0, power=0.3), Smoothness(0.5), Destruction(1.0)] if mode == "mgnet" else [Preservation()]
    return first + [DeletionGame(substrates=["mean", "random"]), InsertionGame(substrates=["blur", "strong_blur"])]


def protocol_game(**options):
    return [DeletionGame(protocols=["rise", "igos"], **options), InsertionGame(protocols=["rise", "igos"], **options)]


@pytest.mark.parametrize("mode, objectives", [("ct", None), ("bt", None), ("mgnet", None), ("mgnet", "dabkowski"),
                                              ("ct", "game"), ("mgnet", "game"), ("ct", "protocol_game")],
                         ids=["ct", "bt", "mgnet", "mgnet-hinge", "ct-game", "mgnet-game", "ct-protocol-game"])
def test_loss_decreases_on_a_tiny_batch(tiny_blackbox_path, scenes, mode, objectives):
    terms_of = {None: lambda: None, "dabkowski": dabkowski_code, "game": lambda: game(mode),
                "protocol_game": lambda: [Preservation(), *protocol_game()]}
    model = predictor(tiny_blackbox_path, mode, objectives=terms_of[objectives]())
    model.train()
    optimizer = torch.optim.Adam([p for p in model.net.parameters() if p.requires_grad], lr=1e-2)
    images, index = scenes["image"], scenes["index"]
    with torch.no_grad():
        features, logits = model.blackbox.features_and_logits(images)
    losses = []
    for _ in range(12):
        loss, terms, mask = model.compute_loss(images, features, logits.argmax(1), index, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.005, losses
    played = {"game_deletion", "game_insertion"} if objectives in ("game", "protocol_game") else set()
    assert set(terms) == ({"ce", "area", "tv", "bg"} if mode == "mgnet" else {"ce"}) | played
    assert not any(p.grad is not None for p in model.blackbox.parameters())


def loss_and_batches(model: MaskPredictor, scenes, monkeypatch) -> tuple:
    """(loss, terms, the sizes of the black-box calls) of one loss computation on ``scenes``."""
    images, index = scenes["image"], scenes["index"]
    with torch.no_grad():
        features, logits = model.blackbox.features_and_logits(images)
    sizes = []
    forward = model.blackbox.logits
    monkeypatch.setattr(model.blackbox, "logits", lambda x: sizes.append(x.shape[0]) or forward(x))
    loss, terms, _ = model.compute_loss(images, features, logits.argmax(1), index, 0)
    return loss, terms, sizes


def test_sampled_terms_cost_their_passes_in_one_black_box_call(tiny_blackbox_path, scenes, monkeypatch):
    """AmortisedRISE with 3 masks and FastSHAP with 1 coalition pair: 5 perturbed batches in one call; the loss
    is the weighted sum of the two terms and back-propagates to the generator."""
    model = predictor(tiny_blackbox_path, objectives=[AmortisedRISE(samples=3), FastSHAP(0.5, samples=1)])
    loss, terms, sizes = loss_and_batches(model, scenes, monkeypatch)
    assert sizes == [(3 + 2) * len(scenes["image"])] and set(terms) == {"rise", "shap"}
    assert loss.item() == pytest.approx(terms["rise"].item() + 0.5 * terms["shap"].item(), rel=1e-6)
    loss.backward()
    grads = [p.grad for p in model.net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_game_only_loss_skips_the_preserved_pass_and_draws_fractions_by_power(tiny_blackbox_path, scenes, monkeypatch):
    """No CE term (CT has no bg term): the black box sees only the two game batches, and the loss is the game's;
    fraction_power k draws the game's fractions as u^k from the same per-image uniforms."""
    images, index = scenes["image"], scenes["index"]
    loss, terms, sizes = loss_and_batches(predictor(tiny_blackbox_path, objectives=protocol_game()), scenes, monkeypatch)
    assert sizes == [2 * len(images)] and set(terms) == {"game_deletion", "game_insertion"}
    assert loss.item() == pytest.approx((terms["game_deletion"] + terms["game_insertion"]).item())

    seen = {}
    for power in (1.0, 3.0):
        model = predictor(tiny_blackbox_path, objectives=protocol_game(fraction_power=power))
        for term in model.objectives:
            def record(batch, fractions, picks, p=power, deletion=term.deletion):
                seen[(p, deletion)] = fractions
                return torch.ones_like(batch.mask), batch.images

            monkeypatch.setattr(term, "protocol_game", record)
            term.perturbations(training_batch(model, images, index))
    uniforms = per_image_uniforms(0, 0, 4, index, 2)
    torch.testing.assert_close(seen[(1.0, True)], uniforms[:, 0])
    torch.testing.assert_close(seen[(3.0, False)], uniforms[:, 1] ** 3)
    with pytest.raises(ValueError, match="scores the explained class"):
        predictor(tiny_blackbox_path, objectives=[Preservation(0.0), Area(1.0)])
    with pytest.raises(ValueError, match="at most once"):
        predictor(tiny_blackbox_path, objectives=[Preservation(), Preservation(0.5)])
    with pytest.raises(ValueError, match="fraction_power"):
        DeletionGame(fraction_power=0.0)


def test_top_fraction_mask_selects_the_top_pixels_softly():
    mask = torch.arange(100.0).view(1, 1, 10, 10).repeat(3, 1, 1, 1)
    soft = top_fraction_mask(mask, torch.tensor([0.1, 0.5, 0.9]), temperature=0.01)
    hard = soft > 0.5
    assert hard.flatten(1).sum(1).tolist() == [10, 50, 90]  # exactly the top fraction
    assert bool(hard[0].flatten()[90:].all()) and not bool(hard[0].flatten()[:90].any())  # the largest values
    warm = top_fraction_mask(mask, torch.tensor([0.5, 0.5, 0.5]), temperature=1.0)
    assert 0.2 < warm[0].flatten()[49].item() < 0.5 < warm[0].flatten()[50].item() < 0.8  # soft near the threshold
    mask.requires_grad_(True)
    top_fraction_mask(mask, torch.tensor([0.5, 0.5, 0.5]), 0.1).sum().backward()
    assert mask.grad.flatten(1)[:, 45:55].abs().min() > 0 and mask.grad.flatten(1)[:, 0].abs().max() < 1e-6


def test_game_substrates_are_per_image(tiny_blackbox_path, scenes):
    model = predictor(tiny_blackbox_path)
    images, index = scenes["image"], scenes["index"]
    draws = torch.linspace(0, 0.99, 8)
    every = ["mean", "blur", "strong_blur", "random"]
    together = drawn_substrates(training_batch(model, images, index), every, draws)
    alone = torch.cat([drawn_substrates(training_batch(model, images[i:i + 1], index[i:i + 1]), every, draws[i:i + 1])
                       for i in range(8)])
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(together[0], model.blackbox.mean[0].expand(3, SIZE, SIZE))  # draws < 1/4: the mean
    assert together.min() >= 0 and together.max() <= 1
    with pytest.raises(ValueError, match="substrates"):
        DeletionGame(substrates=["noise"])
    with pytest.raises(ValueError, match="protocols"):
        InsertionGame(protocols=["mine"])


def test_protocol_game_perturbs_like_the_causal_metric(tiny_blackbox_path, scenes):
    """Under the igos preset the game's hard limit (temperature -> 0) removes exactly the top cells of the
    metric's grid, upsampled bilinearly, into the preset's blur."""
    from saliency_lab.metrics import CausalProtocol
    from saliency_lab.metrics.causal import rank_units, unit_scores

    model, term = predictor(tiny_blackbox_path), DeletionGame(protocols=["rise", "igos"], temperature=1e-4)
    images = scenes["image"]
    mask = torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    batch = training_batch(model, images, scenes["index"])
    batch.mask = mask
    fractions = torch.full((8,), 0.25)
    soft, substrate = term.protocol_game(batch, fractions, torch.full((8,), 0.9))
    protocol = CausalProtocol.igos(SIZE)
    grid = protocol.units
    top = rank_units(unit_scores(mask, grid)) < round(0.25 * grid * grid)
    expected = F.interpolate(top.view(8, 1, grid, grid).float(), size=(SIZE, SIZE), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(soft, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(substrate, drawn_substrates(batch, ["strong_blur"], torch.zeros(8)), atol=1e-5, rtol=0)


def test_hinge_and_smoothness_terms():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.5, 2.0]])
    targets = torch.tensor([0, 2])
    # margins z_c - max_other: 2 and -0.5
    assert hinge_loss(logits, targets, 1.0, preserve=True).item() == pytest.approx((0 + 1.5) / 2)
    assert hinge_loss(logits, targets, 5.0, preserve=False).item() == pytest.approx((7 + 4.5) / 2)
    mask = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    assert total_variation(mask).item() == pytest.approx(0.5 + 0.5)  # mean over each direction, summed
    assert total_variation(mask, "sum").item() == pytest.approx((1 + 1) / 2)
    assert total_variation(mask, "sum", border=1.0).item() == pytest.approx((2 + 6) / 2)  # edges 1+2+1+2


def test_explainer_contract_and_posthoc_tuning_keeps_the_ranking(tiny_blackbox_path, scenes):
    model = predictor(tiny_blackbox_path).eval()
    images, index = scenes["image"], scenes["index"]
    targets = model.blackbox.logits(images).argmax(1)
    explainer = model.as_explainer(max_forward_batch=3)
    saliency = explainer(images, targets, index)
    assert explainer.name == "predictor_ct" and saliency.shape == (8, 1, SIZE, SIZE)
    assert explainer.cost.forwards == 8 and explainer.cost.backwards == 0
    torch.testing.assert_close(saliency[2:3], explainer(images[2:3], targets[2:3], index[2:3]))
    tuned_explainer = model.as_explainer(posthoc=True, posthoc_points=16, max_forward_batch=7)
    tuned = tuned_explainer(images, targets, index)
    assert tuned_explainer.name == "predictor_ct_posthoc"
    assert tuned_explainer.cost.forwards == 8 * (1 + 17)
    untuned = model.as_explainer(max_forward_batch=7)(images, targets, index)  # same chunks: same floats
    order = torch.sort(untuned.flatten(1), dim=1, descending=True, stable=True).indices
    assert (tuned.flatten(1).gather(1, order).diff(dim=1) <= 1e-7).all(), "post-hoc tuning changed the ranking"
    assert (tuned >= 0).all() and not torch.allclose(tuned / tuned.amax((2, 3), keepdim=True),
                                                     saliency / saliency.amax((2, 3), keepdim=True))
    assert model.net.training is False and not any(p.requires_grad for p in model.blackbox.parameters())


def test_mgnet_ct_posthoc_is_ct_of_mgnet_masks_and_leaves_mgnet_unchanged(tiny_blackbox_path, scenes):
    model = predictor(tiny_blackbox_path, "mgnet").eval()
    checkpoint = _checkpoint_of(model)
    blackbox, images, index = model.blackbox, scenes["image"], scenes["index"]
    with torch.no_grad():
        features = blackbox.features(images)
        targets = blackbox.logits(images).argmax(1)
        a, b = model.net.raw(features, targets).abs().unbind(1)
        reference = model.net.mask(features, targets, (SIZE, SIZE))
    ratio = (a / (a + b + 1e-6)).unsqueeze(1)  # MGnet's mask before upsampling, by hand
    z = (ratio - ratio.mean((2, 3), keepdim=True)) / (ratio.std((2, 3), unbiased=False, keepdim=True) + 1e-5)
    expected = F.interpolate(torch.sigmoid(2.0 * z) ** 3.0, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    tuned = explainers.build("mgnet_ct_posthoc", blackbox, checkpoint=checkpoint, eta=2.0, h=3.0)
    assert tuned.hparams["eta"] == pytest.approx(2.0) and tuned.hparams["h"] == pytest.approx(3.0)
    torch.testing.assert_close(tuned(images, targets, index), expected, atol=1e-5, rtol=1e-5)
    assert tuned.cost.forwards == 8 and tuned.cost.backwards == 0
    defaults = explainers.build("mgnet_ct_posthoc", blackbox, checkpoint=checkpoint).hparams
    assert (defaults["eta"], defaults["h"]) == pytest.approx((1.5, 2.5))
    plain = explainers.build("mgnet", blackbox, checkpoint=checkpoint)  # mgnet's defaults: untouched, to the bit
    assert torch.equal(plain(images, targets, index), reference) and "eta" not in plain.hparams
    with pytest.raises(ValueError, match="cannot be loaded as 'mgnet_ct_posthoc'"):
        explainers.build("mgnet_ct_posthoc", blackbox, checkpoint=_checkpoint_of(predictor(tiny_blackbox_path)))


def _checkpoint_of(model: MaskPredictor) -> dict:
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    return checkpoint


def _fit_briefly(model, scenes, tmp_path, steps=2):
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    samples = [{k: v[i] for k, v in scenes.items()} for i in range(8)]
    trainer.fit(model, DataLoader(samples, batch_size=4, collate_fn=collate_samples))
    return trainer


@pytest.mark.parametrize("mode, name", [("ct", "predictor_ct"), ("bt", "predictor_bt"), ("square", "predictor_square"),
                                        ("mgnet", "mgnet")])
def test_checkpoint_round_trip_through_the_registry(tiny_blackbox_path, scenes, tmp_path, mode, name):
    model = predictor(tiny_blackbox_path, mode)
    trainer = _fit_briefly(model, scenes, tmp_path)
    path = tmp_path / "predictor.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["explainer"]["name"] == name
    assert not any(k.startswith("blackbox.") for k in raw["state_dict"]), "black-box weights were stored"
    blackbox = BlackBox(f"ckpt:{tiny_blackbox_path}")
    loaded_name = explainers.recorded_name(str(path))
    explainer = explainers.build(loaded_name, blackbox, checkpoint=str(path))
    assert loaded_name == name
    images, index = scenes["image"], scenes["index"]
    targets = blackbox.logits(images).argmax(1)
    expected = model.eval().as_explainer()(images, targets, index)
    torch.testing.assert_close(explainer(images, targets, index), expected)
    if mode == "ct":  # the post-hoc variant from the same checkpoint, and the black box rebuilt from its spec
        tuned = explainers.build("predictor_ct_posthoc", None, checkpoint=str(path), posthoc_points=8)
        variant = tuned.name
        assert variant == "predictor_ct_posthoc" and tuned.blackbox.spec == "timm:resnet10t"
        assert tuned(images, targets, index).shape == expected.shape
        asked = explainers.build("predictor_ct_posthoc", blackbox, checkpoint=str(path)).name  # evaluate.py NAME=PATH
        assert asked == "predictor_ct_posthoc"
        with pytest.raises(ValueError, match="cannot be loaded as 'mgnet'"):
            explainers.build("mgnet", blackbox, checkpoint=str(path))
        resumed = MaskPredictor.load_from_checkpoint(path, weights_only=True)  # black box refilled on load
        for key, value in model.net.state_dict().items():
            torch.testing.assert_close(resumed.net.state_dict()[key], value)


def test_a_recipe_records_its_own_method_name(tiny_blackbox_path, scenes, tmp_path):
    """MaskPredictor(method=...): the game recipe's checkpoints record and explain as predictor_game, a method
    distinct from predictor_ct (same network and controller, so the two maps of one checkpoint agree)."""
    model = predictor(tiny_blackbox_path, "ct", method="predictor_game",
                      objectives=[DeletionGame(), InsertionGame()])
    assert model.explainer_name() == "predictor_game" and model.as_explainer().name == "predictor_game"
    assert model.as_explainer(posthoc=True).name == "predictor_ct_posthoc"  # post-hoc tuning: the controller's
    trainer = _fit_briefly(model, scenes, tmp_path, steps=1)
    path = tmp_path / "game.ckpt"
    trainer.save_checkpoint(path)
    assert explainers.recorded_name(str(path)) == "predictor_game"
    assert torch.load(path, weights_only=True)["hyper_parameters"]["method"] == "predictor_game"
    blackbox = BlackBox(f"ckpt:{tiny_blackbox_path}")
    game = explainers.build("predictor_game", blackbox, checkpoint=str(path))
    as_ct = explainers.build("predictor_ct", blackbox, checkpoint=str(path))  # evaluate.py predictor_ct=PATH
    assert (game.name, as_ct.name) == ("predictor_game", "predictor_ct")
    images, index = scenes["image"], scenes["index"]
    targets = blackbox.logits(images).argmax(1)
    torch.testing.assert_close(game(images, targets, index), as_ct(images, targets, index))
    assert predictor(tiny_blackbox_path, "ct").explainer_name() == "predictor_ct"  # no method: the controller's
    with pytest.raises(ValueError, match="'bt' controller; choose one of \\['predictor_bt'\\]"):
        predictor(tiny_blackbox_path, "bt", method="predictor_game")
    for wrong in ("rise", "predictor_ct_posthoc"):
        with pytest.raises(ValueError, match=f"method '{wrong}' is not a registered predictor"):
            predictor(tiny_blackbox_path, "ct", method=wrong)


def test_a_checkpoint_for_another_black_box_is_refused(tiny_blackbox_path, scenes, tmp_path):
    model = predictor(tiny_blackbox_path)
    trainer = _fit_briefly(model, scenes, tmp_path, steps=1)
    trainer.save_checkpoint(tmp_path / "p.ckpt")
    other = BlackBox("timm:resnet10t", num_classes=10, model_kwargs={"channels": [8, 16, 24, 48]})
    with pytest.raises(ValueError, match="feature channels"):
        explainers.build("predictor_ct", other, checkpoint=str(tmp_path / "p.ckpt"))


# ---------------------------------------------------------------------------------------------------------
# train.py end to end (subprocesses)

# The ResNet-50 and GoogLeNet filter and CT configs run end to end at 224 px in tests/test_imagenet_chain.py (without
# the probe-set callbacks, which the configs here run); VGG-19's chain is the documented longer run only.
IMAGENET_CONFIGS = ["imagenet_resnet50_bt", "imagenet_resnet50_mgnet", "imagenet_vgg19_filter", "imagenet_vgg19_ct"]
EMBEDDED_PREDICTORS = ["embedded_predictor_ct", "embedded_predictor_bt", "embedded_mgnet", "embedded_predictor_game"]
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]


def run_train(repo_root, *args, timeout=600):
    return subprocess.run([sys.executable, "train.py", *args], cwd=repo_root, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def embedded_data(num_train=16, batch=8):
    return ["--data.init_args.image_size=32", f"--data.init_args.batch_size={batch}", "--data.init_args.num_workers=0",
            f"--data.init_args.num_train={num_train}", "--data.init_args.num_val=8", "--data.init_args.num_test=8"]


@pytest.fixture(scope="module")
def imagenet_export(tmp_path_factory):
    from saliency_lab.datamodules.scene_export import export_imagenet

    return export_imagenet(tmp_path_factory.mktemp("imagenet"), {"train": 16, "val": 8}, image_size=SIZE)


# One child process runs train.py's main for each config in turn (fresh LightningCLI, Trainer and model every
# time; stdout and stderr of each run to its own file): the same runs as one `python train.py` each, without
# paying the interpreter and library imports six times.
_EACH_CONFIG = """
import json, os, sys, traceback
from saliency_lab.cli import train
for name, args, log in json.loads(sys.argv[1]):
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1); os.dup2(out.fileno(), 2)
        try:
            train.main(args)
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    print(json.dumps([name, code]), flush=True)
"""


@pytest.mark.slow
def test_fast_dev_run_of_every_imagenet_config(repo_root, imagenet_export, tmp_path):
    """The real architectures (torchvision ResNet-50 / VGG-19 / GoogLeNet, random weights, 10 classes) on the
    embedded ImageNet export at 32 px, with the config's bf16 and channels_last on the CPU: every config in
    IMAGENET_CONFIGS (one child process, each config its own train.py main call, run folder and log)."""
    runs = {}
    for config in IMAGENET_CONFIGS:
        run_dir = tmp_path / config
        args = ["fit", "--config", f"configs/train/{config}.yaml", "--trainer.fast_dev_run=true",
                f"--run_dir={run_dir}", f"--data.init_args.root={imagenet_export}",
                f"--data.init_args.image_size={SIZE}", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
                "--model.init_args.blackbox.init_args.weights=null",
                "--model.init_args.blackbox.init_args.num_classes=10", *CPU]
        if not config.endswith("filter"):
            args.append("--model.init_args.filter_checkpoint=null")
        runs[config] = args
    logs = run_each_config(repo_root, tmp_path, runs)
    for config in IMAGENET_CONFIGS:
        run_dir = tmp_path / config
        assert "max_steps=1" in logs[config], config
        if not config.endswith("filter"):
            assert (run_dir / "eval" / "val_mask_histogram_epoch000.png").is_file(), config
            assert (run_dir / "eval" / "val_epoch000_overlays.png").is_file(), config


# The game recipe (experiments/predictor_ablation.py's winner ct_pgame_only_fp3) on top of each CT config; the
# embedded one also sets how the ablation trained it (bf16 autocast, channels-last), the ImageNet CT configs already do.
GAME_RECIPE = {"method": "predictor_game", "objectives": "configs/objectives/game.yaml"}
GAME_CONFIGS = {"embedded_predictor_game": "embedded_predictor_ct", "imagenet_resnet50_game": "imagenet_resnet50_ct",
                "imagenet_vgg19_game": "imagenet_vgg19_ct", "imagenet_googlenet_game": "imagenet_googlenet_ct"}


def resolved_config(name: str, *overrides: str):
    """train.py's parse of configs/train/NAME.yaml (its ``config:`` includes resolved), nothing instantiated."""
    from saliency_lab.cli.utils import SaliencyCLI

    class ParseOnly(SaliencyCLI):
        def _set_seed(self) -> None:  # seed_everything would reseed this test process
            pass

        def before_instantiate_classes(self) -> None:  # it would create the run folder
            pass

        def instantiate_classes(self) -> None:
            pass

    with unittest.mock.patch.object(sys, "argv", ["train.py"]):  # pytest's own arguments are not train.py's
        return ParseOnly(subclass_mode_model=True, subclass_mode_data=True, run=False,
                         args=["--config", f"configs/train/{name}.yaml", *overrides]).config


@pytest.mark.parametrize("config", sorted(GAME_CONFIGS))
def test_game_configs_are_their_ct_config_plus_the_game_recipe(repo_root, monkeypatch, config):
    monkeypatch.chdir(repo_root)
    game, ct = dict(resolved_config(config).items()), dict(resolved_config(GAME_CONFIGS[config]).items())
    changed = {key for key in set(game) | set(ct) if game.get(key) != ct.get(key)} - {"config"}
    recipe = {f"model.init_args.{key}" for key in GAME_RECIPE}
    run = {"run_dir", "trainer.logger.init_args.name"}
    fast = {"trainer.precision", "model.init_args.channels_last"} if config.startswith("embedded") else set()
    assert changed == recipe | run | fast
    assert game["model.init_args.method"] == "predictor_game"
    shipped = [{"class_path": o.class_path, "init_args": o.init_args.as_dict()} for o in game["model.init_args.objectives"]]
    assert shipped == [o.config() for o in load_objectives(repo_root / GAME_RECIPE["objectives"])]
    assert game["model.init_args.mode"] == "ct" and game["trainer.precision"] == "bf16-mixed"
    assert game["model.init_args.channels_last"] is True
    assert game["run_dir"].endswith("_game") and game["trainer.logger.init_args.name"] == config


def test_embedded_game_config_builds_the_game_predictor(repo_root, monkeypatch, tiny_blackbox_path, scenes):
    """The config's model arguments build a predictor that plays the game alone and records predictor_game."""
    monkeypatch.chdir(repo_root)
    cfg = resolved_config("embedded_predictor_game")
    assert cfg.model.class_path == "saliency_lab.lightning_modules.mask_predictor.MaskPredictor"
    kwargs = {k: v for k, v in cfg.model.init_args.as_dict().items() if k not in ("blackbox", "filter_checkpoint")}
    kwargs["objectives"] = [build_objective(spec) for spec in kwargs["objectives"]]
    model = predictor(tiny_blackbox_path, **kwargs)
    assert model.explainer_name() == "predictor_game" != predictor(tiny_blackbox_path).explainer_name()
    assert [type(o) for o in model.objectives] == [DeletionGame, InsertionGame]
    assert all(o.fraction_power == 3.0 and o.protocols == ("rise", "igos") for o in model.objectives)
    assert model.hparams.h == 5.0 and model.hparams.channels_last  # the embedded CT recipe's h, and FAST
    images, index = scenes["image"], scenes["index"]
    with torch.no_grad():
        features, logits = model.blackbox.features_and_logits(images)
    loss, terms, _ = model.compute_loss(images, features, logits.argmax(1), index, 0)
    assert set(terms) == {"game_deletion", "game_insertion"} and torch.isfinite(loss)  # no CE term, no preserved pass


@pytest.fixture(scope="module")
def embedded_filter(repo_root, tiny_blackbox_path, tmp_path_factory):
    """A real (2-step) run of configs/train/embedded_filter.yaml: its last.ckpt feeds the predictors."""
    run_dir = tmp_path_factory.mktemp("filter")
    proc = run_train(repo_root, "fit", "--config", "configs/train/embedded_filter.yaml", f"--run_dir={run_dir}",
                     f"--model.init_args.blackbox.init_args.model=ckpt:{tiny_blackbox_path}", *embedded_data(),
                     "--trainer.limit_train_batches=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = run_dir / "checkpoints" / "last.ckpt"
    assert "feature_filter" in torch.load(path, weights_only=True)
    return path


def predictor_args(config, tiny_blackbox_path, filter_path, run_dir, *extra):
    return ["fit", "--config", f"configs/train/{config}.yaml", f"--run_dir={run_dir}",
            f"--model.init_args.blackbox.init_args.model=ckpt:{tiny_blackbox_path}",
            f"--model.init_args.filter_checkpoint={filter_path}", *extra]


def run_each_config(repo_root, tmp_path, runs: dict[str, list[str]]) -> dict[str, str]:
    """train.py's main for each config in ``runs`` (name -> arguments) in one child process (_EACH_CONFIG):
    name -> its log; a failed run fails the test, naming the config and showing its log."""
    logs = {name: tmp_path / f"{name}.log" for name in runs}
    proc = subprocess.run([sys.executable, "-c", _EACH_CONFIG,
                           json.dumps([[name, args, str(logs[name])] for name, args in runs.items()])],
                          cwd=repo_root, env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    codes = dict(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("["))
    assert proc.returncode == 0 and list(codes) == list(runs), proc.stdout[-2000:] + proc.stderr[-3000:]
    texts = {name: logs[name].read_text() for name in runs}
    for name in runs:
        assert codes[name] == 0, (name, texts[name][-3000:])
    return texts


@pytest.mark.slow
def test_fast_dev_run_of_the_embedded_predictor_configs(repo_root, tiny_blackbox_path, embedded_filter, tmp_path):
    """Every config in EMBEDDED_PREDICTORS (one child process, each config its own train.py main call)."""
    run_each_config(repo_root, tmp_path, {
        config: predictor_args(config, tiny_blackbox_path, embedded_filter, tmp_path / config, *embedded_data(),
                               "--trainer.fast_dev_run=true") for config in EMBEDDED_PREDICTORS})
    for config in EMBEDDED_PREDICTORS:
        assert (tmp_path / config / "eval" / "val_epoch000.json").is_file(), config


@pytest.mark.slow
def test_uninterrupted_fit_ends_in_last_ckpt_and_repeats_exactly(repo_root, tiny_blackbox_path, embedded_filter,
                                                                 tmp_path):
    """The predictor config as it is (its callbacks, deterministic, seeded workers) under training seed 1: last.ckpt
    holds the final step, and a second run of the same command gives the same weights bit for bit."""
    states = []
    for run in ("first", "second"):
        run_dir = tmp_path / run
        proc = run_train(repo_root, *predictor_args(
            "embedded_predictor_ct", tiny_blackbox_path, embedded_filter, run_dir, *embedded_data(num_train=16, batch=8),
            "--trainer.max_epochs=2", "--trainer.limit_val_batches=1", "--seed_everything=1",
            "--model.init_args.draw_seed=1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        states.append(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True))
    assert states[0]["global_step"] == 4  # 2 epochs x 2 steps
    assert states[0]["hyper_parameters"]["draw_seed"] == 1
    weights = states[0]["state_dict"]
    assert weights and all(torch.equal(weights[k], states[1]["state_dict"][k]) for k in weights)


RESUME_TRAINER = """trainer:
  logger: false
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        save_last: true
        save_top_k: 0
        every_n_train_steps: 3
        enable_version_counter: false
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        save_last: true
        save_top_k: 0
        enable_version_counter: false
"""


@pytest.mark.slow
def test_killed_mid_epoch_resumes_with_optimizer_and_scheduler_state(repo_root, tiny_blackbox_path, embedded_filter,
                                                                      tmp_path):
    """SIGKILL right after the first mid-epoch checkpoint; ``--ckpt_path last`` then finishes the schedule
    from there: Adam's step counts and the StepLR epoch continue instead of restarting."""
    overlay = tmp_path / "resume.yaml"
    overlay.write_text(RESUME_TRAINER)
    run_dir = tmp_path / "run"
    args = predictor_args("embedded_predictor_ct", tiny_blackbox_path, embedded_filter, run_dir,
                          *embedded_data(num_train=96, batch=8), "--config", str(overlay),
                          "--trainer.max_epochs=2", "--trainer.limit_val_batches=1")  # 12 steps an epoch
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=repo_root, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert last.exists(), stderr[-3000:]
    interrupted = torch.load(last, weights_only=True)  # Lightning saves atomically: never a torn file
    killed_at = interrupted["global_step"]
    assert 0 < killed_at < 12 and killed_at % 12, f"not killed mid-epoch (step {killed_at})"
    adam = interrupted["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == killed_at for s in adam.values())

    second = run_train(repo_root, *args, "--ckpt_path=last")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in second.stdout + second.stderr
    final = torch.load(last, weights_only=True)
    steps = final["global_step"]
    assert steps == 24, steps  # 2 epochs x 12 steps: continued where it stopped, the epoch not replayed
    # Adam continued from the restored counts (a fresh optimizer would count 24 - killed_at)
    assert all(int(s["step"]) == steps for s in final["optimizer_states"][0]["state"].values())
    schedule = final["lr_schedulers"][0]
    assert schedule["last_epoch"] == 2 and schedule["_last_lr"][0] == pytest.approx(0.01 * 0.5**2)
    assert final["explainer"]["name"] == "predictor_ct"


@pytest.mark.slow
def test_two_ddp_processes_match_one(repo_root, tiny_blackbox_path, embedded_filter, tmp_path):
    """One optimizer step on all 8 training scenes, by 1 process x 8 or 2 DDP processes x 4, then validation
    with ExplainerEvaluation("self"); and the 1-process checkpoint validated again by 2 processes.

    Evaluation (sharded probe set and validation data, torchmetrics / sync_dist reductions) must agree to
    float precision. Training agrees within tolerance only: the generator's batch norms normalise with each
    process's own 4 images (SyncBatchNorm needs GPUs), so the one step differs slightly.
    """
    import json

    metrics = {}
    for devices, batch in ((1, 8), (2, 4)):
        run_dir = tmp_path / f"ddp{devices}"
        proc = run_train(repo_root, *predictor_args(
            "embedded_predictor_ct", tiny_blackbox_path, embedded_filter, run_dir,
            *embedded_data(num_train=8, batch=batch), "--trainer.max_epochs=1",
            f"--trainer.devices={devices}", f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics[devices] = json.loads((run_dir / "fit_metrics.json").read_text())
    run_dir = tmp_path / "validate2"
    args = predictor_args("embedded_predictor_ct", tiny_blackbox_path, embedded_filter, run_dir,
                          *embedded_data(batch=4), "--trainer.devices=2", "--trainer.strategy=ddp",
                          f"--ckpt_path={tmp_path / 'ddp1' / 'checkpoints' / 'last.ckpt'}")
    proc = run_train(repo_root, "validate", *args[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr or "MEMBER: 2/2" in proc.stdout + proc.stderr
    validated = json.loads((run_dir / "validate_metrics.json").read_text())

    evaluation = ["val/loss", "val/ce", "val/mask_mean", "val/mask_std", "val/mask_skewness", "val/self/mf",
                  "val/self/insertion", "val/self/deletion", "val/self/mi", "val/self/pointing_game",
                  "val/self/iou", "val/self/images"]
    for name in evaluation:
        assert validated[name] == pytest.approx(metrics[1][name], rel=1e-4, abs=1e-5), name
    for name in ("val/loss", "val/self/mf", "val/self/insertion", "val/self/deletion", "val/self/mi"):
        assert metrics[2][name] == pytest.approx(metrics[1][name], rel=0.02), name
    assert metrics[2]["val/mask_mean"] == pytest.approx(metrics[1]["val/mask_mean"], abs=0.02)
    assert metrics[2]["val/self/images"] == metrics[1]["val/self/images"] == 8
