"""Train or test any of the project's LightningModules: ``saliency-lab fit --config configs/train/X.yaml``
(``python train.py fit ...`` from the checkout).

Subcommands: fit, validate, test, predict (LightningCLI). ``--ckpt_path last`` resumes from ``RUN_DIR/checkpoints``;
``--print_config`` shows the resolved config. ``--config configs/...`` falls back to the installed package's configs;
a ``configs/evaluate/`` config is refused, naming ``saliency-lab evaluate``.
"""
from __future__ import annotations

import sys

from saliency_lab.cli.utils import SaliencyCLI
from saliency_lab.core.resources import TRAIN_COMMANDS, resolve_config_args


def main(args: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if args is None else args)
    command = next((arg for arg in args if arg in TRAIN_COMMANDS), "fit")  # a configs/evaluate/ file is refused
    SaliencyCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=resolve_config_args(args, command=command),
    )


if __name__ == "__main__":
    main()
