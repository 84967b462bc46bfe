"""``saliency-lab report OUT --compare A B``: the paired difference of two methods of an evaluation folder, with a
95% bootstrap interval over the images both have (:func:`saliency_lab.metrics.report.paired_difference`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from saliency_lab.metrics.report import paired_difference, scan_evaluation


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Paired comparison of two methods of an evaluate.py output "
                                                 "folder: " + paired_difference.__doc__)
    parser.add_argument("out", type=Path, help="an evaluate.py --out folder")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), required=True)
    parser.add_argument("--against", type=Path, default=None,
                        help="read B from this other output folder (e.g. the same method at another setting)")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args(argv)
    a, b = args.compare
    mine = scan_evaluation(args.out)
    rows = list(mine.of(a))
    if args.against is not None:  # B from another folder, renamed so that A and B may be one method
        b_rows = [{**r, "method": f"{b}@{args.against.name}"} for r in scan_evaluation(args.against).of(b)]
        b = f"{b}@{args.against.name}"
    else:
        b_rows = list(mine.of(b))
    rows += b_rows
    table = paired_difference(rows, a, b, resamples=args.resamples)
    print(f"{a}@{args.out.name} - {b} (mean over the images both have [95% bootstrap interval])")
    for key, stats in table.items():
        print(f"  {key:14s} {stats['mean']:+8.3f}  [{stats['low']:+8.3f}, {stats['high']:+8.3f}]  "
              f"({stats['images']} images)")
    return table
