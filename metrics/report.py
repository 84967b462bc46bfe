"""From per-image rows to the reported numbers: ``results.json``, ``results.csv`` and ``summary.md``.

A row is one (image, method) pair: ``index``, ``method``, ``label``, ``target``, every name of
``metrics.METRIC_NAMES``, ``seconds``, ``forwards``, ``backwards`` and the two curves. Aggregation needs
every method's rows at once (the normalised M_F is a per-image min-max across methods), so it runs after
all rows are written, and it depends on nothing but the rows: an interrupted and resumed evaluation
reports exactly what an uninterrupted one does.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from metrics.causal import minmax_across_methods
from metrics.rows import RowStore
from metrics.suite import METRIC_NAMES

# results.json keys per method (issue contract) and the table columns, in order.
SUMMARY_KEYS = ("deletion", "insertion", "deletion_norm", "insertion_norm", "mf", "mf_normalized", "mi", "pointing_game", "iou", "f1",
                "seconds_per_image", "forwards_per_image", "backwards_per_image")
EXTRA_KEYS = ("pointing_game_hit_rate", "iou_top", "f1_top", "iou_pixel", "f1_pixel")
CSV_COLUMNS = ("index", "method", "label", "target", *METRIC_NAMES, "mf_normalized", "seconds", "forwards",
               "backwards")


def _missing(value) -> bool:
    """A value that is not there: absent (rows written before the metric existed), None or NaN."""
    return value is None or math.isnan(float(value))


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def dedupe(rows: Iterable[dict]) -> list[dict]:
    """One row per (index, method) — the first written wins (DDP padding and reruns may repeat a pair) —
    sorted by method then index, so the aggregate does not depend on write order."""
    unique: dict[tuple[int, str], dict] = {}
    for row in rows:
        unique.setdefault((int(row["index"]), row["method"]), row)
    return [unique[k] for k in sorted(unique, key=lambda k: (k[1], k[0]))]


def add_normalized_mf(rows: list[dict], methods: list[str]) -> int:
    """Set ``mf_normalized`` on every row (NaN where excluded, and on images some method did not explain:
    the min-max runs over the images every method has); returns the number of excluded images."""
    by_index: dict[int, dict[str, dict]] = {}
    for row in rows:
        row["mf_normalized"] = math.nan
        by_index.setdefault(int(row["index"]), {})[row["method"]] = row
    complete = sorted(i for i, per in by_index.items() if all(m in per for m in methods))
    if not complete:
        return 0
    raw = {m: torch.tensor([float(by_index[i][m]["mf"]) for i in complete]) for m in methods}
    result = minmax_across_methods(raw) if len(methods) > 1 else None
    for m in methods:
        for j, i in enumerate(complete):
            by_index[i][m]["mf_normalized"] = float(result.normalised[m][j]) if result else math.nan
    return result.excluded if result else 0


def pointing_accuracy(rows: list[dict]) -> float | None:
    """Mean over the evaluated (ground-truth) classes of hits / (hits + misses) (PROTOCOLS.md)."""
    per_class: dict[int, list[float]] = {}
    for row in rows:
        per_class.setdefault(int(row["label"]), []).append(float(row["pointing_game"]))
    return _nanmean([sum(v) / len(v) for v in per_class.values()]) if per_class else None


def summarise(rows: list[dict], methods: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-method means (``SUMMARY_KEYS`` + ``EXTRA_KEYS``) and the excluded-image counts."""
    excluded_mf_norm = add_normalized_mf(rows, methods)
    summary, excluded = {}, {"mf_normalized_degenerate": excluded_mf_norm, "mf_degenerate": {}}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        stats = {key: _nanmean([float(r[key]) for r in mine if not _missing(r.get(key))])
                 for key in METRIC_NAMES + ("mf_normalized",)}
        stats["pointing_game_hit_rate"] = stats["pointing_game"]
        stats["pointing_game"] = pointing_accuracy(mine)
        for key, src in (("seconds_per_image", "seconds"), ("forwards_per_image", "forwards"),
                         ("backwards_per_image", "backwards")):
            stats[key] = _nanmean([float(r[src]) for r in mine])
        stats["images"] = len(mine)
        summary[m] = {k: stats[k] for k in SUMMARY_KEYS + EXTRA_KEYS + ("images",)}
        for key in ("mf", "deletion_norm", "insertion_norm"):
            excluded.setdefault(f"{key}_degenerate", {})[m] = sum(1 for r in mine if _missing(r.get(key)))
    return summary, excluded


def mean_curves(rows: list[dict], methods: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean deletion and insertion curves per method, each (n+1,)."""
    curves = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if mine:
            curves[m] = (torch.tensor([r["deletion_curve"] for r in mine]).mean(0),
                         torch.tensor([r["insertion_curve"] for r in mine]).mean(0))
    return curves


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, math.nan) for k in CSV_COLUMNS})


def _fmt(value, key: str) -> str:
    if value is None:
        return "–"
    if key in ("forwards_per_image", "backwards_per_image"):
        return f"{value:.0f}"
    if key == "images":
        return f"{value:d}"
    if key == "seconds_per_image":
        return f"{value:.3f}"
    if key in ("mf", "mi"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def summary_markdown(results: dict) -> str:
    """A table per black box: method x every reported number, with the protocol underneath."""
    keys = SUMMARY_KEYS + ("iou_top", "f1_top", "images")
    lines = [f"## {results['blackbox']} — {results['num_images']} images of {results['data'].get('name', 'data')}"
             f" ({results['data'].get('split', '')})", "",
             "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, stats in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(stats.get(k), k) for k in keys) + " |")
    protocol = results["protocol"]
    causal = protocol["protocol"]
    lines += ["", "deletion/insertion: area under the probability curve (trapezoid over [0,1]), units "
              f"{causal['units']}, {causal['steps']} steps, deletion substrate {causal['deletion_substrate']}, "
              f"insertion substrate {causal['insertion_substrate']} (blur kernel {causal['blur_kernel']}, "
              f"sigma {causal['blur_sigma']:.2f}), explained class: {causal['target']}. deletion_norm/insertion_norm: "
              "the same areas rescaled by each curve's end points, (A - v_n)/(v_0 - v_n) and (A - v_0)/(v_n - v_0) "
              f"(0 = ideal deletion, 1 = ideal insertion; images with |v_0 - v_n| <= {causal.get('norm_eps', 0.05)} "
              "excluded). "
              f"mf: raw M_F (%), {protocol['mf_steps']} steps; mf_normalized: per-image min-max across the "
              f"methods above, on the images every method explained. mi: PR area (%) against the ground-truth "
              f"mask. pointing_game: mean over classes, "
              f"tolerance {protocol['pointing_tolerance']:.1f} px. iou/f1: map >= {protocol['iou_threshold']} "
              f"after min-max; iou_top/f1_top: top {protocol['top_fraction']:.0%} of pixels. "
              f"Excluded images: {json.dumps(results['excluded'])}.", ""]
    return "\n".join(lines)


def write_reports(rows: list[dict], methods: list[str], header: dict, out: Path) -> dict:
    """Write results.csv, results.json and summary.md into ``out``; returns the results.json content."""
    rows = dedupe(rows)
    summary, excluded = summarise(rows, methods)
    results = _json_safe({**header, "num_images": len({int(r["index"]) for r in rows}), "excluded": excluded,
                          "methods": summary})
    write_csv(rows, out / "results.csv")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(summary_markdown(results))
    return results


PAIRED_KEYS = ("deletion", "insertion", "deletion_norm", "insertion_norm", "mf", "mi", "pointing_game", "iou", "f1")


def paired_difference(rows: list[dict], a: str, b: str, keys: Iterable[str] = PAIRED_KEYS,
                      resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per metric, the mean over images of (method ``a`` - method ``b``) on the images both were scored on,
    with a 95% percentile-bootstrap interval over images (seeded). Tells whether a gap between two methods
    of a small evaluation is larger than the image-to-image noise. ``pointing_game`` here is the per-image
    hit (the summary's is a mean over classes)."""
    rows = dedupe(rows)
    mine = {m: {int(r["index"]): r for r in rows if r["method"] == m} for m in (a, b)}
    common = sorted(set(mine[a]) & set(mine[b]))
    if not common:
        raise ValueError(f"no image was scored for both {a!r} and {b!r}")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        diff = torch.tensor([float(mine[a][i][key]) - float(mine[b][i][key]) for i in common], dtype=torch.float64)
        diff = diff[~diff.isnan()]  # e.g. M_F of an image whose curve is degenerate
        if len(diff) == 0:
            continue
        means = diff[torch.randint(len(diff), (resamples, len(diff)), generator=generator)].mean(1)
        low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out[key] = {"mean": diff.mean().item(), "low": low, "high": high, "images": len(diff)}
    return out


if __name__ == "__main__":  # python -m metrics.report OUT --compare A B
    import argparse

    parser = argparse.ArgumentParser(description="Paired comparison of two methods of an evaluate.py output "
                                                 "folder: " + paired_difference.__doc__)
    parser.add_argument("out", type=Path, help="an evaluate.py --out folder")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), required=True)
    parser.add_argument("--against", type=Path, default=None,
                        help="read B from this other output folder (e.g. the same method at another setting)")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    a, b = args.compare
    mine = RowStore(args.out / "rows").read_all()
    rows = [r for r in mine if r["method"] == a]
    if args.against is not None:  # B from another folder, renamed so that A and B may be one method
        other = RowStore(args.against / "rows").read_all()
        b_rows = [{**r, "method": f"{b}@{args.against.name}"} for r in other if r["method"] == b]
        b = f"{b}@{args.against.name}"
    else:
        b_rows = [r for r in mine if r["method"] == b]
    rows += b_rows
    table = paired_difference(rows, a, b, resamples=args.resamples)
    print(f"{a}@{args.out.name} - {b} (mean over the images both have [95% bootstrap interval])")
    for key, stats in table.items():
        print(f"  {key:14s} {stats['mean']:+8.3f}  [{stats['low']:+8.3f}, {stats['high']:+8.3f}]  "
              f"({stats['images']} images)")
