"""Name -> explainer class registry: ``@register("rise")``, ``build("rise", blackbox, n_masks=4000)``.

Config files and the evaluation loop refer to explainers by name only; adding a method is one decorated
class plus an import in ``explainers/__init__.py`` (which is also what the conformance tests iterate over).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from explainers.base import Explainer

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
    """Sorted names of every registered explainer."""
    return sorted(_REGISTRY)


def build(name: str, blackbox: nn.Module, **hparams) -> Explainer:
    """Instantiate the explainer registered as ``name`` on ``blackbox`` with keyword ``hparams``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        TypeError: a hyper-parameter the explainer does not take (the message lists those it takes).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown explainer {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](blackbox, **hparams)


# Trained explainers (e.g. the learned mask predictor) live in checkpoints: each checkpoint carries an
# ``"explainer"`` record {"name": registry name, ...}, and the module that defines the method registers a
# loader for that name.
_CHECKPOINT_LOADERS: dict[str, Callable[[dict, str, nn.Module], Explainer]] = {}


def register_checkpoint_loader(name: str):
    """Decorator: ``loader(checkpoint: dict, path: str, blackbox) -> Explainer`` for checkpoints of ``name``."""

    def decorate(loader):
        _CHECKPOINT_LOADERS[name] = loader
        return loader

    return decorate


def load_checkpoint(path: str, blackbox: nn.Module, name: str | None = None) -> tuple[str, Explainer]:
    """(name, explainer) from a trained explainer's checkpoint, read with ``weights_only=True``.

    ``name`` asks for a variant of the recorded explainer that the same weights give (e.g.
    ``predictor_ct_posthoc`` from a ``predictor_ct`` checkpoint); None keeps the recorded one.

    Raises:
        ValueError: the file carries no ``"explainer"`` record, one no registered loader handles, or one
            that cannot give the requested ``name``.
    """
    from lightning_modules.blackbox import safe_load

    checkpoint = safe_load(path)
    record = checkpoint.get("explainer") if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict) or "name" not in record:
        raise ValueError(f"{path} is not a trained-explainer checkpoint (no 'explainer' record with a 'name')")
    wanted = name or record["name"]
    if wanted not in _CHECKPOINT_LOADERS:
        known = ", ".join(sorted(_CHECKPOINT_LOADERS)) or "none registered"
        raise ValueError(f"{path}: no loader gives a {wanted!r} explainer (loaders: {known})")
    explainer = _CHECKPOINT_LOADERS[wanted](checkpoint, path, blackbox)
    if getattr(explainer, "name", wanted) != wanted:
        raise ValueError(f"{path} holds a {record['name']!r} explainer, which cannot be loaded as {wanted!r}")
    return wanted, explainer
