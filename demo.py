"""The embedded pipeline in one command (``make demo``): every stage writes under ``--out`` and is skipped
when its results are already there, so a re-run reuses finished stages and resumes an interrupted one.

Stages (each a plain ``train.py`` / ``evaluate.py`` call that you can also run by hand):
  1. classifier — train the embedded black box (configs/experiment/embedded_classifier.yaml), then test it;
  2. evaluation — every baseline explainer x every metric on the embedded test split
     (configs/experiment/embedded_evaluate.yaml); evaluate.py itself skips finished (image, method) pairs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CLASSIFIER_CONFIG = "configs/experiment/embedded_classifier.yaml"
EVALUATE_CONFIG = "configs/experiment/embedded_evaluate.yaml"


def _call(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint (ModelCheckpoint keeps one, by the monitored metric) of a stage, else last.ckpt."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    return ckpts[-1] if ckpts else run_dir / "checkpoints" / "last.ckpt"


def train_stage(config: str, run_dir: Path, extra: list[str] = ()) -> dict:
    """fit (resuming from last.ckpt when interrupted), then test the best checkpoint; reuse a finished stage."""
    if (run_dir / "test_metrics.json").is_file():
        print(f"[demo] {run_dir.name}: finished earlier, reusing {run_dir}")
    else:
        base = ["--config", config, f"--run_dir={run_dir}", *extra]
        if not (run_dir / "fit_metrics.json").is_file():
            resume = ["--ckpt_path=last"] if (run_dir / "checkpoints" / "last.ckpt").is_file() else []
            _call([sys.executable, "train.py", "fit", *base, *resume])
        _call([sys.executable, "train.py", "test", *base, f"--ckpt_path={best_checkpoint(run_dir)}"])
    return json.loads((run_dir / "test_metrics.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder for every stage's outputs")
    parser.add_argument("--num_images", type=int, default=None, help="images to evaluate (default: the config's)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    classifier_dir = args.out / "classifier"
    accuracy = train_stage(CLASSIFIER_CONFIG, classifier_dir)["test/acc"]
    ckpt = best_checkpoint(classifier_dir)
    timings["classifier"] = round(time.perf_counter() - start, 1)
    print(f"\n[demo] embedded black box: test accuracy {accuracy:.2%} on the embedded test split")
    print(f"[demo] checkpoint: {ckpt}  (BlackBox('ckpt:{ckpt}'))\n")

    start = time.perf_counter()
    evaluation = args.out / "evaluation"
    extra = [] if args.num_images is None else [f"--num_images={args.num_images}"]
    _call([sys.executable, "evaluate.py", "--config", EVALUATE_CONFIG, f"--blackbox=ckpt:{ckpt}",
           f"--out={evaluation}", *extra])
    timings["evaluation"] = round(time.perf_counter() - start, 1)

    (args.out / "timings.json").write_text(json.dumps(timings, indent=2))
    print(f"[demo] black box test accuracy {accuracy:.2%}; checkpoint {ckpt}")
    print(f"[demo] evaluation: {evaluation}/summary.md, results.json, results.csv, curves.png, overlays.png")
    print(f"[demo] stage seconds this run: {timings} (total {sum(timings.values()):.0f} s)")


if __name__ == "__main__":
    main()
