"""Every metric of one saliency map, per image: what the evaluation callback and ``evaluate.py`` both call.

``score_saliency`` runs the causal metrics (deletion, insertion, ROAD, M_F) through the model and the
localisation metrics (M_I, pointing game, IoU/F1 image- and pixel-level) against the ground truth, with
the knobs of one :class:`EvaluationSettings` — which is what gets written next to the numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor

from saliency_lab.metrics.causal import CausalProtocol, Model, causal_curves, faithfulness_mf, make_protocol
from saliency_lab.metrics.localisation import default_pointing_tolerance, iou_f1, iou_f1_pixel_level, pointing_game, pr_auc
from saliency_lab.metrics.road import ROAD_FRACTIONS, ROAD_NOISE, check_fractions, road_scores

# Per-image values in the order tables show them; percentages (mf, mi) are in [0, 100], the rest in [0, 1]
# (the normalised areas can leave [0, 1] a little when a curve is not monotone).
METRIC_NAMES = ("deletion", "insertion", "deletion_norm", "insertion_norm", "road_morf", "road_lerf", "road_gap", "mf",
                "mi", "pointing_game", "iou", "f1", "iou_top", "f1_top", "iou_pixel", "f1_pixel")
ROAD_NAMES = ("road_morf", "road_lerf", "road_gap")
# The metrics measured against the ground truth: NaN for an image without any (docs/protocols.md; counted apart).
LOCALISATION_NAMES = ("mi", "pointing_game", "iou", "f1", "iou_top", "f1_top", "iou_pixel", "f1_pixel")
# IoU and F1 divided by the binarised region's size are ~1e-3 at 64 px: tables print them x 1000.
PER_MILLE_NAMES = ("iou_pixel", "f1_pixel")


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """The knobs of a full evaluation (docs/protocols.md).

    Attributes:
        protocol: deletion / insertion protocol: a :class:`CausalProtocol`, or (in configs, before the
            image size is known) a preset name "rise" / "igos" or a dict of fields, see :func:`make_protocol`;
            :meth:`resolve` turns it into a :class:`CausalProtocol` for the images at hand.
        mf_steps: n of M_F's preserving curve (Delta = 1/n).
        mf_eps: images with q_O - q_F <= mf_eps get M_F = NaN and are counted as excluded.
        pointing_tolerance: pixels; None = 15 px at 224 scaled to the image (docs/protocols.md).
        iou_threshold: binarisation threshold T of the min-max normalised map for IoU/F1.
        top_fraction: the second binarisation: the top q of pixels (``iou_top``, ``f1_top``).
        road_fractions: the fractions of pixels ROAD removes (metrics/road.py); an empty list skips ROAD (its
            values are then NaN, reported as missing).
        road_noise: std of ROAD's imputation noise, [0, 1] pixel units.
        road_seed: seed of ROAD's fixed noise field.
    """

    protocol: Union[CausalProtocol, str, dict[str, Any]] = "rise"
    mf_steps: int = 32
    mf_eps: float = 1e-3
    pointing_tolerance: Optional[float] = None
    iou_threshold: float = 0.3
    top_fraction: float = 0.3
    road_fractions: tuple[float, ...] = ROAD_FRACTIONS
    road_noise: float = ROAD_NOISE
    road_seed: int = 0

    def __post_init__(self) -> None:
        if self.road_fractions:
            object.__setattr__(self, "road_fractions", check_fractions(self.road_fractions))
        else:
            object.__setattr__(self, "road_fractions", ())

    @classmethod
    def default(cls, image_size: int, **overrides: Any) -> "EvaluationSettings":
        """RISE's causal protocol at ``image_size`` and the docs/protocols.md defaults for the rest."""
        return cls(protocol=CausalProtocol.rise(image_size), **overrides)

    def resolve(self, image_size: int, *, target: str | None = None,
                max_forward_batch: int | None = None) -> "EvaluationSettings":
        """These settings with the protocol made concrete at ``image_size`` (:func:`make_protocol`)."""
        protocol = make_protocol(self.protocol, image_size, target=target, max_forward_batch=max_forward_batch)
        return dataclasses.replace(self, protocol=protocol)

    def tolerance(self, image_size: int) -> float:
        return default_pointing_tolerance(image_size) if self.pointing_tolerance is None else self.pointing_tolerance

    def to_dict(self, image_size: int) -> dict[str, Any]:
        protocol = self._resolved()
        record = dataclasses.asdict(dataclasses.replace(self, protocol="resolved"))
        record["protocol"] = protocol.to_dict()
        record["pointing_tolerance"] = self.tolerance(image_size)
        return record

    def _resolved(self) -> CausalProtocol:
        if not isinstance(self.protocol, CausalProtocol):
            raise ValueError(f"the protocol {self.protocol!r} is not resolved yet: call resolve(image_size)")
        return self.protocol


class SaliencyScores(NamedTuple):
    """``values``: name -> (B,) float (NaN where undefined); curves (B, n+1) over ``fractions`` (n+1,)."""

    values: dict[str, Tensor]
    deletion_curve: Tensor
    insertion_curve: Tensor
    fractions: Tensor


def score_saliency(model: Model, images: Tensor, saliency: Tensor, targets: Tensor, gt_mask: Tensor,
                   settings: EvaluationSettings) -> SaliencyScores:
    """All metrics of ``saliency`` (B,1,H,W) for ``images`` (B,3,H,W) in [0,1], explained ``targets`` (B,)
    and ground truth ``gt_mask`` (B,1,H,W) bool.

    An image whose ``gt_mask`` is empty (no boxes file, invalid boxes) has no localisation score: its
    ``LOCALISATION_NAMES`` are NaN, not 0, so the aggregation (:func:`metrics.report.summarise`) leaves it out
    of those means and counts it, instead of scoring it a miss."""
    protocol = settings._resolved()
    with torch.no_grad():
        curves = causal_curves(model, images, saliency, targets, protocol)
        mf = faithfulness_mf(model, images, saliency, targets, steps=settings.mf_steps, eps=settings.mf_eps,
                             max_forward_batch=protocol.max_forward_batch)
        road = _road(model, images, saliency, targets, settings, protocol.max_forward_batch)
    saliency = saliency.detach().float()
    iou, f1 = iou_f1(saliency, gt_mask, settings.iou_threshold)
    iou_top, f1_top = iou_f1(saliency, gt_mask, top_fraction=settings.top_fraction)
    iou_px, f1_px = iou_f1_pixel_level(saliency, gt_mask, settings.iou_threshold)
    hits = pointing_game(saliency, gt_mask, settings.tolerance(images.shape[-1]))
    values = {
        "deletion": curves.deletion, "insertion": curves.insertion, "deletion_norm": curves.deletion_norm,
        "insertion_norm": curves.insertion_norm, **road, "mf": mf.mf, "mi": pr_auc(saliency, gt_mask),
        "pointing_game": hits.float(), "iou": iou, "f1": f1, "iou_top": iou_top, "f1_top": f1_top,
        "iou_pixel": iou_px, "f1_pixel": f1_px,
    }
    has_gt = gt_mask.flatten(1).any(1)
    values.update({k: torch.where(has_gt, values[k].float(), torch.nan) for k in LOCALISATION_NAMES})
    return SaliencyScores({k: v.detach().float() for k, v in values.items()}, curves.deletion_curve,
                          curves.insertion_curve, curves.fractions)


def _road(model: Model, images: Tensor, saliency: Tensor, targets: Tensor, settings: EvaluationSettings,
          max_forward_batch: int) -> dict[str, Tensor]:
    """ROAD's (B,) MoRF, LeRF and gap values, NaN when ``settings.road_fractions`` is empty."""
    if not settings.road_fractions:
        return {name: torch.full((images.shape[0],), torch.nan, device=images.device) for name in ROAD_NAMES}
    road = road_scores(model, images, saliency, targets, settings.road_fractions, settings.road_noise,
                       settings.road_seed, max_forward_batch)
    return dict(zip(ROAD_NAMES, (road.morf, road.lerf, road.gap)))
