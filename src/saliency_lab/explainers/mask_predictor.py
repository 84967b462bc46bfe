"""The trained mask predictor as an explainer: the registered methods built from its checkpoints.

``explainers.build(name, blackbox, checkpoint=PATH)`` rebuilds a predictor trained by
:class:`saliency_lab.lightning_modules.mask_predictor.MaskPredictor` from the checkpoint's ``"explainer"`` record with
``torch.load(weights_only=True)``: ``predictor_ct``, ``predictor_bt``, ``mgnet`` (the controller must be
the checkpoint's), ``predictor_ct_posthoc`` (CT with post-hoc tuning, from a CT checkpoint), so one
training run gives both ``predictor_ct`` and ``predictor_ct_posthoc``, ``predictor_square`` (the x^2
transformer), ``mgnet_ct_posthoc`` (CT applied post hoc to MGnet's masks, from an MGnet checkpoint: the paper's
post-hoc experiment), and ``predictor_game`` (a CT network
trained by the deletion/insertion game: the same explainer as ``predictor_ct`` under the name its training
recipe records, so that both can be evaluated side by side from their checkpoints). The checkpoint does not hold the
black box's weights, only its config: the caller passes the black box, or None to rebuild the recorded one.
The networks come from :mod:`networks` (plain ``nn.Module``s), never from the LightningModule.

Saliency = the predictor's mask M^d for the explained class, upsampled bilinearly to the image: one pass of
the black box's feature extractor plus the generator (``cost.forwards`` = 1 per image).

Post-hoc tuning (docs/methods.md §1, an inference option): rank the pixels by M, reveal the top k of them into
the blurred image at ``posthoc_points`` + 1 uniformly spaced k (k = ceil(j N / n), j = 0..n), measure
q = p_c, make q monotone with a running max, interpolate it linearly to every rank i (q_i = q at i + 1
revealed pixels), and rescale r'_i = r_i (q_max - q_i + eps). r and (q_max - q_i + eps) are both
non-increasing along the ranking, so the ranking is kept (ties may appear, never swaps); the map's values
now say how much of the class score is still missing when a pixel is revealed. Costs n + 1 more forwards
per image.

CT applied post hoc (``mgnet_ct_posthoc``, the paper's post-hoc experiment on MGnet): the trained network's
mask M^d (B, 1, h_0, w_0), MGnet's |a| / (|a| + |b|) in [0, 1], goes through the CT controller before the
upsampling, sigmoid(eta * z) ** h with z = (M^d - mean) / std per image (``networks.controllers.CTController``,
eta and h given at explanation time, default the paper's 1.5 and 2.5); the result is in (0, 1). *Deviation /
our choice:* our sources say only that CT is applied post hoc to MGnet's masks; we standardise the masks as CT
standardises M^g in training, so that eta and h keep their meaning. CT is increasing in M^d, so the ranking
is kept (pixel-ranking metrics are unchanged up to the bilinear upsampling); the mask's distribution, and thus
thresholded and mask-weighted scores, change. No extra forward pass.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import Tensor

from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.checkpoints import safe_load
from saliency_lab.core.perturbation import gaussian_blur, scaled_blur
from saliency_lab.explainers.base import Explainer, device_of, rebatch
from saliency_lab.explainers.registry import register
from saliency_lab.networks.controllers import Controller, CTController
from saliency_lab.networks.mask_generator import MaskPredictorNet, upsample

EXPLAINER_FORMAT = "saliency-lab/mask-predictor/v1"
NET_PREFIX = "net."


class MaskPredictorExplainer(Explainer):
    """A trained :class:`saliency_lab.networks.mask_generator.MaskPredictorNet` behind the explainer contract.

    Subclasses fix the controller (``"ct"``, ``"bt"``, ``"square"``, ``"none"``) and whether post-hoc tuning or
    a post-hoc controller (:attr:`retransform`) is applied; each is one registered name.

    Args:
        blackbox: the black box the predictor was trained on.
        net: the predictor network (kept by reference: a LightningModule's live network explains with its
            current weights); its controller must be the class's.
        posthoc_points: n, the measured ranks of post-hoc tuning. posthoc_eps: its epsilon.
        posthoc_blur_kernel, posthoc_blur_sigma: the blur the pixels are revealed into, given at 224 and
            scaled to the image (default: the strong blur M_F uses, kernel 51, sigma 50).
        filter_bias: b of the feature filter at inference (None: the trained value, 0).
        seed, max_forward_batch, image_dtype: see :class:`Explainer` (the predictor itself is deterministic).
    """

    trained = True
    controller: ClassVar[str] = ""
    posthoc: ClassVar[bool] = False  # apply post-hoc tuning (see the module docstring)

    def __init__(self, blackbox, net, *, posthoc_points: int = 32, posthoc_eps: float = 1e-3,
                 posthoc_blur_kernel: int = 51, posthoc_blur_sigma: float = 50.0, filter_bias: float | None = None,
                 seed: int = 0, max_forward_batch: int = 256, image_dtype: str = "float32"):
        super().__init__(blackbox, seed=seed, max_forward_batch=max_forward_batch, image_dtype=image_dtype)
        if net.controller.kind != self.controller:
            raise ValueError(f"{self.name!r} needs a predictor with the {self.controller!r} controller, got "
                             f"{net.controller.kind!r}")
        if posthoc_points < 1:
            raise ValueError(f"posthoc_points must be >= 1, got {posthoc_points}")
        self.net = net
        self.posthoc_points, self.posthoc_eps = int(posthoc_points), float(posthoc_eps)
        self.posthoc_blur_kernel, self.posthoc_blur_sigma = int(posthoc_blur_kernel), float(posthoc_blur_sigma)
        self.filter_bias = filter_bias
        #: a controller applied at explanation time to the network's M^d, before upsampling (None: off)
        self.retransform: Controller | None = None

    @property
    def hparams(self) -> dict:
        return {**super().hparams, "posthoc": self.posthoc}

    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        modes = [(m, m.training) for m in self.net.modules()]
        bias = self.net.filter.bias
        self.net.eval()
        if self.filter_bias is not None:
            self.net.filter.bias = float(self.filter_bias)
        try:
            maps = []
            for part in self._chunks(images.shape[0]):
                features = self._features(images[part])
                maps.append(self._mask(features, targets[part], images.shape[-2:]).float())
            saliency = torch.cat(maps)
        finally:
            for module, mode in modes:
                module.training = mode
            self.net.filter.bias = bias
        if self.posthoc:
            saliency = self.tune(images, saliency, targets)
        return saliency

    def _mask(self, features: list[Tensor], targets: Tensor, size) -> Tensor:
        """M^d of the network (through :attr:`retransform` when set) upsampled to ``size``: (B, 1, H, W)."""
        if self.retransform is None:
            return self.net.mask(features, targets, size)
        return upsample(self.retransform(self.net(features, targets)), size)

    # -- post-hoc tuning ----------------------------------------------------------------------------
    def tune(self, images: Tensor, saliency: Tensor, targets: Tensor) -> Tensor:
        """Post-hoc tuning of non-negative ``saliency`` (B, 1, H, W); see the module docstring."""
        batch, pixels = saliency.shape[0], saliency[0].numel()
        points = min(self.posthoc_points, pixels)
        flat = saliency.flatten(1).clamp_min(0)
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices  # rank -> pixel
        positions = torch.arange(pixels, device=flat.device)
        rank = torch.empty_like(order).scatter_(1, order, positions.expand(batch, -1))  # pixel -> rank
        counts = (torch.arange(points + 1, device=flat.device) * pixels + points - 1) // points
        kernel, sigma = scaled_blur(self.posthoc_blur_kernel, self.posthoc_blur_sigma, images.shape[-1])
        blurred = gaussian_blur(images, kernel, sigma)

        def parts() -> Iterator[tuple[Tensor, Tensor]]:
            for b in range(batch):
                keep = (rank[b].view(1, 1, *images.shape[-2:]) < counts.view(-1, 1, 1, 1)).to(images.dtype)
                x = torch.lerp(blurred[b].expand(points + 1, -1, -1, -1), images[b].expand(points + 1, -1, -1, -1),
                               keep)
                yield x, targets[b].expand(points + 1)

        probs = [self._logits(x).float().softmax(1).gather(1, c[:, None]).squeeze(1)
                 for x, c in rebatch(parts(), self.max_forward_batch)]
        q = torch.cat(probs).view(batch, points + 1).cummax(dim=1).values
        # q at i + 1 revealed pixels for rank i, linear between the measured counts
        revealed = positions + 1
        upper = torch.searchsorted(counts, revealed).clamp(1, points)
        lower = upper - 1
        weight = ((revealed - counts[lower]) / (counts[upper] - counts[lower]).clamp_min(1)).to(q.dtype)
        q_rank = torch.lerp(q[:, lower], q[:, upper], weight.expand(batch, -1))
        factor = q[:, -1:] - q_rank + self.posthoc_eps
        tuned = flat.gather(1, order) * factor
        return torch.empty_like(flat).scatter_(1, order, tuned).view_as(saliency)

    # -- checkpoints --------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint, blackbox=None, **options) -> "MaskPredictorExplainer":
        """This method from a predictor checkpoint (a path, read with ``weights_only=True``, or its dict).

        ``blackbox`` None builds the black box from the recorded config; ``options`` override the recorded
        inference options (``posthoc_points``, ``filter_bias``, ...).
        """
        where = "the checkpoint" if isinstance(checkpoint, Mapping) else str(checkpoint)
        loaded = checkpoint if isinstance(checkpoint, Mapping) else safe_load(checkpoint)
        record = loaded.get("explainer") or {}
        if record.get("format") != EXPLAINER_FORMAT:
            raise ValueError(f"{where} is not a mask-predictor checkpoint (explainer format {record.get('format')!r})")
        net = MaskPredictorNet.from_config(record["net"])
        if net.controller.kind != cls.controller:
            raise ValueError(f"{where} holds a {record.get('name')!r} explainer, which cannot be loaded as {cls.name!r}")
        net.load_state_dict({k[len(NET_PREFIX):]: v for k, v in loaded["state_dict"].items() if k.startswith(NET_PREFIX)})
        if blackbox is None:
            blackbox = BlackBox.from_config(record["blackbox"])
        _check_fit(net, blackbox, where)
        net.to(device_of(blackbox) or torch.device("cpu")).eval()
        recorded = {k: v for k, v in record.get("inference", {}).items() if k != "posthoc"}  # the class decides
        return cls(blackbox, net, **{**recorded, **options})


@register("predictor_ct")
class PredictorCT(MaskPredictorExplainer):
    """The learned predictor with the CT controller (the paper's method)."""

    controller = "ct"


@register("predictor_ct_posthoc")
class PredictorCTPosthoc(PredictorCT):
    """The CT predictor with post-hoc tuning (from the same checkpoint as ``predictor_ct``)."""

    posthoc = True


@register("predictor_bt")
class PredictorBT(MaskPredictorExplainer):
    """The learned predictor with the BT controller."""

    controller = "bt"


@register("mgnet")
class MGNet(MaskPredictorExplainer):
    """The MGnet baseline (Dabkowski & Gal): the ratio head, no distribution controller."""

    controller = "none"


@register("predictor_square")
class PredictorSquare(MaskPredictorExplainer):
    """The learned predictor with the non-monotonic x^2 controller (the paper's Fig. 2c)."""

    controller = "square"


@register("mgnet_ct_posthoc")
class MGNetCTPosthoc(MGNet):
    """MGnet's masks through CT at explanation time (module docstring), from an MGnet checkpoint.

    Args:
        eta, h: CT's slope and power (the paper's 1.5, 2.5; give the values tuned for the data, e.g. on its
            validation split). The other arguments: :class:`MaskPredictorExplainer`.
    """

    def __init__(self, blackbox, net, *, eta: float = 1.5, h: float = 2.5, **options):
        super().__init__(blackbox, net, **options)
        self.retransform = CTController(eta, h).to(next(net.parameters()).device)

    @property
    def eta(self) -> float:
        return self.retransform.eta

    @property
    def h(self) -> float:
        return self.retransform.h


@register("predictor_game")
class PredictorGame(PredictorCT):
    """The CT predictor trained by the deletion/insertion game alone (configs/train/embedded_predictor_game.yaml,
    the winner of experiments/predictor_ablation.py): at inference the same network and controller as
    ``predictor_ct``; its own name is what its checkpoints record (``MaskPredictor(method="predictor_game")``)."""


_CLASSES = {(cls.controller, cls.posthoc): cls
            for cls in (PredictorCT, PredictorCTPosthoc, PredictorBT, PredictorSquare, MGNet)}
# Registered predictors a training recipe may record as its own name (MaskPredictor's ``method``), by name.
RECIPES = {cls.name: cls for cls in (PredictorCT, PredictorBT, PredictorSquare, MGNet, PredictorGame)}
# Inference-time variants of a recipe's checkpoint (never recorded by training), by name.
VARIANTS = {cls.name: cls for cls in (PredictorCTPosthoc, MGNetCTPosthoc)}


def predictor_class(controller: str, posthoc: bool = False) -> type[MaskPredictorExplainer]:
    """The registered predictor method of a controller (``"ct"``, ``"bt"``, ``"square"``, ``"none"``), with or
    without post-hoc tuning (registered for CT: ``predictor_ct_posthoc``)."""
    key = (controller, bool(posthoc))
    if key not in _CLASSES:
        raise ValueError(f"no registered predictor for controller {controller!r} with posthoc={bool(posthoc)}; "
                         "post-hoc tuning is registered for CT only (predictor_ct_posthoc)")
    return _CLASSES[key]


def explainer_name(controller: str, posthoc: bool = False) -> str:
    """Registry name of a predictor: ``predictor_ct`` / ``predictor_bt`` / ``predictor_square`` / ``mgnet`` /
    ``predictor_ct_posthoc``."""
    return predictor_class(controller, posthoc).name


def recipe_class(method: str, controller: str) -> type[MaskPredictorExplainer]:
    """The registered predictor a training recipe names as its method (``predictor_game``...); it must explain
    with ``controller``, the recipe's (post-hoc tuning is an inference option, never a recipe's name)."""
    cls = RECIPES.get(method)
    if cls is None or cls.controller != controller:
        fitting = sorted(name for name, c in RECIPES.items() if c.controller == controller)
        raise ValueError(f"method {method!r} is not a registered predictor with the {controller!r} controller; "
                         f"choose one of {fitting}")
    return cls


def _check_fit(net, blackbox, where: str) -> None:
    channels = list(getattr(blackbox, "feature_channels", net.generator.feature_channels))
    if channels != net.generator.feature_channels or int(blackbox.num_classes) != net.num_classes:
        raise ValueError(f"{where} was trained for a black box with feature channels {net.generator.feature_channels} "
                         f"and {net.num_classes} classes; the given one has {channels} and {blackbox.num_classes}")
