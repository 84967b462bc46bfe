"""Explain your own images: saliency maps of any registered explainer or of a trained predictor checkpoint.

    python explain.py --images DIR_OR_FILES... --out DIR (--method NAME | --ckpt_path PATH) [--blackbox SPEC]
                      [--batch_size N] [--image_size S] [--method_hparams '{n_masks: 2000}']
                      [--accelerator auto --devices 2 --strategy ddp] [--precision bf16-mixed: --ckpt_path only]

Inputs: folders (recursively) and files of any size and mode; ``datamodules/image_files.py`` documents
which files are taken (regular files only: a FIFO, socket or device file is skipped and named, never
opened; a symlink leading out of the input folders is skipped and named unless ``--follow_symlinks
true``; a folder holding another run's output record is skipped), how modes become RGB (EXIF orientation
applied, alpha dropped, greyscale replicated, palette mapped, 16-bit reduced to 8, 32-bit integer and
float scaled by their own range) and the resize rule: the whole image is resized to the black box's
S x S input (no crop, no padding); each map is resized back to the file's own size, or, for a file
whose longer side exceeds ``--max_map_side``, to that size scaled down to fit (index.jsonl records
both).

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
command again skips the files already in the index (a killed run resumes); ``run.json`` keeps every
setting that changes a map (:func:`run_settings`: the method and its hyper-parameters, the black box by
content hash and its options, the ``--ckpt_path`` predictor by content hash, S, the precision, the class
names, the target rule and the map size rule) and marks the folder as an explain output; a rerun with
other settings into the same folder is refused, naming the settings that differ. One run at a time
writes a folder (``core.files.FolderLock`` on ``--out``: a second run is refused while the first runs).

Stopping: SIGTERM (and Ctrl-C) stops the run after the batch being explained; every file in the index
is complete, the process exits with status 128 + the signal (143 for SIGTERM, 130 for Ctrl-C), and the
same command resumes.

Runs on Lightning's predict loop, so devices, DDP, precision and the progress bar are Lightning's.
"""
from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import ActionConfigFile, ArgumentParser
from torch.utils.data import DataLoader

from saliency_lab import explainers
from saliency_lab.callbacks.explanation_writer import ExplanationWriter, read_index
from saliency_lab.datamodules.image_files import (DECODE_BYTES_PER_PIXEL, DEFAULT_MAX_MAP_SIDE, DEFAULT_MAX_PIXELS,
                                                  OUTPUT_MARKER, ImageFiles, collate_files, find_images,
                                                  read_class_names, recorded_class_names, recorded_input_size)
from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.checkpoints import safe_load
from saliency_lab.cli.args import normalise_args
from saliency_lab.cli.checks import changed_leaves, check_trainer_precision
from saliency_lab.core.files import FolderLock, atomic_write_json, file_sha256, safe_name
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
                        help="images whose header claims more pixels are skipped as decompression bombs. Decoding "
                             f"one image holds up to {DECODE_BYTES_PER_PIXEL} bytes a pixel, so the default "
                             f"({DEFAULT_MAX_PIXELS:,}) costs <= {DECODE_BYTES_PER_PIXEL} x {DEFAULT_MAX_PIXELS:,} "
                             "= 1.4 GB per decoding process (the main one and each --num_workers worker); a batch "
                             "keeps only the S x S inputs and the images at their saved map size, and writing a "
                             "map at --max_map_side 4096 needs 1.3 GB, so the default batch size of 8 needs < 3.5 "
                             "GB in all (image_files.py: Memory)")
    parser.add_argument("--max_map_side", type=int, default=DEFAULT_MAX_MAP_SIDE,
                        help="the longest side of a saved map: maps of larger images are saved scaled down to "
                             "fit (aspect ratio kept); index.jsonl records map_width and map_height")
    parser.add_argument("--follow_symlinks", type=bool, default=False,
                        help="explain symlinked files whose target lies outside the input folders (default: "
                             "skipped and named); symlinked folders are never followed")
    parser.add_argument("--accelerator", type=str, default="auto", help="auto: a GPU where one is visible, else the CPU")
    parser.add_argument("--devices", type=int | str, default=1)
    parser.add_argument("--strategy", type=str, default="auto")
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--precision", type=str | None, default=None,
                        help="Lightning precision of a trained predictor's pass (--ckpt_path), e.g. bf16-mixed "
                             "(default: 32); explainers (--method) run at the black box's precision "
                             "(--blackbox.init_args.precision) and refuse any other")
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
        check_trainer_precision(cfg.precision, "--precision")  # a trained predictor (--ckpt_path) runs under any
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


# run.json keys that are recorded for the reader but do not change a map (paths: the content is compared)
_INFORMATIONAL = ("ckpt_path", "blackbox")


def names_sha256(names: list[str] | None) -> str | None:
    """Hex SHA-256 of the class names (one a line), None when unknown."""
    return None if names is None else hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def run_settings(cfg, blackbox: BlackBox, spec: str, name: str, explainer, size: int, precision: str,
                 names: list[str] | None) -> dict:
    """The run record (``run.json``): every setting that changes a map or an index line, by content where it
    is a file (the black box's weights by ``BlackBox.content_hash``, the predictor by ``file_sha256``), and
    :data:`_INFORMATIONAL` paths; :data:`OUTPUT_MARKER` marks the folder as an explain output."""
    hparams = {k: v for k, v in explainer.hparams.items() if k != "max_forward_batch"}
    options = {k: v for k, v in blackbox.config()["init_args"].items() if k not in ("model", "weights")}
    checkpoint = _split_ckpt(cfg.ckpt_path)[1] if cfg.ckpt_path is not None else None
    return json.loads(json.dumps({
        OUTPUT_MARKER: "explain", "method": name, "hparams": hparams,
        "ckpt_sha256": file_sha256(checkpoint) if checkpoint is not None else None,
        "blackbox_architecture": blackbox.spec, "blackbox_sha256": blackbox.content_hash(),
        "blackbox_options": options, "image_size": int(size), "precision": precision,
        "class_names_sha256": names_sha256(names), "target": "predicted",
        "map_size": {"rule": "the file's size, scaled down to fit max_map_side", "max_map_side": cfg.max_map_side},
        "ckpt_path": cfg.ckpt_path, "blackbox": spec}, default=str))



def check_run(out: Path, header: dict) -> None:
    """A rerun into ``out`` must explain with the same settings (all but :data:`_INFORMATIONAL`), or its maps
    would mix with the old ones: a ValueError naming each differing setting (old -> new); else ``run.json``
    is (re)written."""
    path = out / "run.json"
    if path.is_file():
        before = json.loads(path.read_text())
        compared = [k for k in sorted(set(before) | set(header)) if k not in _INFORMATIONAL]
        changed = changed_leaves({k: before.get(k) for k in compared}, {k: header.get(k) for k in compared})
        if changed:
            raise ValueError(f"{out} holds maps made with other settings ({'; '.join(changed)}); use another "
                             "--out, rerun with the old settings, or delete the folder")
    atomic_write_json(path, header)


class RunStopped(BaseException):
    """SIGTERM (or SIGINT) arrived: the run stops after the current batch (a BaseException, like
    KeyboardInterrupt, so that nothing on the way catches it as an error)."""


class StopOnSignal(pl.Callback):
    """Raises :class:`RunStopped` at the end of the predict batch during which :meth:`request` was called
    (after the writer has written it: the callbacks run in order, this one last)."""

    def __init__(self):
        self.signal: int | None = None

    def request(self, signum: int, frame=None) -> None:
        self.signal = signum

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.signal is not None:
            raise RunStopped(self.signal)


@contextmanager
def stop_on_signals(stopper: StopOnSignal):
    """While active, SIGTERM and SIGINT ask ``stopper`` to stop; a second signal acts as it did before
    (the default: the process ends at once). The previous handlers come back afterwards. Only in the main
    thread (signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}

    def handle(signum, frame):
        stopper.request(signum, frame)
        for s in signals:
            signal.signal(s, previous[s])

    for s in signals:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s in signals:
            signal.signal(s, previous[s])


def main(argv: list[str] | None = None) -> dict | None:
    cfg = build_parser().parse_args(normalise_args(sys.argv[1:] if argv is None else list(argv)))
    check_names(cfg)
    out = Path(cfg.out)
    files, skipped = find_images(cfg.images, exclude=out, follow_symlinks=cfg.follow_symlinks)
    blackbox, spec, name, explainer, checkpoints = build(cfg)
    size = cfg.image_size or recorded_input_size(checkpoints, spec)
    if size is None:
        raise ValueError(f"the input size of black box {spec} is not recorded anywhere "
                         "(a bare black-box record does not store it): pass --image_size")
    names = (read_class_names(cfg.class_names, blackbox.num_classes) if cfg.class_names
             else recorded_class_names(checkpoints, blackbox.num_classes))
    stopper = StopOnSignal()
    writer = ExplanationWriter(out, [], name, names, skipped)
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                         num_nodes=cfg.num_nodes, precision=cfg.precision, logger=False, enable_checkpointing=False,
                         inference_mode=False, enable_model_summary=False, enable_progress_bar=cfg.progress,
                         default_root_dir=str(out), callbacks=[writer, stopper])
    header = run_settings(cfg, blackbox, spec, name, explainer, size, str(trainer.precision), names)
    # one run per folder: the global-zero process holds the lock for the whole run (DDP ranks do not take it)
    lock = FolderLock(out, "explain run")
    if trainer.is_global_zero:
        lock.acquire()
    try:
        with stop_on_signals(stopper):
            return _explain(cfg, trainer, writer, header, files, blackbox, explainer, size)
    except RunStopped as stop:
        _stop_other_ranks(trainer)
        print(f"[explain] stopped by signal {stop.args[0]} after a complete batch; {len(read_index(out))} files in "
              f"{out / 'index.jsonl'}; the same command resumes", file=sys.stderr, flush=True)
        raise SystemExit(128 + int(stop.args[0])) from None
    finally:
        lock.release()


def _stop_other_ranks(trainer: pl.Trainer) -> None:
    """Pass a stop on to the DDP processes this one started (each stops after its own current batch)."""
    kill = getattr(trainer.strategy.launcher, "kill", None)
    if trainer.is_global_zero and callable(kill):
        kill(signal.SIGTERM)


def _explain(cfg, trainer: pl.Trainer, writer: ExplanationWriter, header: dict, files: list, blackbox: BlackBox,
             explainer, size: int) -> dict | None:
    """Check the run record, explain the files not in the index yet, report; the summary on global zero."""
    out = Path(cfg.out)
    if trainer.is_global_zero:
        check_run(out, header)
    done = read_index(out)
    todo = [f for f in files if f.relative not in done]
    print(f"[explain] {len(files)} image files, {len(files) - len(todo)} already explained in {out}; "
          f"{header['method']} on {len(todo)} at {size}x{size}", flush=True)
    writer.files = todo
    if todo:
        module = ExplanationModule(blackbox, explainer, [f.seed_index for f in todo])
        data = ImageFiles(todo, size, cfg.max_pixels, cfg.max_map_side)
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                            collate_fn=collate_files)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
    elif trainer.is_global_zero:
        writer.report(sorted(set(writer.bad)))
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
