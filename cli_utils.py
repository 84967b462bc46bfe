"""What ``train.py`` and ``evaluate.py`` share: the LightningCLI subclass, run folders and the W&B logger.

Run folder: every run writes into ``--run_dir`` (default: the Trainer's ``default_root_dir``): checkpoints
in ``RUN_DIR/checkpoints`` (``last.ckpt`` included, so ``--ckpt_path last`` resumes), the resolved config
in ``RUN_DIR/config.yaml``, W&B files in ``RUN_DIR/wandb``.
"""
from __future__ import annotations

import json
import netrc
import os
from pathlib import Path

from pytorch_lightning.callbacks import Timer
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.utilities import rank_zero_info



def wandb_has_credentials() -> bool:
    """True when W&B can log online: an API key in the environment or in ~/.netrc (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger that goes offline by itself (and says so) when there is no API key.

    Args:
        offline: force offline (True) or online (False); default: online iff credentials are found.
        project: W&B project name.
        save_dir: folder of the local W&B files (default: the run folder when launched by ``SaliencyCLI``).
        **kwargs: the other arguments of ``pytorch_lightning.loggers.WandbLogger``.
    """

    def __init__(self, offline: bool | None = None, project: str = "saliency-lab", save_dir: str | None = None,
                 **kwargs):
        save_dir = save_dir or "."
        if offline is None:
            offline = not wandb_has_credentials()
            if offline and os.environ.get("WANDB_MODE") != "disabled":
                rank_zero_info(f"W&B: no API key (WANDB_API_KEY or `wandb login`) found, logging OFFLINE to "
                               f"{save_dir}/wandb; upload later with `wandb sync {save_dir}/wandb/offline-run-*`.")
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(offline=offline, project=project, save_dir=save_dir, **kwargs)


class SaveConfigToRunDir(SaveConfigCallback):
    """Saves the resolved config beside the run (overwriting on resume) and sends it to the loggers."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config.as_dict()})


class SaliencyCLI(LightningCLI):
    """LightningCLI with a ``--run_dir`` that places checkpoints, the saved config and W&B files together."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", SaveConfigToRunDir)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Folder for checkpoints, config.yaml and logs (default: trainer.default_root_dir)")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = Path(config.run_dir or config.trainer.default_root_dir or "outputs/run")
        config.trainer.default_root_dir = str(run_dir)
        for callback in config.trainer.callbacks or []:
            if str(callback.class_path).endswith("ModelCheckpoint") and not callback.init_args.get("dirpath"):
                callback.init_args.dirpath = str(run_dir / "checkpoints")
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if hasattr(logger, "init_args") and "save_dir" in logger.init_args and not logger.init_args.save_dir:
                logger.init_args.save_dir = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)

    def _write_metrics(self, subcommand: str) -> None:
        """``RUN_DIR/<subcommand>_metrics.json``: the final logged metrics, for scripts that chain stages."""
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None:  # its elapsed times are saved in checkpoints, so a resumed run counts them all
            metrics.update({f"time/{stage}_seconds": timer.time_elapsed(stage) for stage in ("train", "validate")})
        path = Path(self.trainer.default_root_dir) / f"{subcommand}_metrics.json"
        path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        rank_zero_info(f"metrics written to {path}")

    def after_fit(self) -> None:
        self._write_metrics("fit")
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        if best:
            rank_zero_info(f"best checkpoint: {best}")

    def after_validate(self) -> None:
        self._write_metrics("validate")

    def after_test(self) -> None:
        self._write_metrics("test")
