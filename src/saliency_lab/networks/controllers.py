"""Distribution controllers: turn the generator's raw map M^g into a mask M^d (docs/methods.md §1).

Every controller first standardises M^g per image over its entries, z = (M^g - mean) / std (an instance
norm without affine parameters), so the mask's *distribution* is fixed by the controller, not learnt:

- ``"bt"``    M^d = ReLU(z)                     >= 0, unbounded above (about half of the entries are 0);
- ``"ct"``    M^d = sigmoid(eta * z) ** h       in (0, 1); with eta = 1.5, h = 2.5 a standard-normal z gives
                                                a right-skewed mask (mean ~0.28, a long tail towards 1);
- ``"square"`` M^d = z ** 2 / max_j z_j ** 2    in [0, 1]; the paper's non-monotonic x^2 transformer (its Fig. 2c):
                                                both tails of z are salient, the image's mean value is not;
- ``"none"``  the MGnet head (Dabkowski & Gal): two channels (a, b), M = |a| / (|a| + |b|), no
              standardisation (their area / smoothness losses shape the mask instead).

Shapes: ``(B, C, h, w) -> (B, 1, h, w)`` with C = :attr:`Controller.in_channels` (1, or 2 for ``"none"``).
Statistics are computed in float32 whatever the autocast dtype, because the std of a bf16 map is coarse.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

CONTROLLERS = ("none", "bt", "ct", "square")
EPS = 1e-5


def standardise(raw: Tensor, eps: float = EPS) -> Tensor:
    """z = (x - mean) / (std + eps) per image over all its entries: (B, 1, h, w) -> (B, 1, h, w), float32."""
    flat = raw.float().flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, unbiased=False, keepdim=True)
    return ((flat - mean) / (std + eps)).view_as(raw)


class Controller(nn.Module):
    """Base class: ``forward(raw (B, in_channels, h, w)) -> mask (B, 1, h, w)``; ``kind`` names it."""

    kind: str = ""
    in_channels: int = 1
    #: the largest value the mask can take (inf for BT); histograms and clamping use it
    upper: float = 1.0

    def config(self) -> dict:
        """Plain-data record from which :func:`make_controller` rebuilds this controller."""
        return {"kind": self.kind}


class BTController(Controller):
    """BT: M^d = ReLU(z). Non-negative, unbounded; the perturbation clamps it to [0, 1]."""

    kind = "bt"
    upper = math.inf

    def forward(self, raw: Tensor) -> Tensor:
        return torch.relu(standardise(raw))


class CTController(Controller):
    """CT: M^d = sigmoid(eta * z) ** h, in (0, 1) and increasing in z.

    Args:
        eta: slope of the sigmoid (larger: a harder, more binary mask).
        h: power (larger: pushes mid values down, so fewer pixels stay on; more right skew).
        trainable: learn eta and h (positive, through their logarithms) with the generator. docs/methods.md
            fixes them; the option exists for ablations.
    """

    kind = "ct"

    def __init__(self, eta: float = 1.5, h: float = 2.5, trainable: bool = False):
        super().__init__()
        if eta <= 0 or h <= 0:
            raise ValueError(f"CT needs eta > 0 and h > 0, got eta={eta}, h={h}")
        log_params = torch.tensor([math.log(eta), math.log(h)])
        if trainable:
            self.log_params = nn.Parameter(log_params)
        else:
            self.register_buffer("log_params", log_params)
        self.trainable = trainable

    @property
    def eta(self) -> float:
        return float(self.log_params[0].exp())

    @property
    def h(self) -> float:
        return float(self.log_params[1].exp())

    def forward(self, raw: Tensor) -> Tensor:
        eta, h = self.log_params.float().exp()
        # sigmoid(x) ** h = exp(h * logsigmoid(x)): no underflow to 0 ** h and a finite gradient everywhere
        return torch.exp(h * nn.functional.logsigmoid(eta * standardise(raw)))

    def config(self) -> dict:
        return {"kind": self.kind, "eta": self.eta, "h": self.h, "trainable": self.trainable}

    def extra_repr(self) -> str:
        return f"eta={self.eta:.3g}, h={self.h:.3g}, trainable={self.trainable}"


class SquareController(Controller):
    """The x^2 transformer (the paper's Fig. 2c): M^d = z^2 / max_j z_j^2 per image, in [0, 1].

    Shapes: (B, 1, h, w) -> (B, 1, h, w). Non-monotonic in z: 0 at the image's mean (z = 0), growing towards
    both tails, so the ranking of M^d is not the ranking of M^g (the paper's non-monotonic transformer).

    *Deviation / our choice:* our sources name the transformer x^2 only, without its normalisation to
    [0, 1]; we divide by the image's largest z^2 (the maximum entry is exactly 1; a constant map gives 0
    everywhere, since its z is 0). The maximum carries a gradient like every other entry.
    """

    kind = "square"

    def forward(self, raw: Tensor) -> Tensor:
        squared = standardise(raw).pow(2)
        return squared / squared.amax((1, 2, 3), keepdim=True).clamp_min(EPS)


class RatioHead(Controller):
    """MGnet's head: M = |a| / (|a| + |b| + eps) from two channels (a, b); in [0, 1]."""

    kind = "none"
    in_channels = 2

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, raw: Tensor) -> Tensor:
        if raw.shape[1] != 2:
            raise ValueError(f"the ratio head needs 2 channels, got {raw.shape[1]}")
        a, b = raw.float().abs().unbind(1)
        return (a / (a + b + self.eps)).unsqueeze(1)


def make_controller(kind: str, eta: float = 1.5, h: float = 2.5, trainable: bool = False) -> Controller:
    """``"none"`` (MGnet ratio head), ``"bt"``, ``"square"`` or ``"ct"`` (with ``eta``, ``h``, ``trainable``)."""
    if kind == "ct":
        return CTController(eta, h, trainable)
    if kind == "bt":
        return BTController()
    if kind == "square":
        return SquareController()
    if kind == "none":
        return RatioHead()
    raise ValueError(f"unknown controller {kind!r}; choose from {CONTROLLERS}")


def skewness(values: Tensor, dim: int | None = None) -> Tensor:
    """Sample skewness E[(x - mu)^3] / sigma^3 (population moments) over ``dim`` (all entries if None).

    A constant input has skewness 0 (not NaN)."""
    x = values.float()
    if dim is None:
        x, dim = x.flatten(), 0
    centred = x - x.mean(dim, keepdim=True)
    m2 = centred.pow(2).mean(dim)
    m3 = centred.pow(3).mean(dim)
    return torch.where(m2 > 0, m3 / m2.clamp_min(1e-30).pow(1.5), torch.zeros_like(m3))
