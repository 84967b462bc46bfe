"""Files that ship inside the package: the configs (``configs/``) and the embedded assets (``assets/``).

A relative path that starts with ``configs/`` or ``assets/`` and does not exist under the working directory is
read from the installed package instead, so the documented commands (``--config
configs/evaluate/embedded_evaluate.yaml``, ``ckpt:assets/embedded_blackbox.pt``) work from any folder once the
package is installed. A file that exists where the path points always wins.

The configs of ``saliency-lab fit|validate|test|predict`` live in ``configs/train/``, those of ``saliency-lab
evaluate`` in ``configs/evaluate/``; :func:`resolve_config_args` refuses, before anything is parsed, a config of
one folder given to the other command (:func:`check_config_command`).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PACKAGED_FOLDERS = ("configs", "assets")


def packaged(relative: str | os.PathLike) -> Path:
    """The path of a file shipped with the package, e.g. ``packaged("assets/embedded_blackbox.pt")``."""
    return PACKAGE_DIR / relative


def resolve_resource(path: str | os.PathLike) -> str:
    """``path`` itself when it exists (or is not under a packaged folder), else the packaged file it names."""
    text = os.fspath(path)
    if os.path.exists(text) or os.path.isabs(text):
        return text
    parts = Path(text).parts
    if parts and parts[0] in PACKAGED_FOLDERS and packaged(text).exists():
        return str(packaged(text))
    return text


TRAIN_COMMANDS = ("fit", "validate", "test", "predict")
# configs/<folder>/ -> the command that reads its configs
CONFIG_FOLDERS = {"train": "saliency-lab fit|validate|test|predict", "evaluate": "saliency-lab evaluate"}


def config_folder(path: str | os.PathLike) -> str | None:
    """``"train"`` or ``"evaluate"`` for a file under ``configs/train/`` or ``configs/evaluate/`` (the checkout's
    or the installed package's), else None."""
    parts = Path(path).parts
    for i in range(len(parts) - 3, -1, -1):  # the innermost configs/<folder>/... with a file below it
        if parts[i] == "configs" and parts[i + 1] in CONFIG_FOLDERS:
            return parts[i + 1]
    return None


def check_config_command(path: str | os.PathLike, command: str) -> None:
    """Exit with a message naming the file and the command that reads it when ``path`` is a config of the other
    CLI: a ``configs/evaluate/`` file given to ``fit|validate|test|predict``, a ``configs/train/`` file given to
    ``evaluate``. Configs elsewhere (your own, ``configs/debug/``) pass."""
    folder = config_folder(path)
    wanted = "evaluate" if command == "evaluate" else "train" if command in TRAIN_COMMANDS else None
    if folder is None or wanted is None or folder == wanted:
        return
    kind = "an evaluation" if folder == "evaluate" else "a training"
    run = "saliency-lab evaluate" if folder == "evaluate" else "saliency-lab fit"
    raise SystemExit(f"saliency-lab {command}: --config {os.fspath(path)} is {kind} config (configs/{folder}/): "
                     f"run `{run} --config {os.fspath(path)}`. The configs of {CONFIG_FOLDERS[wanted]} are in "
                     f"configs/{wanted}/.")


def resolve_config_args(argv: list[str], command: str | None = None) -> list[str]:
    """``argv`` with every ``--config PATH`` / ``--config=PATH`` / ``-c PATH`` resolved by :func:`resolve_resource`
    (a packaged config when the working directory has no such file), and so is any other option's value that names
    a packaged config file (``--model.init_args.objectives configs/objectives/game.yaml``). With ``command``
    (``fit``, ``evaluate``, ...), a config of the other CLI's folder is refused first (:func:`check_config_command`)."""
    out, expect_path = [], False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if expect_path or (name == "--config" and eq):
            path = arg if expect_path else value
            if command is not None:
                check_config_command(path, command)
            out.append(resolve_resource(path) if expect_path else f"--config={resolve_resource(path)}")
            expect_path = False
        else:
            out.append(f"{name}={_packaged_config(value)}" if name.startswith("--") and eq else _packaged_config(arg))
            expect_path = arg in ("--config", "-c")
    return out


def _packaged_config(text: str) -> str:
    """A ``configs/...`` path the working directory lacks, resolved to the packaged file; anything else unchanged."""
    return resolve_resource(text) if Path(text).parts[:1] == ("configs",) else text


# Before the package existed, the layers were top-level packages (``core``, ``datamodules``, ...) and checkpoints
# written then record class paths such as ``core.blackbox.BlackBox``; they still load.
LEGACY_PACKAGES = ("core", "metrics", "networks", "explainers", "lightning_modules", "callbacks", "datamodules")


def current_class_path(class_path: str) -> str:
    """A class path of this package, ``saliency_lab.``-prefixed where it was recorded before the package existed."""
    text = str(class_path)
    if text.partition(".")[0] in LEGACY_PACKAGES:
        return f"saliency_lab.{text}"
    if text.startswith("cli_utils."):
        return "saliency_lab.cli.utils." + text.removeprefix("cli_utils.")
    return text
