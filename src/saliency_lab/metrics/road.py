"""ROAD: RemOve And Debias (Rong et al. 2022, "A consistent and efficient evaluation strategy for attribution
methods"; docs/protocols.md, "ROAD").

A fraction p of the pixels is removed in the map's order, most relevant first (MoRF) or least relevant first
(LeRF), and filled by *noisy linear imputation*: every removed pixel becomes the weighted mean of its 8 neighbours
(weights 1/6 for the 4 direct ones, 1/12 for the diagonals; removed neighbours are unknowns too, so all removed
pixels of an image come from one sparse linear system), plus Gaussian noise. The filled region follows the image
around it, so the shape of the removed set leaks much less class evidence than a blurred or grey substrate does.
The score at p is the black box's softmax probability of the explained class; a curve's score is its mean over
the fractions: MoRF lower is better, LeRF higher is better, ``road_gap = LeRF - MoRF`` higher is better.

The imputation solves the linear system of pytorch-grad-cam's ``NoisyLinearImputer`` and Quantus'
``noisy_linear_imputation`` (the tests check both to 1e-5 at zero noise), built vectorised, a few times faster
than their element-by-element construction (``python -m benchmarks.road``). Deviations from the paper's code:
  - the noise (std ``noise`` in [0, 1] pixel units, 0.01 by default as in both libraries) is one fixed field
    drawn from ``seed`` per image size, added on the removed pixels, instead of a fresh draw from the global
    generator at each call: a score then depends on nothing but the image, the map and the settings (not on the
    batch, the process or what ran before);
  - pixels are ranked by the map's value with ties broken by the lower flat index (:func:`rank_units`), and the
    number removed at p is ``round(p * H * W)``;
  - images are not clipped to [0, 1] after the fill (neither library clips).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saliency_lab.core.blackbox import fast_passes
from saliency_lab.core.inputs import check_explained_batch, check_saliency
from saliency_lab.metrics.causal import Model, rank_units

ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROAD_NOISE = 0.01


class RoadScores(NamedTuple):
    """(B,) ``morf``, ``lerf`` (means over the fractions), ``gap`` = lerf - morf; (B, F) curves over ``fractions``."""

    morf: Tensor
    lerf: Tensor
    gap: Tensor
    morf_curve: Tensor
    lerf_curve: Tensor
    fractions: Tensor


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """The fractions as a tuple, each in (0, 1); a clear error otherwise."""
    fractions = tuple(float(p) for p in fractions)
    bad = [p for p in fractions if not 0.0 < p < 1.0]
    if not fractions or bad:
        raise ValueError(f"ROAD fractions must be a non-empty list of values in (0, 1); got {list(fractions)}")
    return fractions


def removal_masks(saliency: Tensor, fractions: Sequence[float], most_relevant_first: bool) -> Tensor:
    """(B, F, H, W) bool, True where a pixel is removed at each fraction of (B, 1, H, W) ``saliency``: the
    ``round(p * H * W)`` highest-ranked pixels (MoRF) or lowest-ranked ones (LeRF)."""
    batch, _, height, width = saliency.shape
    ranks = rank_units(saliency.detach().float().flatten(1))  # (B, HW), 0 = most salient
    if not most_relevant_first:
        ranks = height * width - 1 - ranks
    counts = torch.tensor([round(p * height * width) for p in fractions], device=saliency.device)
    return (ranks[:, None, :] < counts[None, :, None]).view(batch, len(fractions), height, width)


def noise_field(shape: Sequence[int], seed: int) -> Tensor:
    """(C, H, W) float32 standard normal noise, the same for every image of that shape and ``seed``."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


# (row offset, column offset, weight) of the 8 neighbours in the imputation's mean: 1/6 direct, 1/12 diagonal.
NEIGHBOURS = ((1, 1, 1 / 12), (0, 1, 1 / 6), (-1, 1, 1 / 12), (1, -1, 1 / 12), (0, -1, 1 / 6), (-1, -1, 1 / 12),
              (1, 0, 1 / 6), (-1, 0, 1 / 6))


def linear_fill(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """``image`` (C, H, W) float64 with its ``removed`` (H, W) bool pixels replaced by the solution of ROAD's
    linear system: for every removed pixel i, sum_j w_ij (x_j - x_i) = 0 over its in-image neighbours j, where
    x_j is the image's value for a kept neighbour and an unknown for a removed one. Same system as
    pytorch-grad-cam's ``NoisyLinearImputer`` and Quantus' ``noisy_linear_imputation``, built in one vectorised
    pass as a sparse matrix instead of element by element, and solved with scipy's ``spsolve``."""
    from scipy.sparse import coo_matrix  # scipy only where ROAD runs, not for every user of the metrics
    from scipy.sparse.linalg import spsolve

    channels, height, width = image.shape
    flat_removed = removed.reshape(-1)
    unknown_pixels = np.flatnonzero(flat_removed)
    n = unknown_pixels.size
    variable = np.full(height * width, -1)
    variable[unknown_pixels] = np.arange(n)
    rows, cols = np.divmod(unknown_pixels, width)
    flat = image.reshape(channels, -1)
    weight_sum, rhs = np.zeros(n), np.zeros((n, channels))
    entries = [[], [], []]  # off-diagonal (row, column, weight) of the unknown neighbours
    for d_row, d_col, weight in NEIGHBOURS:
        r, c = rows + d_row, cols + d_col
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        equation, neighbour = np.flatnonzero(inside), r[inside] * width + c[inside]
        weight_sum[equation] += weight
        is_unknown = flat_removed[neighbour]
        entries[0].append(equation[is_unknown])
        entries[1].append(variable[neighbour[is_unknown]])
        entries[2].append(np.full(int(is_unknown.sum()), weight))
        rhs[equation[~is_unknown]] -= weight * flat[:, neighbour[~is_unknown]].T
    diagonal = np.arange(n)
    system = coo_matrix((np.concatenate([-weight_sum, *entries[2]]),
                         (np.concatenate([diagonal, *entries[0]]), np.concatenate([diagonal, *entries[1]]))),
                        shape=(n, n)).tocsc()
    filled = flat.copy()
    filled[:, unknown_pixels] = spsolve(system, rhs).reshape(n, channels).T
    return filled.reshape(channels, height, width)


def impute(image: Tensor, removed: Tensor, noise: Tensor | None = None) -> Tensor:
    """``image`` (C, H, W) with its ``removed`` (H, W) bool pixels filled by :func:`linear_fill` (solved in float64
    on the CPU), plus ``noise`` (C, H, W, already scaled) on the removed pixels. Returns (C, H, W) float32 on
    the image's device; the kept pixels keep their values exactly."""
    if not bool(removed.any()):
        return image.float().clone()
    cpu = image.detach().float().cpu()
    mask = removed.cpu()
    filled = torch.from_numpy(linear_fill(cpu.double().numpy(), mask.numpy())).float()
    filled = torch.where(mask[None], filled, cpu)
    if noise is not None:
        filled = filled + noise.float().cpu() * mask[None]
    return filled.to(image.device)


def road_scores(model: Model, images: Tensor, saliency: Tensor, targets: Tensor,
                fractions: Sequence[float] = ROAD_FRACTIONS, noise: float = ROAD_NOISE, seed: int = 0,
                max_forward_batch: int = 256) -> RoadScores:
    """ROAD of ``saliency`` (B, 1, H, W) (any size: resized to the images' like the causal metrics do) for
    ``images`` (B, 3, H, W) in [0, 1] and explained ``targets`` (B,): MoRF and LeRF probability curves at
    ``fractions`` and their means. The imputations run on the CPU (one sparse solve per image, fraction and
    order); the black box's passes run in chunks of at most ``max_forward_batch`` images."""
    fractions = check_fractions(fractions)
    batch = check_explained_batch(images, targets)
    check_saliency(saliency, batch)
    if saliency.shape[-2:] != images.shape[-2:]:
        saliency = torch.nn.functional.interpolate(saliency.float(), size=images.shape[-2:], mode="bilinear",
                                                   align_corners=False)
    field = noise * noise_field(images.shape[1:], seed) if noise > 0 else None
    perturbed, owners = [], []
    for order in (True, False):
        masks = removal_masks(saliency, fractions, most_relevant_first=order)
        for b in range(images.shape[0]):
            for f in range(len(fractions)):
                perturbed.append(impute(images[b], masks[b, f], field))
                owners.append(b)
    x = torch.stack(perturbed).to(images.device)
    owners = torch.tensor(owners, device=images.device)
    probs = torch.empty(x.shape[0], device=images.device)
    with torch.no_grad(), fast_passes(model):
        for start in range(0, x.shape[0], max_forward_batch):
            chunk = slice(start, start + max_forward_batch)
            p = torch.softmax(model(x[chunk]).float(), dim=-1)
            probs[chunk] = p.gather(1, targets[owners[chunk]].unsqueeze(1)).squeeze(1)
    curves = probs.view(2, images.shape[0], len(fractions))
    morf, lerf = curves[0].mean(1), curves[1].mean(1)
    return RoadScores(morf, lerf, lerf - morf, curves[0], curves[1], torch.tensor(fractions))

