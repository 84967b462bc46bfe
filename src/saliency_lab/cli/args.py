"""One spelling per option across the entry points, and the shorthands that read into it.

- ``--blackbox SPEC`` (``embedded``, ``timm:NAME``, ``torchvision:NAME``, ``module:PKG.CLASS``, ``ckpt:PATH`` or a
  ``.ckpt``/``.pt`` path) is short for ``--blackbox.class_path saliency_lab.core.blackbox.BlackBox
  --blackbox.init_args.model SPEC``; the other black-box options are ``--blackbox.init_args.NAME`` everywhere
  (``weights``, ``num_classes``, ``precision``, ...). ``--blackbox_weights`` and ``--num_classes`` (earlier
  spellings of explain) still read as ``--blackbox.init_args.weights`` / ``num_classes``.
- ``--ckpt_path`` is every command's checkpoint option (``--ckpt`` still reads as it).
- ``--config configs/...`` falls back to the installed package's copy (:func:`resolve_config_args`), and
  ``evaluate`` refuses a ``configs/train/`` config, naming the command that reads it.
"""
from __future__ import annotations

import re

from saliency_lab.core.blackbox import CLASS_PATH
from saliency_lab.core.resources import resolve_config_args

_SPEC = re.compile(r"^(embedded$|(timm|torchvision|ckpt|module):)|\.(ckpt|pt)$")
_RENAMED = {"--blackbox_weights": "--blackbox.init_args.weights", "--num_classes": "--blackbox.init_args.num_classes",
            "--ckpt": "--ckpt_path"}


def is_blackbox_spec(value: str) -> bool:
    """Whether ``value`` is a model spec string (not a config file or a JSON/YAML object)."""
    return bool(_SPEC.search(value))


def normalise_args(argv: list[str], command: str | None = None) -> list[str]:
    """``argv`` with the shorthands of the module docstring spelled out and packaged configs resolved; with
    ``command`` (``"evaluate"``), a config of another command's folder is refused (``configs/train/``)."""
    out: list[str] = []
    items = list(resolve_config_args(argv, command=command))
    i = 0
    while i < len(items):
        arg = items[i]
        name, eq, value = arg.partition("=")
        if not eq and i + 1 < len(items) and arg in ("--blackbox", *_RENAMED):
            value, i = items[i + 1], i + 1
            eq = "="
        if name == "--blackbox" and eq and is_blackbox_spec(value):
            out += [f"--blackbox.class_path={CLASS_PATH}", f"--blackbox.init_args.model={value}"]
        elif name in _RENAMED and eq:
            out.append(f"{_RENAMED[name]}={value}")
        elif eq and name == "--blackbox":
            out.append(f"--blackbox={value}")
        else:
            out.append(arg)
        i += 1
    return out
