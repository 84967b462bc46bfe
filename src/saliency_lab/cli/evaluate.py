"""Evaluate explainers on a black box: every method x every metric, resumable, single- or multi-process.

    python evaluate.py --config configs/evaluate/embedded_evaluate.yaml [--explainers a,b,c] [--ckpt_path PATH ...]
                       [--num_images N] [--out DIR] [--trainer configs/trainer/cpu_ddp.yaml]

The config mirrors the objects it builds: ``blackbox`` (``class_path: saliency_lab.core.blackbox.BlackBox`` + ``init_args``),
``data`` (a LightningDataModule), ``explainers`` (the explainer specs of :mod:`explainers.specs`, as in the
callbacks), ``settings`` (:class:`saliency_lab.metrics.EvaluationSettings` with its nested ``CausalProtocol``: a preset,
``--settings.protocol igos``, or fields) and ``trainer`` (``pl.Trainer`` arguments, e.g. a configs/trainer/*.yaml).

Writes into DIR: results.json, results.csv (one row per image x method), summary.md, curves.png,
overlays.png, report.html (all of these in one self-contained page) and the same as W&B tables and images.
Rows are appended as they finish (DIR/rows/); the same command again skips finished (image, method) pairs
and reports exactly what an uninterrupted run does. Every row carries a key of what produced it (the method's
full hyper-parameters, its checkpoint's content hash, the black box's content hash, the data and the
protocol): a rerun with other settings computes again exactly the rows whose key changed and reuses the rest.
One run at a time writes into DIR (DIR/.lock); every report file is written atomically.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Union

import pytorch_lightning as pl
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch.utils.data import DataLoader, Subset

from saliency_lab import explainers
from saliency_lab.callbacks.figures import agreement_figure, curves_figure, overlay_grid
from saliency_lab.callbacks.sanity import explainer_factories, label_randomisation
from saliency_lab.cli.checks import (HONOURED_TRAINER_PRECISIONS, changed_leaves, check_trainer_precision, ckpt_spec,
                                     listed_specs, validate_args)
from saliency_lab.cli.utils import WandbLogger, plain_build_errors
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.cli.args import normalise_args
from saliency_lab.core.files import FolderLock, atomic_write, atomic_write_json, file_sha256, safe_name
from saliency_lab.core.machine import describe
from saliency_lab.datamodules import collate_samples
from saliency_lab.explainers import ExplainerSpec, build_explainer, explainer_keys, parse_spec
from saliency_lab.lightning_modules.evaluation import COST_KEYS, EvaluationModule, RandomisationCheck
from saliency_lab.metrics import TARGET_RULES, EvaluationSettings, RowStore, explained_class
from saliency_lab.metrics.agreement import agreement_markdown, metric_agreement
from saliency_lab.metrics.report import markdown_cell, mean_curves, write_reports
from saliency_lab.metrics.rows import RowSet, content_key
from saliency_lab.metrics.sanity import check_fractions, randomisation_table
from saliency_lab.metrics.report_html import write_html_report

# Trainer arguments evaluate.py sets itself (the rest, e.g. configs/trainer/*.yaml, come from the config).
TRAINER_FIXED = {"logger": False, "enable_checkpointing": False, "inference_mode": False,
                 "enable_model_summary": False}
TRAINER_SKIPPED = {"logger", "callbacks", "plugins", "enable_checkpointing", "default_root_dir"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    parser.add_subclass_arguments(BlackBox, "blackbox", required=True,
                                  help="the black box: class_path saliency_lab.core.blackbox.BlackBox, init_args model "
                                       "('ckpt:PATH', 'timm:NAME' or 'torchvision:NAME'), weights, num_classes, ...")
    parser.add_subclass_arguments(pl.LightningDataModule, "data", help="the datamodule (class_path + init_args)")
    parser.add_argument("--split", type=str, default="test", help="split of the datamodule: test or val")
    parser.add_argument("--explainers", type=Union[str, list[Union[str, dict[str, Any]]]],
                        default="rise,gradient,gradcam",
                        help="explainer specs: registry names (a list, or comma-separated) or {name, alias, "
                             "checkpoint, **hparams} dicts (explainers/specs.py)")
    parser.add_argument("--method_hparams", type=dict[str, dict[str, Any]], default={},
                        help="per-explainer keyword arguments over the specs', by key, e.g. {rise: {n_masks: 2000}}")
    parser.add_argument("--ckpt_path", type=list[str], default=[],
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
                               help="metric knobs; settings.protocol: a preset ('rise', 'igos', or the held-out 'noise', "
                                    "'blur_wide', 'grid16'), or CausalProtocol fields")
    parser.add_argument("--target", type=str, default="predicted", help=f"explained class: one of {TARGET_RULES}")
    parser.add_argument("--max_forward_batch", type=int, default=256, help="memory knob of metrics and methods")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stochastic method")
    parser.add_argument("--overlay_images", type=int, default=8)
    parser.add_argument("--randomisation_images", type=int, default=0,
                        help="also run the cascading model-randomisation check (metrics/sanity.py) of every "
                             "untrained explainer on the first N images (0: off), inside the evaluation stage "
                             "(sharded over the processes, on their devices); writes randomisation.json")
    parser.add_argument("--randomisation_fractions", type=list[float], default=[0.5],
                        help="fractions of the black box's layers re-initialised, counted from the output")
    parser.add_argument("--label_randomisation_blackbox", type=str | None, default=None,
                        help="with --randomisation_images: also the label-randomisation check (Adebayo et al.) "
                             "against this black box trained on shuffled labels ('ckpt:PATH', e.g. from "
                             "configs/train/embedded_classifier_shuffled.yaml)")
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
    parser.set_defaults({"trainer.accelerator": "auto", "trainer.devices": 1})  # a GPU where one is visible
    parser.add_argument("--wandb", type=bool, default=True, help="also log tables and images to W&B")
    parser.add_argument("--wandb_project", type=str, default="saliency-lab")
    return parser


def explainer_specs(cfg) -> list[ExplainerSpec]:
    """The explainer list: ``--explainers`` (hyper-parameters from ``--method_hparams`` on top), then one
    ``{name, checkpoint}`` per ``--ckpt_path`` (names, keys and files are checked by :func:`cli_checks.validate_args`)."""
    specs = listed_specs(cfg.explainers) + [ckpt_spec(entry) for entry in cfg.ckpt_path]
    overrides = {key: cfg.method_hparams.get(key, {}) for key in explainer_keys(specs)}
    return [_with_hparams(spec, overrides[key]) for spec, key in zip(specs, explainer_keys(specs))]


def _with_hparams(spec: ExplainerSpec, hparams: dict) -> ExplainerSpec:
    if not hparams:
        return spec
    return {"name": spec, **hparams} if isinstance(spec, str) else {**spec, **hparams}


def given_hparams(spec: ExplainerSpec) -> dict:
    """The hyper-parameters a spec sets (not the defaults, not the checkpoint), as recorded in run.json."""
    return parse_spec(spec).hparams


# Data-module arguments that change how images are loaded, never which images or what they hold.
DATA_LOADING_ARGS = {"batch_size", "num_workers", "pin_memory", "persistent_workers"}
VERSIONED_PACKAGES = ("torch", "torchvision", "pytorch-lightning", "timm", "torchmetrics", "captum", "grad-cam",
                      "numpy", "jsonargparse")


def _plain(value):
    """``value`` as plain JSON data (tuples -> lists, other objects -> str), as run.json records it."""
    return json.loads(json.dumps(value, default=str))


def method_records(keys: list[str], specs: list[ExplainerSpec], methods: dict) -> dict[str, dict]:
    """Per method key: its registry name, its full resolved hyper-parameters (``Explainer.hparams``, defaults
    included) and its checkpoint (path and content hash) or None."""
    records = {}
    for key, spec in zip(keys, specs):
        parsed = parse_spec(spec)
        checkpoint = parsed.checkpoint and {"path": str(parsed.checkpoint), "sha256": file_sha256(parsed.checkpoint)}
        records[key] = {"name": parsed.name, "hparams": _plain(methods[key].hparams), "checkpoint": checkpoint}
    return records


def pass_settings(blackbox: BlackBox, device: torch.device | str, trainer_precision) -> dict:
    """What decides the dtype and layout of the black box's passes here: its ``precision`` setting, its
    ``channels_last``, the dtype of its plain passes and of the passes of methods that opt in to ``fast`` on
    this device, and the Trainer's precision. Part of every map's key: a rerun that changes any of them (another
    setting, or a machine with or without native bf16) computes its rows again."""
    with blackbox.fast():
        fast_dtype = blackbox.pass_dtype(device)
    return {"blackbox_precision": blackbox.precision, "channels_last": blackbox.channels_last,
            "plain_pass_dtype": str(blackbox.pass_dtype(device)).removeprefix("torch."),
            "fast_pass_dtype": str(fast_dtype).removeprefix("torch."),
            "trainer_precision": "32-true" if trainer_precision in HONOURED_TRAINER_PRECISIONS else str(trainer_precision)}


def evaluation_device(accelerator) -> torch.device:
    """The device the Trainer's ``accelerator`` runs the passes on (its type; the index does not change a dtype)."""
    name = str(accelerator).lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def row_keys(records: dict[str, dict], blackbox_sha256: str, data: dict, protocol: dict,
             passes: dict | None = None) -> tuple[dict, dict]:
    """(explanation keys, row keys) per method (``metrics.rows.content_key``).

    The explanation key identifies a map: the method's name and full hyper-parameters, its checkpoint's
    content hash, the black box's content hash, the pass settings (:func:`pass_settings`: precision, layout,
    effective dtypes on this device) and the data record (what image an index is). The row key
    adds the protocol (settings and explained-class rule) that scored the map. Left out on purpose, because
    they change memory or speed and never a value: ``max_forward_batch`` and the data loading arguments
    (:data:`DATA_LOADING_ARGS`); paths are left out where a content hash stands for them."""
    data = {**data, "init_args": {k: v for k, v in data["init_args"].items() if k not in DATA_LOADING_ARGS}}
    protocol = {**protocol, "protocol": {k: v for k, v in protocol["protocol"].items() if k != "max_forward_batch"}}
    explanation, rows = {}, {}
    for key, record in records.items():
        what = {"name": record["name"],
                "hparams": {k: v for k, v in record["hparams"].items() if k != "max_forward_batch"},
                "checkpoint_sha256": (record["checkpoint"] or {}).get("sha256"),
                "blackbox_sha256": blackbox_sha256, "data": data}
        if passes is not None:
            what["passes"] = passes
        explanation[key] = content_key(what)
        rows[key] = content_key({"explanation": explanation[key], "protocol": protocol})
    return explanation, rows


def package_versions() -> dict[str, str | None]:
    versions = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The project's commit (``+dirty`` when tracked files differ from it), None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def reusable_maps(source: Path, header: dict) -> dict[str, tuple[Path, dict[int, dict]]]:
    """The methods of ``header`` whose maps an earlier evaluation folder ``source`` saved with the same
    explanation key (method, full hyper-parameters, checkpoint content, black-box content, data):
    name -> (maps folder, {index: the cost of its row})."""
    path = source / "run.json"
    if not path.is_file():
        raise ValueError(f"--maps_from {source}: no run.json there (not an evaluate.py --out folder)")
    before = json.loads(path.read_text())
    reuse = {}
    for name, key in header["explanation_keys"].items():
        if before.get("explanation_keys", {}).get(name) != key or not (source / "maps" / name).is_dir():
            continue
        rowset = RowStore(source / "rows").scan({name: before["row_keys"][name]})
        reuse[name] = (source / "maps", {int(r["index"]): {k: r[k] for k in COST_KEYS if k in r}
                                         for r in rowset.of(name)})
    print(f"--maps_from {source}: scoring its saved maps of {sorted(reuse) or 'no method'}; explaining the rest")
    return reuse



def note_rerun(out: Path, header: dict, num_images: int) -> None:
    """Write run.json; on a rerun, say which methods' rows are computed again and why, and delete the saved
    maps of every method whose explanation key changed (they were made by something else).

    "Computed again" is read from the rows themselves: images this run scores (the first ``num_images``, or the
    method's own limit) that have rows of the method, none of them with its current key. (The previous run.json
    alone can name a method whose current rows are all there: after switching settings back, or after a run with
    other settings was killed before writing any row.)"""
    path = out / "run.json"
    before = json.loads(path.read_text()) if path.is_file() else None
    if before is not None and "row_keys" not in before:
        print(f"{out}: its rows were written by a version without row keys; every row is computed again")
    elif before is not None:
        common = {k: before.get(k) for k in ("blackbox_sha256", "data", "protocol")}
        store = RowStore(out / "rows")
        stored, current = store.scan(), store.scan(header["row_keys"])
        for name in header["row_keys"]:
            limit = header["method_num_images"].get(name, num_images)
            redo = {i for i in stored.indices(name).tolist() if i < limit} - set(current.indices(name).tolist())
            if not redo:
                continue  # a new method, or its rows are there
            why = changed_leaves({**common, "method": before.get("methods", {}).get(name)},
                           {**{k: header[k] for k in common}, "method": header["methods"][name]})
            print(f"{out}: the rows of {name!r} on {len(redo)} images are computed again (they were made with "
                  f"other settings{': ' + '; '.join(why) if why else ''})")
        for name, key in header["explanation_keys"].items():
            maps = out / "maps" / safe_name(name, "method")  # never a folder outside OUT/maps
            if before.get("explanation_keys", {}).get(name) != key and maps.is_dir():
                shutil.rmtree(maps)
    atomic_write_json(path, header, default=str)


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser()
    cfg = parser.parse_args(normalise_args(sys.argv[1:] if argv is None else list(argv), command="evaluate"))
    validate_args(cfg)  # every value (explainer names too), before the output folder, data or black box are touched
    check_trainer_precision(cfg.trainer.precision, "--trainer.precision")
    specs = explainer_specs(cfg)
    keys = explainer_keys(specs)
    if cfg.label_randomisation_blackbox and cfg.randomisation_images < 1:
        raise ValueError("--label_randomisation_blackbox needs --randomisation_images N > 0 (the images checked)")
    unknown = sorted(set(cfg.method_num_images) - set(keys))
    if unknown or any(n < 1 for n in cfg.method_num_images.values()):
        raise ValueError(f"--method_num_images must map evaluated methods to counts >= 1; got {cfg.method_num_images}"
                         f" (not evaluated: {unknown}; evaluated: {keys})")
    with plain_build_errors():  # e.g. an insane black-box record: its own message, not jsonargparse's union noise
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
    settings = init.settings.resolve(image_size, target=cfg.target, max_forward_batch=cfg.max_forward_batch)
    data_record = {"name": type(datamodule).__name__, "split": cfg.split,
                   "init_args": _plain(cfg.data.init_args.as_dict())}
    model = cfg.blackbox.init_args.model
    records = method_records(keys, specs, methods)
    protocol = _plain(settings.to_dict(image_size))
    blackbox_sha256 = blackbox.content_hash()
    device = evaluation_device(cfg.trainer.accelerator)
    passes = pass_settings(blackbox, device, cfg.trainer.precision)
    explanation_keys, keys_of_rows = row_keys(records, blackbox_sha256, data_record, protocol, passes)
    header = {"protocol": protocol, "blackbox": model if model.startswith("ckpt") else blackbox.spec,
              "blackbox_sha256": blackbox_sha256, "passes": passes, "machine": describe(device),
              "data": data_record, "seed": cfg.seed, "methods": records,
              "methods_hparams": {key: r["hparams"] for key, r in records.items()},
              "checkpoints": {key: r["checkpoint"] for key, r in records.items() if r["checkpoint"]},
              "explanation_keys": explanation_keys, "row_keys": keys_of_rows,
              "versions": package_versions(), "git_commit": git_commit(),
              "method_num_images": {key: min(n, num_images) for key, n in cfg.method_num_images.items()}}

    trainer = pl.Trainer(**{**cfg.trainer.as_dict(), **TRAINER_FIXED, "default_root_dir": str(out)})
    # one run per folder: rank 0 holds the lock for the whole run (the DDP ranks it starts do not take it)
    lock = FolderLock(out, "evaluate.py run")
    if trainer.is_global_zero:
        lock.acquire()
    try:
        if trainer.is_global_zero:
            note_rerun(out, header, num_images)
        overlay = set(range(min(cfg.overlay_images, num_images, *cfg.method_num_images.values())))
        reuse = reusable_maps(Path(cfg.maps_from), header) if cfg.maps_from else {}
        untrained = [(key, spec) for key, spec in zip(keys, specs) if not explainers.is_trained(parse_spec(spec).name)]
        check = (randomisation_settings(cfg, untrained, subset, out, blackbox_sha256)
                 if cfg.randomisation_images > 0 else None)
        module = EvaluationModule(blackbox, methods, settings, cfg.target, out / "rows", out / "maps", overlay,
                                  save_all_maps=cfg.save_maps, reuse=reuse, row_keys=keys_of_rows,
                                  randomisation=check, image_limits=cfg.method_num_images)
        loader = DataLoader(subset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                            collate_fn=collate_samples)
        trainer.test(module, dataloaders=loader, verbose=False)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return None
        # the rows of this run's keys and images only: rows of other settings or beyond --num_images stay unread
        rows = RowStore(out / "rows").scan(keys_of_rows, range(num_images))
        results = write_reports(rows, list(methods), header, out)
        write_figures(rows, list(methods), subset, sorted(overlay), out)
        write_agreement(rows, list(methods), out)
        label = (label_randomisation_rows(cfg, blackbox, untrained, subset, out, blackbox_sha256)
                 if check and cfg.label_randomisation_blackbox else None)
        randomisation = randomisation_report(check, [key for key, _ in untrained], out, label) if check else []
        # report.html: the results, figures and randomisation rows above in one self-contained page
        write_html_report(results, out, randomisation)
        if cfg.wandb:
            log_to_wandb(cfg, out, results)
        print((out / "summary.md").read_text())
        return results
    finally:
        lock.release()


def write_agreement(rows: RowSet, methods: list[str], out: Path) -> dict | None:
    """How much the metrics agree on the methods' order (:func:`metrics.agreement.metric_agreement`): Kendall's W
    and the metric x metric Spearman table as ``agreement.json``, ``agreement.md`` and ``agreement.png``; only
    with 3 methods or more (with two, every ranking is a coin)."""
    if len(methods) < 3:
        return None
    result = metric_agreement([row for m in methods for row in rows.of(m)], methods)
    atomic_write_json(out / "agreement.json", result)
    atomic_write(out / "agreement.md", agreement_markdown(result))
    fig = agreement_figure(result)
    atomic_write(out / "agreement.png", lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    return result


def randomisation_settings(cfg, methods: list[tuple[str, ExplainerSpec]], subset, out: Path,
                           blackbox_sha256: str) -> RandomisationCheck:
    """The cascading model randomisation (Adebayo et al.) of the untrained methods ``(key, spec)`` on the first
    ``--randomisation_images`` images, as the evaluation module runs it in its test step. Each row records the
    fractions, seed, hyper-parameters and black-box content hash it was made with: a rerun reuses the rows that
    match (the check costs 1 + len(fractions) explanations per image and method) and recomputes the rest."""
    fractions = [0.0, *check_fractions(cfg.randomisation_fractions)]
    common = {"seed": cfg.seed, "max_forward_batch": cfg.max_forward_batch}
    specs = [(key, {"alias": key, **({"name": spec} if isinstance(spec, str) else dict(spec)), **given_hparams(spec)})
             for key, spec in methods]
    records = {key: json.loads(json.dumps({"fractions": fractions, "seed": cfg.seed, "hparams": given_hparams(spec),
                                           "blackbox_sha256": blackbox_sha256}, default=str))
               for key, spec in methods}
    indices = {int(subset[i]["index"]) for i in range(min(cfg.randomisation_images, len(subset)))}
    return RandomisationCheck(explainer_factories([spec for _, spec in specs], **common), indices, fractions,
                              cfg.seed, out / "randomisation", records)


def label_randomisation_rows(cfg, blackbox: BlackBox, methods: list[tuple[str, ExplainerSpec]], subset, out: Path,
                             blackbox_sha256: str) -> tuple[dict, list[dict]]:
    """Label randomisation (Adebayo et al.) of the untrained methods ``(key, spec)`` on the first
    ``--randomisation_images`` images: each map on the trained black box against the map on
    ``--label_randomisation_blackbox`` (the same recipe trained on shuffled labels). Rank 0, after the stage
    (one pass per image and method on each black box, unlike the cascading check). Returns (settings, rows);
    the rows saved in randomisation.json are reused when their settings are the current ones."""
    settings = {"images": min(cfg.randomisation_images, len(subset)), "label_blackbox": cfg.label_randomisation_blackbox,
                "seed": cfg.seed, "blackbox_sha256": blackbox_sha256,
                "hparams": _plain({key: given_hparams(spec) for key, spec in methods})}
    path = out / "randomisation.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("label_settings") == settings:
        return settings, saved.get("label_rows", [])
    batch = collate_samples([subset[i] for i in range(settings["images"])])
    targets = explained_class(blackbox, batch["image"], batch["label"], cfg.target, cfg.max_forward_batch)
    common = {"seed": cfg.seed, "max_forward_batch": cfg.max_forward_batch}
    specs = [{"alias": key, **({"name": spec} if isinstance(spec, str) else dict(spec)), **common,
              **given_hparams(spec)} for key, spec in methods]
    shuffled = BlackBox(cfg.label_randomisation_blackbox).to(batch["image"].device)
    return settings, label_randomisation(blackbox, shuffled, specs, batch["image"], targets, indices=batch["index"])


def randomisation_report(check: RandomisationCheck, names: list[str], out: Path,
                         label: tuple[dict, list[dict]] | None = None) -> list[dict]:
    """Rank 0, after the stage: the rows of every process (:func:`metrics.sanity.randomisation_table`) and the
    label-randomisation rows (``label``: :func:`label_randomisation_rows`, or None) into randomisation.json and
    one table appended to summary.md; returns the model-randomisation table's rows."""
    rows = [r for r in RowStore(check.row_dir).records() if check.current(r)]
    table = randomisation_table(rows, names, check.fractions)
    settings = {"images": len(check.indices), "fractions": list(check.fractions[1:]), "methods": names,
                "seed": check.seed, "hparams": {name: check.records[name]["hparams"] for name in names}}
    label_settings, label_rows = label or (None, [])
    atomic_write_json(out / "randomisation.json", {"settings": settings, "rows": table,
                                                   "label_settings": label_settings, "label_rows": label_rows})
    by_label = {r["explainer"]: r["spearman"] for r in label_rows}
    columns = [f"{f:.0%} of layers" for f in settings["fractions"]] + (["shuffled labels"] if by_label else [])
    title = "Model randomisation" + (" and label randomisation" if by_label else "")
    lines = ["", f"## {title} ({settings['images']} images; Spearman rank correlation of each map with its map on "
             "the trained black box; below 0.5 = the map depends on the weights"
             + (" / on the labels the model learned" if by_label else "") + ")", "",
             "| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name in names:
        values = [r["spearman"] for r in table if r["explainer"] == name and r["step"] > 0]
        values += [by_label[name]] if by_label else []
        lines.append(f"| {markdown_cell(name)} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    atomic_write(out / "summary.md", (out / "summary.md").read_text() + "\n".join(lines) + "\n")
    return table


def write_figures(rows: RowSet, methods: list[str], subset, overlay: list[int], out: Path) -> None:
    import matplotlib.pyplot as plt

    curves = mean_curves(rows.rows(curves=True), methods)
    fig = curves_figure(torch.linspace(0, 1, len(next(iter(curves.values()))[0])), curves)
    atomic_write(out / "curves.png", lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
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
        atomic_write(out / "overlays.png", lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
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
