"""How much the metrics agree on which method is better (Tomsett et al. 2020, "Sanity checks for saliency metrics").

Each metric is a *rater* that ranks the methods: on one image (its per-image values) or on a whole evaluation (the
methods' means). Lower-is-better metrics (:data:`LOWER_IS_BETTER`) are negated first, so rank 1 is always the
method a metric calls worst and rank n the best; ties get their average rank.

- **Kendall's W** (coefficient of concordance) of m raters over n methods, in [0, 1]: 1 when every metric orders
  the methods alike, 0 when their orders cancel out. ``W = 12 S / (m^2 (n^3 - n) - m T)``, S the sum over methods
  of the squared deviations of their rank sums from the mean rank sum, T the tie correction
  ``sum over raters and tie groups of (t^3 - t)`` (Kendall & Babington Smith's formula).
- **Pairwise Spearman** between two metrics' rankings: which metrics agree with which, and so which one a method
  may be gaming (a method that tops one metric and no other).

Per image, a metric takes part only where it is defined for every method (finite), and an image needs at least
two such metrics; the per-image W is averaged over those images. The W of the means ranks the methods by their
mean over the images every method has a finite value for, per metric.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr

# Metrics where lower is better; every other one in a ranking is higher-is-better.
LOWER_IS_BETTER = ("deletion", "deletion_norm", "road_morf")
AGREEMENT_METRICS = ("deletion", "insertion", "deletion_norm", "insertion_norm", "road_morf", "road_lerf", "road_gap",
                     "mf", "mi", "pointing_game", "iou", "f1")


def oriented(values: np.ndarray, metric: str) -> np.ndarray:
    """``values`` with higher = better for ``metric``."""
    return -values if metric in LOWER_IS_BETTER else values


def kendalls_w(scores: np.ndarray) -> float:
    """Kendall's W of ``scores`` (m raters, n items; higher = better), with the tie correction. NaN for fewer than
    2 raters or items, or when every rater ties every item (no ranking to agree on)."""
    scores = np.asarray(scores, dtype=np.float64)
    raters, items = scores.shape
    if raters < 2 or items < 2:
        return math.nan
    ranks = np.stack([rankdata(row) for row in scores])
    sums = ranks.sum(0)
    spread = float(((sums - sums.mean()) ** 2).sum())
    ties = sum(float((counts ** 3 - counts).sum()) for counts in (np.unique(row, return_counts=True)[1]
                                                                   for row in scores))
    denominator = raters ** 2 * (items ** 3 - items) - raters * ties
    return 12.0 * spread / denominator if denominator > 0 else math.nan


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two score vectors (scipy; average ranks for ties); NaN when either is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def per_image_values(rows: Sequence[Mapping], methods: Sequence[str],
                     metrics: Sequence[str]) -> dict[int, np.ndarray]:
    """Image index -> (metrics, methods) oriented values (NaN where missing), for images every method has."""
    table: dict[int, dict[str, Mapping]] = {}
    for row in rows:
        if row["method"] in methods:
            table.setdefault(int(row["index"]), {})[row["method"]] = row
    out = {}
    for index, by_method in sorted(table.items()):
        if len(by_method) < len(methods):
            continue
        values = np.array([[_float(by_method[m].get(metric)) for m in methods] for metric in metrics])
        out[index] = np.stack([oriented(v, metric) for v, metric in zip(values, metrics)])
    return out


def metric_agreement(rows: Sequence[Mapping], methods: Sequence[str],
                     metrics: Sequence[str] = AGREEMENT_METRICS) -> dict:
    """Agreement of ``metrics`` on ``methods`` from evaluation rows (``index``, ``method``, metric values).

    Returns ``{"methods", "metrics", "images", "w_per_image" (mean over images), "w_per_image_images",
    "w_of_means", "means" (metric -> method -> mean, as reported), "spearman" (metric -> metric -> mean over
    images of the pairwise Spearman of the per-image rankings, NaN-skipping), "spearman_of_means"}``."""
    values = per_image_values(rows, methods, metrics)
    per_image_w, pair_sums, pair_counts = [], np.zeros((len(metrics),) * 2), np.zeros((len(metrics),) * 2)
    for matrix in values.values():
        usable = [i for i in range(len(metrics)) if np.isfinite(matrix[i]).all()]
        if len(usable) >= 2:
            w = kendalls_w(matrix[usable])
            if math.isfinite(w):
                per_image_w.append(w)
        for i in usable:
            for j in usable:
                rho = spearman(matrix[i], matrix[j])
                if math.isfinite(rho):
                    pair_sums[i, j] += rho
                    pair_counts[i, j] += 1
    stacked = np.stack(list(values.values())) if values else np.full((0, len(metrics), len(methods)), np.nan)
    complete = np.isfinite(stacked).all(2)  # (images, metrics): the metric is defined for every method
    means = np.array([stacked[complete[:, i], i].mean(0) if complete[:, i].any() else np.full(len(methods), np.nan)
                      for i in range(len(metrics))])
    defined = [i for i in range(len(metrics)) if np.isfinite(means[i]).all()]
    with np.errstate(invalid="ignore", divide="ignore"):
        pairs = np.where(pair_counts > 0, pair_sums / np.maximum(pair_counts, 1), np.nan)
    return {
        "methods": list(methods), "metrics": list(metrics), "images": len(values),
        "w_per_image": float(np.mean(per_image_w)) if per_image_w else math.nan,
        "w_per_image_images": len(per_image_w),
        "w_of_means": kendalls_w(means[defined]) if len(defined) >= 2 else math.nan,
        "means": {metrics[i]: {m: float(oriented(means[i], metrics[i])[k]) for k, m in enumerate(methods)}
                  for i in range(len(metrics))},
        "spearman": {metrics[i]: {metrics[j]: float(pairs[i, j]) for j in range(len(metrics))}
                     for i in range(len(metrics))},
        "spearman_of_means": {metrics[i]: {metrics[j]: spearman(means[i], means[j]) if i in defined and j in defined
                                           else math.nan for j in range(len(metrics))} for i in range(len(metrics))},
    }


def agreement_markdown(result: Mapping) -> str:
    """The agreement as Markdown: W per image and of the means, then the metric x metric Spearman table."""
    metrics = result["metrics"]
    lines = [f"Kendall's W over {len(metrics)} metrics ranking {len(result['methods'])} methods "
             f"({', '.join(result['methods'])}): per image {result['w_per_image']:.3f} "
             f"(mean over {result['w_per_image_images']} images), of the method means {result['w_of_means']:.3f}.",
             "", "Mean per-image Spearman between the metrics' rankings of the methods (1: they agree, -1: they "
             "order the methods oppositely):", "",
             "| metric | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for a in metrics:
        cells = [f"{result['spearman'][a][b]:+.2f}" if math.isfinite(result["spearman"][a][b]) else "–"
                 for b in metrics]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _float(value) -> float:
    return math.nan if value is None else float(value)
