"""Stage 2: train the mask predictor (generator + controller) on a frozen black box and feature filter.

Loss: a list of terms, each a small class of ``lightning_modules.objectives`` that configs compose by
``class_path`` (``objectives``); the loss is the sum of weight x value over them. Default, by mode: the paper's
classification loss (docs/methods.md §1) for CT, BT and the x^2 transformer, ``Preservation``: the cross-entropy
of F(phi(I, M, A)) against the explained class, with A per image a gaussian blur of I or a random constant colour
plus gaussian noise, drawn from the image's own seed (draw seed, epoch, dataset index) so it does not depend on
batch size or process count. MGnet's default is Eq. 2 (below). The other terms (area, smoothness, destroyer, the
deletion / insertion game, the teacher, amortised RISE, FastSHAP) are described in ``objectives``.

``mode="mgnet"`` is Dabkowski & Gal's real-time saliency (the MGnet baseline): the two-channel ratio head
M = |a| / (|a| + |b|) and Eq. 2 of the distribution-guided paper with their code's weights as defaults —
preserver 0.3 (its -log p_c term is the CE above), area 8 with power 0.3, smoothness 0.5, destroyer 1.
``loss: hinge`` (Preservation, Destruction) with Smoothness ``reduction: sum`` and ``border: 0.3`` is their
released code instead:
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

Logged: ``{train,val}/loss`` and each term by its name (``ce``, ``area``, ``tv``, ``bg``, ``game_deletion``,
``game_insertion``, ``teacher``, ``rise``, ``shap``), ``{train,val}/mask_mean``,
``val/mask_skewness`` (pooled over every mask value of the validation set), ``val/mask_skewness_per_image``,
``val/mask_std``. The distribution of the validation mask values is kept in :attr:`MaskPredictor.mask_distribution`
for ``saliency_lab.callbacks.MaskHistogram`` (W&B histogram + PNG under ``{run_dir}/eval/``). Add
``ExplainerEvaluation(explainers=["self"])`` for M_F, M_I, pointing game, deletion, insertion and overlays
(it calls :meth:`MaskPredictor.as_explainer`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torchmetrics
from torch import Tensor

from saliency_lab.core.blackbox import BlackBox, require_feature_levels
from saliency_lab.explainers.mask_predictor import EXPLAINER_FORMAT, MaskPredictorExplainer, predictor_class, recipe_class
from saliency_lab.lightning_modules.feature_filter import FrozenBlackBoxModule
from saliency_lab.lightning_modules.objectives import Objective, TrainingBatch, build_objective, default_objectives
from saliency_lab.metrics import TARGET_RULES
from saliency_lab.networks.controllers import skewness
from saliency_lab.networks.feature_filter import load_filter
from saliency_lab.networks.mask_generator import MaskPredictorNet, generator_widths, upsample

MODES = {"ct": "ct", "bt": "bt", "square": "square", "mgnet": "none"}  # mode -> controller
BT_HISTOGRAM_UPPER = 4.0  # BT values (standard-normal tail) beyond this land in the last bin


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
        blackbox: the frozen :class:`saliency_lab.core.blackbox.BlackBox`; only its config goes into checkpoints.
        filter_checkpoint: the stage-1 checkpoint of :class:`FeatureFilterModule` (None: an untrained
            random filter, with a warning — for tests).
        mode: ``"ct"``, ``"bt"``, ``"square"`` (the paper's non-monotonic x^2 transformer, Fig. 2c; explains as
            ``predictor_square``) or ``"mgnet"``.
        eta, h, trainable_controller: CT's parameters (docs/methods.md: 1.5, 2.5, fixed).
        widths, width_ratio: generator block widths (default: the paper's preset for ResNet-50 / VGG-19 /
            GoogLeNet, half the skip channels otherwise; see ``networks.mask_generator.generator_widths``).
        extra_upsamples: x2 upsampling blocks after the generator's last skip level (0: the paper's mask at
            the first feature level's stride, 4; 1: stride 2; see ``saliency_lab.networks.mask_generator.MaskGenerator``).
        target: explained class in training: ``"predicted"`` (the black box's argmax on the clean image, as
            at evaluation) or ``"label"``.
        objectives: the loss terms (``lightning_modules.objectives``, composed by ``class_path`` in configs;
            None: the mode's default, ``objectives.default_objectives``). At least one must score the class.
        lr, lr_step_epochs, lr_gamma, weight_decay: Adam, learning rate x ``lr_gamma`` every
            ``lr_step_epochs`` epochs (the paper: 1e-2, halved every 3 epochs).
        draw_seed: the objectives' per-image draws (with the epoch and the dataset index). Not called
            ``seed``: Lightning merges the model's and the datamodule's hyper-parameters and refuses two
            different ``seed`` values, so a model ``seed`` could only ever equal the data's (the scenes') and a
            second training seed would change ``seed_everything`` alone.
        channels_last: see :class:`FrozenBlackBoxModule`.
        posthoc, posthoc_points, filter_bias: inference options of :meth:`as_explainer` and of the
            explainer rebuilt from checkpoints (post-hoc tuning; the filter's confidence bias b).
        method: the registry name this training recipe records in its checkpoints and explains as (None: the
            mode's, ``predictor_ct`` / ``predictor_bt`` / ``mgnet``); a registered predictor with the mode's
            controller, e.g. ``predictor_game`` for CT trained by the game, so that two recipes of one
            controller are two methods side by side in an evaluation. With ``posthoc`` the explainer is the
            controller's post-hoc one (``predictor_ct_posthoc``) whatever the method.
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
        extra_upsamples: int = 0,
        target: str = "predicted",
        objectives: Sequence[Objective] | None = None,
        lr: float = 1e-2,
        lr_step_epochs: int = 3,
        lr_gamma: float = 0.5,
        weight_decay: float = 0.0,
        draw_seed: int = 0,
        channels_last: bool = False,
        posthoc: bool = False,
        posthoc_points: int = 32,
        filter_bias: float = 0.0,
        method: str | None = None,
        histogram_bins: int = 50,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        if target not in TARGET_RULES:
            raise ValueError(f"target must be one of {TARGET_RULES}, got {target!r}")
        if method is not None:
            recipe_class(method, MODES[mode])  # refuses a name that is not a predictor of this controller
        # a checkpoint's hyper-parameters hold the terms as {class_path, init_args} (load_from_checkpoint)
        self.objectives = [build_objective(o) if isinstance(o, dict) else o
                           for o in (default_objectives(mode) if objectives is None else objectives)]
        names = [o.name for o in self.objectives]
        if len(set(names)) < len(names):
            raise ValueError(f"objectives: each loss term at most once (they are logged by name), got {names}")
        if not any(o.scores_class and o.weight for o in self.objectives):
            raise ValueError("objectives: the loss needs a term that scores the explained class with a weight > 0 "
                             f"(Preservation, Destruction, a game, AmortisedRISE or FastSHAP), got {self.objectives}")
        # the terms are objects: the checkpoint's hyper-parameters keep their class paths and arguments (plain
        # values, loadable with weights_only=True)
        self.save_hyperparameters(ignore=["blackbox", "objectives"])
        self.hparams["objectives"] = [o.config() for o in self.objectives]
        self._set_blackbox(blackbox)
        require_feature_levels(self.blackbox, "the mask predictor (its generator reads every level)")
        channels = self.blackbox.feature_channels
        self.net = MaskPredictorNet(channels, self.blackbox.num_classes,
                                    generator_widths(self.blackbox.spec, channels, widths, width_ratio),
                                    MODES[mode], eta, h, trainable_controller,
                                    extra_upsamples=extra_upsamples)
        self.net.filter.load_state_dict(load_filter(filter_checkpoint, self.blackbox).state_dict())
        self.net.filter.bias = 0.0  # b = 0 in training; filter_bias applies at inference
        upper = BT_HISTOGRAM_UPPER if mode == "bt" else 1.0
        self.mask_stats = MaskDistribution(histogram_bins, upper)
        self.mask_distribution: dict[str, Tensor] | None = None  # of the last validation / test epoch

    # -- the loss -----------------------------------------------------------------------------------
    def training_batch(self, images: Tensor, mask_low: Tensor, targets: Tensor, index: Tensor,
                       epoch: int) -> TrainingBatch:
        """What the loss terms read for one batch (``objectives.TrainingBatch``); M^d upsampled to the images."""
        return TrainingBatch(images, mask_low, upsample(mask_low, images.shape[-2:]), targets, index, epoch,
                             int(self.hparams.draw_seed), MODES[self.hparams.mode], self.blackbox.mean)

    def compute_loss(self, images: Tensor, features: Sequence[Tensor], targets: Tensor, index: Tensor,
                     epoch: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(loss, {term: value}, M^d (B,1,h,w)) of one batch; ``features`` from the clean forward. Every term's
        perturbed images go through the black box in one call."""
        mask_low = self.net(features, targets)
        batch = self.training_batch(images, mask_low, targets, index, epoch)
        active = [o for o in self.objectives if o.weight]
        asked = [o.perturbations(batch) for o in active]
        blocks: list[Tensor] = []
        if any(perturbed for perturbed, _ in asked):
            x = torch.cat([image for perturbed, _ in asked for image in perturbed])
            if self.hparams.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            blocks = list(self.blackbox.logits(x).float().split(images.shape[0]))
        terms, loss, used = {}, mask_low.new_zeros(()), 0
        for objective, (perturbed, state) in zip(active, asked):
            terms[objective.name] = objective.value(batch, blocks[used:used + len(perturbed)], state)
            used += len(perturbed)
            loss = loss + objective.weight * terms[objective.name]
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
        self.mask_distribution = stats  # drawn and sent to W&B by saliency_lab.callbacks.MaskHistogram

    # -- the explainer ------------------------------------------------------------------------------
    def inference_options(self) -> dict:
        hp = self.hparams
        return {"posthoc": bool(hp.posthoc), "posthoc_points": int(hp.posthoc_points),
                "filter_bias": float(hp.filter_bias)}

    def explainer_class(self, posthoc: bool) -> type[MaskPredictorExplainer]:
        """The registered explainer of this predictor: the recipe's ``method``, else the controller's."""
        controller, method = MODES[self.hparams.mode], self.hparams.method
        return recipe_class(method, controller) if method and not posthoc else predictor_class(controller, posthoc)

    def explainer_name(self) -> str:
        return self.explainer_class(self.hparams.posthoc).name

    def as_explainer(self, **overrides) -> MaskPredictorExplainer:
        """This predictor (live weights) behind the explainer contract; ``overrides`` change the inference
        options (``posthoc``, ``posthoc_points``, ``filter_bias``, ``max_forward_batch``...)."""
        options = {**self.inference_options(), **overrides}
        cls = self.explainer_class(options.pop("posthoc", False))
        return cls(self.blackbox, self.net, **options)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["explainer"] = {
            "format": EXPLAINER_FORMAT, "name": self.explainer_name(), "net": self.net.config(),
            "blackbox": self.blackbox.config(), "inference": self.inference_options(),
            "loss_weights": {o.name: o.weight for o in self.objectives}}
