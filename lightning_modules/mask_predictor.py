"""Stage 2: train the mask predictor (generator + controller) on a frozen black box and feature filter.

Loss (METHODS.md §1): the cross-entropy of F(phi(I, M, A)) against the explained class, with A per image a
gaussian blur of I (probability ``blur_prob``) or a random constant colour plus gaussian noise, drawn from
the image's own seed (run seed, epoch, dataset index) so it does not depend on batch size or process count.
Optional constraint terms, off by default for the predictor:

    loss = ce_weight * CE(F(phi(I, M, A)), c)
         + area_weight * mean((M + 5e-4) ** area_power)          (area_power 1: plain mean(M))
         + tv_weight * TV(M)                                      (mean squared neighbour differences)
         + bg_weight * mean(p_c(phi(I, 1 - M, A)) ** bg_power)    (destroy the class when M is inverted)

``mode="mgnet"`` is Dabkowski & Gal's real-time saliency (the MGnet baseline): the two-channel ratio head
M = |a| / (|a| + |b|) and Eq. 2 of the distribution-guided paper with their code's weights as defaults —
preserver 0.3 (its -log p_c term is the CE above), area 8 with power 0.3, smoothness 0.5, destroyer 1.
``class_loss="hinge"`` with ``tv_reduction="sum"`` and ``tv_border=0.3`` is their released code instead:
Carlini-Wagner hinges on logit margins, preserve relu(max_other - z_c + 1), destroy relu(z_c - max_other + 5),
and a smoothness summed over the mask (per image, / 2) with a border penalty. The two differ in scale: with
probabilities the class terms are bounded while the area term's (M + eps)^0.3 pulls hard towards M = 0 (on
the embedded data the mask collapses to ~0 within 100 steps), the logit hinges keep pushing back.
Their fake-class training of the class selector is not reproduced (our filter is trained in stage 1, frozen).

Masks: M^d is predicted at the first feature level's resolution (56 x 56 at 224) and upsampled bilinearly.
BT masks are unbounded above; the perturbation clamps them to [0, 1] (the explanation keeps the raw values).

Checkpoints hold the generator, controller and (frozen) filter weights and an ``"explainer"`` record;
``explainers.build(name, blackbox, checkpoint=path)`` rebuilds the explainer from them. The black box's
weights are not stored: its config (``BlackBox.config()``) is.

Logged: ``{train,val}/loss`` and each term (``ce``, ``area``, ``tv``, ``bg``), ``{train,val}/mask_mean``,
``val/mask_skewness`` (pooled over every mask value of the validation set), ``val/mask_skewness_per_image``,
``val/mask_std``. The distribution of the validation mask values is kept in :attr:`MaskPredictor.mask_distribution`
for ``callbacks.MaskHistogram`` (W&B histogram + PNG under ``{run_dir}/eval/``). Add
``ExplainerEvaluation(explainers=["self"])`` for M_F, M_I, pointing game, deletion, insertion and overlays
(it calls :meth:`MaskPredictor.as_explainer`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from core.blackbox import BlackBox
from core.perturbation import NOISE_STD, gaussian_blur, perturb, random_colour_noise, scaled_blur
from core.seeding import derive_seeds, per_image_uniforms
from explainers.mask_predictor import EXPLAINER_FORMAT, MaskPredictorExplainer, explainer_name, predictor_class
from lightning_modules.feature_filter import STREAM_SUBSTRATE, FrozenBlackBoxModule
from metrics import TARGET_RULES
from networks.controllers import skewness
from networks.feature_filter import load_filter
from networks.mask_generator import MaskPredictorNet, generator_widths, upsample

MODES = {"ct": "ct", "bt": "bt", "mgnet": "none"}  # mode -> controller
# Loss weights by mode (None in the constructor = these). MGnet: Dabkowski & Gal's code defaults.
LOSS_DEFAULTS = {
    "ct": {"ce_weight": 1.0, "area_weight": 0.0, "area_power": 1.0, "tv_weight": 0.0, "bg_weight": 0.0},
    "bt": {"ce_weight": 1.0, "area_weight": 0.0, "area_power": 1.0, "tv_weight": 0.0, "bg_weight": 0.0},
    "mgnet": {"ce_weight": 0.3, "area_weight": 8.0, "area_power": 0.3, "tv_weight": 0.5, "bg_weight": 1.0},
}
AREA_EPS = 5e-4  # Dabkowski's (M + eps) ** power: a finite gradient at M = 0
BT_HISTOGRAM_UPPER = 4.0  # BT values (standard-normal tail) beyond this land in the last bin


def total_variation(mask: Tensor, reduction: str = "mean", border: float = 0.0) -> Tensor:
    """Squared differences of vertically and horizontally neighbouring values, per image: (B,).

    ``"mean"``: mean over each direction's differences, summed over the two directions. ``"sum"``: their
    sum / 2 (Dabkowski's scale, which grows with the mask's resolution). ``border`` > 0 adds that weight x
    the squared values on the mask's edges (their border penalty; halved with "sum" like the rest)."""
    dy = (mask[..., 1:, :] - mask[..., :-1, :]).pow(2).flatten(1)
    dx = (mask[..., :, 1:] - mask[..., :, :-1]).pow(2).flatten(1)
    edges = torch.cat([mask[..., 0, :], mask[..., -1, :], mask[..., :, 0], mask[..., :, -1]], -1).pow(2).flatten(1)
    if reduction == "sum":
        return (dy.sum(1) + dx.sum(1) + border * edges.sum(1)) / 2
    return dy.mean(1) + dx.mean(1) + border * edges.mean(1)


def hinge_loss(logits: Tensor, targets: Tensor, confidence: float, preserve: bool) -> Tensor:
    """Dabkowski's Carlini-Wagner hinges on the margin m = z_c - max_{k != c} z_k, batch mean:
    preserve relu(confidence - m) (keep the class ahead), destroy relu(m + confidence) (push it behind)."""
    logits = logits.float()
    this = logits.gather(1, targets[:, None]).squeeze(1)
    other = logits.scatter(1, targets[:, None], float("-inf")).amax(1)
    margin = this - other
    return torch.relu(confidence - margin).mean() if preserve else torch.relu(margin + confidence).mean()


class MaskDistribution(torchmetrics.Metric):
    """Distribution of mask values, summed over batches and DDP ranks: pooled moments (-> mean, std,
    skewness), the mean per-image skewness, and a histogram on [0, ``upper``] (larger values: last bin)."""

    full_state_update = False

    def __init__(self, bins: int = 50, upper: float = 1.0):
        super().__init__()
        self.bins, self.upper = int(bins), float(upper)
        self.add_state("moments", torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")  # n, sum x, x^2, x^3
        self.add_state("image_skew", torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")  # sum, count
        self.add_state("hist", torch.zeros(self.bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, masks: Tensor) -> None:
        x = masks.detach().flatten(1).float()
        d = x.double()
        self.moments += torch.stack([d.new_tensor(d.numel()), d.sum(), d.pow(2).sum(), d.pow(3).sum()])
        per_image = skewness(x, dim=1).double()
        self.image_skew += torch.stack([per_image.sum(), d.new_tensor(per_image.numel())])
        self.hist += torch.histc(x.clamp(0, self.upper), self.bins, 0, self.upper).double()

    def compute(self) -> dict[str, Tensor]:
        n, s1, s2, s3 = self.moments
        n = n.clamp_min(1)
        mean = s1 / n
        var = (s2 / n - mean**2).clamp_min(0)
        third = s3 / n - 3 * mean * s2 / n + 2 * mean**3
        skew = torch.where(var > 0, third / var.clamp_min(1e-30).pow(1.5), torch.zeros_like(var))
        return {"mean": mean, "std": var.sqrt(), "skewness": skew,
                "skewness_per_image": self.image_skew[0] / self.image_skew[1].clamp_min(1),
                "hist": self.hist.clone(), "edges": torch.linspace(0, self.upper, self.bins + 1)}


class MaskPredictor(FrozenBlackBoxModule):
    """Stage-2 LightningModule: a :class:`MaskPredictorNet` trained through a frozen black box.

    Args:
        blackbox: the frozen :class:`core.blackbox.BlackBox`; only its config goes into checkpoints.
        filter_checkpoint: the stage-1 checkpoint of :class:`FeatureFilterModule` (None: an untrained
            random filter, with a warning — for tests).
        mode: ``"ct"``, ``"bt"`` or ``"mgnet"``.
        eta, h, trainable_controller: CT's parameters (METHODS.md: 1.5, 2.5, fixed).
        widths, width_ratio: generator block widths (default: the paper's preset for ResNet-50 / VGG-19 /
            GoogLeNet, half the skip channels otherwise; see ``networks.mask_generator.generator_widths``).
        target: explained class in training: ``"predicted"`` (the black box's argmax on the clean image, as
            at evaluation) or ``"label"``.
        blur_prob: probability of the blur substrate (else random colour + noise).
        blur_kernel, blur_sigma: the substrate blur at 224 px (variance 10: sigma sqrt(10)), scaled to the
            image size. noise_std: of the random-colour substrate, in pixel units.
        ce_weight, area_weight, area_power, tv_weight, bg_weight: loss terms (None: :data:`LOSS_DEFAULTS`
            of the mode). bg_power: exponent of the destroy term (probability form).
        class_loss: ``"probability"`` (CE / p_c as above) or ``"hinge"`` (Dabkowski's logit-margin hinges,
            preserve confidence 1, destroy confidence 5, weighted by ce_weight and bg_weight).
        tv_reduction: ``"mean"`` of the squared differences, or ``"sum"`` over the mask / 2 per image
            (Dabkowski's scale). tv_border: weight of their border penalty (sum of squared edge values).
        lr, lr_step_epochs, lr_gamma, weight_decay: Adam, learning rate x ``lr_gamma`` every
            ``lr_step_epochs`` epochs (the paper: 1e-2, halved every 3 epochs).
        seed: per-image substrate draws. channels_last: see :class:`FrozenBlackBoxModule`.
        posthoc, posthoc_points, filter_bias: inference options of :meth:`as_explainer` and of the
            explainer rebuilt from checkpoints (post-hoc tuning; the filter's confidence bias b).
        histogram_bins: bins of the mask histogram (:attr:`mask_distribution`).
    """

    def __init__(
        self,
        blackbox: BlackBox,
        filter_checkpoint: str | None = "outputs/demo/filter/checkpoints/last.ckpt",
        mode: str = "ct",
        eta: float = 1.5,
        h: float = 2.5,
        trainable_controller: bool = False,
        widths: Sequence[int] | None = None,
        width_ratio: float | None = None,
        target: str = "predicted",
        blur_prob: float = 0.5,
        blur_kernel: int = 21,
        blur_sigma: float = math.sqrt(10.0),
        noise_std: float = NOISE_STD,
        ce_weight: float | None = None,
        area_weight: float | None = None,
        area_power: float | None = None,
        tv_weight: float | None = None,
        bg_weight: float | None = None,
        bg_power: float = 1.0,
        class_loss: str = "probability",
        tv_reduction: str = "mean",
        tv_border: float = 0.0,
        lr: float = 1e-2,
        lr_step_epochs: int = 3,
        lr_gamma: float = 0.5,
        weight_decay: float = 0.0,
        seed: int = 0,
        channels_last: bool = False,
        posthoc: bool = False,
        posthoc_points: int = 32,
        filter_bias: float = 0.0,
        histogram_bins: int = 50,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if target not in TARGET_RULES:
            raise ValueError(f"target must be one of {TARGET_RULES}, got {target!r}")
        if class_loss not in ("probability", "hinge") or tv_reduction not in ("mean", "sum"):
            raise ValueError(f"class_loss must be 'probability' or 'hinge' and tv_reduction 'mean' or 'sum', got "
                             f"{class_loss!r}, {tv_reduction!r}")
        if not 0 <= blur_prob <= 1:
            raise ValueError(f"blur_prob must be in [0, 1], got {blur_prob}")
        self.save_hyperparameters(ignore=["blackbox"])
        given = {"ce_weight": ce_weight, "area_weight": area_weight, "area_power": area_power,
                 "tv_weight": tv_weight, "bg_weight": bg_weight}
        self.weights = {k: float(LOSS_DEFAULTS[mode][k] if v is None else v) for k, v in given.items()}
        self._set_blackbox(blackbox)
        channels = self.blackbox.feature_channels
        self.net = MaskPredictorNet(channels, self.blackbox.num_classes,
                                    generator_widths(self.blackbox.spec, channels, widths, width_ratio),
                                    MODES[mode], eta, h, trainable_controller)
        self.net.filter.load_state_dict(load_filter(filter_checkpoint, self.blackbox).state_dict())
        self.net.filter.bias = 0.0  # b = 0 in training; filter_bias applies at inference
        upper = BT_HISTOGRAM_UPPER if mode == "bt" else 1.0
        self.mask_stats = MaskDistribution(histogram_bins, upper)
        self.mask_distribution: dict[str, Tensor] | None = None  # of the last validation / test epoch

    # -- the loss -----------------------------------------------------------------------------------
    def substrate(self, images: Tensor, index: Tensor, epoch: int) -> Tensor:
        """A (B, 3, H, W): per image blur (probability blur_prob) or random colour + noise, drawn from
        (seed, epoch, dataset index)."""
        hp = self.hparams
        use_blur = (per_image_uniforms(hp.seed, epoch, STREAM_SUBSTRATE, index)[:, 0] < hp.blur_prob)
        kernel, sigma = scaled_blur(hp.blur_kernel, hp.blur_sigma, images.shape[-1])
        # .to(images.dtype): under bf16 autocast the blur's conv returns bf16
        substrate = gaussian_blur(images, kernel, sigma).to(images.dtype) if use_blur.any() else torch.empty_like(images)
        colour = (~use_blur).nonzero().flatten()
        if colour.numel():
            run_seed = (hp.seed * 1_000_003 + epoch + 1) % 2**31  # a different stream per epoch
            seeds = derive_seeds(run_seed, index.cpu()[colour])
            rows = colour.to(images.device)
            substrate[rows] = random_colour_noise(images[rows], seeds, hp.noise_std).to(images.dtype)
        return substrate

    def compute_loss(self, images: Tensor, features: Sequence[Tensor], targets: Tensor, index: Tensor,
                     epoch: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(loss, {term: value}, M^d (B,1,h,w)) of one batch; ``features`` from the clean forward."""
        w = self.weights
        mask_low = self.net(features, targets)
        mask = upsample(mask_low, images.shape[-2:])
        keep = mask.clamp(0, 1) if self.hparams.mode == "bt" else mask
        substrate = self.substrate(images, index, epoch)
        batch = [perturb(images, keep, substrate)]
        if w["bg_weight"]:
            batch.append(perturb(images, 1 - keep, substrate))
        x = torch.cat(batch)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.blackbox.logits(x).float()  # one black-box call for both perturbations
        size, hinge = images.shape[0], self.hparams.class_loss == "hinge"
        terms = {"ce": hinge_loss(logits[:size], targets, 1.0, preserve=True) if hinge
                 else F.cross_entropy(logits[:size], targets)}
        loss = w["ce_weight"] * terms["ce"]
        if w["area_weight"]:
            area = mask_low if w["area_power"] == 1 else (mask_low + AREA_EPS).pow(w["area_power"])
            terms["area"] = area.mean()
            loss = loss + w["area_weight"] * terms["area"]
        if w["tv_weight"]:
            terms["tv"] = total_variation(mask_low, self.hparams.tv_reduction, self.hparams.tv_border).mean()
            loss = loss + w["tv_weight"] * terms["tv"]
        if w["bg_weight"]:
            if hinge:
                terms["bg"] = hinge_loss(logits[size:], targets, 5.0, preserve=False)
            else:
                p_c = logits[size:].softmax(1).gather(1, targets[:, None]).squeeze(1)
                terms["bg"] = p_c.pow(self.hparams.bg_power).mean()
            loss = loss + w["bg_weight"] * terms["bg"]
        return loss, terms, mask_low

    def _step(self, batch: dict, split: str) -> tuple[Tensor, Tensor]:
        images = self._images(batch)
        index = batch.get("index", torch.arange(images.shape[0]))
        with torch.no_grad():
            features, logits = self.blackbox.features_and_logits(images)
        targets = logits.argmax(1) if self.hparams.target == "predicted" else batch["label"]
        loss, terms, mask_low = self.compute_loss(images, features, targets, index, self._epoch())
        size, on_step = images.shape[0], split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step,
                 batch_size=size)
        for name, value in terms.items():
            self.log(f"{split}/{name}", value, on_step=on_step, on_epoch=True, sync_dist=not on_step, batch_size=size)
        self.log(f"{split}/mask_mean", mask_low.detach().float().mean(), on_step=on_step, on_epoch=True,
                 sync_dist=not on_step, batch_size=size)
        return loss, mask_low

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.mask_stats.update(self._step(batch, "val")[1])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.mask_stats.update(self._step(batch, "test")[1])

    def on_validation_epoch_end(self) -> None:
        self._log_distribution("val")

    def on_test_epoch_end(self) -> None:
        self._log_distribution("test")

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.lr_step_epochs, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    # -- mask distribution --------------------------------------------------------------------------
    def _log_distribution(self, split: str) -> None:
        stats = self.mask_stats.compute()  # a collective under DDP: every rank calls it
        self.mask_stats.reset()
        if self.trainer.sanity_checking:
            return
        for name in ("skewness", "skewness_per_image", "std"):
            self.log(f"{split}/mask_{name}", stats[name].float(), on_epoch=True, sync_dist=False)
        self.mask_distribution = stats  # drawn and sent to W&B by callbacks.MaskHistogram

    # -- the explainer ------------------------------------------------------------------------------
    def inference_options(self) -> dict:
        hp = self.hparams
        return {"posthoc": bool(hp.posthoc), "posthoc_points": int(hp.posthoc_points),
                "filter_bias": float(hp.filter_bias)}

    def explainer_name(self) -> str:
        return explainer_name(MODES[self.hparams.mode], self.hparams.posthoc)

    def as_explainer(self, **overrides) -> MaskPredictorExplainer:
        """This predictor (live weights) behind the explainer contract; ``overrides`` change the inference
        options (``posthoc``, ``posthoc_points``, ``filter_bias``, ``max_forward_batch``...)."""
        options = {**self.inference_options(), **overrides}
        cls = predictor_class(MODES[self.hparams.mode], options.pop("posthoc", False))
        return cls(self.blackbox, self.net, **options)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["explainer"] = {
            "format": EXPLAINER_FORMAT, "name": self.explainer_name(), "net": self.net.config(),
            "blackbox": self.blackbox.config(), "inference": self.inference_options(),
            "loss_weights": dict(self.weights)}
