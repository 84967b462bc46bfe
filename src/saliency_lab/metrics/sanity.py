"""Model randomisation (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018) as per-image rows
and the one aggregation of them, shared by ``evaluate.py`` (inside its evaluation ``Trainer.test``, sharded
over processes) and the callback ``saliency_lab.callbacks.ModelRandomisationCheck``.

Cascading: re-initialise the black box's layers from the output down and measure how much each explainer's
maps change (Spearman rank correlation with the maps of the trained model). A method whose maps survive the
loss of the weights explains the image, not the model.

Explainers come in as factories ``blackbox -> explainer`` (this layer builds none itself), so the caller
decides how a method is built (the registry, ``callbacks``' "self", a test double).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torchmetrics.functional.regression import spearman_corrcoef

DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def parameterised_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule with parameters of its own and a ``reset_parameters()``, in
    registration order — input to output for the timm / torchvision CNNs we wrap.

    Parameters held by modules without ``reset_parameters`` (e.g. a layer-scale gamma) are not
    re-initialised; for the CNNs of this project every parameter lives in a conv, linear or norm layer.
    """
    return [(name, m) for name, m in module.named_modules()
            if callable(getattr(m, "reset_parameters", None)) and next(m.parameters(recurse=False), None) is not None]


def randomise_layers(layers: Sequence[tuple[str, nn.Module]], start: int, stop: int, seed: int) -> None:
    """``reset_parameters()`` of ``layers[start:stop]``; layer i is drawn from seed ``seed + i`` so its new
    weights do not depend on where a cascade step begins. The global RNG state is left as it was."""
    for position in range(start, stop):
        module = layers[position][1]
        device = next(module.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + position)
            module.reset_parameters()


def rank_correlation(maps: Tensor, reference: Tensor) -> Tensor:
    """(B,) Spearman rank correlation between each map (B,1,H,W) and its reference (B,1,H,W), in [-1, 1].

    Ties get their average rank (torchmetrics). A constant map has no ranking: its correlation is NaN
    (torchmetrics would report 0).
    """
    flat, ref = maps.detach().flatten(1).double(), reference.detach().flatten(1).double()
    rho = spearman_corrcoef(flat.T, ref.T).reshape(-1)  # columns are images
    constant = (flat.amax(1) == flat.amin(1)) | (ref.amax(1) == ref.amin(1))
    return rho.float().masked_fill(constant, math.nan)


def check_fractions(fractions: Sequence[float]) -> list[float]:
    fractions = [float(f) for f in fractions]
    if any(not 0 <= f <= 1 for f in fractions) or fractions != sorted(fractions):
        raise ValueError(f"fractions must be non-decreasing values in [0, 1], got {fractions}")
    return fractions


def randomisation_rows(
    blackbox: nn.Module,
    factories: Mapping[str, Callable[[nn.Module], Any]],
    images: Tensor,
    targets: Tensor,
    indices: Tensor,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per-image rows of the cascading model randomisation of one batch.

    A deep copy of ``blackbox`` (same device) is randomised step by step: at step s the top
    ``round(fractions[s] * L)`` of its L parameterised layers (:func:`parameterised_layers`, counted from the
    output) have been re-initialised with their ``reset_parameters()`` (PyTorch's default init, not the
    architecture's own init scheme; layer i from seed ``seed + i``, so a step's weights do not depend on the
    batch or the steps before it). After each step every explainer is rebuilt on the copy (``factories[key]
    (copy)``) and explains ``targets`` — the classes explained on the trained model, kept fixed — and each
    map is compared with its map from the trained model by :func:`rank_correlation` on the raw maps.
    ``blackbox`` itself and the global RNG state are not touched.

    Args:
        images: (B,3,H,W) in [0,1]. targets: (B,) long. indices: (B,) dataset indices (per-image seeds).
        fractions: non-decreasing fractions in [0, 1] of layers randomised at each step.

    Returns:
        One row per (step, explainer, image): ``{"index", "explainer", "step", "fraction", "layers"`` (number
        randomised), ``"layer"`` (the lowest layer randomised so far, "" for none), ``"spearman"}``.
    """
    fractions = check_fractions(fractions)
    with torch.inference_mode(False), torch.enable_grad():  # copies made under inference mode lack autograd
        model = copy.deepcopy(blackbox)
        images, targets, indices = images.clone(), targets.clone(), indices.clone()
        layers = parameterised_layers(getattr(model, "net", model))[::-1]  # top (output) layer first
        original = {key: factory(model)(images, targets, indices) for key, factory in factories.items()}
        rows, randomised = [], 0
        for step, fraction in enumerate(fractions):
            count = round(fraction * len(layers))
            randomise_layers(layers, randomised, count, seed)
            randomised = count
            for key, factory in factories.items():
                maps = factory(model)(images, targets, indices) if count else original[key]
                rho = rank_correlation(maps, original[key])
                rows += [{"index": int(i), "explainer": key, "step": step, "fraction": fraction, "layers": count,
                          "layer": layers[count - 1][0] if count else "", "spearman": _float(r)}
                         for i, r in zip(indices.tolist(), rho.tolist())]
    return rows


def randomisation_table(rows: Iterable[Mapping[str, Any]], explainers: Sequence[str],
                        fractions: Sequence[float]) -> list[dict[str, Any]]:
    """The one aggregation of :func:`randomisation_rows` (whatever process or batch wrote them).

    Returns one row per (step, explainer), steps first: ``{"step", "fraction", "layers", "layer",
    "explainer", "spearman"`` (mean over images, NaN ignored; NaN if none), ``"images"``, ``"per_image"``
    (the values in dataset-index order)``}``. A repeated (explainer, step, index) counts once.
    """
    unique: dict[tuple[str, int, int], Mapping[str, Any]] = {}
    for row in rows:
        unique.setdefault((row["explainer"], int(row["step"]), int(row["index"])), row)
    table = []
    for step, fraction in enumerate(fractions):
        for key in explainers:
            mine = [unique[k] for k in sorted(k for k in unique if k[:2] == (key, step))]
            values = [float(r["spearman"]) for r in mine]
            finite = [v for v in values if not math.isnan(v)]
            table.append({"step": step, "fraction": float(fraction),
                          "layers": mine[0]["layers"] if mine else 0, "layer": mine[0]["layer"] if mine else "",
                          "explainer": key, "spearman": sum(finite) / len(finite) if finite else math.nan,
                          "images": len(mine), "per_image": values})
    return table


def _float(value: float) -> float:
    return value if math.isfinite(value) else math.nan
