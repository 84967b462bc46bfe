"""Evaluate explainers on a black box: every method x every metric, resumable, single- or multi-process.

    python evaluate.py --config configs/experiment/embedded_evaluate.yaml [--explainers a,b,c] [--ckpt PATH ...]
                       [--num_images N] [--out DIR] [--trainer configs/trainer/cpu_ddp.yaml]

The config mirrors the objects it builds: ``blackbox`` (``class_path: core.blackbox.BlackBox`` + ``init_args``),
``data`` (a LightningDataModule), ``explainers`` (the explainer specs of :mod:`explainers.specs`, as in the
callbacks), ``settings`` (:class:`metrics.EvaluationSettings` with its nested ``CausalProtocol``: a preset,
``--settings.protocol igos``, or fields) and ``trainer`` (``pl.Trainer`` arguments, e.g. a configs/trainer/*.yaml).

Writes into DIR: results.json, results.csv (one row per image x method), summary.md, curves.png,
overlays.png, report.html (all of these in one self-contained page) and the same as W&B tables and images.
Rows are appended as they finish (DIR/rows/); the same command again skips finished (image, method) pairs
and reports exactly what an uninterrupted run does.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Union

import pytorch_lightning as pl
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch.utils.data import DataLoader, Subset

import explainers
from callbacks.figures import curves_figure, overlay_grid
from callbacks.sanity import label_randomisation, model_randomisation
from cli_utils import WandbLogger
from core.blackbox import BlackBox
from datamodules import collate_samples
from explainers import ExplainerSpec, build_explainer, explainer_keys, parse_spec
from lightning_modules.evaluation import EvaluationModule
from metrics import TARGET_RULES, EvaluationSettings, RowStore, explained_class
from metrics.report import dedupe, mean_curves, write_reports
from metrics.report_html import write_html_report

# Trainer arguments evaluate.py sets itself (the rest, e.g. configs/trainer/*.yaml, come from the config).
TRAINER_FIXED = {"logger": False, "enable_checkpointing": False, "inference_mode": False,
                 "enable_model_summary": False}
TRAINER_SKIPPED = {"logger", "callbacks", "plugins", "enable_checkpointing", "default_root_dir"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    parser.add_subclass_arguments(BlackBox, "blackbox", required=True,
                                  help="the black box: class_path core.blackbox.BlackBox, init_args model "
                                       "('ckpt:PATH', 'timm:NAME' or 'torchvision:NAME'), weights, num_classes, ...")
    parser.add_subclass_arguments(pl.LightningDataModule, "data", help="the datamodule (class_path + init_args)")
    parser.add_argument("--split", type=str, default="test", help="split of the datamodule: test or val")
    parser.add_argument("--explainers", type=Union[str, list[Union[str, dict[str, Any]]]],
                        default="rise,gradient,gradcam",
                        help="explainer specs: registry names (a list, or comma-separated) or {name, alias, "
                             "checkpoint, **hparams} dicts (explainers/specs.py)")
    parser.add_argument("--method_hparams", type=dict[str, dict[str, Any]], default={},
                        help="per-explainer keyword arguments over the specs', by key, e.g. {rise: {n_masks: 2000}}")
    parser.add_argument("--ckpt", type=list[str], default=[],
                        help="checkpoints of trained explainers, each evaluated as a method: PATH (the recorded "
                             "explainer) or NAME=PATH (another registered method of the same weights, e.g. "
                             "predictor_ct_posthoc=PATH)")
    parser.add_argument("--num_images", type=int | None, default=None, help="the first N images of the split")
    parser.add_argument("--method_num_images", type=dict[str, int], default={},
                        help="per-explainer image counts below --num_images, by key, e.g. {igos_pp: 100}: that "
                             "method explains only the first N images (slow per-image optimisers); mf_normalized "
                             "then uses the images every method explained")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_class_arguments(EvaluationSettings, "settings",
                               help="metric knobs; settings.protocol: preset 'rise' or 'igos', or CausalProtocol fields")
    parser.add_argument("--target", type=str, default="predicted", help=f"explained class: one of {TARGET_RULES}")
    parser.add_argument("--max_forward_batch", type=int, default=256, help="memory knob of metrics and methods")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stochastic method")
    parser.add_argument("--overlay_images", type=int, default=8)
    parser.add_argument("--randomisation_images", type=int, default=0,
                        help="also run the cascading model-randomisation check (callbacks/sanity.py) of every "
                             "untrained explainer on the first N images (0: off); writes randomisation.json")
    parser.add_argument("--randomisation_fractions", type=list[float], default=[0.5],
                        help="fractions of the black box's layers re-initialised, counted from the output")
    parser.add_argument("--label_randomisation_blackbox", type=str | None, default=None,
                        help="with --randomisation_images: also the label-randomisation check (Adebayo et al.) "
                             "against this black box trained on shuffled labels ('ckpt:PATH', e.g. from "
                             "configs/experiment/embedded_classifier_shuffled.yaml)")
    parser.add_argument("--save_maps", type=bool, default=False,
                        help="save every map under OUT/maps/METHOD/INDEX.pt (not only the overlay images')")
    parser.add_argument("--maps_from", type=str | None, default=None,
                        help="an earlier --out folder run with --save_maps: score its saved maps (e.g. under another "
                             "--settings.protocol) instead of explaining again, for each method whose settings (black box, "
                             "data, seed, hyper-parameters, checkpoint content) match; cost is copied from its rows")
    parser.add_argument("--out", type=str, default="outputs/evaluation")
    parser.add_class_arguments(pl.Trainer, "trainer", instantiate=False, skip=TRAINER_SKIPPED,
                               help="Trainer arguments (accelerator, devices, strategy, precision, ...); "
                                    f"evaluate.py sets {sorted(TRAINER_FIXED)} itself")
    parser.set_defaults({"trainer.accelerator": "cpu", "trainer.devices": 1})
    parser.add_argument("--wandb", type=bool, default=True, help="also log tables and images to W&B")
    parser.add_argument("--wandb_project", type=str, default="saliency-lab")
    return parser


def explainer_specs(cfg) -> list[ExplainerSpec]:
    """The explainer list: ``--explainers`` (hyper-parameters from ``--method_hparams`` on top), then one
    ``{name, checkpoint}`` per ``--ckpt``; every registry name is checked."""
    given = cfg.explainers.split(",") if isinstance(cfg.explainers, str) else list(cfg.explainers)
    specs = [spec.strip() if isinstance(spec, str) else dict(spec) for spec in given]
    specs = [spec for spec in specs if spec]
    unknown = [parse_spec(s).name for s in specs if parse_spec(s).name not in explainers.available()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(explainers.available())}")
    for entry in cfg.ckpt:
        wanted, path = split_ckpt_entry(entry)
        specs.append({"name": wanted or explainers.recorded_name(path), "checkpoint": path})
    overrides = {key: cfg.method_hparams.get(key, {}) for key in explainer_keys(specs)}
    return [_with_hparams(spec, overrides[key]) for spec, key in zip(specs, explainer_keys(specs))]


def _with_hparams(spec: ExplainerSpec, hparams: dict) -> ExplainerSpec:
    if not hparams:
        return spec
    return {"name": spec, **hparams} if isinstance(spec, str) else {**spec, **hparams}


def given_hparams(spec: ExplainerSpec) -> dict:
    """The hyper-parameters a spec sets (not the defaults, not the checkpoint), as recorded in run.json."""
    return parse_spec(spec).hparams


def split_ckpt_entry(entry: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain path (even one holding '=') -> (None, PATH)."""
    wanted, sep, path = entry.partition("=")
    if not sep or "/" in wanted or Path(entry).exists():
        return None, entry
    return wanted, path


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reusable_maps(source: Path, header: dict) -> dict[str, tuple[Path, dict[int, dict]]]:
    """The methods of ``header`` whose maps an earlier evaluation folder ``source`` saved with the same black box,
    data, seed, hyper-parameters and checkpoint content: name -> (maps folder, {index: row})."""
    path = source / "run.json"
    if not path.is_file():
        raise ValueError(f"--maps_from {source}: no run.json there (not an evaluate.py --out folder)")
    before = json.loads(path.read_text())
    same = all(before.get(k) == header[k] for k in ("blackbox", "data", "seed"))
    reuse = {}
    for name, hparams in header["methods_hparams"].items():
        if not (same and before.get("methods_hparams", {}).get(name) == hparams
                and (before.get("checkpoints", {}).get(name) or {}).get("sha256")
                == (header["checkpoints"].get(name) or {}).get("sha256")
                and (source / "maps" / name).is_dir()):
            continue
        rows = {int(r["index"]): r for r in RowStore(source / "rows").read_all() if r["method"] == name}
        reuse[name] = (source / "maps", rows)
    print(f"--maps_from {source}: scoring its saved maps of {sorted(reuse) or 'no method'}; explaining the rest")
    return reuse


def check_run_header(out: Path, header: dict) -> None:
    """A rerun must evaluate the same thing; otherwise its rows would be mixed with the old ones."""
    path = out / "run.json"
    if path.is_file():
        before = json.loads(path.read_text())
        # Hyper-parameters, checkpoints and per-method image counts may change: rows are per (image, method).
        changed = sorted(k for k in header if k not in ("methods_hparams", "checkpoints", "method_num_images")
                         and before.get(k) != header[k])
        if changed:
            raise ValueError(f"{out} holds an evaluation with other settings ({', '.join(changed)} differ); use "
                             "another --out or delete the folder")
    path.write_text(json.dumps(header, indent=2, default=str))


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if cfg.target not in TARGET_RULES:
        raise ValueError(f"--target must be one of {TARGET_RULES}, got {cfg.target!r}")
    if cfg.label_randomisation_blackbox and cfg.randomisation_images < 1:
        raise ValueError("--label_randomisation_blackbox needs --randomisation_images N > 0 (the images checked)")
    specs = explainer_specs(cfg)
    keys = explainer_keys(specs)
    unknown = sorted(set(cfg.method_num_images) - set(keys))
    if unknown or any(n < 1 for n in cfg.method_num_images.values()):
        raise ValueError(f"--method_num_images must map evaluated methods to counts >= 1; got {cfg.method_num_images}"
                         f" (not evaluated: {unknown}; evaluated: {keys})")
    init = parser.instantiate(cfg)
    datamodule: pl.LightningDataModule = init.data
    blackbox: BlackBox = init.blackbox
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    datamodule.prepare_data()
    datamodule.setup("test" if cfg.split == "test" else "validate")
    dataset = datamodule.dataset(cfg.split)
    num_images = len(dataset) if cfg.num_images is None else min(cfg.num_images, len(dataset))
    subset = Subset(dataset, range(num_images))
    image_size = int(subset[0]["image"].shape[-1])

    if blackbox.num_classes != getattr(datamodule, "num_classes", blackbox.num_classes):
        raise ValueError(f"black box has {blackbox.num_classes} classes, the data {datamodule.num_classes}")
    common = {"seed": cfg.seed, "max_forward_batch": cfg.max_forward_batch}
    methods = {key: build_explainer(spec, blackbox, **common) for key, spec in zip(keys, specs)}
    checkpoints = {key: parse_spec(spec).checkpoint for key, spec in zip(keys, specs) if parse_spec(spec).checkpoint}
    settings = init.settings.resolve(image_size, target=cfg.target, max_forward_batch=cfg.max_forward_batch)
    data_record = {"name": type(datamodule).__name__, "split": cfg.split,
                   "init_args": json.loads(json.dumps(cfg.data.init_args.as_dict(), default=str))}
    model = cfg.blackbox.init_args.model
    header = {"protocol": settings.to_dict(image_size), "blackbox": model if model.startswith("ckpt") else blackbox.spec,
              "data": data_record, "seed": cfg.seed,
              "methods_hparams": {key: given_hparams(spec) for key, spec in zip(keys, specs)},
              "checkpoints": {key: {"path": path, "sha256": file_sha256(path)} for key, path in checkpoints.items()},
              "method_num_images": {key: min(n, num_images) for key, n in cfg.method_num_images.items()}}

    trainer = pl.Trainer(**{**cfg.trainer.as_dict(), **TRAINER_FIXED, "default_root_dir": str(out)})
    if trainer.is_global_zero:
        check_run_header(out, header)
    overlay = set(range(min(cfg.overlay_images, num_images, *cfg.method_num_images.values())))
    reuse = reusable_maps(Path(cfg.maps_from), header) if cfg.maps_from else {}
    module = EvaluationModule(blackbox, methods, settings, cfg.target, out / "rows", out / "maps", overlay,
                              save_all_maps=cfg.save_maps, reuse=reuse, image_limits=cfg.method_num_images)
    loader = DataLoader(subset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=collate_samples)
    trainer.test(module, dataloaders=loader, verbose=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    rows = RowStore(out / "rows").read_all()
    results = write_reports(rows, list(methods), header, out)
    write_figures(rows, list(methods), subset, sorted(overlay), out)
    randomisation = []
    if cfg.randomisation_images > 0:
        untrained = [(key, spec) for key, spec in zip(keys, specs) if not explainers.is_trained(parse_spec(spec).name)]
        randomisation = randomisation_check(cfg, blackbox, untrained, subset, out)
    # report.html: the results, figures and randomisation rows above in one self-contained page
    write_html_report(results, out, randomisation)
    if cfg.wandb:
        log_to_wandb(cfg, out, results)
    print((out / "summary.md").read_text())
    return results


def randomisation_check(cfg, blackbox: BlackBox, methods: list[tuple[str, ExplainerSpec]], subset, out: Path) -> list[dict]:
    """Sanity checks (Adebayo et al.) of the untrained methods ``(key, spec)`` on the first
    ``--randomisation_images`` images: cascading model randomisation and, with ``--label_randomisation_blackbox``,
    label randomisation (the maps on a black box trained on shuffled labels). Rows in randomisation.json
    (``rows``: model, ``label_rows``: label) and one table appended to summary.md; returns the model rows.
    Reused when randomisation.json exists with the same settings (the checks cost 1 + len(fractions) (+ 1)
    explanations per image and method)."""
    names = [key for key, _ in methods]
    settings = {"images": min(cfg.randomisation_images, len(subset)), "fractions": cfg.randomisation_fractions,
                "methods": names, "seed": cfg.seed, "label_blackbox": cfg.label_randomisation_blackbox,
                "hparams": json.loads(json.dumps({key: given_hparams(spec) for key, spec in methods}, default=str))}
    path = out / "randomisation.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("settings") == settings:
        rows, label_rows = saved["rows"], saved.get("label_rows", [])
    else:
        batch = collate_samples([subset[i] for i in range(settings["images"])])
        targets = explained_class(blackbox, batch["image"], batch["label"], cfg.target, cfg.max_forward_batch)
        common = {"seed": cfg.seed, "max_forward_batch": cfg.max_forward_batch}
        specs = [{"alias": key, **({"name": spec} if isinstance(spec, str) else dict(spec)), **common,
                  **given_hparams(spec)} for key, spec in methods]
        rows = model_randomisation(blackbox, specs, batch["image"], targets, fractions=[0.0, *cfg.randomisation_fractions],
                                   seed=cfg.seed, indices=batch["index"])
        label_rows = []
        if cfg.label_randomisation_blackbox:
            shuffled = BlackBox(cfg.label_randomisation_blackbox).to(batch["image"].device)
            label_rows = label_randomisation(blackbox, shuffled, specs, batch["image"], targets, indices=batch["index"])
        path.write_text(json.dumps({"settings": settings, "rows": rows, "label_rows": label_rows}, indent=2))
    label = {r["explainer"]: r["spearman"] for r in label_rows}
    columns = [f"{f:.0%} of layers" for f in cfg.randomisation_fractions] + (["shuffled labels"] if label else [])
    title = "Model randomisation" + (" and label randomisation" if label else "")
    lines = ["", f"## {title} ({settings['images']} images; Spearman rank correlation of each map with its map on "
             "the trained black box; below 0.5 = the map depends on the weights"
             + (" / on the labels the model learned" if label else "") + ")", "",
             "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name in names:
        values = [r["spearman"] for r in rows if r["explainer"] == name and r["fraction"] > 0]
        values += [label[name]] if label else []
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    with open(out / "summary.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    return rows


def write_figures(rows: list[dict], methods: list[str], subset, overlay: list[int], out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = dedupe(rows)
    fig = curves_figure(torch.linspace(0, 1, len(rows[0]["deletion_curve"])), mean_curves(rows, methods))
    fig.savefig(out / "curves.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    # A rerun with a larger --overlay_images finds rows whose maps were not saved: draw the images that have them.
    missing = [i for i in overlay if not all((out / "maps" / m / f"{i}.pt").is_file() for m in methods)]
    if missing:
        print(f"overlays.png: no saved maps for images {missing} (scored by an earlier run with fewer "
              "--overlay_images); drawing the others")
    overlay = [i for i in overlay if i not in missing]
    if overlay:
        images = torch.stack([subset[i]["image"] for i in overlay])
        maps = {m: torch.stack([torch.load(out / "maps" / m / f"{i}.pt", weights_only=True) for i in overlay])
                for m in methods}
        fig = overlay_grid(images, maps, [f"#{i}" for i in overlay])
        fig.savefig(out / "overlays.png", dpi=120, bbox_inches="tight")
        plt.close(fig)


def log_to_wandb(cfg, out: Path, results: dict) -> None:
    """The results as a W&B table plus the two figures (offline when there is no API key)."""
    logger = WandbLogger(project=cfg.wandb_project, save_dir=str(out), name=f"evaluate-{out.name}",
                         job_type="evaluation")
    with open(out / "results.csv") as f:
        table = list(csv.reader(f))
    logger.log_table(key="evaluation/rows", columns=table[0], data=table[1:])
    columns = ["method", *next(iter(results["methods"].values())).keys()]
    logger.log_table(key="evaluation/summary", columns=columns,
                     data=[[m, *stats.values()] for m, stats in results["methods"].items()])
    logger.log_image(key="evaluation/figures", images=[str(out / "curves.png"), str(out / "overlays.png")],
                     caption=["mean deletion / insertion curves", "saliency overlays"])
    logger.log_hyperparams({"evaluation": {k: v for k, v in results.items() if k != "methods"}})
    logger.experiment.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
