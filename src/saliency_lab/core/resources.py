"""Files that ship inside the package: the configs (``configs/``) and the embedded assets (``assets/``).

A relative path that starts with ``configs/`` or ``assets/`` and does not exist under the working directory is
read from the installed package instead, so the documented commands (``--config
configs/experiment/embedded_evaluate.yaml``, ``ckpt:assets/embedded_blackbox.pt``) work from any folder once the
package is installed. A file that exists where the path points always wins.
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


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config PATH`` / ``--config=PATH`` resolved by :func:`resolve_resource` (a packaged
    config when the working directory has no such file)."""
    out, expect_path = [], False
    for arg in argv:
        if expect_path:
            out.append(resolve_resource(arg))
            expect_path = False
        elif arg == "--config":
            out.append(arg)
            expect_path = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_resource(arg.partition("=")[2]))
        else:
            out.append(arg)
    return out


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
