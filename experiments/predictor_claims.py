"""The learned predictors' claims over several training seeds: mean ± sd over seeds of every reported metric.

    python -m experiments.predictor_claims [--seeds 0,1,2] [--num_images 500] [--out outputs/claims/predictor_seeds]
                                          [--kinds ct,bt,mgnet] [--dry_run]

For each training seed s, the predictors of ``--kinds`` (:data:`KINDS`) are trained with their configs as they
are (by default the three demo predictors, configs/train/embedded_predictor_ct.yaml, embedded_predictor_bt.yaml,
embedded_mgnet.yaml; after the demo's filter stage) with ``--seed_everything=s`` (initialisation, batch order,
seeded workers) and ``--model.init_args.draw_seed=s`` (the per-image substrate draws), into OUT/seed{s}/KIND. Then
``evaluate.py --config configs/evaluate/embedded_claims_predictors.yaml`` scores that seed's checkpoints next
to Grad-CAM on the same test images into OUT/seed{s}/evaluation (so M_F's per-image min-max is across the
methods evaluated together). Prints one table: method x metric, mean ± sd (n - 1) over the seeds, and, for the
pairs of ``--compare``, the paired difference of the seed-averaged per-image scores with its 95% bootstrap
interval. Finished trainings (fit_metrics.json) and evaluations (results.json of the same methods) are reused, and
evaluate.py reuses the rows of a method it scored before; an interrupted training resumes from its last.ckpt.
``--dry_run`` prints the commands only.

``--store DIR`` keeps each finished seed's evaluation beside the code, so that a study longer than one machine's
life can be run a seed at a time: after a seed is evaluated, its results.json and its per-image rows (every score,
not the curves) go to DIR/seed{s}/ (results.json, rows.jsonl.gz) with the trainings' fit_metrics (fits.json); a
seed whose stored evaluation holds the same methods on the same number of images is read from there and is neither
trained nor evaluated again. A stored seed of other methods, another image count or other black-box passes is
trained and evaluated anew (and replaces the stored one). The evaluations run the black box in float32
(:data:`PASSES`) on every machine, so seeds measured on different CPUs are averaged at one precision.

The controllers' evidence of the distribution-guided paper (docs/papers/distribution_guided.md) is one call:
``--kinds ct,bt,mgnet,ct_h2.5,mgnet_area8,square,mgnet_ct_posthoc`` (the paper's CT h 2.5 and MGnet area weight 8
beside the validation-chosen h 5 and area weight 1, the x^2 transformer, and CT applied post hoc to MGnet's masks,
which trains nothing: it reads the ``mgnet`` run), or ``--kinds controllers`` (the same with CT at eta 3). The lambda
grids on CT and MGnet are ``--kinds lambda_grid`` (:data:`LAMBDA_GRID`).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]  # outputs/ and configs/ are read relative to the checkout
CLI = (sys.executable, "-m", "saliency_lab.cli")


from experiments.predictor_ablation import PAIRED_OTHER, fmt_seeds, seed_averaged
from saliency_lab.metrics.report import SUMMARY_KEYS, paired_difference, scan_evaluation


@dataclasses.dataclass(frozen=True)
class Kind:
    """A trained predictor of the study: its training config (None: it trains nothing and reads the run of
    ``run``), the run folder it reads, the explainers (registry name, reported alias) of its checkpoint, and the
    demo's own run of the same config at seed 0, if the demo trains it (``--reuse_demo`` links it)."""
    config: str | None
    run: str
    explainers: tuple[tuple[str, str], ...]
    demo_run: str | None = None


KINDS = {
    "ct": Kind("configs/train/embedded_predictor_ct.yaml", "ct",
               (("predictor_ct", "predictor_ct"), ("predictor_ct_posthoc", "predictor_ct_posthoc")),
               "outputs/demo/predictor_ct"),
    "bt": Kind("configs/train/embedded_predictor_bt.yaml", "bt", (("predictor_bt", "predictor_bt"),),
               "outputs/demo/predictor_bt"),
    "mgnet": Kind("configs/train/embedded_mgnet.yaml", "mgnet", (("mgnet", "mgnet"),), "outputs/demo/mgnet"),
    "square": Kind("configs/train/ablation/square.yaml", "square", (("predictor_square", "predictor_square"),)),
    "mgnet_ct_posthoc": Kind(None, "mgnet", (("mgnet_ct_posthoc", "mgnet_ct_posthoc"),)),
}
# The paper's lambda grids: CT's classification loss plus one constraint at a time (area, smoothness, background;
# the grid's zero is `ct`), and MGnet's Eq. 2 with one weight moved from the embedded MGnet's (area 1 and, as
# `mgnet_area8`, 8; smoothness 0.5; background 1). Each is configs/train/ablation/NAME.yaml.
LAMBDA_GRID = ("ct_area0.1", "ct_area1", "ct_tv0.5", "ct_tv5", "ct_bg0.3", "ct_bg1",
               "mgnet_area0.25", "mgnet_tv0.05", "mgnet_tv5", "mgnet_bg0", "mgnet_bg3")


def setting_kind(name: str) -> Kind:
    """CT or MGnet at another setting, trained by configs/train/ablation/NAME.yaml and reported as NAME (MGnet) or
    predictor_NAME (CT): ``ct_h2.5`` explains as ``predictor_ct`` under the alias ``predictor_ct_h2.5``."""
    method = "mgnet" if name.startswith("mgnet") else "predictor_ct"
    alias = name if method == "mgnet" else f"predictor_{name}"
    return Kind(f"configs/train/ablation/{name}.yaml", name, ((method, alias),))


KINDS.update({name: setting_kind(name) for name in ("ct_h2.5", "ct_eta3", "mgnet_area8", *LAMBDA_GRID)})
# --kinds GROUP: the kinds of one study at once
GROUPS = {
    "controllers": ("ct", "bt", "mgnet", "ct_h2.5", "ct_eta3", "mgnet_area8", "square", "mgnet_ct_posthoc"),
    "lambda_grid": ("ct", "mgnet", "mgnet_area8", *LAMBDA_GRID),
}
CLAIMS = "configs/evaluate/embedded_claims_predictors.yaml"
# The black box's passes in float32 on every machine: precision "auto" runs the causal metrics' passes in bf16 where
# the CPU computes it natively and in float32 elsewhere, and seeds evaluated on different CPUs are averaged together.
PASSES = "32"
COMPARED = ("deletion", "insertion", "deletion_norm", "insertion_norm", "pointing_game", *PAIRED_OTHER)


def train_command(kind: str, seed: int, out: Path, filter_ckpt: Path) -> list[str]:
    run_dir = out / f"seed{seed}" / KINDS[kind].run
    resume = ["--ckpt_path=last"] if (ROOT / run_dir / "checkpoints" / "last.ckpt").is_file() else []
    return [*CLI, "fit", "--config", KINDS[kind].config, f"--run_dir={run_dir}",
            f"--model.init_args.filter_checkpoint={filter_ckpt}", f"--seed_everything={seed}",
            f"--model.init_args.draw_seed={seed}", *resume]


def link_demo_run(kind: str, out: Path) -> bool:
    """Seed 0 of a demo kind: link OUT/seed0/RUN to the demo's finished run (same config, seed 0) instead of
    training it again; False when the demo has no finished run or OUT already has one."""
    if KINDS[kind].demo_run is None:
        return False
    demo, mine = ROOT / KINDS[kind].demo_run, ROOT / out / "seed0" / KINDS[kind].run
    if not (demo / "fit_metrics.json").is_file() or mine.exists() or mine.is_symlink():
        return False
    mine.parent.mkdir(parents=True, exist_ok=True)
    mine.symlink_to(demo.resolve(), target_is_directory=True)
    print(f"{mine.relative_to(ROOT)} -> {demo.relative_to(ROOT)} (the demo's seed-0 run)", flush=True)
    return True


def explainer_list(kinds: Sequence[str], seed: int, out: Path) -> str:
    """The evaluation's explainers: Grad-CAM, then every explainer of every kind on this seed's checkpoint."""
    specs = ["gradcam"]
    for kind in kinds:
        ckpt = out / f"seed{seed}" / KINDS[kind].run / "checkpoints" / "last.ckpt"
        for name, alias in KINDS[kind].explainers:
            specs.append(f"{{name: {name}, checkpoint: {ckpt}}}" if alias == name
                         else f"{{name: {name}, alias: {alias}, checkpoint: {ckpt}}}")
    return "[" + ", ".join(specs) + "]"


def evaluate_command(seed: int, out: Path, num_images: int, kinds: Sequence[str] = ("ct", "bt", "mgnet")) -> list[str]:
    """evaluate.py of the claims config with this seed's checkpoints (the config's explainer list, re-pointed)."""
    return [*CLI, "evaluate", "--config", CLAIMS, f"--explainers={explainer_list(kinds, seed, out)}",
            f"--num_images={num_images}", f"--out={out / f'seed{seed}' / 'evaluation'}", "--wandb=false",
            f"--blackbox.init_args.precision={PASSES}"]


def same_evaluation(results: dict, methods: set[str], num_images: int) -> bool:
    """Whether an evaluation's results.json holds exactly ``methods``, each scored on ``num_images`` images, with
    the black box's passes at :data:`PASSES`."""
    return (set(results["methods"]) == methods and all(m.get("images") == num_images
                                                       for m in results["methods"].values())
            and results.get("passes", {}).get("blackbox_precision") == PASSES)


def reported_rows(evaluation: Path, num_images: int) -> list[dict]:
    """The rows an evaluation folder's last run reported (its row keys, its first ``num_images`` images), without
    the curves: not the rows of earlier settings left in the folder."""
    return [row for row in scan_evaluation(ROOT / evaluation).rows(curves=False) if row["index"] < num_images]


def stored_seed(store: Path, seed: int, methods: set[str], num_images: int) -> tuple[dict, list[dict]] | None:
    """(results.json, rows) of ``seed`` kept in ``store`` by :func:`store_seed`, or None: nothing stored, or an
    evaluation of other methods, another number of images or other black-box passes (:func:`same_evaluation`)."""
    folder = ROOT / store / f"seed{seed}"
    if not (folder / "results.json").is_file():
        return None
    results = json.loads((folder / "results.json").read_text())
    if not same_evaluation(results, methods, num_images):
        return None
    with gzip.open(folder / "rows.jsonl.gz", "rt") as f:
        return results, [json.loads(line) for line in f if line.strip()]


def _float32_digits(value):
    """A float at 9 significant digits (enough to give back every float32 score exactly), anything else as is."""
    return float(f"{value:.9g}") if isinstance(value, float) else value


def store_seed(store: Path, seed: int, out: Path, kinds: Sequence[str]) -> Path:
    """Copy ``seed``'s evaluation (results.json; its rows without the curves, floats at 9 significant digits,
    gzipped) and the fit_metrics.json of each trained kind from OUT/seed{s} to STORE/seed{s}; returns that folder."""
    source, folder = ROOT / out / f"seed{seed}", ROOT / store / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    text = (source / "evaluation" / "results.json").read_text()
    results = json.loads(text)
    rows = reported_rows(out / f"seed{seed}" / "evaluation", max(m["images"] for m in results["methods"].values()))
    (folder / "results.json").write_text(text)
    with gzip.open(folder / "rows.jsonl.gz", "wt", compresslevel=9) as f:
        f.writelines(json.dumps({k: _float32_digits(v) for k, v in row.items()}, sort_keys=True) + "\n"
                     for row in rows)
    fits = {kind: json.loads((source / KINDS[kind].run / "fit_metrics.json").read_text())
            for kind in kinds if (source / KINDS[kind].run / "fit_metrics.json").is_file()}
    (folder / "fits.json").write_text(json.dumps(fits, indent=1, sort_keys=True) + "\n")
    return folder


def compared(rows_per_seed: list[list[dict]], a: str, b: str, resamples: int = 2000) -> dict:
    """(method a - method b) of the seed-averaged per-image scores, with 95% bootstrap intervals."""
    mine = seed_averaged([[r for r in rows if r["method"] == a] for rows in rows_per_seed], a)
    theirs = seed_averaged([[r for r in rows if r["method"] == b] for rows in rows_per_seed], b)
    return paired_difference(mine + theirs, a, b, keys=COMPARED, resamples=resamples)


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
    parser.add_argument("--kinds", default="ct,bt,mgnet", help="predictors trained and evaluated, comma-separated, "
                                                                  "from: " + ", ".join(KINDS) + "; or a group: "
                                                                  + ", ".join(GROUPS))
    parser.add_argument("--compare", default="", help="pairs A-B of evaluated methods, comma-separated (e.g. "
                                                      "predictor_ct_h2.5-predictor_ct): paired, seed-averaged")
    parser.add_argument("--reuse_demo", action="store_true",
                        help="seed 0 of ct, bt and mgnet: link the demo's finished runs (outputs/demo) instead of "
                             "training them again with the same command")
    parser.add_argument("--store", type=Path, default=None,
                        help="folder of finished seeds' evaluations: a seed stored there with the same methods, "
                             "image count and passes is read, not trained or evaluated; each seed evaluated here is "
                             "stored")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    kinds = list(dict.fromkeys(k for item in args.kinds.split(",") if item for k in GROUPS.get(item, (item,))))
    if not seeds:
        parser.error("--seeds needs at least one seed")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        parser.error(f"--kinds: unknown kind(s) {unknown or kinds}; known: {', '.join(KINDS)}")
    evaluated = {alias for k in kinds for _, alias in KINDS[k].explainers} | {"gradcam"}
    pairs = [tuple(p.split("-", 1)) for p in args.compare.split(",") if p]
    bad = [p for p in pairs if len(p) != 2 or not set(p) <= evaluated]
    if bad:
        parser.error(f"--compare: {bad} not pairs A-B of the evaluated methods {sorted(evaluated)}")
    stored = {seed: stored_seed(args.store, seed, evaluated, args.num_images) if args.store else None
              for seed in seeds}
    if not args.dry_run and None in stored.values() and not (ROOT / args.filter).is_file():
        parser.error(f"--filter {args.filter} not found: run make demo (its filter stage) first")
    results, rows_per_seed = [], []
    for seed in seeds:
        kept = stored[seed]
        if kept is not None:
            print(f"seed {seed}: read from {args.store / f'seed{seed}'} (stored evaluation of the same methods and "
                  "images)", flush=True)
            results.append(kept[0])
            rows_per_seed.append(kept[1])
            continue
        for kind in kinds:
            if seed == 0 and args.reuse_demo and not args.dry_run:
                link_demo_run(kind, args.out)
            finished = (ROOT / args.out / f"seed{seed}" / KINDS[kind].run / "fit_metrics.json").is_file()
            if KINDS[kind].config and not finished:
                run(train_command(kind, seed, args.out, args.filter), args.dry_run)
        path = ROOT / args.out / f"seed{seed}" / "evaluation" / "results.json"
        if not path.is_file() or not same_evaluation(json.loads(path.read_text()), evaluated, args.num_images):
            # evaluate.py reuses the rows it has and scores the methods and images it lacks
            run(evaluate_command(seed, args.out, args.num_images, kinds), args.dry_run)
        if not args.dry_run:
            results.append(json.loads(path.read_text()))
            rows_per_seed.append(reported_rows(args.out / f"seed{seed}" / "evaluation", args.num_images))
            if args.store:
                print(f"seed {seed}: stored in {store_seed(args.store, seed, args.out, kinds).relative_to(ROOT)}")
    if args.dry_run:
        return {}
    table = seed_table(results)
    print(f"\ntest split, first {args.num_images} images; mean ± sd over training seeds {seeds} "
          "(Grad-CAM has no training: its sd is 0)")
    print("| method | " + " | ".join(SUMMARY_KEYS) + " |")
    print("|---|" + "---|" * len(SUMMARY_KEYS))
    for method, cells in table.items():
        print(f"| {method} | " + " | ".join(cells[k] for k in SUMMARY_KEYS) + " |")
    for a, b in pairs:
        diff = compared(rows_per_seed, a, b)
        print(f"{a} - {b}, seed-averaged per image [95% bootstrap]: "
              + "; ".join(f"{k} {v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" for k, v in diff.items()))
    return table


if __name__ == "__main__":
    main()
