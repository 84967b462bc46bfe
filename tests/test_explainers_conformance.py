"""Every registered explainer against the contract (docs/architecture.md, "The explainer contract").

One list, ``explainers.available()``: registering a method runs it through all of these checks, the trained
predictors included (built from tiny checkpoints written by their own LightningModule). Methods only differ
by the small hyper-parameters in FAST_HPARAMS, which must name every registered method, and, optionally,
their exact cost formula.
"""
from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch

from saliency_lab import explainers
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.seeding import derive_seeds, seeded_generator
from saliency_lab.explainers.base import _HOOK_DICTS
from saliency_lab.lightning_modules.mask_predictor import MaskPredictor

NAMES = explainers.available()
SIZE = 48  # resnet10t's last level is then 2 x 2, so CAM maps are not constant
BATCH = 4
# Small settings per method; max_forward_batch = 12 does not divide any of the totals, so chunk
# boundaries cut through images.
FAST_HPARAMS = {
    "gradient": {},
    "gradcam": {},
    "gradcam_pp": {},
    "rise": {"n_masks": 40},
    "smoothgrad": {"n_samples": 5},
    "integrated_gradients": {"n_steps": 7},
    "iassa": {"window": 120.0, "stride": 60.0, "iterations": 2},
    # l1 = 0: on this untrained net p_c barely moves, and the L1 kink at M = 1 would keep the masks at 1.
    "igos_pp": {"iterations": 2, "ig_steps": 3, "resolution": 4, "scale_with_image": False, "l1": 0.0},
    "igos": {"iterations": 2, "ig_steps": 3, "resolution": 4, "scale_with_image": False, "l1": 0.0},
    "igos_pp_insertion": {"iterations": 2, "ig_steps": 3, "resolution": 4, "scale_with_image": False, "l1": 0.0},
    "igos_naive_insertion": {"iterations": 2, "ig_steps": 3, "resolution": 4, "scale_with_image": False, "l1": 0.0},
    "mpert": {"iterations": 3, "resolution": 4, "scale_with_image": False},
    "xpert": {"iterations": 3},
    "finv": {"inversion_iterations": 2, "class_iterations": 2},
    "lime": {"n_samples": 30, "n_segments": 10},
    # trained predictors: random weights (the contract does not depend on training); checkpoint added by `make`
    "predictor_ct": {},
    "predictor_ct_posthoc": {"posthoc_points": 5},
    "predictor_bt": {},
    "mgnet": {},
    "mgnet_ct_posthoc": {"eta": 2.0, "h": 3.0},
    "predictor_square": {},
    "predictor_game": {},
}
# The checkpoint (of a MaskPredictor mode) each trained method is built from.
TRAINED_FROM = {"predictor_ct": "ct", "predictor_ct_posthoc": "ct", "predictor_bt": "bt", "mgnet": "mgnet",
                "mgnet_ct_posthoc": "mgnet", "predictor_square": "square", "predictor_game": "ct"}
COMMON = {"max_forward_batch": 12, "seed": 3}
# Exact black-box passes per image at FAST_HPARAMS: (forwards, backwards).
COST_PER_IMAGE = {
    "rise": (40, 0),
    "gradient": (1, 1),
    "smoothgrad": (5, 5),
    "integrated_gradients": (7, 7),
    "gradcam": (1, 1),
    "gradcam_pp": (1, 1),
    "mpert": (3, 3),
    "xpert": (3 * 3, 3 * 3),  # areas x iterations
    "finv": (1 + 2 + 2 * 2, 2 + 2 * 2),  # clean features + T1 + 2 T2
    "lime": (30, 0),
    "predictor_ct": (1, 0),
    "predictor_bt": (1, 0),
    "mgnet": (1, 0),
    "mgnet_ct_posthoc": (1, 0),
    "predictor_square": (1, 0),
    "predictor_game": (1, 0),
    "predictor_ct_posthoc": (1 + 5 + 1, 0),  # the feature pass + posthoc_points + 1 measured ranks
}
# Batch vs single calls agree to atol = BATCH_ATOL x the map's largest value (default 1e-5). Post-hoc tuning
# re-ranks the predictor's pixels and measures p_c on the top k of them: the predictor's map differs in its last
# float bits between batch sizes (batched convolutions, ~1e-6 here), which can swap near-tied pixels across a
# measured k and move the tuned values by up to ~1e-3 of the scale (6e-4 measured on this untrained net; with
# one and the same input map, tuning alone is batch-independent to the bit).
# igos_pp_insertion: on this untrained net its insertion term barely moves the mask (the map's largest value is
# 3.5e-3), so float noise in the line search's last bits, which differs between batch sizes and CPU kernels, is
# 3.5e-5 of that largest value (measured, AVX2, one image alone); a batching bug changes maps by O(1) of it.
BATCH_ATOL = {"predictor_ct_posthoc": 1e-3, "igos_pp_insertion": 2e-4}
# Input-gradient methods are compared by the relative L2 error of each image's whole map instead, at most
# GRADIENT_REL_L2. Their backward pass routes through max-pool's argmax: resnet10t is piecewise linear, and where
# the top two values of a pooling window are closer than float32 summation noise (which differs between batch
# sizes and chunkings), the gradient of that window goes to the other input, i.e. a whole receptive field of the
# map changes by O(1) of its local values while the rest is equal to the bit (3.4e-3 measured here on one image;
# elementwise that pixel is 9e-3 of the map's largest value). A batching bug (images or targets mixed up, a
# missing chunk) changes the whole map: relative error O(1).
GRADIENT_METHODS = ("gradient", "smoothgrad", "integrated_gradients")
GRADIENT_REL_L2 = 1e-2


@pytest.fixture(scope="module")
def blackbox():
    torch.manual_seed(0)
    return BlackBox("timm:resnet10t", num_classes=5, model_kwargs={"channels": [8, 16, 24, 32]})


@pytest.fixture(scope="module")
def checkpoints(blackbox, tmp_path_factory):
    """mode -> a checkpoint of an untrained MaskPredictor on ``blackbox``, written as training writes it."""
    folder = tmp_path_factory.mktemp("predictors")
    paths = {}
    for seed, mode in enumerate(sorted(set(TRAINED_FROM.values()))):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untrained-filter warning
            module = MaskPredictor(blackbox=blackbox, filter_checkpoint=None, mode=mode)
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        paths[mode] = folder / f"{mode}.ckpt"
        torch.save(checkpoint, paths[mode])
    return paths


@pytest.fixture(scope="module")
def make(blackbox, checkpoints):
    """make(name, **overrides): the method at its fast settings (a KeyError for a method without any)."""

    def build(name, **overrides):
        trained = {"checkpoint": checkpoints[TRAINED_FROM[name]]} if explainers.is_trained(name) else {}
        return explainers.build(name, blackbox, **trained, **{**COMMON, **FAST_HPARAMS[name], **overrides})

    return build


def test_every_registered_method_has_fast_settings():
    missing = sorted(set(NAMES) - set(FAST_HPARAMS))
    assert not missing, f"registered methods without FAST_HPARAMS (they would run their slow defaults): {missing}"
    assert not sorted(set(FAST_HPARAMS) - set(NAMES)), "FAST_HPARAMS names a method that is not registered"
    trained = sorted(n for n in NAMES if explainers.is_trained(n))
    assert trained == sorted(TRAINED_FROM), "every trained method needs a checkpoint to be built from"


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=generator)
    return images, torch.tensor([0, 4, 2, 2]), torch.tensor([7, 3, 12, 0])


def assert_clean(blackbox, reference_state):
    for module in blackbox.modules():
        for name in _HOOK_DICTS:
            assert not getattr(module, name, {}), f"{type(module).__name__}.{name} left behind"
        assert not module.training
    for key, value in blackbox.state_dict().items():
        assert torch.equal(value, reference_state[key]), f"{key} changed"
    assert not any(p.requires_grad or p.grad is not None for p in blackbox.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_output_contract_and_cost(name, make, batch):
    images, targets, indices = batch
    explainer = make(name)
    saliency = explainer(images, targets, indices)
    assert saliency.shape == (BATCH, 1, SIZE, SIZE)
    assert saliency.dtype == images.dtype and saliency.device == images.device
    assert torch.isfinite(saliency).all() and not saliency.requires_grad
    assert saliency.std() > 0, "a constant map explains nothing"
    cost = explainer.cost
    assert cost.images == BATCH and cost.forwards > 0
    if name in COST_PER_IMAGE:
        forwards, backwards = COST_PER_IMAGE[name]
        assert (cost.forwards, cost.backwards) == (forwards * BATCH, backwards * BATCH)
    assert explainer.hparams["max_forward_batch"] == COMMON["max_forward_batch"]


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_single_calls_and_is_deterministic(name, make, batch):
    images, targets, indices = batch
    explainer = make(name)
    together = explainer(images, targets, indices)
    assert torch.equal(together, explainer(images, targets, indices)), "two identical calls differ"
    alone = torch.cat([explainer(images[i:i + 1], targets[i:i + 1], indices[i:i + 1]) for i in range(BATCH)])
    # Another memory knob changes the chunking, not the result.
    other = make(name, max_forward_batch=5)(images, targets, indices)
    for maps in (alone, other):
        if name in GRADIENT_METHODS:
            assert relative_l2(together, maps).max() <= GRADIENT_REL_L2, relative_l2(together, maps)
        else:
            scale = together.abs().max() * BATCH_ATOL.get(name, 1e-5)
            assert torch.allclose(together, maps, rtol=1e-4, atol=scale)


def relative_l2(maps: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """(B,) ||maps_i - others_i|| / ||maps_i|| per image of two (B, 1, H, W) batches; 0 where both are zero."""
    size = maps.flatten(1).norm(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps - others).flatten(1).norm(dim=1) / size


def test_relative_l2_flags_a_mixed_up_batch():
    maps = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert relative_l2(maps, maps.clone()).max() == 0
    assert relative_l2(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)) == 0
    assert relative_l2(maps, maps.flip(0))[[0, 2]].min() > 10 * GRADIENT_REL_L2


@pytest.mark.parametrize("name", NAMES)
def test_blackbox_state_restored_and_hooks_removed(name, make, blackbox, batch, monkeypatch):
    images, targets, indices = batch
    reference = {k: v.clone() for k, v in blackbox.state_dict().items()}
    explainer = make(name)
    explainer(images, targets, indices)
    assert_clean(blackbox, reference)

    def sabotaged_pass(x):  # leaves a hook, unfreezes and switches to train mode, then fails
        blackbox.net.register_forward_hook(lambda *args: None)
        blackbox.net.get_submodule(explainer.hparams.get("target_layer") or "layer4").register_full_backward_hook(
            lambda *args: None)
        next(blackbox.parameters()).requires_grad_(True)
        blackbox.net.train()
        raise RuntimeError("boom")

    monkeypatch.setattr(blackbox, "logits", sabotaged_pass)
    monkeypatch.setattr(blackbox, "features", sabotaged_pass)  # the feature pass of IASSA and the predictors
    with pytest.raises(RuntimeError, match="boom"):
        explainer(images, targets, indices)
    monkeypatch.undo()
    assert_clean(blackbox, reference)


class _ExplainInValidation(pl.LightningModule):
    """validation_step runs an explainer, as callbacks/evaluation modules will."""

    def __init__(self, blackbox, explainer):
        super().__init__()
        self.blackbox = blackbox
        self.explainer = explainer
        self.saliency = None
        self.inference_batch = None

    def validation_step(self, batch, batch_idx):
        images, targets, indices = batch
        self.inference_batch = images.is_inference()
        self.saliency = self.explainer(images, targets, indices)


@pytest.mark.parametrize("inference_mode", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_works_inside_a_lightning_validation_loop(name, inference_mode, make, blackbox, batch):
    images, targets, indices = batch
    explainer = make(name)
    module = _ExplainInValidation(blackbox, explainer)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets, indices), batch_size=BATCH)
    trainer = pl.Trainer(accelerator="cpu", devices=1, inference_mode=inference_mode, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and loggers
        trainer.validate(module, dataloaders=loader, verbose=False)
    expected = explainer(images, targets, indices)
    assert torch.allclose(module.saliency, expected, rtol=1e-4, atol=1e-6)
    assert module.inference_batch == inference_mode  # the loop really handed over inference tensors
    assert not module.saliency.is_inference()
    assert not any(p.requires_grad for p in blackbox.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_clear_errors_on_bad_input(name, make, batch):
    images, targets, _ = batch
    explainer = make(name)
    nan_images = images.clone()
    nan_images[1, 0, 3, 3] = float("nan")
    cases = [
        ((nan_images, targets), "NaN or Inf"),
        ((images * 2, targets), r"\[0, 1\]"),
        ((images - 0.5, targets), r"\[0, 1\]"),
        ((images[:, :1], targets), r"\(B, 3, H, W\)"),
        ((images[0], targets), r"\(B, 3, H, W\)"),
        ((images, torch.tensor([0, 1, 5, 2])), r"targets must lie in \[0, 5\)"),
        ((images, torch.tensor([0, -1, 2, 2])), r"targets must lie in \[0, 5\)"),
        ((images, targets[:3]), "one class per image"),
        ((images, targets.float()), "torch.long"),
        ((images.to("meta"), targets), "black box is on cpu"),
        ((images, targets, torch.tensor([0, 1])), "indices"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            explainer(*args)


def test_registry_names_classes_and_errors(make, blackbox, checkpoints):
    assert NAMES == sorted(NAMES) and {"rise", "gradient", "smoothgrad", "integrated_gradients", "gradcam",
                                      "gradcam_pp", "igos_pp", "igos", "igos_pp_insertion", "igos_naive_insertion",
                                      "iassa", "predictor_ct", "predictor_ct_posthoc",
                                      "predictor_bt", "predictor_square", "mgnet", "mgnet_ct_posthoc",
                                      "predictor_game"} <= set(NAMES)
    for name in NAMES:
        explainer = make(name)
        assert isinstance(explainer, explainers.Explainer) and explainer.name == name
    with pytest.raises(ValueError, match="unknown explainer 'nope'.*gradcam.*rise.*smoothgrad"):
        explainers.build("nope", blackbox)
    with pytest.raises(TypeError, match=r"unknown hyper-parameters \['n_mask'\].*n_masks"):
        explainers.build("rise", blackbox, n_mask=10)
    with pytest.raises(ValueError, match="already taken"):
        explainers.register("rise")(type("OtherRISE", (explainers.Explainer,), {}))
    with pytest.raises(ValueError, match="trained method: build it with checkpoint=PATH"):
        explainers.build("predictor_ct", blackbox)
    with pytest.raises(ValueError, match="not a trained method"):
        explainers.build("rise", blackbox, checkpoint=checkpoints["ct"])
    assert explainers.recorded_name(checkpoints["bt"]) == "predictor_bt"
    with pytest.raises(ValueError, match="cannot be loaded as 'predictor_bt'"):
        explainers.build("predictor_bt", blackbox, checkpoint=checkpoints["ct"])


def test_seeded_generator_uses_every_bit_of_the_per_image_seeds():
    seeds = derive_seeds(0, torch.tensor([0, 1])).tolist() + derive_seeds(1, torch.tensor([0, 1])).tolist()
    draws = [torch.rand(4, generator=seeded_generator("cpu", seed)) for seed in seeds]
    draws.append(torch.rand(4, generator=seeded_generator("cpu", seeds[0], 1)))
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)
    assert torch.equal(draws[0], torch.rand(4, generator=seeded_generator("cpu", seeds[0])))
