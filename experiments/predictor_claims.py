"""The learned predictors' claims over several training seeds: mean ± sd over seeds of every reported metric.

    python -m experiments.predictor_claims [--seeds 0,1,2] [--num_images 500] [--out outputs/claims/predictor_seeds]
                                          [--dry_run]

For each training seed s, the three demo predictors are trained with their configs as they are
(configs/train/embedded_predictor_ct.yaml, embedded_predictor_bt.yaml, embedded_mgnet.yaml; after the
demo's filter stage) with ``--seed_everything=s`` (initialisation, batch order, seeded workers) and
``--model.init_args.draw_seed=s`` (the per-image substrate draws), into OUT/seed{s}/{ct,bt,mgnet}. Then
``evaluate.py --config configs/evaluate/embedded_claims_predictors.yaml`` scores that seed's checkpoints next
to Grad-CAM on the same test images into OUT/seed{s}/evaluation (so M_F's per-image min-max is across the same
methods as the single-seed claims run). Prints one table: method x metric, mean ± sd (n - 1) over the seeds.
Finished trainings (fit_metrics.json) and evaluations (results.json) are reused; an interrupted training resumes
from its last.ckpt. ``--dry_run`` prints the commands only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # outputs/ and configs/ are read relative to the checkout
CLI = (sys.executable, "-m", "saliency_lab.cli")


from experiments.predictor_ablation import fmt_seeds
from saliency_lab.metrics.report import SUMMARY_KEYS

CONFIGS = {"ct": "embedded_predictor_ct.yaml", "bt": "embedded_predictor_bt.yaml", "mgnet": "embedded_mgnet.yaml"}
CLAIMS = "configs/evaluate/embedded_claims_predictors.yaml"


def train_command(kind: str, seed: int, out: Path, filter_ckpt: Path) -> list[str]:
    run_dir = out / f"seed{seed}" / kind
    resume = ["--ckpt_path=last"] if (ROOT / run_dir / "checkpoints" / "last.ckpt").is_file() else []
    return [*CLI, "fit", "--config", f"configs/train/{CONFIGS[kind]}", f"--run_dir={run_dir}",
            f"--model.init_args.filter_checkpoint={filter_ckpt}", f"--seed_everything={seed}",
            f"--model.init_args.draw_seed={seed}", *resume]


def evaluate_command(seed: int, out: Path, num_images: int) -> list[str]:
    """evaluate.py of the claims config with this seed's checkpoints (the config's explainer list, re-pointed)."""
    ckpt = {kind: out / f"seed{seed}" / kind / "checkpoints" / "last.ckpt" for kind in CONFIGS}
    explainers = (f"[gradcam, {{name: predictor_ct, checkpoint: {ckpt['ct']}}}, "
                  f"{{name: predictor_ct_posthoc, checkpoint: {ckpt['ct']}}}, "
                  f"{{name: predictor_bt, checkpoint: {ckpt['bt']}}}, {{name: mgnet, checkpoint: {ckpt['mgnet']}}}]")
    return [*CLI, "evaluate", "--config", CLAIMS, f"--explainers={explainers}",
            f"--num_images={num_images}", f"--out={out / f'seed{seed}' / 'evaluation'}", "--wandb=false"]


def seed_table(results: list[dict], keys=SUMMARY_KEYS) -> dict[str, dict[str, str]]:
    """method -> metric -> "mean ± sd" over the results.json contents of the seeds (one value: that value)."""
    methods = list(dict.fromkeys(m for r in results for m in r["methods"]))
    return {m: {k: fmt_seeds([r["methods"].get(m, {}).get(k) for r in results], k) for k in keys} for m in methods}


def run(cmd: list[str], dry_run: bool) -> None:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> dict[str, dict[str, str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--num_images", type=int, default=500, help="test images evaluated (the claims config's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/claims/predictor_seeds"))
    parser.add_argument("--filter", type=Path, default=Path("outputs/demo/filter/checkpoints/last.ckpt"))
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not seeds:
        parser.error("--seeds needs at least one seed")
    if not args.dry_run and not (ROOT / args.filter).is_file():
        parser.error(f"--filter {args.filter} not found: run make demo (its filter stage) first")
    results = []
    for seed in seeds:
        for kind in CONFIGS:
            if not (ROOT / args.out / f"seed{seed}" / kind / "fit_metrics.json").is_file():
                run(train_command(kind, seed, args.out, args.filter), args.dry_run)
        path = ROOT / args.out / f"seed{seed}" / "evaluation" / "results.json"
        if not path.is_file():
            run(evaluate_command(seed, args.out, args.num_images), args.dry_run)
        if not args.dry_run:
            results.append(json.loads(path.read_text()))
    if args.dry_run:
        return {}
    table = seed_table(results)
    print(f"\ntest split, first {args.num_images} images; mean ± sd over training seeds {seeds} "
          "(Grad-CAM has no training: its sd is 0)")
    print("| method | " + " | ".join(SUMMARY_KEYS) + " |")
    print("|---|" + "---|" * len(SUMMARY_KEYS))
    for method, cells in table.items():
        print(f"| {method} | " + " | ".join(cells[k] for k in SUMMARY_KEYS) + " |")
    return table


if __name__ == "__main__":
    main()
