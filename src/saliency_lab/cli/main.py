"""``saliency-lab SUBCOMMAND [ARGS]``: one command for every task.

    saliency-lab fit|validate|test|predict --config CONFIG   train or test a model (LightningCLI)
    saliency-lab evaluate --config CONFIG                    every explainer x every metric -> results.json, ...
    saliency-lab explain --images DIR --out DIR --method M   saliency maps for your own images
    saliency-lab export --ckpt_path PRED.ckpt --format onnx  a trained predictor as one ONNX/TorchScript file
    saliency-lab report OUT --compare A B                    paired difference of two methods, bootstrap interval
    saliency-lab demo                                        the embedded pipeline, end to end
    saliency-lab export-scenes --format imagenet --out DIR   the embedded scenes as an ImageNet / COCO folder
    saliency-lab export-blackbox CKPT OUT [--half]           a classifier checkpoint as a black-box record
    saliency-lab teacher --method rise --out FILE            teacher maps for the predictor's teacher loss
    saliency-lab cost --config CONFIG [--out DIR]            passes, FLOPs, memory and GPU-hours of a config

``--config configs/...`` and ``assets/...`` paths that do not exist in the working directory are read from the
installed package (:mod:`saliency_lab.core.resources`).
"""
from __future__ import annotations

import importlib
import sys

TRAIN_SUBCOMMANDS = ("fit", "validate", "test", "predict")
SUBCOMMANDS = {
    "evaluate": ("saliency_lab.cli.evaluate", "every explainer x every metric on a data split"),
    "explain": ("saliency_lab.cli.explain", "saliency maps for a folder of images"),
    "export": ("saliency_lab.cli.export", "a trained predictor as one ONNX or TorchScript file"),
    "report": ("saliency_lab.cli.report", "paired comparison of two methods of an evaluation folder"),
    "demo": ("saliency_lab.cli.demo", "the embedded pipeline, end to end"),
    "export-scenes": ("saliency_lab.cli.export_scenes", "the embedded scenes in ImageNet or COCO layout"),
    "export-blackbox": ("saliency_lab.cli.export_blackbox", "a classifier checkpoint as a black-box record"),
    "teacher": ("saliency_lab.cli.teacher", "a costly explainer's maps for the predictor's teacher loss"),
    "cost": ("saliency_lab.cli.cost", "black-box passes, FLOPs, memory and GPU-hours of a training or evaluation config"),
}


def usage() -> str:
    from saliency_lab import __version__

    lines = [f"saliency-lab {__version__}", "", "usage: saliency-lab SUBCOMMAND [ARGS]  (SUBCOMMAND --help for its options)", "",
             f"  {'|'.join(TRAIN_SUBCOMMANDS):22s} train / test a model from a config (LightningCLI)"]
    lines += [f"  {name:22s} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The ``saliency-lab`` console script: exit status 0 unless a subcommand raises (its return value, often a
    dict of what it wrote, is for Python callers of :func:`run`)."""
    run(argv)


def run(argv: list[str] | None = None) -> object:
    """Dispatch ``argv`` (default: the command line) to a subcommand and return what it returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if argv[0] == "--version":
        from saliency_lab import __version__

        print(__version__)
        return None
    command, rest = argv[0], argv[1:]
    if command in TRAIN_SUBCOMMANDS:
        from saliency_lab.cli.train import main as train_main

        return train_main(argv)
    if command not in SUBCOMMANDS:
        print(f"saliency-lab: unknown subcommand {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    return importlib.import_module(SUBCOMMANDS[command][0]).main(rest)


if __name__ == "__main__":
    main()
