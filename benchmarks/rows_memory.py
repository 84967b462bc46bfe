"""Peak memory of reading and aggregating the per-image rows of a large evaluation (it must stay bounded at
50,000 images x 13 methods).

    python -m benchmarks.rows_memory [--images 50000] [--methods 13] [--curve 225] [--old_images 1000]
                                     [--threads 2] [--clock wall|cpu]

Everything runs on the CPU (files and JSON; ``--device`` is accepted and ignored).

1. Writes a synthetic rows folder as ``evaluate.py`` leaves it after a 2-process run: two ``rows-rank*.jsonl``
   files, every (image, method) row with the current key, 13 metrics, the cost and two curves of ``--curve``
   points (225 = the RISE protocol at 224 px), plus a stale copy of one method's rows under an older key (a
   rerun with other hyper-parameters). The lines have exactly ``json.dumps``'s format; they are assembled from
   pre-made curve strings only to write 650,000 rows quickly.
2. In a fresh process, runs what ``evaluate.py`` runs on it: the resume read (``RowStore.finished``), the
   index (``RowStore.scan``), ``write_reports`` (results.csv/json, summary.md) and the mean curves
   (``mean_curves``); prints the peak resident memory (``ru_maxrss``) above the process's size after its
   imports, and each phase's seconds.
3. For comparison, the old reading (every row with its curves in one list, as ``read_all`` did before) on
   ``--old_images`` images, in another fresh process: memory per row and its extrapolation to the full size.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


from saliency_lab.core.timing import Stopwatch, add_timing_arguments, stopwatch_from_args
from saliency_lab.metrics.suite import METRIC_NAMES

KEY, STALE = "0123456789abcdef", "fedcba9876543210"


def method_names(count: int) -> list[str]:
    return [f"method{m:02d}" for m in range(count)]


def write_rows(folder: Path, images: int, methods: int, curve: int, seed: int = 0) -> int:
    """The synthetic rows folder; returns its size in bytes."""
    rng = random.Random(seed)
    pool = [json.dumps([rng.random() for _ in range(curve)]) for _ in range(64)]
    folder.mkdir(parents=True, exist_ok=True)
    files = [open(folder / f"rows-rank{r}.jsonl", "w") for r in range(2)]
    names = method_names(methods)
    try:
        for index in range(images):
            for m, name in enumerate(names):
                keys = [KEY, STALE] if m == 0 else [KEY]
                for key in keys:
                    row = {"index": index, "method": name, "key": key, "label": index % 10, "target": index % 10,
                           "seconds": rng.random(), "forwards": 8000.0, "backwards": 0.0,
                           **{k: rng.random() for k in METRIC_NAMES}}
                    head = json.dumps(row)[:-1]
                    files[index % 2].write(f'{head}, "deletion_curve": {pool[rng.randrange(64)]}, '
                                           f'"insertion_curve": {pool[rng.randrange(64)]}}}\n')
    finally:
        for f in files:
            f.close()
    return sum(p.stat().st_size for p in folder.glob("*.jsonl"))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_new(folder: Path, images: int, methods: int, stopwatch: Stopwatch | None = None) -> dict:
    from saliency_lab.metrics.report import mean_curves, write_reports
    from saliency_lab.metrics.rows import RowStore
    from saliency_lab.metrics.suite import EvaluationSettings

    names = method_names(methods)
    keys = {name: KEY for name in names}
    header = {"protocol": EvaluationSettings().resolve(224).to_dict(224), "blackbox": "synthetic",
              "data": {"name": "synthetic", "split": "test"}}
    out = folder.parent / "report"
    out.mkdir(exist_ok=True)
    stopwatch = stopwatch or Stopwatch()
    base = _rss_mb()
    seconds = {}
    done, seconds["finished (resume read)"] = stopwatch.time(lambda: RowStore(folder).finished(keys))
    assert sum(len(v) for v in done.values()) == images * methods
    del done
    rowset, seconds["scan (index)"] = stopwatch.time(lambda: RowStore(folder).scan(keys, range(images)))
    results, seconds["write_reports"] = stopwatch.time(lambda: write_reports(rowset, names, header, out))
    curves, seconds["mean_curves"] = stopwatch.time(lambda: mean_curves(rowset.rows(curves=True), names))
    assert results["num_images"] == images and len(curves) == methods
    return {"rss_after_imports_mb": base, "peak_rss_mb": _rss_mb(), "seconds": seconds}


def child_old(folder: Path) -> dict:
    import saliency_lab.metrics.report  # noqa: F401  (the same imports as the new reading, for the same baseline)

    base = _rss_mb()
    rows = []
    for path in sorted(folder.glob("rows-rank*.jsonl")):  # the old RowStore.read_all
        for line in path.read_text().splitlines():
            rows.append(json.loads(line))
    return {"rss_after_imports_mb": base, "peak_rss_mb": _rss_mb(), "rows": len(rows)}


def in_child(kind: str, folder: Path, images: int, methods: int, threads: int = 2, clock: str = "wall") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--folder", str(folder), "--images", str(images),
                          "--methods", str(methods), "--threads", str(threads), "--clock", clock, "--device", "cpu"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--methods", type=int, default=13)
    parser.add_argument("--curve", type=int, default=225)
    parser.add_argument("--old_images", type=int, default=1000)
    parser.add_argument("--folder", type=Path, default=None, help="work folder (default: a temporary one, deleted)")
    parser.add_argument("--child", choices=["new", "old"], default=None, help=argparse.SUPPRESS)
    add_timing_arguments(parser, threads=2, clock="wall")
    args = parser.parse_args()
    stopwatch = stopwatch_from_args(args)
    if stopwatch.device.type != "cpu":  # files and JSON: nothing here runs on an accelerator
        stopwatch = Stopwatch(torch.device("cpu"), args.clock)
    if args.child:
        measure = (child_new(args.folder, args.images, args.methods, stopwatch) if args.child == "new"
                   else child_old(args.folder))
        print(json.dumps(measure))
        return
    print(stopwatch.header(), flush=True)
    work = args.folder or Path(tempfile.mkdtemp(prefix="rows_memory_"))
    try:
        size, seconds = stopwatch.time(lambda: write_rows(work / "big" / "rows", args.images, args.methods,
                                                          args.curve))
        rows = args.images * (args.methods + 1)
        print(f"rows folder: {args.images} images x {args.methods} methods (+1 stale copy of one method) = {rows} rows, "
              f"curves of {args.curve} points, {size / 2**30:.2f} GiB, written in {seconds:.0f} s")
        new = in_child("new", work / "big" / "rows", args.images, args.methods, args.threads, args.clock)
        grown = new["peak_rss_mb"] - new["rss_after_imports_mb"]
        print(f"new reading (finished + scan + write_reports + mean_curves): peak RSS {new['peak_rss_mb']:.0f} MiB, "
              f"{grown:.0f} MiB above the {new['rss_after_imports_mb']:.0f} MiB after imports")
        print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in new["seconds"].items()))
        write_rows(work / "small" / "rows", args.old_images, args.methods, args.curve)
        old = in_child("old", work / "small" / "rows", args.old_images, args.methods, args.threads, args.clock)
        per_row = (old["peak_rss_mb"] - old["rss_after_imports_mb"]) * 2**20 / old["rows"]
        print(f"old reading (every row with its curves in a list) of {old['rows']} rows: peak RSS "
              f"{old['peak_rss_mb']:.0f} MiB, {per_row / 1024:.1f} KiB per row -> about {per_row * rows / 2**30:.1f} GiB "
              f"for the {rows} rows above (extrapolated, not run)")
    finally:
        if args.folder is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
