"""Stage 2: train the mask predictor (generator + controller) on a frozen black box and feature filter.

Loss (docs/methods.md §1): the cross-entropy of F(phi(I, M, A)) against the explained class, with A per image a
gaussian blur of I (probability ``blur_prob``) or a random constant colour plus gaussian noise, drawn from
the image's own seed (run seed, epoch, dataset index) so it does not depend on batch size or process count.
Optional constraint terms, off by default for the predictor:

    loss = ce_weight * CE(F(phi(I, M, A)), c)
         + area_weight * mean((M + 5e-4) ** area_power)          (area_power 1: plain mean(M))
         + tv_weight * TV(M)                                      (mean squared neighbour differences)
         + bg_weight * mean(p_c(phi(I, 1 - M, A)) ** bg_power)    (destroy the class when M is inverted)
         + deletion_weight * mean(p_c(phi(I, 1 - T_f(M), A_del)))     (the deletion game, below)
         + insertion_weight * mean(1 - p_c(phi(I, T_g(M), A_ins)))    (the insertion game)
         + teacher_weight * (1 - mean_b pearson(M^d_b, ranks of the teacher map_b))   (a costly explainer's maps)

The deletion / insertion game (ours, not in the paper; off by default). The causal metrics rank pixels by M
and measure p_c as the top fraction f of them is removed (deletion) or revealed (insertion); their areas are
the means over f in [0, 1]. T_f(M) is a soft indicator of the top fraction f of each image's pixels,
sigmoid((M - t_f) / (tau * std(M))) with t_f the (1 - f) quantile of M (no gradient through t_f or the std),
so the two terms, with f and g drawn uniformly per image and step, are unbiased estimates of (smoothed)
deletion and insertion areas, differentiable through the pixels near the threshold. Unlike the CE term,
they only depend on the ranking of M, which is all the metrics read. A_del and A_ins are drawn per image from
``deletion_substrates`` / ``insertion_substrates`` ("mean": the black box's normalisation mean colour,
"blur": the training blur, "strong_blur": kernel 51 / sigma 50 at 224 (the igos protocol's and M_F's),
"random": a random colour + noise). With ``game_protocols`` the game is played under the causal metrics' own
protocols instead (per image one preset: its ranking units -- pixels or grid cells -- and its substrates).

The teacher term (ours, off by default) regresses the mask onto the pixel ranks of maps that a costly explainer
(e.g. RISE) computed once on the first training images (``lightning_modules.teacher``); images without a
teacher map do not contribute to it.

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

Logged: ``{train,val}/loss`` and each term (``ce``, ``area``, ``tv``, ``bg``, ``game_deletion``,
``game_insertion``, ``teacher``), ``{train,val}/mask_mean``,
``val/mask_skewness`` (pooled over every mask value of the validation set), ``val/mask_skewness_per_image``,
``val/mask_std``. The distribution of the validation mask values is kept in :attr:`MaskPredictor.mask_distribution`
for ``saliency_lab.callbacks.MaskHistogram`` (W&B histogram + PNG under ``{run_dir}/eval/``). Add
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

from saliency_lab.core.blackbox import BlackBox, require_feature_levels
from saliency_lab.core.perturbation import NOISE_STD, gaussian_blur, make_substrate, perturb, random_colour_noise, scaled_blur
from saliency_lab.core.seeding import derive_seeds, per_image_uniforms
from saliency_lab.explainers.mask_predictor import EXPLAINER_FORMAT, MaskPredictorExplainer, predictor_class, recipe_class
from saliency_lab.lightning_modules.feature_filter import STREAM_SUBSTRATE, FrozenBlackBoxModule
from saliency_lab.lightning_modules.teacher import load_teacher_maps, rank_targets
from saliency_lab.metrics import HELDOUT_PRESETS, TARGET_RULES, CausalProtocol
from saliency_lab.networks.controllers import skewness
from saliency_lab.networks.feature_filter import load_filter
from saliency_lab.networks.mask_generator import MaskPredictorNet, generator_widths, upsample

MODES = {"ct": "ct", "bt": "bt", "square": "square", "mgnet": "none"}  # mode -> controller
# Loss weights by mode (None in the constructor = these). MGnet: Dabkowski & Gal's code defaults.
LOSS_DEFAULTS = {
    "ct": {"ce_weight": 1.0, "area_weight": 0.0, "area_power": 1.0, "tv_weight": 0.0, "bg_weight": 0.0},
    "bt": {"ce_weight": 1.0, "area_weight": 0.0, "area_power": 1.0, "tv_weight": 0.0, "bg_weight": 0.0},
    "square": {"ce_weight": 1.0, "area_weight": 0.0, "area_power": 1.0, "tv_weight": 0.0, "bg_weight": 0.0},
    "mgnet": {"ce_weight": 0.3, "area_weight": 8.0, "area_power": 0.3, "tv_weight": 0.5, "bg_weight": 1.0},
}
AREA_EPS = 5e-4  # Dabkowski's (M + eps) ** power: a finite gradient at M = 0
GAME_SUBSTRATES = ("mean", "blur", "strong_blur", "random")
GAME_PROTOCOLS = ("rise", "igos")  # the presets of saliency_lab.metrics.CausalProtocol
STRONG_BLUR_224 = (51, 50.0)  # the igos protocol's blur (and M_F's), kernel and sigma at 224 px
STREAM_GAME, STREAM_GAME_SUBSTRATE = 4, 5  # per-image draws of the game (see feature_filter's streams)
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


def top_fraction_mask(mask: Tensor, fractions: Tensor, temperature: float) -> Tensor:
    """Soft indicator (B, 1, H, W) in (0, 1) of the top ``fractions[b]`` (B,) of image b's pixels by ``mask``.

    sigmoid((M - t) / (temperature * std(M))), t the midpoint between the k-th and (k + 1)-th largest values of
    the image, k = round(f * N) clamped to [1, N - 1]; t and std carry no gradient, so the gradient moves the
    pixels near the threshold (up when revealing them helps). Ties count as above the threshold by half.
    """
    flat = mask.flatten(1).float()
    count = flat.shape[1]
    ordered = flat.detach().sort(dim=1, descending=True).values
    k = (fractions.to(flat.device).float() * count).round().long().clamp(1, count - 1).view(-1, 1)
    threshold = (ordered.gather(1, k - 1) + ordered.gather(1, k)) / 2
    scale = temperature * flat.detach().std(1, keepdim=True).clamp_min(1e-6)
    return torch.sigmoid((flat - threshold) / scale).view_as(mask)


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
        blur_prob: probability of the blur substrate (else random colour + noise).
        blur_kernel, blur_sigma: the substrate blur at 224 px (variance 10: sigma sqrt(10)), scaled to the
            image size. noise_std: of the random-colour substrate, in pixel units.
        ce_weight, area_weight, area_power, tv_weight, bg_weight: loss terms (None: :data:`LOSS_DEFAULTS`
            of the mode). bg_power: exponent of the destroy term (probability form).
        deletion_weight, insertion_weight: weights of the deletion / insertion game (module docstring; 0: off,
            each costs one more black-box pass of the batch). game_temperature: tau of the soft top fraction,
            relative to each mask's std. deletion_substrates, insertion_substrates: the substrates the game
            draws from, per image (:data:`GAME_SUBSTRATES`).
        game_protocols: causal-metric presets (``"rise"``, ``"igos"``; see ``saliency_lab.metrics.CausalProtocol``): when
            given, each image plays the game under one of them, drawn per image, with that preset's ranking
            units and substrates instead of the pixels and the substrates above.
        game_ranking: what the game's soft top fraction thresholds, per unit (pixel or pooled cell): ``"logit"``
            (log M - log(1 - M): exactly the metric's order of M, without CT's saturation near 0 and 1, so the
            gradient also orders the low-saliency regions; BT's unbounded mask is used as it is) or ``"mask"``
            (M itself).
        game_fraction_power: k of the game's fractions f = u^k, u uniform on [0, 1) per image. k = 1 samples
            f as the causal metrics weight it (uniformly); k > 1 spends more of the game on small fractions,
            the only ones that order the top of the ranking: once the object is deleted (or revealed) p_c is
            flat in f and the sample gives no gradient.
        teacher_maps, teacher_weight: a file of ``saliency-lab teacher`` and the weight of the
            teacher term (module docstring).
        class_loss: ``"probability"`` (CE / p_c as above) or ``"hinge"`` (Dabkowski's logit-margin hinges,
            preserve confidence 1, destroy confidence 5, weighted by ce_weight and bg_weight).
        tv_reduction: ``"mean"`` of the squared differences, or ``"sum"`` over the mask / 2 per image
            (Dabkowski's scale). tv_border: weight of their border penalty (sum of squared edge values).
        lr, lr_step_epochs, lr_gamma, weight_decay: Adam, learning rate x ``lr_gamma`` every
            ``lr_step_epochs`` epochs (the paper: 1e-2, halved every 3 epochs).
        draw_seed: the per-image substrate and game draws (with the epoch and the dataset index). Not called
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
        deletion_weight: float = 0.0,
        insertion_weight: float = 0.0,
        game_temperature: float = 0.05,
        deletion_substrates: Sequence[str] = ("mean",),
        insertion_substrates: Sequence[str] = ("blur",),
        game_protocols: Sequence[str] = (),
        game_ranking: str = "logit",
        game_fraction_power: float = 1.0,
        teacher_maps: str | None = None,
        teacher_weight: float = 0.0,
        class_loss: str = "probability",
        tv_reduction: str = "mean",
        tv_border: float = 0.0,
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
        if class_loss not in ("probability", "hinge") or tv_reduction not in ("mean", "sum"):
            raise ValueError(f"class_loss must be 'probability' or 'hinge' and tv_reduction 'mean' or 'sum', got "
                             f"{class_loss!r}, {tv_reduction!r}")
        if not 0 <= blur_prob <= 1:
            raise ValueError(f"blur_prob must be in [0, 1], got {blur_prob}")
        for name, choices in (("deletion_substrates", deletion_substrates), ("insertion_substrates", insertion_substrates)):
            unknown = sorted(set(choices) - set(GAME_SUBSTRATES))
            if not choices or unknown:
                raise ValueError(f"{name} must be a non-empty list of {GAME_SUBSTRATES}, got {list(choices)}")
        if game_ranking not in ("logit", "mask"):
            raise ValueError(f"game_ranking must be 'logit' or 'mask', got {game_ranking!r}")
        heldout = sorted(set(game_protocols) & set(HELDOUT_PRESETS))
        if heldout:
            raise ValueError(f"game_protocols {heldout}: held-out perturbation families (docs/heldout.md) are only "
                             "scored, never trained or tuned on")
        unknown = sorted(set(game_protocols) - set(GAME_PROTOCOLS))
        if unknown:
            raise ValueError(f"game_protocols must be presets of {GAME_PROTOCOLS}, got {list(game_protocols)}")
        if method is not None:
            recipe_class(method, MODES[mode])  # refuses a name that is not a predictor of this controller
        if deletion_weight < 0 or insertion_weight < 0 or game_temperature <= 0 or game_fraction_power <= 0:
            raise ValueError(f"the game needs weights >= 0, game_temperature > 0 and game_fraction_power > 0, got "
                             f"{deletion_weight}, {insertion_weight}, {game_temperature}, {game_fraction_power}")
        self.save_hyperparameters(ignore=["blackbox"])
        given = {"ce_weight": ce_weight, "area_weight": area_weight, "area_power": area_power,
                 "tv_weight": tv_weight, "bg_weight": bg_weight}
        self.weights = {k: float(LOSS_DEFAULTS[mode][k] if v is None else v) for k, v in given.items()}
        if not (self.weights["ce_weight"] or self.weights["bg_weight"] or deletion_weight or insertion_weight):
            raise ValueError("the loss needs a classification term: ce_weight, bg_weight, deletion_weight or "
                             "insertion_weight > 0 (all are 0)")
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
        if bool(teacher_weight) != bool(teacher_maps):
            raise ValueError("teacher_weight and teacher_maps go together: give both or neither")
        self._teacher = load_teacher_maps(teacher_maps) if teacher_maps else None
        self._teacher_rows = {int(i): row for row, i in enumerate(self._teacher["indices"].tolist())} if teacher_maps else {}
        self._teacher_ranks: dict[tuple[int, int], Tensor] = {}  # by mask size, made on first use

    # -- the loss -----------------------------------------------------------------------------------
    def substrate(self, images: Tensor, index: Tensor, epoch: int) -> Tensor:
        """A (B, 3, H, W): per image blur (probability blur_prob) or random colour + noise, drawn from
        (draw_seed, epoch, dataset index)."""
        hp = self.hparams
        use_blur = (per_image_uniforms(hp.draw_seed, epoch, STREAM_SUBSTRATE, index)[:, 0] < hp.blur_prob)
        kernel, sigma = scaled_blur(hp.blur_kernel, hp.blur_sigma, images.shape[-1])
        substrate = gaussian_blur(images, kernel, sigma).to(images.dtype) if use_blur.any() else torch.empty_like(images)
        colour = (~use_blur).nonzero().flatten()
        if colour.numel():
            run_seed = (hp.draw_seed * 1_000_003 + epoch + 1) % 2**31  # a different stream per epoch
            seeds = derive_seeds(run_seed, index.cpu()[colour])
            rows = colour.to(images.device)
            substrate[rows] = random_colour_noise(images[rows], seeds, hp.noise_std).to(images.dtype)
        return substrate

    def game_substrate(self, images: Tensor, choices: Sequence[str], draws: Tensor, index: Tensor,
                       epoch: int) -> Tensor:
        """A (B, 3, H, W): image b's substrate is ``choices[floor(draws[b] * len(choices))]`` (draws (B,) in [0, 1))."""
        hp = self.hparams
        which = (draws * len(choices)).long().clamp_max(len(choices) - 1).tolist()
        substrate = torch.empty_like(images)
        for name in set(choices[w] for w in which):
            rows = torch.tensor([b for b, w in enumerate(which) if choices[w] == name], device=images.device)
            part = images[rows]
            if name == "mean":
                fill = self.blackbox.mean.to(images.dtype).expand_as(part)
            elif name == "random":
                run_seed = (hp.draw_seed * 1_000_003 + epoch + 1 + 7919) % 2**31  # not the CE term's colours
                fill = random_colour_noise(part, derive_seeds(run_seed, index.cpu()[rows.cpu()]), hp.noise_std)
            else:
                kernel, sigma = hp.blur_kernel, hp.blur_sigma
                if name == "strong_blur":
                    kernel, sigma = STRONG_BLUR_224
                fill = gaussian_blur(part, *scaled_blur(kernel, sigma, images.shape[-1]))
            substrate[rows] = fill.to(images.dtype)
        return substrate

    def ranking_scores(self, mask: Tensor) -> Tensor:
        """What the game thresholds for ``mask`` values (pixels or pooled cells): see ``game_ranking``."""
        if self.hparams.game_ranking == "mask" or self.hparams.mode == "bt":
            return mask
        bounded = mask.float().clamp(1e-30, 1 - 1e-7)
        return torch.log(bounded) - torch.log1p(-bounded)

    def game_images(self, images: Tensor, mask: Tensor, index: Tensor, epoch: int) -> list[Tensor]:
        """The deletion and insertion images of the game (those with a non-zero weight), one batch each;
        ``mask`` (B, 1, H, W) is M upsampled to the image."""
        hp = self.hparams
        draws = per_image_uniforms(hp.draw_seed, epoch, STREAM_GAME, index, 2).to(images.device) ** hp.game_fraction_power
        picks = per_image_uniforms(hp.draw_seed, epoch, STREAM_GAME_SUBSTRATE, index, 3)
        batches = []
        for weight, column, deletion in ((hp.deletion_weight, 0, True), (hp.insertion_weight, 1, False)):
            if not weight:
                continue
            if hp.game_protocols:
                soft, substrate = self.protocol_game(images, mask, draws[:, column], picks[:, 2], deletion)
            else:
                soft = top_fraction_mask(self.ranking_scores(mask), draws[:, column], hp.game_temperature)
                choices = list(hp.deletion_substrates if deletion else hp.insertion_substrates)
                substrate = self.game_substrate(images, choices, picks[:, column], index, epoch)
            batches.append(perturb(images, 1 - soft if deletion else soft, substrate))
        return batches

    def protocol_game(self, images: Tensor, mask: Tensor, fractions: Tensor, picks: Tensor,
                      deletion: bool) -> tuple[Tensor, Tensor]:
        """The game under causal-metric protocols: image b draws a preset of ``game_protocols`` (``picks[b]``
        in [0, 1)) and its top ``fractions[b]`` is soft-selected over that preset's ranking units (pixels, or
        cells of its grid, upsampled as the preset does) and replaced by that preset's deletion or insertion
        substrate. Returns (soft top-fraction mask (B, 1, H, W), substrate (B, 3, H, W))."""
        names = list(self.hparams.game_protocols)
        which = (picks * len(names)).long().clamp_max(len(names) - 1).tolist()
        soft, substrate = torch.empty_like(mask, dtype=torch.float32), torch.empty_like(images)
        for name in sorted(set(names[w] for w in which)):
            rows = torch.tensor([b for b, w in enumerate(which) if names[w] == name], device=images.device)
            protocol = getattr(CausalProtocol, name)(images.shape[-1])
            if protocol.units == "pixel":
                part = top_fraction_mask(self.ranking_scores(mask[rows]), fractions[rows], self.hparams.game_temperature)
            else:  # cells ranked like the metric ranks them: by the mean of M over each cell
                cells = self.ranking_scores(F.adaptive_avg_pool2d(mask[rows].float(), protocol.units))
                part = F.interpolate(top_fraction_mask(cells, fractions[rows], self.hparams.game_temperature),
                                     size=images.shape[-2:], mode=protocol.upsample,
                                     align_corners=False if protocol.upsample == "bilinear" else None)
            soft[rows] = part
            spec = protocol.deletion_substrate if deletion else protocol.insertion_substrate
            substrate[rows] = make_substrate(spec, images[rows], blur_kernel=protocol.blur_kernel,
                                             blur_sigma=protocol.blur_sigma, mean=protocol.mean).to(images.dtype)
        return soft, substrate

    def teacher_term(self, mask_low: Tensor, index: Tensor) -> Tensor:
        """1 - mean Pearson correlation of the game's ranking scores of M^d (``ranking_scores``: logit(M) for CT,
        so that the near-zero background is ordered too, as the teacher orders it) with the teacher's
        standardised pixel ranks, over the batch images that have a teacher map (0 when none has)."""
        size = tuple(mask_low.shape[-2:])
        if size not in self._teacher_ranks:
            self._teacher_ranks[size] = rank_targets(self._teacher["maps"], size)
        rows = [(b, self._teacher_rows[i]) for b, i in enumerate(index.tolist()) if i in self._teacher_rows]
        if not rows:
            return mask_low.sum() * 0.0
        batch_rows, teacher_rows = (torch.tensor(r) for r in zip(*rows))
        student = self.ranking_scores(mask_low[batch_rows.to(mask_low.device)].float()).flatten(1)
        student = (student - student.mean(1, keepdim=True)) / student.std(1, unbiased=False, keepdim=True).clamp_min(1e-6)
        target = self._teacher_ranks[size][teacher_rows].to(student.device).flatten(1)
        return 1 - (student * target).mean(1).mean()

    def compute_loss(self, images: Tensor, features: Sequence[Tensor], targets: Tensor, index: Tensor,
                     epoch: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(loss, {term: value}, M^d (B,1,h,w)) of one batch; ``features`` from the clean forward."""
        w = self.weights
        mask_low = self.net(features, targets)
        mask = upsample(mask_low, images.shape[-2:])
        keep = mask.clamp(0, 1) if self.hparams.mode == "bt" else mask
        batch = []
        if w["ce_weight"] or w["bg_weight"]:  # with neither, the preserved / destroyed images cost no pass
            substrate = self.substrate(images, index, epoch)
            batch += [perturb(images, keep, substrate)] if w["ce_weight"] else []
            batch += [perturb(images, 1 - keep, substrate)] if w["bg_weight"] else []
        batch += self.game_images(images, mask, index, epoch)
        x = torch.cat(batch)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.blackbox.logits(x).float()  # one black-box call for every perturbation
        size, hinge = images.shape[0], self.hparams.class_loss == "hinge"
        blocks = iter(logits.split(size))
        terms, loss = {}, mask_low.new_zeros(())
        if w["ce_weight"]:
            block = next(blocks)
            terms["ce"] = (hinge_loss(block, targets, 1.0, preserve=True) if hinge
                           else F.cross_entropy(block, targets))
            loss = loss + w["ce_weight"] * terms["ce"]
        if w["area_weight"]:
            area = mask_low if w["area_power"] == 1 else (mask_low + AREA_EPS).pow(w["area_power"])
            terms["area"] = area.mean()
            loss = loss + w["area_weight"] * terms["area"]
        if w["tv_weight"]:
            terms["tv"] = total_variation(mask_low, self.hparams.tv_reduction, self.hparams.tv_border).mean()
            loss = loss + w["tv_weight"] * terms["tv"]
        if w["bg_weight"]:
            block = next(blocks)
            if hinge:
                terms["bg"] = hinge_loss(block, targets, 5.0, preserve=False)
            else:
                p_c = block.softmax(1).gather(1, targets[:, None]).squeeze(1)
                terms["bg"] = p_c.pow(self.hparams.bg_power).mean()
            loss = loss + w["bg_weight"] * terms["bg"]
        for name, weight in (("game_deletion", self.hparams.deletion_weight),
                             ("game_insertion", self.hparams.insertion_weight)):
            if weight:
                p_c = next(blocks).softmax(1).gather(1, targets[:, None]).squeeze(1)
                terms[name] = p_c.mean() if name == "game_deletion" else (1 - p_c).mean()
                loss = loss + weight * terms[name]
        if self.hparams.teacher_weight:
            terms["teacher"] = self.teacher_term(mask_low, index)
            loss = loss + self.hparams.teacher_weight * terms["teacher"]
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
            "loss_weights": dict(self.weights)}
