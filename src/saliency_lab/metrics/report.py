"""From per-image rows to the reported numbers: ``results.json``, ``results.csv`` and ``summary.md``.

A row is one (image, method) pair (:func:`image_rows`): ``index``, ``method``, ``label``, ``target``, every
name of ``saliency_lab.metrics.METRIC_NAMES``, ``seconds``, ``forwards``, ``backwards`` and the two curves. Aggregation
needs every method's rows at once (the normalised M_F is a per-image min-max across methods), so it runs
after all rows are written, and it depends on nothing but the rows: an interrupted and resumed evaluation
reports exactly what an uninterrupted one does.

:func:`summarise` is the one aggregation of the project: ``evaluate.py`` (through :func:`write_reports`) and
the training callback ``saliency_lab.callbacks.ExplainerEvaluation`` (on the rows of its probe set, gathered over ranks)
both call it, so one metric name carries one number whichever path produced it.
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from saliency_lab.core.files import atomic_write, atomic_write_json, json_safe
from saliency_lab.metrics.causal import minmax_across_methods
from saliency_lab.metrics.rows import RowSet, RowStore
from saliency_lab.metrics.suite import LOCALISATION_NAMES, METRIC_NAMES, SaliencyScores

# results.json keys per method (the results contract) and the table columns, in order.
SUMMARY_KEYS = ("deletion", "insertion", "deletion_norm", "insertion_norm", "road_morf", "road_lerf", "road_gap", "mf", "mf_normalized", "mi", "pointing_game", "iou", "f1",
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


# Defined for every scored image: NaN here means the scoring failed (e.g. the black box returned NaN), not
# "undefined" as for M_F's guard or the localisation metrics of an image without ground truth.
ALWAYS_DEFINED = ("deletion", "insertion")
COST_NAMES = ("seconds", "forwards", "backwards")


def non_finite_keys(row: dict) -> list[str]:
    """The values that make ``row`` unusable: ``ALWAYS_DEFINED`` ones that are null or NaN, and any metric or
    cost that is +-inf (a NaN elsewhere means "undefined" and is left out of that one mean). Absent keys (rows
    of an older version) are not counted."""
    bad = []
    for key in METRIC_NAMES + ("mf_normalized",) + COST_NAMES:
        if key not in row:
            continue
        value = row[key]
        number = math.nan if value is None else float(value)
        if math.isinf(number) or (key in ALWAYS_DEFINED and math.isnan(number)):
            bad.append(key)
    return bad


def usable(rows: Iterable[dict]) -> list[dict]:
    """The rows of ``rows`` that :func:`non_finite_keys` finds nothing wrong with."""
    return [r for r in rows if not non_finite_keys(r)]


def warn_non_finite(excluded_rows: dict[str, list[int]]) -> None:
    """One warning naming, per method, the image indices of its rows excluded as non-finite (if any)."""
    named = {m: indices for m, indices in excluded_rows.items() if indices}
    if named:
        listed = "; ".join(f"{m}: images {indices[:10]}{' ...' if len(indices) > 10 else ''}"
                           for m, indices in sorted(named.items()))
        warnings.warn(f"rows with NaN or inf values (deletion/insertion NaN, or any value inf) are excluded from "
                      f"every mean and counted as excluded 'non_finite': {listed}", RuntimeWarning, stacklevel=3)


def dedupe(rows: Iterable[dict]) -> list[dict]:
    """One row per (index, method) — the first written wins (DDP padding and reruns may repeat a pair) —
    sorted by method then index, so the aggregate does not depend on write order."""
    unique: dict[tuple[int, str], dict] = {}
    for row in rows:
        unique.setdefault((int(row["index"]), row["method"]), row)
    return [unique[k] for k in sorted(unique, key=lambda k: (k[1], k[0]))]


def add_normalized_mf(rows: list[dict], methods: list[str]) -> int:
    """Set ``mf_normalized`` on every row (NaN where excluded); returns the number of excluded images."""
    raw: dict[str, dict[int, float]] = {m: {} for m in methods}
    for row in usable(rows):
        if row["method"] in raw:
            raw[row["method"]][int(row["index"])] = row["mf"]
    normalised, excluded = normalized_mf(raw)
    for row in rows:
        value = normalised.get(row["method"], {}).get(int(row["index"]))
        if value is not None:
            row["mf_normalized"] = value
    return excluded


def normalized_mf(raw: dict[str, dict[int, float]]) -> tuple[dict[str, dict[int, float]], int]:
    """Per-image min-max of M_F across the methods of ``raw`` (method -> {index: mf}), on the images every
    method has: (method -> {index: mf_normalized (NaN where excluded)}, number of excluded images)."""
    methods = list(raw)
    complete = sorted(set.intersection(*(set(v) for v in raw.values()))) if methods else []
    if not complete:
        return {}, 0
    values = {m: torch.tensor([math.nan if raw[m][i] is None else float(raw[m][i]) for i in complete]) for m in methods}
    result = minmax_across_methods(values) if len(methods) > 1 else None
    normalised = {m: dict(zip(complete, result.normalised[m].tolist() if result else [math.nan] * len(complete)))
                  for m in methods}
    return normalised, result.excluded if result else 0


def image_rows(method: str, indices: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
               scores: SaliencyScores, costs: list[dict]) -> list[dict]:
    """The rows of one scored batch of ``method``: dataset ``indices``, annotated ``labels`` and explained
    ``targets`` (B,) each, the :func:`metrics.score_saliency` ``scores`` and each image's cost {seconds,
    forwards, backwards}. Values are plain floats, NaN where undefined (also for +-inf)."""
    rows = []
    for j, index in enumerate(indices.tolist()):
        row = {"index": int(index), "method": method, "label": int(labels[j]), "target": int(targets[j]), **costs[j]}
        row.update({k: _float(v[j]) for k, v in scores.values.items()})
        row["deletion_curve"] = scores.deletion_curve[j].tolist()
        row["insertion_curve"] = scores.insertion_curve[j].tolist()
        rows.append(row)
    return rows


def _float(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.nan


def pointing_accuracy(rows: list[dict]) -> float | None:
    """The pointing game as TorchRay reports it (docs/protocols.md): per annotated class (the row's ``label``),
    hits / (hits + misses) over its images, then the mean over the classes with at least one evaluated image.
    Images without ground truth (``pointing_game`` NaN) are not evaluated. The plain hit rate over images is
    the summary's ``pointing_game_hit_rate``."""
    per_class: dict[int, list[float]] = {}
    for row in rows:
        if not _missing(row.get("pointing_game")):
            per_class.setdefault(int(row["label"]), []).append(float(row["pointing_game"]))
    return _nanmean([sum(v) / len(v) for v in per_class.values()]) if per_class else None


def without_ground_truth(rows: Iterable[dict]) -> list[int]:
    """Dataset indices of the images scored without ground truth (their localisation metrics are NaN)."""
    return sorted({int(r["index"]) for r in rows if _missing(r.get("pointing_game"))})


def summarise(rows: list[dict], methods: list[str], warn: bool = True
              ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-method means (``SUMMARY_KEYS`` + ``EXTRA_KEYS`` + ``images``) and the excluded-image counts.

    Every mean is over the images where the value is defined: M_F's guard, flat curves (``*_norm``) and
    images without ground truth (every name of ``LOCALISATION_NAMES``) are left out of that mean and
    counted in the second dict (``no_ground_truth``: images; ``{key}_degenerate``: per method). A row with
    non-finite values (:func:`non_finite_keys`) is left out of every mean of its method, counted per method in
    ``non_finite``. With ``warn``, images without ground truth are warned about once, with their count, and the
    non-finite rows once, by method and image index.
    """
    excluded_mf_norm = add_normalized_mf(rows, methods)
    no_gt = without_ground_truth(r for r in usable(rows) if r["method"] in methods)
    excluded = excluded_counts(no_gt, excluded_mf_norm, warn)
    summary = {}
    for m in methods:
        summary[m] = method_summary([r for r in rows if r["method"] == m], m, excluded)
    if warn:
        warn_non_finite(excluded.pop("non_finite_rows"))
    else:
        excluded.pop("non_finite_rows")
    return summary, excluded


def excluded_counts(no_gt: list[int], mf_normalized_degenerate: int, warn: bool) -> dict[str, Any]:
    """The excluded-image counts every aggregation starts from (``method_summary`` adds the per-method ones);
    with ``warn``, the images without ground truth are warned about once, with their count."""
    if warn and no_gt:
        warnings.warn(f"{len(no_gt)} image(s) have no ground truth (empty mask), e.g. dataset indices {no_gt[:5]}: "
                      f"their localisation metrics ({', '.join(LOCALISATION_NAMES)}) are excluded from the means "
                      "and counted as excluded 'no_ground_truth'", stacklevel=3)
    return {"no_ground_truth": len(no_gt), "mf_normalized_degenerate": mf_normalized_degenerate, "mf_degenerate": {}}


def method_summary(mine: list[dict], m: str, excluded: dict[str, Any]) -> dict[str, Any]:
    """The summary of one method's rows ``mine`` (``mf_normalized`` already set); adds its excluded-image
    counts to ``excluded`` (and the image indices of its non-finite rows to ``excluded["non_finite_rows"]``,
    which the caller reports and removes). One method at a time, so a large evaluation holds one method's rows
    at most. ``images`` counts every row; the means are over the usable ones."""
    scored = len(mine)
    bad = [int(r["index"]) for r in mine if non_finite_keys(r)]
    excluded.setdefault("non_finite", {})[m] = len(bad)
    excluded.setdefault("non_finite_rows", {})[m] = bad
    mine = usable(mine)
    stats = {key: _nanmean([float(r[key]) for r in mine if not _missing(r.get(key))])
             for key in METRIC_NAMES + ("mf_normalized",)}
    stats["pointing_game_hit_rate"] = stats["pointing_game"]
    stats["pointing_game"] = pointing_accuracy(mine)
    for key, src in (("seconds_per_image", "seconds"), ("forwards_per_image", "forwards"),
                     ("backwards_per_image", "backwards")):
        stats[key] = _nanmean([float(r[src]) for r in mine if not _missing(r.get(src))])
    stats["images"] = scored
    for key in ("mf", "deletion_norm", "insertion_norm"):
        excluded.setdefault(f"{key}_degenerate", {})[m] = sum(1 for r in mine if _missing(r.get(key)))
    return {k: stats[k] for k in SUMMARY_KEYS + EXTRA_KEYS + ("images",)}


def mean_curves(rows: Iterable[dict], methods: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean deletion and insertion curves per method, each (n+1,); ``rows`` is read once, as a stream."""
    sums: dict[str, list] = {}
    for r in rows:
        if r["method"] in methods:
            total = sums.setdefault(r["method"], [0, 0.0, 0.0])
            total[0] += 1
            total[1] = total[1] + torch.tensor(r["deletion_curve"], dtype=torch.float64)
            total[2] = total[2] + torch.tensor(r["insertion_curve"], dtype=torch.float64)
    return {m: ((sums[m][1] / sums[m][0]).float(), (sums[m][2] / sums[m][0]).float()) for m in methods if m in sums}


def write_csv(rows: Iterable[dict], path: Path) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, math.nan) for k in CSV_COLUMNS})

    atomic_write(path, save)


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


def _road_text(protocol: dict) -> str:
    """The ROAD sentence of the summary (settings written before ROAD existed have none)."""
    fractions = protocol.get("road_fractions")
    if not fractions:
        return "road_*: not measured. "
    return ("road_morf/road_lerf: mean p(class) after removing the most/least relevant pixels (fractions "
            f"{', '.join(f'{p:g}' for p in fractions)}) filled by noisy linear imputation (noise std "
            f"{protocol.get('road_noise', 0.01)}); road_gap = road_lerf - road_morf. ")


def markdown_cell(value) -> str:
    """``str(value)`` safe inside a Markdown table cell or heading: ``&``, ``<`` and ``>`` as HTML entities
    (``&amp;``, ``&lt;``, ``&gt;``: a name like ``<b>`` or ``<script>`` is shown, never rendered) and ``|`` as
    ``\\|`` (it would end the cell); newlines become spaces (they would end the row)."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return " ".join(text.splitlines())


def summary_markdown(results: dict) -> str:
    """A table per black box: method x every reported number, with the protocol underneath. Names from the
    user (black box, data, methods) go through :func:`markdown_cell`."""
    keys = SUMMARY_KEYS + ("iou_top", "f1_top", "images")
    data = results["data"]
    lines = [f"## {markdown_cell(results['blackbox'])} — {results['num_images']} images of "
             f"{markdown_cell(data.get('name', 'data'))} ({markdown_cell(data.get('split', ''))})", "",
             "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, stats in results["methods"].items():
        lines.append(f"| {markdown_cell(name)} | " + " | ".join(_fmt(stats.get(k), k) for k in keys) + " |")
    protocol = results["protocol"]
    causal = protocol["protocol"]
    lines += ["", "deletion/insertion: area under the probability curve (trapezoid over [0,1]), units "
              f"{causal['units']}, {causal['steps']} steps, deletion substrate {causal['deletion_substrate']}, "
              f"insertion substrate {causal['insertion_substrate']} (blur kernel {causal['blur_kernel']}, "
              f"sigma {causal['blur_sigma']:.2f}), explained class: {causal['target']}. deletion_norm/insertion_norm: "
              "the same areas rescaled by each curve's end points, (A - v_n)/(v_0 - v_n) and (A - v_0)/(v_n - v_0) "
              f"(0 = ideal deletion, 1 = ideal insertion; images with |v_0 - v_n| <= {causal.get('norm_eps', 0.05)} "
              "excluded). "
              f"{_road_text(protocol)}"
              f"mf: raw M_F (%), {protocol['mf_steps']} steps; mf_normalized: per-image min-max across the "
              f"methods above, on the images every method explained. mi: PR area (%) against the ground-truth mask. pointing_game: mean over the annotated "
              f"classes of the hit rate (pointing_game_hit_rate: over images), tolerance {protocol['pointing_tolerance']:.1f} px. iou/f1: map >= {protocol['iou_threshold']} "
              f"after min-max; iou_top/f1_top: top {protocol['top_fraction']:.0%} of pixels. Images without ground "
              "truth (no_ground_truth) are left out of mi, pointing_game, iou and f1. "
              f"Excluded images: {json.dumps(results['excluded'])}.", ""]
    return "\n".join(lines)


class _ListedRows:
    """A list of rows read like a :class:`saliency_lab.metrics.rows.RowSet` (deduplicated, by method then index)."""

    def __init__(self, rows: Iterable[dict]):
        self._by_method: dict[str, list[dict]] = {}
        for row in dedupe(rows):
            self._by_method.setdefault(row["method"], []).append(row)

    def of(self, method: str, curves: bool = False) -> Iterable[dict]:
        return iter(self._by_method.get(method, []))

    def indices(self, method: str | None = None) -> list[int]:
        chosen = [method] if method is not None else list(self._by_method)
        return sorted({int(r["index"]) for m in chosen for r in self._by_method.get(m, [])})


def write_reports(rows: list[dict] | RowSet, methods: list[str], header: dict, out: Path) -> dict:
    """Write results.csv, results.json and summary.md into ``out`` (each atomically); returns the results.json
    content. ``rows``: the rows in a list, or a :class:`RowSet` of a rows folder, read one method at a time
    without curves, so memory grows with one method's rows, not with the whole evaluation. Rows with non-finite
    values are left out of the means (:func:`method_summary`), warned about and listed in ``non_finite_rows``
    (method -> image indices); results.json is strict JSON (``allow_nan=False``, undefined values null)."""
    source = rows if isinstance(rows, RowSet) else _ListedRows(rows)
    raw = {m: {int(r["index"]): r["mf"] for r in usable(source.of(m))} for m in methods}
    normalised, excluded_mf_norm = normalized_mf(raw)
    del raw
    no_gt: set[int] = set()

    def scored(m: str) -> list[dict]:
        return [{**r, "mf_normalized": normalised.get(m, {}).get(int(r["index"]), math.nan)} for r in source.of(m)]

    def csv_rows() -> Iterable[dict]:  # every row, by method then index; notes the images without ground truth
        for m in sorted(methods):
            mine = scored(m)
            no_gt.update(without_ground_truth(usable(mine)))
            yield from mine

    write_csv(csv_rows(), out / "results.csv")
    # then the same aggregation as summarise(), re-reading one method's rows at a time
    excluded = excluded_counts(sorted(no_gt), excluded_mf_norm, warn=True)
    summary = {m: method_summary(scored(m), m, excluded) for m in sorted(methods)}
    non_finite_rows = excluded.pop("non_finite_rows", {})
    warn_non_finite(non_finite_rows)
    images = set().union(*(set(int(i) for i in source.indices(m)) for m in methods)) if methods else set()
    results = json_safe({**header, "num_images": len(images), "excluded": excluded,
                         "non_finite_rows": {m: i for m, i in non_finite_rows.items() if i},
                         "methods": {m: summary[m] for m in methods}})
    atomic_write_json(out / "results.json", results)  # strict JSON: null where a value is undefined
    atomic_write(out / "summary.md", summary_markdown(results))
    return results


def scan_evaluation(out: Path) -> RowSet:
    """The rows of an ``evaluate.py`` folder that its last run reported: the row keys its run.json records
    (every row of a folder written before rows had keys)."""
    run = out / "run.json"
    keys = json.loads(run.read_text()).get("row_keys") if run.is_file() else None
    return RowStore(out / "rows").scan(keys)


PAIRED_KEYS = ("deletion", "insertion", "deletion_norm", "insertion_norm", "road_morf", "road_lerf", "road_gap", "mf", "mi", "pointing_game", "iou", "f1")


def _value(row: dict, key: str) -> float:
    """A row's value of ``key`` as a float, NaN where absent or None."""
    value = row.get(key)
    return math.nan if value is None else float(value)


def percentile_interval(values: torch.Tensor) -> tuple[float, float]:
    """The 2.5% and 97.5% percentiles of bootstrap ``values`` (R,): a 95% percentile-bootstrap interval."""
    low, high = torch.quantile(values.double(), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def paired_difference(rows: list[dict], a: str, b: str, keys: Iterable[str] = PAIRED_KEYS,
                      resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per metric, the mean over images of (method ``a`` - method ``b``) on the images both were scored on,
    with a 95% percentile-bootstrap interval over images (seeded). Tells whether a gap between two methods
    of a small evaluation is larger than the image-to-image noise. ``pointing_game`` here is the per-image
    hit (the summary's is a mean over classes). The resamples of all ``keys`` come from one seeded stream, in
    order, so a key's interval can move in its last digit when other keys are asked before it."""
    rows = dedupe(rows)
    mine = {m: {int(r["index"]): r for r in rows if r["method"] == m} for m in (a, b)}
    common = sorted(set(mine[a]) & set(mine[b]))
    if not common:
        raise ValueError(f"no image was scored for both {a!r} and {b!r}")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        diff = torch.tensor([_value(mine[a][i], key) - _value(mine[b][i], key) for i in common], dtype=torch.float64)
        # not finite: e.g. M_F of an image whose curve is degenerate (NaN), a broken row (inf), or a metric its rows
        # predate (absent, e.g. ROAD)
        diff = diff[diff.isfinite()]
        if len(diff) == 0:
            continue
        means = diff[torch.randint(len(diff), (resamples, len(diff)), generator=generator)].mean(1)
        low, high = percentile_interval(means)
        out[key] = {"mean": diff.mean().item(), "low": low, "high": high, "images": len(diff)}
    return out
