"""What ``train.py`` and ``evaluate.py`` share: the LightningCLI subclass, run folders and the W&B logger.

Run folder: every run writes into ``--run_dir`` (default: the Trainer's ``default_root_dir``): checkpoints
in ``RUN_DIR/checkpoints`` (``last.ckpt`` included, so ``--ckpt_path last`` resumes), the resolved config
in ``RUN_DIR/config.yaml``, W&B files in ``RUN_DIR/wandb``.

Checkpoints (``--ckpt_path``): Lightning loads every checkpoint with ``weights_only=True`` (forced: the
``--weights_only`` option of LightningCLI is removed), so no pickled code runs. A local file is checked
before anything is built; a URL (``http://``, ``s3://``, ...) or Lightning's model registry is refused
unless ``--allow_remote_ckpt true`` is given, and then it too loads with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import netrc
import os
import sys
from pathlib import Path

import torch
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.utilities import rank_zero_info

from saliency_lab.core.checkpoints import (DamagedCheckpointError, UnsafeCheckpointError, is_weights_only_refusal,
                                          remote_scheme, safe_load)
from saliency_lab.core.files import atomic_write_json
from saliency_lab.core.resources import current_class_path

LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc")  # resolved by Lightning to a local file it finds itself

def wandb_has_credentials() -> bool:
    """True when W&B can log online: an API key in the environment or in ~/.netrc (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger that goes offline by itself (and says so) when there is no API key, and obeys
    ``WANDB_MODE``: ``disabled`` turns W&B off and ``offline`` (or ``dryrun``) keeps it offline, with or
    without a key and whatever ``offline`` says. (Lightning's own logger rewrites ``WANDB_MODE`` to
    ``dryrun`` whenever it runs offline, which would turn a disabled run into an offline one.)

    Args:
        offline: force offline (True) or online (False); default: online iff credentials are found.
        project: W&B project name.
        save_dir: folder of the local W&B files (default: the run folder when launched by ``SaliencyCLI``).
        **kwargs: the other arguments of ``pytorch_lightning.loggers.WandbLogger``.
    """

    def __init__(self, offline: bool | None = None, project: str = "saliency-lab", save_dir: str | None = None,
                 **kwargs):
        save_dir = save_dir or "."
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if mode == "disabled":
            offline = False  # so Lightning leaves WANDB_MODE alone; wandb.init then returns a disabled run
            kwargs["mode"] = "disabled"
        elif mode in ("offline", "dryrun"):
            offline = True
        elif offline is None:
            offline = not wandb_has_credentials()
            if offline:
                rank_zero_info(f"W&B: no API key (WANDB_API_KEY or `wandb login`) found, logging OFFLINE to "
                               f"{save_dir}/wandb; upload later with `wandb sync {save_dir}/wandb/offline-run-*`.")
        if mode != "disabled":
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(offline=offline, project=project, save_dir=save_dir, **kwargs)


class SaveConfigToRunDir(SaveConfigCallback):
    """Saves the resolved config beside the run (overwriting on resume) and sends it to the loggers."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.config.as_dict()})


def ckpt_path_problem(path: str | None, allow_remote: bool = False) -> str | None:
    """Why ``--ckpt_path`` must not be loaded, or None when it may (with ``weights_only=True``).

    Refused: a URL or Lightning's model registry without ``allow_remote``, a missing local file, and a local
    file that ``torch.load(weights_only=True)`` refuses (probed memory-mapped: the pickle is read, the
    tensors are not), and a file that cannot be read at all (truncated, damaged: said so, naming it).
    """
    if path is None or str(path) in LIGHTNING_CKPT_KEYWORDS:
        return None
    text = str(path)
    scheme = remote_scheme(text)
    registry = scheme is None and text.lower().split(":")[0] == "registry"
    if scheme is not None or registry:
        if allow_remote:
            return None
        what = f"a {scheme}:// URL" if scheme else "a model-registry name"
        return (f"--ckpt_path {text}: refused, it is {what}, not a local file. Download it and pass the local "
                "path, or opt in with --allow_remote_ckpt true (it is then still loaded with weights_only=True: "
                "tensors and plain containers only, never pickled code).")
    if not Path(text).is_file():
        return f"--ckpt_path {text}: no such checkpoint file"
    try:
        torch.load(text, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        if is_weights_only_refusal(err):  # how torch refuses an object that is not plain data
            return _refusal(text, err)
        try:  # e.g. a legacy (non-zip) file that cannot be memory-mapped: read it whole
            safe_load(text)
        except UnsafeCheckpointError as refused:
            return _refusal(text, refused)
        except DamagedCheckpointError as damaged:  # truncated, damaged, not a checkpoint: says so
            return f"--ckpt_path {text}: {damaged}"
    return None


@contextlib.contextmanager
def plain_build_errors():
    """Re-raise the error behind jsonargparse's "Does not validate against any of the Union subtypes" message.

    A class argument (``--model``, ``--blackbox``, a black box nested in a model) is a union with None, and an
    exception while building it (a refused checkpoint, an insane black-box record) comes back wrapped in that
    message, with the first subtype's own error chained as ``__cause__``: that error names the file and the
    reason, and is what the user sees instead. Other errors pass unchanged."""
    try:
        yield
    except ValueError as err:
        cause = err
        while "Union subtypes" in str(cause).split("\n", 1)[0] and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is err:
            raise
        raise cause from None


def with_current_class_paths(value):
    """``value`` (nested dicts / lists) with every ``class_path`` / ``_class_path`` string read by
    :func:`current_class_path`."""
    if isinstance(value, dict):
        return {k: current_class_path(v) if k in ("class_path", "_class_path") and isinstance(v, str)
                else with_current_class_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [with_current_class_paths(v) for v in value]
    return value


def split_init_args(class_path: str, hparams: dict) -> tuple[dict, list[str]]:
    """(the entries of ``hparams`` that ``class_path``'s ``__init__`` accepts, the sorted names of those it does
    not). A checkpoint recorded by an older version of the class can hold arguments the class no longer has (e.g.
    the mask predictor's loss weights, now its ``objectives``); a class that takes ``**kwargs`` accepts all."""
    module, _, name = class_path.rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(hparams), []
    return ({k: v for k, v in hparams.items() if k in parameters},
            sorted(k for k in hparams if k not in parameters))


def _refusal(path: str, err: Exception) -> str:
    return (f"--ckpt_path {path}: refusing to load it, it is not loadable with weights_only=True (it holds objects "
            f"other than tensors and plain containers; {str(err).splitlines()[0]})")


class SaliencyCLI(LightningCLI):
    """LightningCLI with a ``--run_dir`` that places checkpoints, the saved config and W&B files together,
    and checkpoints loaded only with ``weights_only=True`` (module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_callback", SaveConfigToRunDir)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # weights_only is not an option: it is always True (see _prepare_subcommand_kwargs)
        return {name: skip | {"weights_only"} for name, skip in LightningCLI.subcommands().items()}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Folder for checkpoints, config.yaml and logs (default: trainer.default_root_dir)")
        parser.add_argument("--allow_remote_ckpt", type=bool, default=False,
                            help="Allow a --ckpt_path that is a URL (http://, s3://, ...) or a model-registry "
                                 "name; it is still loaded with weights_only=True")

    def parse_arguments(self, parser, args) -> None:
        """Parse, then refuse a ``--ckpt_path`` that must not be loaded before anything reads it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        problem = ckpt_path_problem(config.get("ckpt_path"), bool(config.get("allow_remote_ckpt")))
        if problem is not None:
            parser.error(problem)

    def _parse_ckpt_path(self) -> None:
        """Lightning's merge of a ``--ckpt_path`` checkpoint's hyper-parameters into the config, with two checks:
        a checkpoint of another model class than the config builds is refused (naming both classes) instead of
        silently turning the model into the checkpoint's, and class paths recorded before the package existed
        (``lightning_modules.X``, ``core.blackbox.BlackBox``) are read as the package's. Settings the class no
        longer takes (:func:`split_init_args`) are left out, named in a message, and the config's stand."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = config.get("ckpt_path")
        if not path or not Path(path).is_file():
            return
        hparams = dict(safe_load(path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        hparams = with_current_class_paths(hparams)
        if "_class_path" in hparams:
            recorded = hparams.pop("_class_path")
            configured = getattr(config.get("model"), "class_path", None)
            if configured is not None and current_class_path(configured) != recorded:
                self.parser.error(f"--ckpt_path {path}: it is a checkpoint of {recorded}, but the config builds "
                                  f"{configured}; pass the config of that model (or a checkpoint of {configured})")
            hparams, dropped = split_init_args(recorded, hparams)
            if dropped:
                rank_zero_info(f"--ckpt_path {path}: recorded by an older version of {recorded}; its settings "
                               f"{', '.join(dropped)} are no longer arguments of it and are ignored (the "
                               "config's settings stand)")
            hparams = {"class_path": recorded, "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the hyper-parameters recorded in --ckpt_path {path} failed\n")
            raise

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        kwargs["weights_only"] = True  # Lightning would unpickle anything from a URL otherwise
        return kwargs

    def instantiate_classes(self) -> None:
        with plain_build_errors():  # a refused checkpoint names the file, without the union-type noise
            super().instantiate_classes()

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
        atomic_write_json(path, metrics, sort_keys=True)
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
