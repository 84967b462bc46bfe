"""Name -> explainer class registry, the one list of every method, trained predictors included.

    @register("rise")                                               # a class decorator
    explainers.build("rise", blackbox, n_masks=4000)                # a method
    explainers.build("predictor_ct", blackbox, checkpoint=PATH)     # a trained method, from its checkpoint

Config files and the evaluation loop refer to explainers by name only; adding a method is one decorated
class plus an import in ``explainers/__init__.py`` (which is also what the conformance tests iterate over).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch.nn as nn

from saliency_lab.core.checkpoints import safe_load
from saliency_lab.explainers.base import Explainer

_REGISTRY: dict[str, type[Explainer]] = {}


def register(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator: make an :class:`Explainer` subclass buildable as ``name`` (and set ``cls.name``)."""

    def decorate(cls: type[Explainer]) -> type[Explainer]:
        if not (isinstance(cls, type) and issubclass(cls, Explainer)):
            raise TypeError(f"@register({name!r}) expects an Explainer subclass, got {cls!r}")
        known = _REGISTRY.get(name)
        # Re-registering the same class (a module imported twice under one name) is harmless; a second
        # class under a taken name is a mistake that would silently change results.
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"explainer name {name!r} is already taken by {known.__module__}.{known.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Sorted names of every registered explainer (the trained ones included)."""
    return sorted(_REGISTRY)


def is_trained(name: str) -> bool:
    """Whether ``name`` is a trained method, built from a checkpoint."""
    return _lookup(name).trained


def build(name: str, blackbox: nn.Module | None, *, checkpoint: str | os.PathLike | Mapping | None = None,
          **hparams) -> Explainer:
    """Instantiate the explainer registered as ``name`` on ``blackbox`` with keyword ``hparams``.

    A trained method needs ``checkpoint`` (the path of its training run's checkpoint, read with
    ``weights_only=True``); for it, ``blackbox`` None rebuilds the black box the checkpoint records, and
    ``hparams`` override its recorded inference options. Any other method refuses a checkpoint.

    Raises:
        ValueError: unknown name (the message lists the known ones), or a checkpoint missing / not expected /
            of another method.
        TypeError: a hyper-parameter the explainer does not take (the message lists those it takes).
    """
    cls = _lookup(name)
    if cls.trained:
        if checkpoint is None:
            raise ValueError(f"{name!r} is a trained method: build it with checkpoint=PATH (a checkpoint of its "
                             "training run)")
        return cls.from_checkpoint(checkpoint, blackbox, **hparams)
    if checkpoint is not None:
        raise ValueError(f"{name!r} is not a trained method: it takes no checkpoint (got {checkpoint})")
    return cls(blackbox, **hparams)


def recorded_name(checkpoint: str | os.PathLike) -> str:
    """The registry name a trained explainer's checkpoint records (its ``"explainer"`` record), read with
    ``weights_only=True``.

    Raises:
        ValueError: the file carries no ``"explainer"`` record with a ``"name"``.
    """
    loaded = safe_load(checkpoint)
    record = loaded.get("explainer") if isinstance(loaded, dict) else None
    if not isinstance(record, dict) or "name" not in record:
        raise ValueError(f"{checkpoint} is not a trained-explainer checkpoint (no 'explainer' record with a 'name')")
    return str(record["name"])


def _lookup(name: str) -> type[Explainer]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown explainer {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]
