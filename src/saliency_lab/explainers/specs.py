"""Explainer specs: the one parser of how configs name an explainer, used by ``evaluate.py`` and the
callbacks alike.

A spec is
- a registry name: ``"rise"``;
- a dict ``{"name": registry name, "alias": key (optional), "checkpoint": PATH (trained methods), **hparams}``:
  ``{"name": "rise", "alias": "rise_2k", "n_masks": 2000}``, ``{"name": "predictor_ct", "checkpoint": "ct.ckpt"}``;
- (Python API only) a factory ``blackbox -> explainer`` whose ``__name__`` is its key.

The *key* is the name results are reported under (the alias, else the name). It names files and folders
(``evaluate.py``'s ``maps/KEY/``), so a name or alias must be a safe file name (``core.files.safe_name``: 1 to
100 characters of ``[A-Za-z0-9._+-]``, not starting with '.'); :func:`parse_spec` refuses any other. The
reserved name ``"self"`` stands for an explainer the caller supplies itself (a LightningModule's own
``as_explainer()``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch.nn as nn

from saliency_lab.core.files import safe_name
from saliency_lab.explainers.base import Explainer
from saliency_lab.explainers.registry import build

ExplainerSpec = Union[str, Mapping[str, Any], Callable[..., Any]]
SELF = "self"
_SPEC_KEYS = ("name", "alias", "checkpoint")  # entries of a dict spec that are not hyper-parameters


@dataclasses.dataclass(frozen=True)
class ParsedSpec:
    """One spec, parsed: ``key`` (reported name), registry ``name`` (None for a factory), ``checkpoint``
    (trained methods), ``hparams`` (keyword arguments of the method) and ``factory`` (Python API)."""

    key: str
    name: str | None
    hparams: dict[str, Any]
    checkpoint: str | None = None
    factory: Callable[..., Any] | None = None


def parse_spec(spec: ExplainerSpec) -> ParsedSpec:
    """Parse one spec (see the module docstring); a dict without ``name``, a name or alias that is not a safe
    file name (ValueError naming it) or any other type is refused."""
    if isinstance(spec, str):
        return ParsedSpec(key=safe_name(spec, "explainer name"), name=spec, hparams={})
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"an explainer dict needs a 'name', got {dict(spec)}")
        hparams = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
        checkpoint = spec.get("checkpoint")
        name = safe_name(str(spec["name"]), "explainer name")
        key = safe_name(str(spec["alias"]), "explainer alias") if "alias" in spec else name
        return ParsedSpec(key=key, name=name, hparams=hparams,
                          checkpoint=None if checkpoint is None else str(checkpoint))
    if callable(spec):
        return ParsedSpec(key=spec.__name__, name=None, hparams={}, factory=spec)
    raise TypeError(f"an explainer is a name, a dict or a factory, got {type(spec).__name__}")


def explainer_key(spec: ExplainerSpec) -> str:
    """The name results are reported under: the registry name, a dict's ``alias`` (else its ``name``), or a
    factory's ``__name__``."""
    return parse_spec(spec).key


def explainer_keys(specs: Sequence[ExplainerSpec]) -> list[str]:
    """Keys of ``specs`` in order; two specs with one key (e.g. RISE twice) need an ``alias`` each."""
    keys = [explainer_key(spec) for spec in specs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"explainers {duplicates} appear more than once: give each an 'alias'")
    if not keys:
        raise ValueError("no explainers given")
    return keys


def build_explainer(spec: ExplainerSpec, blackbox: nn.Module | None,
                    own: Callable[[], Explainer] | None = None, **defaults) -> Explainer:
    """The explainer of ``spec`` on ``blackbox`` (registry: :func:`explainers.build`).

    ``defaults`` (e.g. ``seed``, ``max_forward_batch``) apply where the spec does not set them. ``"self"``
    (or ``{"name": "self"}``) is ``own()``: an explainer the caller owns (a trained LightningModule's
    ``as_explainer()``); it takes no hyper-parameters here.
    """
    parsed = parse_spec(spec)
    if parsed.factory is not None:
        return parsed.factory(blackbox)
    if parsed.name == SELF:
        if own is None:
            raise ValueError(f'explainer "{SELF}" needs a LightningModule with an as_explainer() method')
        if parsed.hparams or parsed.checkpoint:
            raise ValueError(f'explainer "{SELF}" takes no hyper-parameters, got {sorted(parsed.hparams)}')
        return own()
    return build(parsed.name, blackbox, checkpoint=parsed.checkpoint, **{**defaults, **parsed.hparams})
