"""The trained mask predictor as an explainer, and the loaders of its checkpoints.

``explainers.load_checkpoint(path, blackbox)`` rebuilds a predictor trained by
:class:`lightning_modules.mask_predictor.MaskPredictor` from the checkpoint's ``"explainer"`` record —
registered names ``predictor_ct``, ``predictor_bt``, ``mgnet`` and ``predictor_ct_posthoc`` (CT with
post-hoc tuning) — with ``torch.load(weights_only=True)``; the checkpoint does not hold the black box,
the caller passes it (:func:`load_predictor` builds it from the recorded spec when not given).
:func:`load_predictor` also switches post-hoc tuning on or off for any checkpoint, e.g. to evaluate
``predictor_ct`` and ``predictor_ct_posthoc`` from one training run.

Saliency = the predictor's mask M^d for the explained class, upsampled bilinearly to the image: one pass of
the black box's feature extractor plus the generator (``cost.forwards`` = 1 per image).

Post-hoc tuning (METHODS.md §1, an inference option): rank the pixels by M, reveal the top k of them into
the blurred image at ``posthoc_points`` + 1 uniformly spaced k (k = ceil(j N / n), j = 0..n), measure
q = p_c, make q monotone with a running max, interpolate it linearly to every rank i (q_i = q at i + 1
revealed pixels), and rescale r'_i = r_i (q_max - q_i + eps). r and (q_max - q_i + eps) are both
non-increasing along the ranking, so the ranking is kept (ties may appear, never swaps); the map's values
now say how much of the class score is still missing when a pixel is revealed. Costs n + 1 more forwards
per image.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
from torch import Tensor

from explainers.base import Explainer, rebatch
from explainers.perturbation import gaussian_blur, scaled_blur
from explainers.registry import register_checkpoint_loader

PREDICTOR_NAMES = ("predictor_ct", "predictor_bt", "mgnet", "predictor_ct_posthoc")
EXPLAINER_FORMAT = "saliency-lab/mask-predictor/v1"
NET_PREFIX = "net."
_BASE_NAMES = {"ct": "predictor_ct", "bt": "predictor_bt", "none": "mgnet"}


def explainer_name(controller: str, posthoc: bool = False) -> str:
    """Registry name of a predictor: ``predictor_ct`` / ``predictor_bt`` / ``mgnet``, + ``_posthoc`` if tuned."""
    return _BASE_NAMES[controller] + ("_posthoc" if posthoc else "")


class MaskPredictorExplainer(Explainer):
    """A trained :class:`lightning_modules.mask_generator.MaskPredictorNet` behind the explainer contract.

    Args:
        blackbox: the black box the predictor was trained on.
        net: the predictor network (kept by reference: a LightningModule's live network explains with its
            current weights).
        name: the name results are reported under (``explainer_name``).
        posthoc: apply post-hoc tuning (see the module docstring).
        posthoc_points: n, the measured ranks of post-hoc tuning. posthoc_eps: its epsilon.
        posthoc_blur_kernel, posthoc_blur_sigma: the blur the pixels are revealed into, given at 224 and
            scaled to the image (default: the strong blur M_F uses, kernel 51, sigma 50).
        filter_bias: b of the feature filter at inference (None: the trained value, 0).
        seed, max_forward_batch, image_dtype: see :class:`Explainer` (the predictor itself is deterministic).
    """

    def __init__(self, blackbox, net, name: str = "predictor_ct", *, posthoc: bool = False,
                 posthoc_points: int = 32, posthoc_eps: float = 1e-3, posthoc_blur_kernel: int = 51,
                 posthoc_blur_sigma: float = 50.0, filter_bias: float | None = None, seed: int = 0,
                 max_forward_batch: int = 256, image_dtype: str = "float32"):
        super().__init__(blackbox, seed=seed, max_forward_batch=max_forward_batch, image_dtype=image_dtype)
        if posthoc_points < 1:
            raise ValueError(f"posthoc_points must be >= 1, got {posthoc_points}")
        self.net = net
        self.name = name
        self.posthoc, self.posthoc_points, self.posthoc_eps = bool(posthoc), int(posthoc_points), float(posthoc_eps)
        self.posthoc_blur_kernel, self.posthoc_blur_sigma = int(posthoc_blur_kernel), float(posthoc_blur_sigma)
        self.filter_bias = filter_bias

    def _explain(self, images: Tensor, targets: Tensor, seeds: Tensor) -> Tensor:
        modes = [(m, m.training) for m in self.net.modules()]
        bias = self.net.filter.bias
        self.net.eval()
        if self.filter_bias is not None:
            self.net.filter.bias = float(self.filter_bias)
        try:
            maps = []
            for part in self._chunks(images.shape[0]):
                features = self.blackbox.features(images[part])
                self.cost.forwards += images[part].shape[0]
                maps.append(self.net.mask(features, targets[part], images.shape[-2:]).float())
            saliency = torch.cat(maps)
        finally:
            for module, mode in modes:
                module.training = mode
            self.net.filter.bias = bias
        if self.posthoc:
            saliency = self.tune(images, saliency, targets)
        return saliency

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


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _check_fit(net, blackbox, where: str) -> None:
    channels = list(getattr(blackbox, "feature_channels", net.generator.feature_channels))
    if channels != net.generator.feature_channels or int(blackbox.num_classes) != net.num_classes:
        raise ValueError(f"{where} was trained for a black box with feature channels {net.generator.feature_channels} "
                         f"and {net.num_classes} classes; the given one has {channels} and {blackbox.num_classes}")


def _device_of(module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def from_checkpoint(checkpoint: dict, path: str, blackbox=None, posthoc: bool | None = None,
                    **inference) -> MaskPredictorExplainer:
    """A :class:`MaskPredictorExplainer` from a loaded predictor checkpoint.

    ``blackbox`` None builds it from the recorded spec; ``posthoc`` None keeps the recorded choice;
    ``inference`` overrides other recorded inference options (``posthoc_points``, ``filter_bias``, ...).
    """
    from lightning_modules.blackbox import BlackBox
    from lightning_modules.mask_generator import MaskPredictorNet

    record = checkpoint.get("explainer") or {}
    if record.get("format") != EXPLAINER_FORMAT:
        raise ValueError(f"{path} is not a mask-predictor checkpoint (explainer format {record.get('format')!r})")
    net = MaskPredictorNet.from_config(record["net"])
    state = {k[len(NET_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(NET_PREFIX)}
    net.load_state_dict(state)
    if blackbox is None:
        blackbox = BlackBox(**record["blackbox"])
    _check_fit(net, blackbox, path)
    net.to(_device_of(blackbox)).eval()
    options = {**record.get("inference", {}), **inference}
    if posthoc is not None:
        options["posthoc"] = bool(posthoc)
    name = explainer_name(net.controller.kind, options.get("posthoc", False))
    return MaskPredictorExplainer(blackbox, net, name, **options)


def load_predictor(path: str, blackbox=None, posthoc: bool | None = None, **inference) -> tuple[str, MaskPredictorExplainer]:
    """(name, explainer) from a predictor checkpoint at ``path`` (``weights_only=True``); see
    :func:`from_checkpoint` for the arguments. The name follows the controller and ``posthoc``."""
    from lightning_modules.blackbox import safe_load

    explainer = from_checkpoint(safe_load(path), str(path), blackbox, posthoc, **inference)
    return explainer.name, explainer


def _loader(checkpoint: dict, path: str, blackbox, *, name: str) -> MaskPredictorExplainer:
    return from_checkpoint(checkpoint, path, blackbox, posthoc=name.endswith("_posthoc"))


for _name in PREDICTOR_NAMES:
    register_checkpoint_loader(_name)(functools.partial(_loader, name=_name))
