"""The iGOS++ paper's ablations on the embedded data: mask resolution with BTV and plain TV, its Table 3 (which
objective) and its Table 5 (which mask), each variant scored against iGOS++ at its defaults.

    python -m experiments.igos_ablation [--split test] [--num_images 16] [--iterations 5] [--ig_steps 10]
        [--studies resolution,table3,table5] [--grids 4,8,16,32,64] [--image_size 64] [--out outputs/igos_ablation]
        [--table OUT/igos_ablation.md] [--threads N] [--resamples 2000] [--report_only] [--dry_run]
        [--config EVALUATE.yaml] [--evaluate_args ...]

**Studies** (docs/methods.md §2, "Ablations"; every variant is a registered method or an option of one):

- ``resolution``: ``igos_pp``, ``igos`` and ``igos_pp`` with plain TV (``smoothness: plain``) on mask grids of
  ``--grids`` cells per side (``resolution: g, scale_with_image: false``; g = the image side is one cell per
  pixel). The paper's claim: with plain TV, insertion breaks down as the grid gets finer, and BTV repairs it.
  Besides the comparison with the reference, the study pairs BTV against plain TV at every grid.
- ``table3``: ``igos_pp``, ``igos_pp_insertion`` (insertion term only), ``igos_naive_insertion`` (I-GOS plus an
  insertion term on its one mask) and ``igos``.
- ``table5``: ``igos_pp`` returning Mx (``mask: x``), My (``mask: y``) and Mx * My (the default).

The reference of every study is ``igos_pp`` at its defaults (with ``--iterations`` / ``--ig_steps`` when given,
which apply to every variant alike, to make a cheaper run). A grid equal to the defaults' own (28 at 224 scaled to
``--image_size``: 8 at 64 px) is the default setting itself, evaluated once for all studies.

**Evaluation, cached and resumable** (as ``experiments/frontier.py``, whose machinery this reuses): each variant is
one ``evaluate.py`` run into ``OUT/settings/LABEL/rise`` (explaining, with ``--save_maps``), then
``OUT/settings/LABEL/igos`` scores the saved maps under the other preset. Each variant is passed as an explainer
spec ``{name, alias: LABEL, **hparams}``; evaluate.py appends rows as they finish and skips finished ones, so the
same command again continues a killed run, and a larger ``--num_images`` adds images. ``--split`` goes to every
evaluate.py run (default test).

**Paired intervals** (``frontier.paired_against_default``, i.e. ``metrics.report.paired_difference``): per variant
and criterion (deletion, insertion and their normalised forms under both presets), the mean over the images
both explained of variant − reference with its 95% percentile-bootstrap interval. A table cell lists the criteria
whose interval excludes zero, as better (deletion: below zero; insertion: above zero) or worse; an interval inside
+-0.0005 (:data:`NEGLIGIBLE`, it prints as +-0.000) counts as no difference.

Writes ``--table`` (markdown: per study one table headed by date, commit, CPU model and the command; the
resolution study adds the BTV − plain TV intervals per grid) and ``OUT/igos_ablation.json`` (per variant its spec,
means and intervals), and prints the tables. Measured: docs/results/igos_ablation.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import shlex

import torch

from experiments import frontier
from experiments.frontier import (LOWER_IS_BETTER, QUALITY_KEYS, Setting, paired_against_default, setting_rows,
                                  summarise_setting)

PRESETS = frontier.PRESETS  # rise, then igos: the first explains and saves, the second scores the saved maps
STUDIES = ("resolution", "table3", "table5")
GRIDS = (4, 8, 16, 32, 64)
REFERENCE = "igos_pp"  # the label of iGOS++ at its defaults: every study's reference
NEGLIGIBLE = 5e-4  # a paired interval inside +-NEGLIGIBLE is reported as no difference (it prints as +-0.000)
DEFAULT_RESOLUTION = 28  # iGOS++'s and I-GOS's default r at 224 px, scaled with the image
# Resolution study: (label prefix, registry name, hyper-parameters); the grid is added per setting.
RESOLUTION_VARIANTS = (("igos_pp", "igos_pp", {}), ("igos", "igos", {}),
                       ("igos_pp_plain", "igos_pp", {"smoothness": "plain"}))
# Table 3 and Table 5: (label, registry name, hyper-parameters, what the paper's row is).
TABLE3 = (("igos_pp", "igos_pp", {}, "iGOS++"),
          ("igos_pp_insertion", "igos_pp_insertion", {}, "iGOS++, insertion only"),
          ("igos_naive_insertion", "igos_naive_insertion", {}, "naive I-GOS + insertion"),
          ("igos", "igos", {}, "I-GOS"))
TABLE5 = (("igos_pp_mx", "igos_pp", {"mask": "x"}, "M_x (deletion mask)"),
          ("igos_pp_my", "igos_pp", {"mask": "y"}, "M_y (insertion mask)"),
          ("igos_pp", "igos_pp", {}, "M_xy = M_x · M_y (iGOS++'s output)"))


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a study's table: the ``setting`` it reads and what it is called there (``what``, ``grid``)."""

    setting: Setting
    what: str
    grid: int | None = None


def default_grid(image_size: int) -> int:
    """Cells per side of the defaults' grid at ``image_size`` px (``grid_size``'s rule: 8 at 64 px)."""
    return max(2, round(DEFAULT_RESOLUTION * image_size / 224))


def _setting(label: str, name: str, hparams: dict, budget: dict) -> Setting:
    """A variant as a frontier :class:`Setting`: the explainer spec ``{name, alias: label, **budget, **hparams}``."""
    return Setting(name, label, {"name": name, "alias": label, **budget, **hparams}, label == REFERENCE)


def plan(studies: tuple[str, ...], grids: tuple[int, ...], image_size: int, budget: dict) -> dict[str, list[Row]]:
    """study -> its table rows. Settings are shared across studies by label (the reference, I-GOS at its
    defaults, ...), so each is evaluated once; a grid equal to :func:`default_grid` is the default setting."""
    reference_grid = default_grid(image_size)
    out: dict[str, list[Row]] = {}
    for study in studies:
        rows = []
        if study == "resolution":
            for prefix, name, hparams in RESOLUTION_VARIANTS:
                for grid in grids:
                    at_default = grid == reference_grid
                    label = prefix if at_default and not hparams else f"{prefix}-r{grid}"
                    cells = {} if at_default else {"resolution": grid, "scale_with_image": False}
                    rows.append(Row(_setting(label, name, {**hparams, **cells}, budget), prefix, grid))
        else:
            for label, name, hparams, what in TABLE3 if study == "table3" else TABLE5:
                rows.append(Row(_setting(label, name, hparams, budget), what))
        out[study] = rows
    return out


def unique_settings(studies: dict[str, list[Row]]) -> list[Setting]:
    """Every setting once, the reference first (the others are compared with it)."""
    seen: dict[str, Setting] = {}
    for rows in studies.values():
        for row in rows:
            if row.setting.label in seen and seen[row.setting.label] != row.setting:
                raise ValueError(f"two settings share the label {row.setting.label!r}")
            seen.setdefault(row.setting.label, row.setting)
    return sorted(seen.values(), key=lambda s: s.label != REFERENCE)


def run_setting(setting: Setting, args) -> None:
    """Evaluate one setting under every preset: frontier's evaluate.py arguments (each resumes from its rows)."""
    from saliency_lab.cli import evaluate

    for preset in PRESETS:
        argv = frontier.evaluate_argv(setting, preset, args.out, args)
        print(f"[igos_ablation] {setting.label} / {preset}: python evaluate.py {shlex.join(argv)}", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # evaluate.py prints its whole summary each time
            evaluate.main(argv)


# ---------------------------------------------------------------------------------------------------------
# Reading the results


def collect(settings: list[Setting], args) -> dict[str, dict]:
    """label -> {"rows": preset -> rows, "summary": frontier.summarise_setting, "intervals": variant - reference}
    for every setting with rows (on the first ``--num_images`` images)."""
    result = {}
    for setting in settings:
        rows = setting_rows(setting, args.out, PRESETS, args.num_images)
        if any(rows.values()):
            result[setting.label] = {"rows": rows, "summary": summarise_setting(rows)}
    reference = result.get(REFERENCE)
    for label, entry in result.items():
        entry["intervals"] = ({} if reference is None or label == REFERENCE else
                              paired_against_default(entry["rows"], reference["rows"], args.resamples))
    return result


def _f(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def _passes(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0f}"


def excludes_zero(stats: dict[str, float]) -> bool:
    """Whether a paired interval lies off zero by more than :data:`NEGLIGIBLE` (one that prints as +-0.000 is
    a float-rounding difference between two nearly identical settings, not a finding)."""
    return stats["low"] > NEGLIGIBLE or stats["high"] < -NEGLIGIBLE


def interval_note(intervals: dict[str, dict[str, float]]) -> str:
    """The criteria whose 95% interval excludes zero (:func:`excludes_zero`), as better / worse (deletion: lower
    is better)."""
    better, worse = [], []
    for criterion in (f"{p}/{k}" for p in PRESETS for k in QUALITY_KEYS):
        stats = intervals.get(criterion)
        if stats is None or not excludes_zero(stats):
            continue
        lower = criterion.split("/")[1] in LOWER_IS_BETTER
        text = f"{criterion} {stats['mean']:+.3f} [{stats['low']:+.3f}, {stats['high']:+.3f}]"
        (better if (stats["high"] < 0) == lower else worse).append(text)
    if not intervals:
        return "–"
    parts = ([f"better: {'; '.join(better)}"] if better else []) + ([f"worse: {'; '.join(worse)}"] if worse else [])
    return " · ".join(parts) or "no interval excludes 0"


def study_table(study: str, rows: list[Row], result: dict[str, dict]) -> str:
    """One markdown table: per row its images, passes, the 8 means and the note against the reference."""
    quality = [f"{p} {k.replace('_norm', ' norm.')} {'↓' if k in LOWER_IS_BETTER else '↑'}"
               for p in PRESETS for k in QUALITY_KEYS]
    first = ["grid", "method"] if study == "resolution" else ["row"]
    lines = ["| " + " | ".join([*first, "label", "images", "passes / image", *quality,
                                 "vs iGOS++ default (95% paired interval)"]) + " |",
             "|" + "---|" * (len(first) + 4 + len(quality))]
    for row in rows:
        entry = result.get(row.setting.label)
        if entry is None:
            continue
        summary = entry["summary"]
        values = [_f(summary[f"{p}/{k}"]) for p in PRESETS for k in QUALITY_KEYS]
        cells = [f"{row.grid} × {row.grid}", row.what] if study == "resolution" else [row.what]
        note = "reference" if row.setting.label == REFERENCE else interval_note(entry["intervals"])
        lines.append("| " + " | ".join([*cells, f"`{row.setting.label}`", str(summary["images"]),
                                       _passes(summary["passes"]), *values, note]) + " |")
    return "\n".join(lines) + "\n"


def btv_against_plain(rows: list[Row], result: dict[str, dict], resamples: int) -> str:
    """Resolution study: per grid, iGOS++ with BTV - iGOS++ with plain TV, every criterion's paired interval."""
    by_grid: dict[int, dict[str, str]] = {}
    for row in rows:
        if row.what in ("igos_pp", "igos_pp_plain"):
            by_grid.setdefault(row.grid, {})[row.what] = row.setting.label
    columns = [f"{p} {k.replace('_norm', ' norm.')} {'↓' if k in LOWER_IS_BETTER else '↑'}"
               for p in PRESETS for k in QUALITY_KEYS]
    lines = ["| grid | images | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for grid, labels in sorted(by_grid.items()):
        if {"igos_pp", "igos_pp_plain"} - set(labels) or any(labels[k] not in result for k in labels):
            continue
        intervals = paired_against_default(result[labels["igos_pp"]]["rows"], result[labels["igos_pp_plain"]]["rows"],
                                           resamples)
        cells = []
        for p in PRESETS:
            for k in QUALITY_KEYS:
                s = intervals.get(f"{p}/{k}")
                text = "–" if s is None else f"{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]"
                cells.append(f"**{text}**" if s is not None and excludes_zero(s) else text)
        images = max((s["images"] for s in intervals.values()), default=0)  # the raw areas': every image
        lines.append(f"| {grid} × {grid} | {images} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TITLES = {"resolution": "Mask resolution: BTV against plain TV",
          "table3": "Table 3: which objective", "table5": "Table 5: which mask"}


def report(studies: dict[str, list[Row]], result: dict[str, dict], args) -> str:
    header = frontier.provenance("experiments.igos_ablation", args.argv)
    budget = ", ".join(f"{k} {v}" for k, v in args.budget.items()) or "the defaults (15 iterations, 20 IG points)"
    parts = [f"# iGOS++ ablations ({args.split} split, first {args.num_images} images; every variant at {budget})",
             ""]
    for study, rows in studies.items():
        parts += [f"## {TITLES[study]}", "", header, "", study_table(study, rows, result)]
        if study == "resolution":
            parts += ["iGOS++ with BTV − iGOS++ with plain TV, per grid (95% paired interval, bold: excludes 0 by "
                      f"more than {NEGLIGIBLE:g}; images: those of the raw areas, the normalised forms leave out "
                      "images whose curve is flat).",
                      "", header, "", btv_against_plain(rows, result, args.resamples)]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test", choices=("test", "val"), help="the data split (default test)")
    parser.add_argument("--num_images", type=int, default=16, help="first N images of the split (default 16)")
    parser.add_argument("--iterations", type=int, default=None, help="T of every variant (default: its own, 15)")
    parser.add_argument("--ig_steps", type=int, default=None, help="n of every variant (default: its own, 20)")
    parser.add_argument("--studies", type=lambda s: tuple(s.split(",")), default=STUDIES)
    parser.add_argument("--grids", type=lambda s: tuple(int(g) for g in s.split(",")), default=GRIDS,
                        help="mask cells per side of the resolution study (default 4,8,16,32,64)")
    parser.add_argument("--image_size", type=int, default=64,
                        help="the data's image side, only to spot the grid the defaults already use (default 64)")
    frontier.add_study_arguments(parser, "igos_ablation")
    args = parser.parse_args(argv)
    unknown = [s for s in args.studies if s not in STUDIES]
    if unknown:
        parser.error(f"--studies: unknown {unknown}; known {STUDIES}")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    for name in ("num_images", "iterations", "ig_steps", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    bad = [g for g in args.grids if not 2 <= g <= args.image_size]
    if bad:
        parser.error(f"--grids {bad}: each must lie in [2, --image_size = {args.image_size}]")
    args.budget = {k: getattr(args, k) for k in ("iterations", "ig_steps") if getattr(args, k) is not None}
    args.presets = PRESETS  # what frontier.evaluate_argv reads, with config, num_images, evaluate_args
    return frontier.finish_study_args(args, argv)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    studies = plan(args.studies, args.grids, args.image_size, args.budget)
    settings = unique_settings(studies)
    if args.dry_run:
        for setting in settings:
            for preset in PRESETS:
                print("python evaluate.py " + shlex.join(frontier.evaluate_argv(setting, preset, args.out, args)))
        return {}
    if not args.report_only:
        for setting in settings:
            run_setting(setting, args)
    result = collect(settings, args)
    text = report(studies, result, args)
    table = args.table or args.out / "igos_ablation.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    from saliency_lab.core.files import atomic_write, atomic_write_json

    atomic_write(table, text)
    atomic_write_json(args.out / "igos_ablation.json", {
        label: {"spec": next(s.spec for s in settings if s.label == label), "summary": entry["summary"],
                "vs_reference": entry["intervals"]} for label, entry in result.items()})
    print(text)
    print(f"[igos_ablation] wrote {table}")
    return result


if __name__ == "__main__":
    main()
