"""The feature filter (class selector) of the mask predictor, as a plain ``nn.Module`` (docs/methods.md §1).

:class:`FeatureFilter` gates the black box's last feature map X (B, C, h, w) for a class s:

    Y_ij = X_ij * sigmoid(X_ij^T C_s - b)

with C (K, C) one learnt embedding per class (init N(0, 1/sqrt(C)) as a standard deviation) and b a
confidence bias (0 in training; raise it at inference to keep only confident positions).

It is trained in stage 1 by :class:`saliency_lab.lightning_modules.feature_filter.FeatureFilterModule`, whose
checkpoints hold a ``"feature_filter"`` record (the embedding and its shape, plain data) that
:meth:`FeatureFilter.from_checkpoint` reads with ``weights_only=True``.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
from torch import Tensor

from saliency_lab.core.blackbox import BlackBox
from saliency_lab.core.checkpoints import safe_load

FILTER_FORMAT = "saliency-lab/feature-filter/v1"


class FeatureFilter(nn.Module):
    """Class selector Y = X * sigmoid(X^T C_s - b) on the black box's last feature level.

    Args:
        channels: C of the feature map. num_classes: K.
        bias: b, subtracted from every logit (0 in training).

    Shapes: ``forward(x (B,C,h,w), classes (B,)) -> (B,C,h,w)``; ``gate`` -> (B,1,h,w) in (0,1);
    ``logits`` -> (B,1,h,w) = X^T C_s - b.
    """

    def __init__(self, channels: int, num_classes: int, bias: float = 0.0):
        super().__init__()
        self.channels, self.num_classes, self.bias = int(channels), int(num_classes), float(bias)
        self.embedding = nn.Parameter(torch.randn(num_classes, channels) / math.sqrt(channels))

    def logits(self, x: Tensor, classes: Tensor, bias: float | None = None) -> Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"the filter expects {self.channels} channels, got {x.shape[1]}")
        weights = self.embedding[classes].to(x.dtype)  # (B, C)
        bias = self.bias if bias is None else bias
        return torch.einsum("bchw,bc->bhw", x, weights).unsqueeze(1) - bias

    def gate(self, x: Tensor, classes: Tensor, bias: float | None = None) -> Tensor:
        return torch.sigmoid(self.logits(x, classes, bias))

    def forward(self, x: Tensor, classes: Tensor, bias: float | None = None) -> Tensor:
        return x * self.gate(x, classes, bias)

    def record(self) -> dict:
        """Plain-data record (``weights_only``-loadable) that :meth:`from_record` rebuilds this filter from."""
        return {"format": FILTER_FORMAT, "channels": self.channels, "num_classes": self.num_classes,
                "bias": self.bias, "embedding": self.embedding.detach().cpu().clone()}

    @classmethod
    def from_record(cls, record: dict) -> "FeatureFilter":
        if not isinstance(record, dict) or record.get("format") != FILTER_FORMAT:
            raise ValueError(f"not a feature-filter record (expected format {FILTER_FORMAT!r})")
        module = cls(record["channels"], record["num_classes"], record.get("bias", 0.0))
        with torch.no_grad():
            module.embedding.copy_(record["embedding"])
        return module

    @classmethod
    def from_checkpoint(cls, path: str) -> tuple["FeatureFilter", dict]:
        """(filter, record) from a stage-1 checkpoint written by :class:`FeatureFilterModule`."""
        checkpoint = safe_load(path)
        record = checkpoint.get("feature_filter") if isinstance(checkpoint, dict) else None
        if record is None:
            raise ValueError(f"{path} is not a feature-filter checkpoint (no 'feature_filter' record); train one "
                             "with configs/train/*_filter.yaml")
        return cls.from_record(record), record

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}, bias={self.bias}"


def load_filter(path: str | None, blackbox: BlackBox) -> FeatureFilter:
    """The stage-1 filter at ``path`` for ``blackbox`` (checked to fit), or a random one when ``path`` is None."""
    channels, classes = blackbox.feature_channels[-1], blackbox.num_classes
    if path is None:
        warnings.warn("no filter_checkpoint given: the feature filter is randomly initialised (untrained); train "
                      "it first with a configs/train/*_filter.yaml config", stacklevel=3)
        return FeatureFilter(channels, classes)
    module, record = FeatureFilter.from_checkpoint(path)
    if (module.channels, module.num_classes) != (channels, classes):
        raise ValueError(f"the filter in {path} is for {module.channels} channels / {module.num_classes} classes, "
                         f"the black box has {channels} / {classes}")
    trained_on = record.get("blackbox")
    if trained_on and trained_on != blackbox.spec and not str(trained_on).startswith("ckpt:"):
        warnings.warn(f"the filter in {path} was trained on {trained_on}, the black box is {blackbox.spec}",
                      stacklevel=3)
    return module
