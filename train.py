"""Train or test any of the project's LightningModules: ``python train.py fit --config configs/experiment/X.yaml``.

Subcommands: fit, validate, test (LightningCLI). ``--ckpt_path last`` resumes from ``RUN_DIR/checkpoints``;
``--print_config`` shows the resolved config. See README.md for the experiments.
"""
from __future__ import annotations

from cli_utils import SaliencyCLI


def main(args=None) -> None:
    SaliencyCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
    )


if __name__ == "__main__":
    main()
