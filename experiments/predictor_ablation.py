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

Variants (the demo recipe: 2 epochs x 150 batches of 128 = 300 steps, lr 1e-2 halved every epoch; every
variant trains with bf16 autocast and channels-last, see ``FAST``):
  ct, bt, mgnet              the demo configs as they are
  game                       the shipped winner as it is: embedded_predictor_game.yaml (ct_pgame_only_fp3 under its
                             own method name, predictor_game); its claims run is ``--split test --variants game``
  ct_fp32, ct_game_fp32      ct and ct_game trained in float32 (without ``FAST``): is bf16 training faithful?
  ct_game                    CT + the deletion and insertion game (weights 1; deletion into the mean colour,
                             insertion into the training blur; see lightning_modules/mask_predictor.py), the soft
                             top fraction thresholding logit(M) (the metric's order without CT's saturation)
  ct_gamem, ct_gamem_*, ct_pgamem  the same with the top fraction thresholding the mask M itself (squashed near 0)
  ct_del, ct_ins             CT + only the deletion / only the insertion half of the game
  ct_game_only               the game without the CE (preservation) term
  ct_game_subs               the game with mixed substrates (deletion: mean / strong blur / random colour;
                             insertion: training blur / strong blur / random colour)
  ct_game_t02                the game with a softer top fraction (temperature 0.2 instead of 0.05)
  ct_pgame                   the game under the causal metrics' own protocols: per image the rise preset (pixels,
                             mean colour / light blur) or the igos preset (8 x 8 cells, strong blur both ways)
  ct_pgame_10x               ct_pgame trained 10x longer
  ct_pgame_only              ct_pgame without the CE (preservation) term
  ct_pgame_only_fp2, _fp3    ct_pgame_only with the game's fractions drawn as u^2 (u^3): more of the game on the
                             small fractions that order the top of the ranking
  ct_pgame_only_ins2         ct_pgame_only with the insertion game weighted 2
  ct_pgame_only_fp3_10x      ct_pgame_only_fp3 trained 10x longer
  ct_game_10x                ct_game trained 10x longer (10 epochs x 300 batches, lr halved every 3 epochs)
  ct_game_s2                 ct_game with a finer mask: one more x2 upsampling block (stride 2 instead of 4)
  ct_game_tv                 ct_game plus a smoothness term (tv_weight 1)
  ct_teacher, ct_game_teacher, ct_pgame_teacher  CT (ct_game, ct_pgame) plus the teacher term toward RISE maps (500 masks) of the first
                             320 training scenes, trained on those scenes (``TEACHER_MAPS``, made first)
  ct_game_h2.5, ct_game_eta3 CT's shape under the game: the paper's h 2.5; a steeper sigmoid (eta 3)
  bt_game, mgnet_game        the other heads under the game
  ct_pgame_only_fp3_h2.5, ct_pgame_only_fp3_eta3, bt_pgame_only_fp3, mgnet_pgame_only_fp3
                             the controllers under the game-only objective: CT with the paper's h 2.5, CT with a
                             steeper sigmoid (eta 3), BT, and MGnet with its area/TV/background constraints
  ct_h2.5, ct_6ep, mgnet_area8, ct_area1   the earlier ablations (paper's h; 3x longer; Dabkowski's area
                             weight; CT plus MGnet's area term)
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

CONFIGS = {"ct": "embedded_predictor_ct.yaml", "bt": "embedded_predictor_bt.yaml", "mgnet": "embedded_mgnet.yaml",
           "game": "embedded_predictor_game.yaml"}
GAME = ["--model.init_args.deletion_weight=1.0", "--model.init_args.insertion_weight=1.0"]
MIXED_SUBSTRATES = ["--model.init_args.deletion_substrates=[mean, strong_blur, random]",
                    "--model.init_args.insertion_substrates=[blur, strong_blur, random]"]
# RISE (500 masks, mean colour) on the first 320 training scenes (the record holds its cost); the variant trains on those scenes only, so every image of every batch has its map.
TEACHER_SCENES = 320
TEACHER_MAPS = Path(f"outputs/teacher/rise500_{TEACHER_SCENES}.pt")
# 320 scenes are 3 batches of 128 (the last one 64): 100 epochs are the demo's 300 steps, with the learning rate
# halved once after 150 steps as the demo does, and validation at the halfway and final epochs only.
TEACHER = [f"--model.init_args.teacher_maps={TEACHER_MAPS}", "--model.init_args.teacher_weight=1.0",
           f"--data.init_args.num_train={TEACHER_SCENES}", "--trainer.max_epochs=100",
           "--model.init_args.lr_step_epochs=50", "--trainer.check_val_every_n_epoch=50"]
PROTOCOLS = ["--model.init_args.game_protocols=[rise, igos]"]
ON_MASK = ["--model.init_args.game_ranking=mask"]
GAME_ONLY_FP3 = [*GAME, *PROTOCOLS, "--model.init_args.ce_weight=0.0", "--model.init_args.game_fraction_power=3.0"]
LONG = ["--trainer.max_epochs=10", "--trainer.limit_train_batches=300", "--model.init_args.lr_step_epochs=3"]
VARIANTS = {
    "ct": ("ct", []),
    "ct_fp32": ("ct", []),
    "ct_game_fp32": ("ct", GAME),
    "bt": ("bt", []),
    "mgnet": ("mgnet", []),
    "game": ("game", []),
    "ct_game": ("ct", GAME),
    "ct_gamem": ("ct", [*GAME, *ON_MASK]),
    "ct_gamem_subs": ("ct", [*GAME, *ON_MASK, *MIXED_SUBSTRATES]),
    "ct_gamem_s2": ("ct", [*GAME, *ON_MASK, "--model.init_args.extra_upsamples=1"]),
    "ct_gamem_tv": ("ct", [*GAME, *ON_MASK, "--model.init_args.tv_weight=1.0"]),
    "ct_pgamem": ("ct", [*GAME, *ON_MASK, *PROTOCOLS]),
    "ct_del": ("ct", ["--model.init_args.deletion_weight=1.0"]),
    "ct_ins": ("ct", ["--model.init_args.insertion_weight=1.0"]),
    "ct_game_only": ("ct", [*GAME, "--model.init_args.ce_weight=0.0"]),
    "ct_game_subs": ("ct", [*GAME, *MIXED_SUBSTRATES]),
    "ct_pgame": ("ct", [*GAME, *PROTOCOLS]),
    "ct_pgame_10x": ("ct", [*GAME, *PROTOCOLS, *LONG]),
    "ct_pgame_only": ("ct", [*GAME, *PROTOCOLS, "--model.init_args.ce_weight=0.0"]),
    "ct_pgame_only_fp2": ("ct", [*GAME, *PROTOCOLS, "--model.init_args.ce_weight=0.0",
                                 "--model.init_args.game_fraction_power=2.0"]),
    "ct_pgame_only_fp3": ("ct", [*GAME, *PROTOCOLS, "--model.init_args.ce_weight=0.0",
                                 "--model.init_args.game_fraction_power=3.0"]),
    "ct_pgame_only_fp3_10x": ("ct", [*GAME, *PROTOCOLS, "--model.init_args.ce_weight=0.0",
                                     "--model.init_args.game_fraction_power=3.0", *LONG]),
    # the controllers under the game-only objective: the paper's h, a steeper CT, BT, and MGnet's constraints
    "ct_pgame_only_fp3_h2.5": ("ct", [*GAME_ONLY_FP3, "--model.init_args.h=2.5"]),
    "ct_pgame_only_fp3_eta3": ("ct", [*GAME_ONLY_FP3, "--model.init_args.eta=3.0"]),
    "bt_pgame_only_fp3": ("bt", GAME_ONLY_FP3),
    "mgnet_pgame_only_fp3": ("mgnet", GAME_ONLY_FP3),
    "ct_pgame_only_ins2": ("ct", [*PROTOCOLS, "--model.init_args.ce_weight=0.0",
                                  "--model.init_args.deletion_weight=1.0", "--model.init_args.insertion_weight=2.0"]),
    "ct_game_t02": ("ct", [*GAME, "--model.init_args.game_temperature=0.2"]),
    "ct_game_10x": ("ct", [*GAME, *LONG]),
    "ct_game_s2": ("ct", [*GAME, "--model.init_args.extra_upsamples=1"]),
    "ct_game_tv": ("ct", [*GAME, "--model.init_args.tv_weight=1.0"]),
    "ct_teacher": ("ct", [*TEACHER]),
    "ct_game_teacher": ("ct", [*GAME, *TEACHER]),
    "ct_pgame_teacher": ("ct", [*GAME, *PROTOCOLS, *TEACHER]),
    "ct_game_h2.5": ("ct", [*GAME, "--model.init_args.h=2.5"]),
    "ct_game_eta3": ("ct", [*GAME, "--model.init_args.eta=3.0"]),
    "bt_game": ("bt", GAME),
    "mgnet_game": ("mgnet", GAME),
    "ct_h2.5": ("ct", ["--model.init_args.h=2.5"]),
    "ct_6ep": ("ct", ["--trainer.max_epochs=6", "--model.init_args.lr_step_epochs=2"]),
    "mgnet_area8": ("mgnet", ["--model.init_args.area_weight=8.0"]),
    "ct_area1": ("ct", ["--model.init_args.area_weight=1.0"]),
}
# bf16 autocast + channels-last (faster training steps where the CPU has bf16 units, docs/results/predictor.md);
# every variant but *_fp32 uses it.
FAST = ["--trainer.precision=bf16-mixed", "--model.init_args.channels_last=true"]
BASELINES = {"rise": "{rise: {n_masks: 4000}}", "igos_pp": "{}"}
PRESETS = ("rise", "igos")
CAUSAL = ("deletion", "insertion", "deletion_norm", "insertion_norm")
OTHER = ("mf", "mi", "pointing_game", "iou")


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def make_teacher(blackbox: str) -> None:
    """The teacher maps of the teacher variants (reused when the file is complete); prints their cost."""
    run([*CLI, "teacher", f"--blackbox={blackbox}", "--method=rise",
         "--method_hparams={n_masks: 500}", f"--num_images={TEACHER_SCENES}", f"--out={TEACHER_MAPS}"])


def train(name: str, out: Path, filter_ckpt: Path, blackbox: str, seed: int = 0) -> Path:
    """The run folder of variant ``name`` trained with ``seed`` (trained first unless it finished before)."""
    kind, overrides = VARIANTS[name]
    run_dir = out / (name if seed == 0 else f"{name}_seed{seed}")
    # seed_everything: initialisation and batch order; draw_seed: the predictor's per-image substrate and game
    # draws. The data module's seed stays: it fixes the scenes themselves, the same for every training seed.
    seeding = [] if seed == 0 else [f"--seed_everything={seed}", f"--model.init_args.draw_seed={seed}"]
    if "teacher" in name:
        make_teacher(blackbox)
    if not (ROOT / run_dir / "fit_metrics.json").is_file():
        resume = ["--ckpt_path=last"] if (ROOT / run_dir / "checkpoints" / "last.ckpt").is_file() else []
        run([*CLI, "fit", "--config", f"configs/train/{CONFIGS[kind]}",
             f"--run_dir={run_dir}", f"--model.init_args.blackbox.init_args.model={blackbox}",
             f"--model.init_args.filter_checkpoint={filter_ckpt}", *([] if name.endswith("_fp32") else FAST),
             *overrides, *seeding, *resume])
    return run_dir


def evaluate(out: Path, preset: str, args, methods: str = "[]", hparams: str = "{}", ckpt: Path | None = None,
             extra: tuple[str, ...] = (), num_images: int | None = None) -> dict:
    """results.json of one evaluation on the first ``args.num_images`` images of ``args.split`` (or
    ``num_images``), reused when it exists."""
    if not (ROOT / out / "results.json").is_file():
        run([*CLI, "evaluate", "--config", "configs/evaluate/embedded_evaluate.yaml",
             f"--blackbox.init_args.model={args.blackbox}", f"--split={args.split}", f"--explainers={methods}",
             f"--method_hparams={hparams}", f"--settings.protocol={preset}", f"--num_images={num_images or args.num_images}",
             "--batch_size=25", f"--blackbox.init_args.precision={args.precision}",
             f"--ckpt_path=[{ckpt}]" if ckpt else "--ckpt_path=[]", f"--out={out}", "--wandb=false", "--overlay_images=8",
             *([f"--data={args.data}"] if args.data else []), *extra])
    return json.loads((ROOT / out / "results.json").read_text())


def rows_of(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((ROOT / folder / "rows").glob("*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def summarise(folders: dict[str, Path], method: str | None, fit: dict | None) -> dict:
    """One table row from the evaluations of one method under each preset."""
    row = {}
    for preset, folder in folders.items():
        results = json.loads((ROOT / folder / "results.json").read_text())
        stats = results["methods"][method] if method else next(iter(results["methods"].values()))
        row.update({f"{preset}:{key}": stats.get(key) for key in CAUSAL})
        if preset == "rise":
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
    keys = ("deletion", "insertion", "deletion_norm", "insertion_norm", "pointing_game")
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
        for label, mine in groups:
            d = paired_difference(mine + theirs, name, baseline, keys=CAUSAL)
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
    for given, known, what in ((names, VARIANTS, "variants"), (baselines, BASELINES, "baselines"),
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
            extra = ("--save_maps=true",) if folder == first else (f"--maps_from={first}",)
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
                evaluate(folder, preset, args, ckpt=run_dir / "checkpoints" / "last.ckpt")
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
