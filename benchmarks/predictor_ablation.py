"""Ablations of the learned mask predictor on the embedded *validation* split (never the test split).

    python benchmarks/predictor_ablation.py [--variants ct,ct_6ep,...] [--num_images 300] [--out outputs/ablation]

Each variant is one ``train.py fit`` of an embedded predictor config with a few overrides (after the demo:
it reuses ``outputs/demo/filter`` and the demo's ct / bt / mgnet runs), then ``evaluate.py --split val`` of its last checkpoint;
finished runs and evaluations are reused. Prints one row per variant: the explainer metrics on the
validation images plus the skewness of its mask scores (its own ``val/mask_skewness``).
Variants (the demo recipe: 2 epochs x 150 batches of 128, lr 1e-2 halved every epoch):
  ct, bt, mgnet            the demo configs as they are
  ct_6ep                   the embedded CT config (h 5) trained 3x longer (6 epochs, lr halved every 2)
  ct_eta3, ct_h2.5, ct_h1  CT's shape: eta 3 (steeper), h 2.5 (the paper's; the embedded config uses 5),
                           h 1 (plain sigmoid)
  mgnet_area1, mgnet_area8 MGnet with the area weight 1 (the embedded config's) / 8 (Dabkowski's)
  ct_area1                 CT plus MGnet's area term (weight 1)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ct": "embedded_predictor_ct.yaml", "bt": "embedded_predictor_bt.yaml", "mgnet": "embedded_mgnet.yaml"}
VARIANTS = {
    "ct": ("ct", []),
    "bt": ("bt", []),
    "mgnet": ("mgnet", []),
    "ct_6ep": ("ct", ["--trainer.max_epochs=6", "--model.init_args.lr_step_epochs=2"]),
    "ct_eta3": ("ct", ["--model.init_args.eta=3.0"]),
    "ct_h5": ("ct", ["--model.init_args.h=5.0"]),
    "ct_h2.5": ("ct", ["--model.init_args.h=2.5"]),
    "ct_h1": ("ct", ["--model.init_args.h=1.0"]),
    "mgnet_area1": ("mgnet", ["--model.init_args.area_weight=1.0"]),
    "mgnet_area8": ("mgnet", ["--model.init_args.area_weight=8.0"]),
    "ct_area1": ("ct", ["--model.init_args.area_weight=1.0"]),
}
COLUMNS = ("mf", "deletion", "insertion", "mi", "pointing_game", "iou", "f1")


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


DEMO_RUNS = {"ct": "predictor_ct", "bt": "predictor_bt", "mgnet": "mgnet"}  # the demo trained these already


def train(name: str, out: Path, filter_ckpt: Path, blackbox: str) -> Path:
    kind, overrides = VARIANTS[name]
    run_dir = out / name
    demo_run = filter_ckpt.parents[2] / DEMO_RUNS.get(name, "-")
    if (ROOT / demo_run / "fit_metrics.json").is_file():
        return demo_run
    if not (run_dir / "fit_metrics.json").is_file():
        resume = ["--ckpt_path=last"] if (run_dir / "checkpoints" / "last.ckpt").is_file() else []
        run([sys.executable, "train.py", "fit", "--config", f"configs/experiment/{CONFIGS[kind]}",
             f"--run_dir={run_dir}", f"--model.init_args.blackbox.init_args.model={blackbox}",
             f"--model.init_args.filter_checkpoint={filter_ckpt}", *overrides, *resume])
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num_images", type=int, default=300, help="validation images evaluated")
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--filter", type=Path, default=Path("outputs/demo/filter/checkpoints/last.ckpt"))
    parser.add_argument("--blackbox", default="ckpt:assets/embedded_blackbox.pt")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if not (ROOT / args.filter).is_file():
        parser.error(f"--filter {args.filter} not found: run make demo (its filter stage) first")

    rows = {}
    for name in names:
        run_dir = train(name, args.out, args.filter, args.blackbox)
        evaluation = run_dir / "evaluation_val"
        if not (evaluation / "results.json").is_file():
            run([sys.executable, "evaluate.py", "--config", "configs/experiment/embedded_evaluate.yaml",
                 f"--blackbox.init_args.model={args.blackbox}", "--split=val", "--explainers=[]",
                 f"--num_images={args.num_images}",
                 "--batch_size=50", f"--ckpt=[{run_dir / 'checkpoints' / 'last.ckpt'}]", f"--out={evaluation}",
                 "--wandb=false", "--overlay_images=0"])
        results = json.loads((ROOT / evaluation / "results.json").read_text())
        (stats,) = results["methods"].values()
        fit = json.loads((ROOT / run_dir / "fit_metrics.json").read_text())
        rows[name] = {**{c: stats[c] for c in COLUMNS}, "skewness": fit["val/mask_skewness"],
                      "mask_mean": fit["val/mask_mean"]}

    print(f"\nvalidation split, first {args.num_images} images, protocol rise; mf is the raw M_F (its min-max "
          "normalisation needs several methods on the same images: see the claims table)")
    header = ("variant", *COLUMNS, "skewness", "mask_mean")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in header[1:]) + " |")


if __name__ == "__main__":
    main()
