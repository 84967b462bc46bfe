"""``saliency-lab report OUT --compare A B``: the paired difference of two methods of an evaluation folder, with a
95% bootstrap interval over the images both have (:func:`saliency_lab.metrics.report.paired_difference`).

``saliency-lab report OUT --strata``: every metric of every method by the black box's confidence quartile and
by correct vs misclassified images (:mod:`saliency_lab.metrics.strata`), printed and written to ``OUT/strata.md``
and ``OUT/strata.json``.

``--against OTHER`` reads B from another evaluation folder. Rows are paired by dataset index, so the two folders
must have scored the same images the same way: their run records (``run.json``, else ``results.json``) must agree
on :data:`COMPARED` (the data, split included; the protocol, except ``max_forward_batch``, which changes no
score; the black box by content hash). Otherwise the comparison is refused, naming each difference, unless
``--force true``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from saliency_lab.cli.checks import changed_leaves
from saliency_lab.core.files import atomic_write, atomic_write_json
from saliency_lab.metrics.report import PAIRED_KEYS, paired_difference, scan_evaluation
from saliency_lab.metrics.strata import strata_markdown, stratified_means
from saliency_lab.metrics.suite import METRIC_NAMES, PER_MILLE_NAMES

COMPARED = ("data", "protocol", "blackbox_sha256")
_NOT_COMPARED = ("max_forward_batch",)  # a memory knob: no score depends on it


def _boolean(value: str) -> bool:
    """``true``/``false`` (also yes/no, 1/0), case-insensitive, as the other commands read booleans."""
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def run_record(folder: Path) -> dict | None:
    """The run record of an evaluation folder: its ``run.json``, else its ``results.json``; None when it has
    neither."""
    for name in ("run.json", "results.json"):
        path = folder / name
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _without(value, keys: tuple[str, ...]):
    """``value`` with ``keys`` removed from every nested dict."""
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    return value



def comparability_problems(mine: Path, other: Path) -> list[str]:
    """Why rows of ``other`` cannot be paired with rows of ``mine``: a missing run record, or each
    :data:`COMPARED` leaf that differs ('data.split: 'test' -> 'val''). Empty when they can."""
    records = {folder: run_record(folder) for folder in (mine, other)}
    missing = [f"{folder} has no run.json or results.json" for folder, record in records.items() if record is None]
    if missing:
        return missing
    picked = [_without({k: records[f].get(k) for k in COMPARED}, _NOT_COMPARED) for f in (mine, other)]
    return changed_leaves(*picked)


def check_against(mine: Path, other: Path, force: bool) -> None:
    """Refuse (ValueError naming every difference) to pair ``other``'s rows with ``mine`` unless ``force``."""
    problems = comparability_problems(mine, other)
    if not problems:
        return
    text = "; ".join(problems)
    if force:
        print(f"--against {other}: compared anyway (--force true) although {text}")
        return
    raise ValueError(f"--against {other}: its rows cannot be paired with those of {mine} ({text}); a paired "
                     "difference needs the same images, protocol and black box. Pass --force true to compare anyway")


def write_strata(out: Path) -> dict:
    """The stratified means of every method of ``out`` (its reported rows, curves included: the clean image's
    probability is the first point of a deletion curve), printed and written as strata.md and strata.json."""
    rowset = scan_evaluation(out)
    methods = rowset.methods()
    rows = [row for method in methods for row in rowset.of(method, curves=True)]
    result = stratified_means(rows, methods)
    text = strata_markdown(result)
    atomic_write(out / "strata.md", text)
    atomic_write_json(out / "strata.json", result)
    print(text)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Paired comparison of two methods of an evaluate.py output "
                                                 "folder: " + paired_difference.__doc__)
    parser.add_argument("out", type=Path, help="an evaluate.py --out folder")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None)
    parser.add_argument("--strata", action="store_true",
                        help="every metric by confidence quartile and by correct vs misclassified images, written "
                             "to OUT/strata.md and OUT/strata.json")
    parser.add_argument("--against", type=Path, default=None,
                        help="read B from this other output folder (e.g. the same method at another setting); "
                             "refused when the two folders differ in data, protocol or black box")
    parser.add_argument("--force", type=_boolean, default=False,
                        help="true: compare --against a folder whose data, protocol or black box differ")
    parser.add_argument("--keys", default=",".join(PAIRED_KEYS),
                        help="the metrics compared, comma-separated (e.g. iou_pixel,f1_pixel,iou_top,f1_top); "
                             f"{', '.join(PER_MILLE_NAMES)} are printed x 1000")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    if (args.compare is None) == (not args.strata):
        parser.error("give exactly one of --compare A B and --strata")
    keys = [k for k in args.keys.split(",") if k]
    unknown = sorted(set(keys) - set(METRIC_NAMES) - {"mf_normalized"})
    if unknown or not keys:
        parser.error(f"--keys: unknown metric(s) {unknown or keys}; known: {', '.join(METRIC_NAMES)}, mf_normalized")
    if args.strata:
        return write_strata(args.out)
    a, b = args.compare
    if args.against is not None:
        check_against(args.out, args.against, args.force)
    mine = scan_evaluation(args.out)
    rows = list(mine.of(a))
    if args.against is not None:  # B from another folder, renamed so that A and B may be one method
        b_rows = [{**r, "method": f"{b}@{args.against.name}"} for r in scan_evaluation(args.against).of(b)]
        b = f"{b}@{args.against.name}"
    else:
        b_rows = list(mine.of(b))
    rows += b_rows
    table = paired_difference(rows, a, b, keys=keys, resamples=args.resamples)
    print(f"{a}@{args.out.name} - {b} (mean over the images both have [95% bootstrap interval])")
    for key, stats in table.items():
        scale, label = (1e3, f"{key} x1e3") if key in PER_MILLE_NAMES else (1.0, key)
        print(f"  {label:18s} {scale * stats['mean']:+8.3f}  [{scale * stats['low']:+8.3f}, "
              f"{scale * stats['high']:+8.3f}]  ({stats['images']} images)")
    return table
