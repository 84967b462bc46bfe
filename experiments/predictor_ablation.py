"""Ablations of the learned mask predictor on the embedded *validation* split, and the claims run of the chosen
variant on the *test* split (``--split test``, several training seeds).

    python -m experiments.predictor_ablation [--variants ct,ct_game,...] [--num_images 200] [--presets rise,igos]
                                            [--baselines rise,igos_pp] [--curves ct_game_10x] [--out outputs/ablation]
    python -m experiments.predictor_ablation --split test --num_images 500 --variants ct_game --seeds 0,1,2 \
        --baselines rise,igos_pp --baseline_images igos_pp=100 --out outputs/claims/faithful
    python -m experiments.predictor_ablation ... --data configs/data/embedded_hard.yaml   (folders *_embedded_hard)

With several ``--seeds`` every variant is trained once per seed (``seed_everything``: initialisation and batch
order; the predictor's ``draw_seed``: its per-image substrate and game draws), its row is the mean ± sd over seeds, and the paired intervals compare each seed and the seed-averaged
per-image scores with each baseline on the images both scored. ``--baseline_images`` evaluates a costly baseline
on the first N images only (the variants are paired with it on those).

Each variant is one ``train.py fit`` of an embedded predictor config with a few overrides (after the demo's
filter stage: it reads ``outputs/demo/filter``), then ``evaluate.py --split val`` of its last checkpoint under
each causal protocol preset. The baselines (RISE with 4000 masks masking to the black box's mean colour, iGOS++
at its defaults) are evaluated once on the same validation images. Finished runs and evaluations are reused,
so an interrupted ablation resumes. Prints:
  - one row per variant and baseline: deletion, insertion and both normalised areas per preset, raw M_F,
    M_I, pointing game, IoU, the skewness of the mask scores and the training minutes (Lightning's Timer);
  - the paired difference (variant - RISE) of deletion under each preset with its 95% bootstrap interval;
  - learning curves (``--curves``): every epoch checkpoint of those variants, evaluated like the rest.

Variants are training configs with readable names, one file each in ``configs/train/ablation/`` (``--variants NAME``
trains ``configs/train/ablation/NAME.yaml``; ``game`` is ``configs/train/embedded_predictor_game.yaml`` itself, the
shipped recipe). Each file says what it changes; the loss terms are composed by ``class_path``
(``saliency_lab.lightning_modules.objectives``). The ``lever_*`` variants are the faithfulness levers measured in
docs/results/levers.md, all in float32; the others are the earlier ablations of docs/results/predictor.md (bf16
autocast + channels-last, as they were trained), among them ``ct_pgame_only_fp3``, the recipe that ships as
``predictor_game``. ``*_teacher`` variants need the teacher maps, which the driver makes first.

Presets: the causal protocols the variants are scored under, the training presets ``rise`` and ``igos`` and the
held-out families ``noise``, ``blur_wide`` and ``grid16`` (docs/heldout.md); ROAD is computed in the first preset's
evaluation only (it does not depend on the preset) and its columns come from there.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # outputs/ and configs/ are read relative to the checkout
CLI = (sys.executable, "-m", "saliency_lab.cli")


from saliency_lab.metrics.report import paired_difference

ABLATION = Path("configs/train/ablation")  # one training config per variant
SHIPPED = {"game": Path("configs/train/embedded_predictor_game.yaml")}
# RISE (500 masks, mean colour) on the first 320 training scenes (the record holds its cost): what the *_teacher
# variants' Teacher term reads (their configs name this file).
TEACHER_SCENES = 320
TEACHER_MAPS = Path(f"outputs/teacher/rise500_{TEACHER_SCENES}.pt")


def variant_config(name: str) -> Path:
    """The training config of variant ``name`` (relative to the checkout)."""
    return SHIPPED.get(name, ABLATION / f"{name}.yaml")


def known_variants() -> list[str]:
    return sorted([*SHIPPED, *(p.stem for p in (ROOT / ABLATION).glob("*.yaml"))])


BASELINES = {"rise": "{rise: {n_masks: 4000}}", "igos_pp": "{}"}
PRESETS = ("rise", "igos", "noise", "blur_wide", "grid16")
CAUSAL = ("deletion", "insertion", "deletion_norm", "insertion_norm")
OTHER = ("road_morf", "road_lerf", "mf", "mi", "pointing_game", "iou")
PAIRED_OTHER = ("road_morf", "road_lerf", "road_gap", "mf")  # paired against the baselines too (first preset)
# The table reads ROAD from the first preset's evaluation only (ROAD does not depend on the causal preset), so the
# later presets skip its imputations (their rows hold NaN for ROAD).
LATER_PRESETS = ("--settings.road_fractions=[]",)


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def make_teacher(blackbox: str) -> None:
    """The teacher maps of the teacher variants (reused when the file is complete); prints their cost."""
    run([*CLI, "teacher", f"--blackbox={blackbox}", "--method=rise",
         "--method_hparams={n_masks: 500}", f"--num_images={TEACHER_SCENES}", f"--out={TEACHER_MAPS}"])


def train(name: str, out: Path, filter_ckpt: Path, blackbox: str, seed: int = 0) -> Path:
    """The run folder of variant ``name`` trained with ``seed`` (trained first unless it finished before)."""
    run_dir = out / (name if seed == 0 else f"{name}_seed{seed}")
    # seed_everything: initialisation and batch order; draw_seed: the predictor's per-image substrate and game
    # draws. The data module's seed stays: it fixes the scenes themselves, the same for every training seed.
    seeding = [] if seed == 0 else [f"--seed_everything={seed}", f"--model.init_args.draw_seed={seed}"]
    if "teacher" in name:
        make_teacher(blackbox)
    if not (ROOT / run_dir / "fit_metrics.json").is_file():
        resume = ["--ckpt_path=last"] if (ROOT / run_dir / "checkpoints" / "last.ckpt").is_file() else []
        run([*CLI, "fit", "--config", str(variant_config(name)), f"--run_dir={run_dir}",
             f"--model.init_args.blackbox.init_args.model={blackbox}", f"--model.init_args.filter_checkpoint={filter_ckpt}",
             *seeding, *resume])
    return run_dir


def evaluate(out: Path, preset: str, args, methods: str = "[]", hparams: str = "{}", ckpt: Path | None = None,
             extra: tuple[str, ...] = (), num_images: int | None = None) -> dict:
    """results.json of one evaluation on the first ``args.num_images`` images of ``args.split`` (or
    ``num_images``), reused when it exists for that many images (for another count evaluate.py runs again: it
    reuses the rows it has and scores the images it lacks)."""
    path = ROOT / out / "results.json"
    if not (path.is_file() and json.loads(path.read_text()).get("num_images") == (num_images or args.num_images)):
        run([*CLI, "evaluate", "--config", "configs/evaluate/embedded_evaluate.yaml",
             f"--blackbox.init_args.model={args.blackbox}", f"--split={args.split}", f"--explainers={methods}",
             f"--method_hparams={hparams}", f"--settings.protocol={preset}", f"--num_images={num_images or args.num_images}",
             "--batch_size=25", f"--blackbox.init_args.precision={args.precision}",
             f"--ckpt_path=[{ckpt}]" if ckpt else "--ckpt_path=[]", f"--out={out}", "--wandb=false", "--overlay_images=8",
             *([f"--data={args.data}"] if args.data else []), *extra])
    return json.loads(path.read_text())


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((ROOT / folder / "rows").glob("*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def summarise(folders: dict[str, Path], method: str | None, fit: dict | None) -> dict:
    """One table row from the evaluations of one method under each preset (ROAD, M_F, M_I, pointing and IoU from
    the first preset's)."""
    row = {}
    for preset, folder in folders.items():
        results = json.loads((ROOT / folder / "results.json").read_text())
        stats = results["methods"][method] if method else next(iter(results["methods"].values()))
        row.update({f"{preset}:{key}": stats.get(key) for key in CAUSAL})
        if preset == next(iter(folders)):
            row.update({key: stats.get(key) for key in OTHER})
    if fit:
        row["skewness"] = fit.get("val/mask_skewness")
        seconds = fit.get("time/train_seconds")
        row["train_min"] = None if seconds is None else seconds / 60
    return row


def fmt(value, key: str) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if key in ("mf", "mi", "train_min") else f"{value:.3f}"


def fmt_seeds(values: list, key: str) -> str:
    """One value, or mean ± sd (n - 1) over the training seeds."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return fmt(values[0] if values else None, key)
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{fmt(mean, key)} ± {fmt(sd, key)}"


def seed_averaged(rows_per_seed: list[list[dict]], method: str) -> list[dict]:
    """Per image, every paired key averaged over the seeds that scored it (images scored by every seed)."""
    by_seed = [{int(r["index"]): r for r in rows} for rows in rows_per_seed]
    common = set.intersection(*(set(m) for m in by_seed))
    keys = ("deletion", "insertion", "deletion_norm", "insertion_norm", "pointing_game", *PAIRED_OTHER)
    return [{"index": i, "method": method,
             **{k: sum(float(m[i].get(k, float("nan"))) for m in by_seed) / len(by_seed) for k in keys}}
            for i in sorted(common)]


def paired_lines(name: str, rows_per_seed: dict[str, list[list[dict]]], baseline: str,
                 baseline_rows: dict[str, list[dict]], seeds: list[int]) -> list[str]:
    """Per preset and causal key: (variant - baseline) with its 95% bootstrap interval, for the seed-averaged
    per-image scores and (with several seeds) each seed."""
    lines = []
    for preset, per_seed in rows_per_seed.items():
        theirs = [{**r, "method": baseline} for r in baseline_rows[preset]]
        groups = [("seed mean", seed_averaged(per_seed, name))]
        if len(seeds) > 1:
            groups += [(f"seed {s}", [{**r, "method": name} for r in rows]) for s, rows in zip(seeds, per_seed)]
        first = preset == next(iter(rows_per_seed))
        for label, mine in groups:
            d = paired_difference(mine + theirs, name, baseline, keys=CAUSAL + (PAIRED_OTHER if first else ()))
            parts = [f"{k} {v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" for k, v in d.items()]
            images = next(iter(d.values()))["images"] if d else 0
            lines.append(f"  {name} - {baseline}, {preset} preset, {label} ({images} images): " + "; ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="ct,ct_game")
    parser.add_argument("--baselines", default="rise", help="comma-separated, from: " + ", ".join(BASELINES))
    parser.add_argument("--baseline_images", default="", help="NAME=N,...: a baseline on the first N images only")
    parser.add_argument("--presets", default="rise,igos")
    parser.add_argument("--curves", default="", help="variants whose every epoch checkpoint is evaluated")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--seeds", default="0", help="training seeds of every variant, comma-separated")
    parser.add_argument("--num_images", type=int, default=200, help="images evaluated")
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--filter", type=Path, default=Path("outputs/demo/filter/checkpoints/last.ckpt"))
    parser.add_argument("--blackbox", default="ckpt:assets/embedded_blackbox.pt")
    parser.add_argument("--data", default=None,
                        help="the scenes evaluated (a data config, e.g. configs/data/embedded_hard.yaml: other scenes "
                             "and heavier clutter, to check that an ordering generalises); training always uses the "
                             "embedded scenes. Default: the evaluation config's (configs/data/embedded.yaml)")
    parser.add_argument("--precision", default="32", choices=("32", "bf16", "auto"),
                        help="the black box's precision in every evaluation: float32 by default, so that results cached "
                             "before precision 'auto' became evaluate.py's default stay comparable")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    baselines = [b for b in args.baselines.split(",") if b]
    presets = [p for p in args.presets.split(",") if p]
    seeds = [int(x) for x in args.seeds.split(",") if x]
    try:
        counts = {k: int(v) for k, v in (item.split("=") for item in args.baseline_images.split(",") if item)}
    except ValueError:
        parser.error(f"--baseline_images must be NAME=N,..., got {args.baseline_images!r}")
    for given, known, what in ((names, known_variants(), "variants"), (baselines, BASELINES, "baselines"),
                               (presets, PRESETS, "presets"), (list(counts), baselines, "--baseline_images names")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {what} {unknown}; known: {', '.join(known)}")
    if not seeds or any(n < 1 for n in counts.values()):
        parser.error("--seeds needs at least one seed and --baseline_images counts must be >= 1")
    if not (ROOT / args.filter).is_file():
        parser.error(f"--filter {args.filter} not found: run make demo (its filter stage) first")

    table, folders, split = {}, {}, args.split
    # results are reused by folder: scenes other than the embedded ones get their own folders (the training is shared)
    scenes = f"_{Path(args.data).stem}" if args.data else ""
    for baseline in baselines:
        folders[baseline] = {p: args.out / "baselines" / f"{baseline}_{p}{scenes}" for p in presets}
        first = folders[baseline][presets[0]]
        for preset, folder in folders[baseline].items():  # the maps are made once, then scored per preset
            extra = ("--save_maps=true",) if folder == first else (f"--maps_from={first}", *LATER_PRESETS)
            evaluate(folder, preset, args, methods=baseline, hparams=BASELINES[baseline], extra=extra,
                     num_images=counts.get(baseline))
        table[baseline] = [summarise(folders[baseline], baseline, None)]
    runs = {}
    for name in names:
        runs[name] = []
        for seed in seeds:
            run_dir = train(name, args.out, args.filter, args.blackbox, seed)
            evaluations = {p: run_dir / f"{split}_{p}{scenes}" for p in presets}
            for preset, folder in evaluations.items():
                evaluate(folder, preset, args, ckpt=run_dir / "checkpoints" / "last.ckpt",
                         extra=() if preset == presets[0] else LATER_PRESETS)
            fit = json.loads((ROOT / run_dir / "fit_metrics.json").read_text())
            runs[name].append(evaluations)
            table.setdefault(name, []).append(summarise(evaluations, None, fit))

    columns = [f"{p}:{k}" for p in presets for k in CAUSAL] + list(OTHER) + ["skewness", "train_min"]
    seeds_note = f"; variants: mean ± sd over training seeds {seeds}" if len(seeds) > 1 else ""
    fewer = "".join(f", {k} on the first {v}" for k, v in counts.items())
    print(f"\n{split} split, first {args.num_images} images{fewer}; rise:/igos: the causal protocol preset; mf is the raw M_F (its min-max normalisation "
          f"needs several methods on the same images){seeds_note}")
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, rows in table.items():
        print(f"| {name} | " + " | ".join(fmt_seeds([r.get(c) for r in rows], c.split(":")[-1]) for c in columns)
              + " |")

    for baseline in baselines:
        print(f"\npaired difference against {baseline} (variant - {baseline}, mean over images [95% bootstrap "
              "interval]; deletion, deletion_norm: lower is better; insertion, insertion_norm: higher is better)")
        theirs = {p: rows_of(folders[baseline][p]) for p in presets}
        for name in names:
            mine = {p: [rows_of(evaluations[p]) for evaluations in runs[name]] for p in presets}
            print("\n".join(paired_lines(name, mine, baseline, theirs, seeds)))

    for name in [n for n in args.curves.split(",") if n]:
        run_dir = train(name, args.out, args.filter, args.blackbox)
        for preset in presets:
            print(f"\nlearning curve of {name} ({split}, {args.num_images} images, {preset} preset)")
            print("| checkpoint | step | deletion | insertion | deletion_norm | insertion_norm | pointing_game |")
            print("|---|---|---|---|---|---|---|")
            for ckpt in sorted((ROOT / run_dir / "checkpoints").glob("epoch*.ckpt")):
                # the rise preset's curve keeps its first folder name, so earlier curve runs are reused
                folder = run_dir / (f"curve_{ckpt.stem}" if preset == "rise" else f"curve_{preset}_{ckpt.stem}")
                results = evaluate(folder, preset, args, ckpt=ckpt.relative_to(ROOT))
                stats = next(iter(results["methods"].values()))
                step = ckpt.stem.split("step")[-1]
                print(f"| {ckpt.stem} | {int(step)} | " + " | ".join(fmt(stats.get(k), k) for k in (
                    "deletion", "insertion", "deletion_norm", "insertion_norm", "pointing_game")) + " |")


if __name__ == "__main__":
    main()
