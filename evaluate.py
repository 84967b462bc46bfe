"""Evaluate explainers on a black box: every method x every metric, resumable, single- or multi-process.

    python evaluate.py --config configs/experiment/embedded_evaluate.yaml [--blackbox SPEC] [--ckpt PATH ...]
                       [--methods a,b,c] [--num_images N] [--out DIR]

Writes into DIR: results.json, results.csv (one row per image x method), summary.md, curves.png,
overlays.png, and the same as W&B tables and images. Rows are appended as they finish (DIR/rows/); the
same command again skips finished (image, method) pairs and reports exactly what an uninterrupted run does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch.utils.data import DataLoader, Subset

import explainers
from datamodules import collate_samples
from lightning_modules.blackbox import BlackBox
from lightning_modules.evaluation import EvaluationModule, RowStore
from metrics import CausalProtocol, EvaluationSettings
from metrics.report import mean_curves, write_reports


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    parser.add_argument("--blackbox", type=str, required=True,
                        help="'ckpt:PATH' (a project checkpoint), 'timm:NAME' or 'torchvision:NAME'")
    parser.add_argument("--blackbox_weights", type=str | None, default=None, help="local weights file")
    parser.add_argument("--num_classes", type=int | None, default=None, help="classes of a timm/torchvision model")
    parser.add_subclass_arguments(pl.LightningDataModule, "data", help="the datamodule (class_path + init_args)")
    parser.add_argument("--split", type=str, default="test", help="split of the datamodule: test or val")
    parser.add_argument("--methods", type=str | list[str], default="rise,gradient,gradcam",
                        help="comma-separated registry names (or a YAML list)")
    parser.add_argument("--method_hparams", type=dict[str, dict[str, Any]], default={},
                        help="per-method keyword arguments, e.g. {rise: {n_masks: 2000}}")
    parser.add_argument("--ckpt", type=list[str], default=[],
                        help="checkpoints of trained explainers, each evaluated as a method: PATH (the recorded "
                             "explainer) or NAME=PATH (a variant of it, e.g. predictor_ct_posthoc=PATH)")
    parser.add_argument("--num_images", type=int | None, default=None, help="the first N images of the split")
    parser.add_argument("--method_num_images", type=dict[str, int], default={},
                        help="per-method image counts below --num_images, e.g. {igos_pp: 100}: that method explains "
                             "only the first N images (slow per-image optimisers); mf_normalized then uses the "
                             "images every method explained")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--protocol", type=str | dict[str, Any], default="rise",
                        help="causal protocol: preset 'rise' or 'igos', or a dict of CausalProtocol fields")
    parser.add_argument("--target", type=str, default="predicted", help="explained class: predicted or label")
    parser.add_argument("--mf_steps", type=int, default=32)
    parser.add_argument("--pointing_tolerance", type=float | None, default=None,
                        help="pixels (default: 15 px at 224, scaled to the image size)")
    parser.add_argument("--iou_threshold", type=float, default=0.3)
    parser.add_argument("--top_fraction", type=float, default=0.3)
    parser.add_argument("--max_forward_batch", type=int, default=256, help="memory knob of metrics and methods")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stochastic method")
    parser.add_argument("--overlay_images", type=int, default=8)
    parser.add_argument("--randomisation_images", type=int, default=0,
                        help="also run the cascading model-randomisation check (callbacks/sanity.py) of every "
                             "--methods explainer on the first N images (0: off); writes randomisation.json")
    parser.add_argument("--randomisation_fractions", type=list[float], default=[0.5],
                        help="fractions of the black box's layers re-initialised, counted from the output")
    parser.add_argument("--label_randomisation_blackbox", type=str | None, default=None,
                        help="with --randomisation_images: also the label-randomisation check (Adebayo et al.) "
                             "against this black box trained on shuffled labels ('ckpt:PATH', e.g. from "
                             "configs/experiment/embedded_classifier_shuffled.yaml)")
    parser.add_argument("--out", type=str, default="outputs/evaluation")
    parser.add_argument("--accelerator", type=str, default="cpu")
    parser.add_argument("--devices", type=int | str, default=1)
    parser.add_argument("--strategy", type=str, default="auto")
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--wandb", type=bool, default=True, help="also log tables and images to W&B")
    parser.add_argument("--wandb_project", type=str, default="saliency-lab")
    return parser


def method_names(methods: str | list[str]) -> list[str]:
    names = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    unknown = [m for m in names if m not in explainers.available()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(explainers.available())}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a method twice: {names}")
    return names


def make_protocol(spec: str | dict, image_size: int, max_forward_batch: int, target: str) -> CausalProtocol:
    if isinstance(spec, str):
        if spec not in ("rise", "igos"):
            raise ValueError(f"--protocol must be 'rise', 'igos' or a dict of CausalProtocol fields, got {spec!r}")
        return getattr(CausalProtocol, spec)(image_size, max_forward_batch=max_forward_batch, target=target)
    return CausalProtocol(**{"max_forward_batch": max_forward_batch, "target": target, **spec})


def load_blackbox(cfg) -> BlackBox:
    return BlackBox(cfg.blackbox, num_classes=cfg.num_classes, weights=cfg.blackbox_weights)


def build_explainers(cfg, blackbox: BlackBox, names: list[str]) -> dict[str, object]:
    built = {}
    for name in names:
        hparams = {"seed": cfg.seed, "max_forward_batch": cfg.max_forward_batch, **cfg.method_hparams.get(name, {})}
        built[name] = explainers.build(name, blackbox, **hparams)
    for entry in cfg.ckpt:
        wanted, sep, path = entry.partition("=")
        if not sep or "/" in wanted or Path(entry).exists():  # a plain path that happens to hold '='
            wanted, path = None, entry
        name, explainer = explainers.load_checkpoint(path, blackbox, wanted)
        if name in built:
            raise ValueError(f"--ckpt {entry}: a {name!r} explainer is already evaluated (--methods or --ckpt)")
        built[name] = explainer
    return built


def check_run_header(out: Path, header: dict) -> None:
    """A rerun must evaluate the same thing; otherwise its rows would be mixed with the old ones."""
    path = out / "run.json"
    if path.is_file():
        before = json.loads(path.read_text())
        # Hyper-parameters and per-method image counts may change: rows are per (image, method) and stay valid.
        changed = sorted(k for k in header if k not in ("methods_hparams", "method_num_images")
                         and before.get(k) != header[k])
        if changed:
            raise ValueError(f"{out} holds an evaluation with other settings ({', '.join(changed)} differ); use "
                             "another --out or delete the folder")
    path.write_text(json.dumps(header, indent=2, default=str))


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    names = method_names(cfg.methods)
    if cfg.label_randomisation_blackbox and cfg.randomisation_images < 1:
        raise ValueError("--label_randomisation_blackbox needs --randomisation_images N > 0 (the images checked)")
    init = parser.instantiate_classes(cfg)
    datamodule: pl.LightningDataModule = init.data
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    datamodule.prepare_data()
    datamodule.setup("test" if cfg.split == "test" else "validate")
    dataset = datamodule.dataset(cfg.split)
    num_images = len(dataset) if cfg.num_images is None else min(cfg.num_images, len(dataset))
    subset = Subset(dataset, range(num_images))
    image_size = int(subset[0]["image"].shape[-1])

    blackbox = load_blackbox(cfg)
    if blackbox.num_classes != getattr(datamodule, "num_classes", blackbox.num_classes):
        raise ValueError(f"black box has {blackbox.num_classes} classes, the data {datamodule.num_classes}")
    methods = build_explainers(cfg, blackbox, names)
    unknown = sorted(set(cfg.method_num_images) - set(methods))
    if unknown or any(n < 1 for n in cfg.method_num_images.values()):
        raise ValueError(f"--method_num_images must map evaluated methods to counts >= 1; got {cfg.method_num_images}"
                         f" (not evaluated: {unknown})")
    protocol = make_protocol(cfg.protocol, image_size, cfg.max_forward_batch, cfg.target)
    settings = EvaluationSettings(protocol, mf_steps=cfg.mf_steps, pointing_tolerance=cfg.pointing_tolerance,
                                  iou_threshold=cfg.iou_threshold, top_fraction=cfg.top_fraction)
    data_record = {"name": type(datamodule).__name__, "split": cfg.split,
                   "init_args": json.loads(json.dumps(cfg.data.init_args.as_dict(), default=str))}
    header = {"protocol": settings.to_dict(image_size), "blackbox": blackbox.spec if not cfg.blackbox.startswith("ckpt")
              else cfg.blackbox, "data": data_record, "seed": cfg.seed,
              "methods_hparams": {n: cfg.method_hparams.get(n, {}) for n in methods},
              "method_num_images": {n: min(k, num_images) for n, k in cfg.method_num_images.items()}}

    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                         num_nodes=cfg.num_nodes, logger=False, enable_checkpointing=False,
                         inference_mode=False, enable_model_summary=False, default_root_dir=str(out))
    if trainer.is_global_zero:
        check_run_header(out, header)
    overlay = set(range(min(cfg.overlay_images, num_images, *cfg.method_num_images.values())))
    module = EvaluationModule(blackbox, methods, settings, cfg.target, out / "rows", out / "maps", overlay,
                              image_limits=cfg.method_num_images)
    loader = DataLoader(subset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=collate_samples)
    trainer.test(module, dataloaders=loader, verbose=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    rows = RowStore(out / "rows").read_all()
    results = write_reports(rows, list(methods), header, out)
    write_figures(rows, list(methods), subset, sorted(overlay), out)
    if cfg.randomisation_images > 0:
        randomisation_check(cfg, blackbox, names, subset, out)
    if cfg.wandb:
        log_to_wandb(cfg, out, results)
    print((out / "summary.md").read_text())
    return results


def randomisation_check(cfg, blackbox: BlackBox, names: list[str], subset, out: Path) -> list[dict]:
    """Sanity checks (Adebayo et al.) of the registry methods on the first ``--randomisation_images`` images:
    cascading model randomisation and, with ``--label_randomisation_blackbox``, label randomisation (the maps on
    a black box trained on shuffled labels). Rows in randomisation.json (``rows``: model, ``label_rows``:
    label) and one table appended to summary.md. Reused when randomisation.json exists with the same settings
    (each check costs one explanation per image, method and black box)."""
    from callbacks.sanity import label_randomisation, model_randomisation
    from metrics import explained_class

    settings = {"images": min(cfg.randomisation_images, len(subset)), "fractions": cfg.randomisation_fractions,
                "methods": names, "seed": cfg.seed, "label_blackbox": cfg.label_randomisation_blackbox,
                "hparams": json.loads(json.dumps({n: cfg.method_hparams.get(n, {}) for n in names}, default=str))}
    path = out / "randomisation.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("settings") == settings:
        rows, label_rows = saved["rows"], saved.get("label_rows", [])
    else:
        batch = collate_samples([subset[i] for i in range(settings["images"])])
        targets = explained_class(blackbox, batch["image"], batch["label"], cfg.target, cfg.max_forward_batch)
        specs = [{"name": n, "seed": cfg.seed, "max_forward_batch": cfg.max_forward_batch,
                  **cfg.method_hparams.get(n, {})} for n in names]
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
    from callbacks.figures import curves_figure, overlay_grid

    import matplotlib.pyplot as plt

    from metrics.report import dedupe

    rows = dedupe(rows)
    fig = curves_figure(torch.linspace(0, 1, len(rows[0]["deletion_curve"])), mean_curves(rows, methods))
    fig.savefig(out / "curves.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    if overlay:
        images = torch.stack([subset[i]["image"] for i in overlay])
        maps = {m: torch.stack([torch.load(out / "maps" / m / f"{i}.pt", weights_only=True) for i in overlay])
                for m in methods}
        fig = overlay_grid(images, maps, [f"#{i}" for i in overlay])
        fig.savefig(out / "overlays.png", dpi=120, bbox_inches="tight")
        plt.close(fig)


def log_to_wandb(cfg, out: Path, results: dict) -> None:
    """The results as a W&B table plus the two figures (offline when there is no API key)."""
    import csv

    from cli_utils import WandbLogger

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
