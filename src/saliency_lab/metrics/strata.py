"""Every metric of every method, stratified by the black box's confidence and by whether it was right (iGOS++'s
failure analysis on low-confidence and misclassified images), from the rows an evaluation already wrote.

An image's *confidence* is the black box's softmax probability of the explained class on the clean image: the
first point of any method's deletion curve (step 0 removes nothing). Its quartiles over the evaluated images
define four strata (Q1 lowest; an image on a boundary goes to the lower quartile). An image is *correct* when
the explained class is its label (with the ``predicted`` target rule: the black box was right), *misclassified*
otherwise; images without a label are in neither. ``pointing_game`` here is the per-image hit rate (the
summary's is a mean over classes).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

STRATA_METRICS = ("deletion", "insertion", "road_morf", "road_lerf", "road_gap", "mf", "mi", "pointing_game", "iou",
                  "f1")


def image_confidence(rows: Iterable[Mapping]) -> dict[int, float]:
    """Image index -> p(explained class | clean image), read from the rows' deletion curves."""
    confidence = {}
    for row in rows:
        curve = row.get("deletion_curve")
        if curve:
            confidence.setdefault(int(row["index"]), float(curve[0]))
    return confidence


def image_strata(rows: Sequence[Mapping]) -> dict[str, set[int]]:
    """Stratum name -> image indices: ``confidence Q1`` .. ``confidence Q4``, ``correct``, ``misclassified``."""
    confidence = image_confidence(rows)
    strata: dict[str, set[int]] = {}
    if confidence:
        indices = sorted(confidence)
        values = np.array([confidence[i] for i in indices])
        edges = np.quantile(values, [0.25, 0.5, 0.75])
        quartile = np.searchsorted(edges, values, side="left")  # on an edge: the lower quartile
        for q in range(4):
            strata[f"confidence Q{q + 1}"] = {i for i, k in zip(indices, quartile) if k == q}
    correct, wrong = set(), set()
    for row in rows:
        label = row.get("label")
        if label is None or int(label) < 0:
            continue
        (correct if int(label) == int(row["target"]) else wrong).add(int(row["index"]))
    strata["correct"], strata["misclassified"] = correct, wrong
    return strata


def stratified_means(rows: Sequence[Mapping], methods: Sequence[str],
                     metrics: Sequence[str] = STRATA_METRICS) -> dict:
    """``{"strata": {name: {"images": n, "confidence": [low, high], "methods": {method: {metric: mean}}}}}``:
    means over each stratum's images (NaN values left out; None where a stratum has no value)."""
    strata = image_strata(rows)
    confidence = image_confidence(rows)
    out = {}
    for name, images in strata.items():
        per_method = {}
        for method in methods:
            mine = [r for r in rows if r["method"] == method and int(r["index"]) in images]
            per_method[method] = {metric: _mean(r.get(metric) for r in mine) for metric in metrics}
        values = [confidence[i] for i in images if i in confidence]
        out[name] = {"images": len(images), "confidence": [min(values), max(values)] if values else None,
                     "methods": per_method}
    return {"metrics": list(metrics), "strata": out}


def strata_markdown(result: Mapping) -> str:
    """One table per stratum: methods x metrics."""
    metrics = result["metrics"]
    lines = []
    for name, stratum in result["strata"].items():
        span = stratum["confidence"]
        span_text = f", p(class) {span[0]:.3f}–{span[1]:.3f}" if span else ""
        lines += [f"### {name} ({stratum['images']} images{span_text})", "",
                  "| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for method, values in stratum["methods"].items():
            cells = ["–" if values[m] is None else f"{values[m]:.3f}" for m in metrics]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _mean(values: Iterable) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None
