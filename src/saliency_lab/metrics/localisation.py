"""Localisation metrics against ground-truth masks: M_I (PR area), pointing game, IoU and F1.

Definitions: docs/protocols.md. No model is involved. Shapes: saliency (B, 1, h, w) float, higher = more
salient; gt_mask (B, 1, H, W) bool. A saliency map at another resolution than the ground truth is
resized bilinearly (align_corners=False) to H x W first, so every metric is evaluated at the ground
truth's resolution. All functions are vectorised over the batch and stay on the input's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from saliency_lab.core.inputs import check_saliency

# docs/protocols.md: pointing-game tolerance of 15 px at 224 x 224.
POINTING_TOLERANCE_224 = 15.0
# Relative band of the pointing game's tie rule (:func:`pointing_maxima`).
POINTING_TIE_RTOL = 1e-5


def _at_gt_resolution(saliency: Tensor, gt_mask: Tensor) -> Tensor:
    """Validate the pair (saliency through the shared ``core.inputs`` check) and return saliency
    (B, 1, H, W) float at the ground truth's resolution."""
    check_saliency(saliency)
    if not isinstance(gt_mask, Tensor) or gt_mask.ndim != 4 or gt_mask.shape[1] != 1:
        raise ValueError(f"gt_mask must be (B, 1, H, W), got {tuple(getattr(gt_mask, 'shape', ())) or type(gt_mask).__name__}")
    if saliency.shape[0] != gt_mask.shape[0]:
        raise ValueError(f"batch sizes differ: saliency {saliency.shape[0]}, gt_mask {gt_mask.shape[0]}")
    if gt_mask.dtype != torch.bool:
        raise ValueError(f"gt_mask must be bool, got {gt_mask.dtype}")
    saliency = saliency.float()
    if saliency.shape[-2:] != gt_mask.shape[-2:]:
        saliency = F.interpolate(saliency, size=gt_mask.shape[-2:], mode="bilinear", align_corners=False)
    return saliency


def pr_auc(saliency: Tensor, gt_mask: Tensor) -> Tensor:
    """(B,) M_I in percent: average precision of pixels ranked by saliency against the ground truth.

    M_I = 100 * sum_i P_i (R_i - R_{i-1}) over the distinct saliency values taken as thresholds
    (docs/protocols.md Eq. 11), i.e. the same number as torchmetrics' ``binary_average_precision`` and
    sklearn's ``average_precision_score``: pixels with equal saliency enter together (ties are never
    ordered arbitrarily). Vectorised over the batch instead of one torchmetrics call per image; the tests
    check it against both. Images without any ground-truth pixel give NaN (recall is undefined).
    """
    saliency = _at_gt_resolution(saliency, gt_mask)
    scores, positives = saliency.flatten(1), gt_mask.flatten(1)
    scores, order = torch.sort(scores, dim=1, descending=True)
    hits = positives.gather(1, order).double()
    position = torch.arange(1, scores.shape[1] + 1, device=scores.device)
    precision = hits.cumsum(1) / position
    # Precision is read at the end of each run of equal scores: the threshold that admits the whole run.
    run_end = torch.ones_like(scores, dtype=torch.bool)
    run_end[:, :-1] = scores[:, 1:] != scores[:, :-1]
    end_index = torch.where(run_end, position - 1, scores.shape[1])
    end_index = end_index.flip(1).cummin(1).values.flip(1)
    num_positive = hits.sum(1)
    ap = (hits * precision.gather(1, end_index)).sum(1) / num_positive
    return (100 * ap).float().masked_fill(num_positive == 0, torch.nan)


def default_pointing_tolerance(image_size: int) -> float:
    """Pointing-game tolerance in pixels for an image_size x image_size image: 15 * image_size / 224."""
    return POINTING_TOLERANCE_224 * image_size / 224


def pointing_maxima(saliency: Tensor) -> Tensor:
    """(B, H, W) bool: the pixels of (B, 1, H, W) saliency tied with the image's maximum.

    Tie rule: S >= max S - POINTING_TIE_RTOL * max |S|. Float32 rounding is relative to the magnitudes of
    the values summed, so two pixels that are equal in exact arithmetic can come out of a network (or of a
    bilinear resize) a few ulps apart, i.e. ~1e-7 relative; 1e-5 (about 80 float32 ulps at the map's
    largest magnitude) absorbs that summation noise, and is far below any difference a saliency map is read
    at (an 8-bit display step is 4e-3 of the range). ``max |S|`` rather than the range makes the band
    follow the rounding error of an offset map. An all-zero map has band 0: every pixel ties.
    """
    flat = saliency.flatten(1)
    top = flat.amax(1, keepdim=True)
    band = POINTING_TIE_RTOL * flat.abs().amax(1, keepdim=True)
    return (flat >= top - band).view(saliency.shape[0], *saliency.shape[-2:])


def pointing_game(saliency: Tensor, gt_mask: Tensor, tolerance: float) -> Tensor:
    """(B,) bool hits of the pointing game (docs/protocols.md).

    The points are the maxima of the saliency at the ground truth's resolution, ties included: every
    pixel within :func:`pointing_maxima`'s relative band (1e-5 of max |S|) of the maximum. Hit if some
    ground-truth pixel q has Euclidean distance ||q - p|| < tolerance, in pixels, to ANY tied maximum p
    (the point itself always counts, so tolerance 0 means "a maximum is a ground-truth pixel"). Unlike
    "the first maximum in row-major order", this does not depend on float noise of ~1e-7 either way, on
    the summation order or on the scan order. A map whose every pixel ties (a constant map: it points
    nowhere) is a miss. An image without ground truth returns False here; :func:`metrics.score_saliency`
    reports it as NaN (not evaluated, counted apart). Computed by dilating the ground truth with a disc
    of radius ``tolerance`` (a max-pool with a disc kernel), no pixel loops.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    saliency = _at_gt_resolution(saliency, gt_mask)
    maxima = pointing_maxima(saliency)
    near_gt = _dilate(gt_mask[:, 0], tolerance)
    everywhere = maxima.flatten(1).all(1)
    return (maxima & near_gt).flatten(1).any(1) & ~everywhere


def _dilate(mask: Tensor, tolerance: float) -> Tensor:
    """(B, H, W) bool: the pixels p with some pixel q of ``mask`` (B, H, W) at ||q - p|| < tolerance, or q = p.

    Row by row of the disc: for a row offset dy, the pixels within dx <= half(dy) on that row, from prefix
    sums along the row; O(radius * H * W), not a (2 radius + 1)^2 convolution."""
    height, width = mask.shape[-2:]
    reach = max(0, math.ceil(tolerance) - 1)  # the largest integer offset d with d < tolerance
    rows, cols = min(reach, height - 1), min(reach, width - 1)
    padded = F.pad(mask.to(torch.int32), (cols + 1, cols))  # a zero column in front: prefix[k] - prefix[k - w]
    prefix = padded.cumsum(-1)
    out = mask.clone()
    x = torch.arange(width, device=mask.device)
    for dy in range(-rows, rows + 1):
        half = _half_width(tolerance, dy, cols)
        if half < 0:
            continue
        row_hit = (prefix[..., x + half + cols + 1] - prefix[..., x - half + cols]) > 0
        if dy >= 0:
            out[:, :height - dy] |= row_hit[:, dy:]
        else:
            out[:, -dy:] |= row_hit[:, :height + dy]
    return out


def _half_width(tolerance: float, dy: int, cap: int) -> int:
    """The largest integer dx <= cap with dx^2 + dy^2 < tolerance^2; -1 if none."""
    room = tolerance**2 - dy * dy
    if room <= 0:
        return -1
    half = min(cap, math.isqrt(max(0, math.ceil(room) - 1)))
    while half >= 0 and half * half + dy * dy >= tolerance**2:
        half -= 1
    return half


def saliency_region(saliency: Tensor, threshold: float = 0.3, top_fraction: float | None = None) -> Tensor:
    """(B, 1, H, W) bool region R binarised from (B, 1, H, W) saliency.

    Default: min-max normalise per image, S' = (S - min) / (max - min), and keep S' >= threshold
    (IASSA's T = 0.3). A constant map has no salient pixel: S' = 0 everywhere (R empty for T > 0).
    With ``top_fraction`` q in (0, 1]: keep the top ceil(q * H * W) pixels by saliency, equal values
    ordered row-major (stable), so R has exactly that many pixels; ``threshold`` is then unused.
    """
    check_saliency(saliency)
    flat = saliency.flatten(1)
    if top_fraction is not None:
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        keep = math.ceil(top_fraction * flat.shape[1])
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :keep]
        region = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
        return region.view_as(saliency)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = high - low
    normalised = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return (normalised >= threshold).view_as(saliency)


def _iou_f1_area(saliency: Tensor, gt_mask: Tensor, threshold: float, top_fraction: float | None):
    """(iou, f1, |R|), each (B,) float, with R from :func:`saliency_region`; NaN where a denominator is 0."""
    region = saliency_region(_at_gt_resolution(saliency, gt_mask), threshold, top_fraction).flatten(1)
    truth = gt_mask.flatten(1)
    both = (region & truth).sum(1).float()
    area, truth_area = region.sum(1).float(), truth.sum(1).float()
    return both / (area + truth_area - both), 2 * both / (area + truth_area), area


def iou_f1(
    saliency: Tensor, gt_mask: Tensor, threshold: float = 0.3, top_fraction: float | None = None
) -> tuple[Tensor, Tensor]:
    """(iou (B,), f1 (B,)) in [0, 1] of the binarised saliency R against the ground truth G.

    IoU = |R and G| / |R or G|; F1 = foreground F1 = 2 |R and G| / (|R| + |G|) (not sklearn's
    micro-averaged F1, which is pixel accuracy). R from :func:`saliency_region`. NaN when the
    denominator is 0 (R and G both empty).
    """
    iou, f1, _ = _iou_f1_area(saliency, gt_mask, threshold, top_fraction)
    return iou, f1


def iou_f1_pixel_level(
    saliency: Tensor, gt_mask: Tensor, threshold: float = 0.3, top_fraction: float | None = None
) -> tuple[Tensor, Tensor]:
    """IASSA's "pixel-level" variant: (iou / |R|, f1 / |R|), each (B,).

    docs/protocols.md: each image-level score of :func:`iou_f1` divided by the number of pixels in the
    top-30% region. We read "top-30% region" as the same binarised region R the image-level score used
    (S' >= 0.3 by default, or the top ``top_fraction`` of pixels), so the two tables share one R.
    Values are per pixel, hence tiny; kept only to compare with IASSA's table. NaN when R is empty.
    """
    iou, f1, area = _iou_f1_area(saliency, gt_mask, threshold, top_fraction)
    return iou / area, f1 / area
