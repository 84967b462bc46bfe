"""Explain your own images: saliency maps of any registered explainer or of a trained predictor checkpoint.

    python explain.py --images DIR_OR_FILES... --out DIR (--method NAME | --ckpt_path PATH) [--blackbox SPEC]
                      [--batch_size N] [--image_size S] [--method_hparams '{n_masks: 2000}']
                      [--accelerator auto --devices 2 --strategy ddp --precision bf16-mixed]

Inputs: folders (recursively) and files of any size and mode; ``datamodules/image_files.py`` documents
which files are taken, how modes become RGB (EXIF orientation applied, alpha dropped, greyscale
replicated, palette mapped, 16-bit reduced to 8) and the resize rule: the whole image is resized to the
black box's S x S input (no crop, no padding); each map is resized back to the file's own size.

The explained class is the black box's prediction on the resized image. The black box: ``--blackbox``, or
the one recorded in ``--ckpt_path``. S: ``--image_size``, else the training data's size recorded in a
predictor or classifier checkpoint, else the architecture's default (timm ``pretrained_cfg``, 224 for
torchvision); a bare black-box record (``ckpt:assets/embedded_blackbox.pt``) does not store it: pass
``--image_size``. Class names: ``--class_names FILE`` (one per line), else the training datamodule's,
else ImageNet's for 1000 classes.

Outputs, per input file, under ``--out`` with the relative paths mirrored and sanitised: ``X.map.png``
(16-bit), ``X.map.npy`` (float32), ``X.overlay.png``, and a line of ``index.jsonl`` (see
``callbacks/explanation_writer.py``). Bad files (truncated, not an image, decompression bombs over
``--max_pixels``) are skipped and named in one warning (and ``skipped.json``); the run goes on. The same
command again skips the files already in the index (a killed run resumes); ``run.json`` keeps the
settings, and a rerun with other settings into the same folder is refused.

Runs on Lightning's predict loop, so devices, DDP, precision and the progress bar are Lightning's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import ActionConfigFile, ArgumentParser
from torch.utils.data import DataLoader

from saliency_lab import explainers
from saliency_lab.callbacks.explanation_writer import ExplanationWriter, read_index
from saliency_lab.datamodules.image_files import (DEFAULT_MAX_PIXELS, ImageFiles, collate_files, collect_images,
                                     read_class_names, recorded_class_names, recorded_input_size)
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.checkpoints import safe_load
from saliency_lab.cli.args import normalise_args
from saliency_lab.core.files import atomic_write_json, safe_name
from saliency_lab.lightning_modules.explanation import ExplanationModule


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of the options below")
    parser.add_argument("--images", type=str, nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--out", type=str, required=True, help="output folder (nothing is written outside it)")
    parser.add_argument("--method", type=str | None, default=None, help="a registered explainer, e.g. gradcam")
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="a trained predictor checkpoint: PATH, or NAME=PATH for a variant of it "
                             "(e.g. predictor_ct_posthoc=PATH)")
    parser.add_argument("--method_hparams", type=dict[str, Any], default={}, help="keyword arguments of --method")
    parser.add_subclass_arguments(BlackBox, "blackbox", required=False,
                                  help="the black box: a spec ('embedded', 'ckpt:PATH', 'timm:NAME', 'torchvision:NAME', "
                                       "'module:PKG.CLASS') or class_path + init_args; --blackbox.init_args.weights, "
                                       "num_classes, ... (default: the one --ckpt_path records)")
    parser.add_argument("--image_size", type=int | None, default=None, help="S, the black box's input side")
    parser.add_argument("--class_names", type=str | None, default=None, help="text file, one class name a line")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--max_forward_batch", type=int, default=256, help="memory knob of the explainer")
    parser.add_argument("--seed", type=int, default=0, help="seed of stochastic explainers")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="larger images are skipped as decompression bombs")
    parser.add_argument("--accelerator", type=str, default="cpu")
    parser.add_argument("--devices", type=int | str, default=1)
    parser.add_argument("--strategy", type=str, default="auto")
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--precision", type=str | None, default=None, help="e.g. bf16-mixed (default: 32)")
    parser.add_argument("--progress", type=bool, default=True, help="Lightning's progress bar")
    return parser


def blackbox_args(cfg) -> dict | None:
    """The ``BlackBox`` keyword arguments of ``--blackbox``, or None when it is not given."""
    if cfg.get("blackbox") is None:
        return None
    init_args = cfg.blackbox.get("init_args")
    return dict(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args or {})


def _split_ckpt(entry: str) -> tuple[str | None, str]:
    """``PATH`` or ``NAME=PATH`` (as evaluate.py's --ckpt_path) -> (NAME or None, PATH)."""
    wanted, sep, path = entry.partition("=")
    if not sep or "/" in wanted or Path(entry).exists():
        return None, entry
    return wanted, path


def check_names(cfg) -> None:
    """The method name (``--method``, or the NAME of ``--ckpt_path NAME=PATH``) is recorded in every output and
    may name files: a safe file name (``core.files.safe_name``) or a ValueError, before anything is read or
    written."""
    if cfg.method is not None:
        safe_name(cfg.method, "--method")
    wanted = _split_ckpt(cfg.ckpt_path)[0] if cfg.ckpt_path is not None else None
    if wanted is not None:
        safe_name(wanted, "--ckpt_path NAME")


def build(cfg) -> tuple[BlackBox, str, str, Any, list[dict]]:
    """(black box, its spec as given, explainer name, explainer, the checkpoints read: they tell the input
    size and the class names)."""
    if (cfg.method is None) == (cfg.ckpt_path is None):
        raise ValueError("pass exactly one of --method NAME (a registered explainer) or --ckpt_path PATH (a trained "
                         "predictor)")
    if cfg.ckpt_path is not None and cfg.method_hparams:
        raise ValueError("--method_hparams configures --method; a --ckpt_path predictor takes its options from the "
                         "checkpoint (NAME=PATH picks a variant, e.g. predictor_ct_posthoc=PATH)")
    checkpoints: list[dict] = []
    record: dict = {}
    if cfg.ckpt_path is not None:
        wanted, path = _split_ckpt(cfg.ckpt_path)
        checkpoints.append(safe_load(path))
        record = (checkpoints[0].get("explainer") or {}) if isinstance(checkpoints[0], dict) else {}
    given = blackbox_args(cfg)
    if given is not None:
        blackbox = BlackBox(**given)
    elif isinstance(record.get("blackbox"), dict):
        blackbox = BlackBox.from_config(record["blackbox"])
    else:
        raise ValueError("--blackbox is needed: " + ("--method explains a given black box" if cfg.method else
                                                     f"{cfg.ckpt_path} records no black box"))
    spec = blackbox.config()["init_args"]["model"]
    kind, _, bb_path = spec.partition(":")
    if kind == "ckpt" or spec.endswith((".ckpt", ".pt")):  # a classifier checkpoint may record its data
        checkpoints.append(safe_load(bb_path if kind == "ckpt" else spec))
    if cfg.ckpt_path is not None:
        name = wanted or explainers.recorded_name(path)
        explainer = explainers.build(name, blackbox, checkpoint=checkpoints[0])
        explainer.max_forward_batch = int(cfg.max_forward_batch)
    else:
        hparams = {"seed": cfg.seed, "max_forward_batch": cfg.max_forward_batch, **cfg.method_hparams}
        name, explainer = cfg.method, explainers.build(cfg.method, blackbox, **hparams)
    return blackbox, spec, name, explainer, checkpoints


def check_run(out: Path, header: dict) -> None:
    """A rerun into ``out`` must explain with the same settings, or its maps would mix with the old ones."""
    path = out / "run.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in header if before.get(k) != header[k])
        if changed:
            raise ValueError(f"{out} holds maps made with other settings ({', '.join(changed)} differ); use another "
                             "--out or delete the folder")
    atomic_write_json(path, header)


def main(argv: list[str] | None = None) -> dict | None:
    cfg = build_parser().parse_args(normalise_args(sys.argv[1:] if argv is None else list(argv)))
    check_names(cfg)
    out = Path(cfg.out)
    files = collect_images(cfg.images, exclude=out)
    blackbox, spec, name, explainer, checkpoints = build(cfg)
    size = cfg.image_size or recorded_input_size(checkpoints, spec)
    if size is None:
        raise ValueError(f"the input size of black box {spec} is not recorded anywhere "
                         "(a bare black-box record does not store it): pass --image_size")
    names = (read_class_names(cfg.class_names, blackbox.num_classes) if cfg.class_names
             else recorded_class_names(checkpoints, blackbox.num_classes))
    hparams = {k: v for k, v in explainer.hparams.items() if k != "max_forward_batch"}
    header = {"method": name, "ckpt_path": cfg.ckpt_path, "blackbox": spec, "image_size": int(size),
              "hparams": json.loads(json.dumps(hparams, default=str)), "target": "predicted"}

    done = read_index(out)
    todo = [f for f in files if f.relative not in done]
    print(f"[explain] {len(files)} image files, {len(files) - len(todo)} already explained in {out}; {name} on "
          f"{len(todo)} at {size}x{size}", flush=True)
    writer = ExplanationWriter(out, todo, name, names)
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                         num_nodes=cfg.num_nodes, precision=cfg.precision, logger=False, enable_checkpointing=False,
                         inference_mode=False, enable_model_summary=False, enable_progress_bar=cfg.progress,
                         default_root_dir=str(out), callbacks=[writer])
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        check_run(out, header)
    if todo:
        module = ExplanationModule(blackbox, explainer, [f.seed_index for f in todo])
        loader = DataLoader(ImageFiles(todo, size, cfg.max_pixels), batch_size=cfg.batch_size, shuffle=False,
                            num_workers=cfg.num_workers, collate_fn=collate_files)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    index = read_index(out)
    summary = {"out": str(out), "files": len(files), "explained": sum(f.relative in index for f in files),
               "skipped": [path for path, _ in writer.skipped]}
    print(f"[explain] {summary['explained']} of {len(files)} files explained, {len(writer.skipped)} skipped; index: "
          f"{out / 'index.jsonl'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
