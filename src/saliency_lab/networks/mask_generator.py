"""The mask generator G (a U-Net decoder over the black box's features) and the whole predictor network.

:class:`MaskGenerator` (docs/methods.md §1): starting from the (filtered) last feature level, one upsampling
block per shallower level up to the first one (stride 4 for the usual 4 levels: 7 -> 14 -> 28 -> 56 at 224),
each

    3x3 conv (C_in -> w), BN, ReLU, pixel shuffle x2 (-> w/4 channels at twice the resolution),
    concatenate the skip feature map, one residual bottleneck block (-> w channels),

then a 1x1 conv head to ``out_channels`` (1 for BT / CT, 2 for MGnet's ratio head). The pixel shuffle
takes the conv's w channels to w/4: a conv to 4w channels before the shuffle would cost ~1.6 GMAC at
ResNet-50 / 224 (40% of the black box) instead of ~0.6 GMAC (14%), and the speed target of the
predictor (explaining <= 1.25x one black-box forward) rules that out.

Block widths w (deep to shallow): the paper's presets (:data:`GENERATOR_PRESETS`) — a quarter of the skip
level's channels for ResNet-50 (256/128/64), half for VGG-19 (256/128/64) and GoogLeNet (416/240/96) —
and for any other CNN ``width_ratio`` (default 1/2) of the skip channels, rounded to a multiple of 8,
at least 16 (:func:`derive_widths`).

:class:`MaskPredictorNet` = feature filter (frozen) -> generator -> distribution controller; it takes
``BlackBox.features`` and the explained classes and returns the low-resolution mask M^d.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from saliency_lab.networks.controllers import Controller, make_controller
from saliency_lab.networks.feature_filter import FeatureFilter

# The paper's block widths (deep to shallow) for its three black boxes, and the ratio they follow.
GENERATOR_PRESETS: dict[str, tuple[int, ...]] = {"resnet50": (256, 128, 64), "vgg19": (256, 128, 64),
                                                 "googlenet": (416, 240, 96)}
PRESET_RATIOS: dict[str, float] = {"resnet50": 0.25, "vgg19": 0.5, "googlenet": 0.5}
DEFAULT_RATIO = 0.5
NET_FORMAT = "saliency-lab/mask-predictor-net/v1"


def derive_widths(feature_channels: Sequence[int], ratio: float = DEFAULT_RATIO, multiple: int = 8,
                  minimum: int = 16) -> list[int]:
    """Block widths (deep to shallow): ``ratio`` x the channels of each skip level (all but the last level,
    deepest first), rounded to a multiple of ``multiple`` and at least ``minimum``."""
    skips = list(feature_channels)[-2::-1]
    return [max(minimum, int(round(c * ratio / multiple)) * multiple) for c in skips]


def generator_widths(spec: str, feature_channels: Sequence[int], widths: Sequence[int] | None = None,
                     width_ratio: float | None = None) -> list[int]:
    """The widths to use: explicit ``widths``; else ``width_ratio``; else the paper's preset for the black
    box's architecture (``spec`` = "timm:resnet50", "torchvision:vgg19", ...) when its channels match;
    else :data:`DEFAULT_RATIO`."""
    levels = len(feature_channels) - 1
    if widths is not None:
        widths = [int(w) for w in widths]
        if len(widths) != levels:
            raise ValueError(f"need {levels} block widths for {len(feature_channels)} feature levels, got {widths}")
        return widths
    if width_ratio is not None:
        return derive_widths(feature_channels, width_ratio)
    name = spec.partition(":")[2] or spec
    preset = GENERATOR_PRESETS.get(name)
    if preset is not None and derive_widths(feature_channels, PRESET_RATIOS[name]) == list(preset):
        return list(preset)
    return derive_widths(feature_channels, DEFAULT_RATIO)


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear (align_corners=False) resize of (B, C, h, w) maps to ``size``, differentiable.

    Same values as ``F.interpolate(maps, size, mode="bilinear")``; computed with the B * C maps as the
    channels of one channels-last image, which torch vectorises over channels: ~7x faster on the CPU for
    the one-channel masks here (0.6 vs 4.5 ms for 64 masks 16 -> 64)."""
    batch, channels = maps.shape[:2]
    stacked = maps.reshape(1, batch * channels, *maps.shape[-2:]).contiguous(memory_format=torch.channels_last)
    out = F.interpolate(stacked, size=tuple(size), mode="bilinear", align_corners=False)
    return out.contiguous().view(batch, channels, *out.shape[-2:])


def _conv_bn(cin: int, cout: int, kernel: int, relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class Bottleneck(nn.Module):
    """Residual bottleneck: 1x1 (-> mid) / 3x3 / 1x1 (-> out), each with BN, + a 1x1 projection shortcut.

    The first 1x1 conv and the projection read the same input, so they run as one conv with mid + out
    output channels (and one BN), split afterwards: the same function as two convs, one pass over the input
    (on the CPU, small convs cost mostly per-call overhead)."""

    def __init__(self, cin: int, cout: int, mid: int | None = None):
        super().__init__()
        self.mid = mid or max(cout // 4, 8)
        self.project = cin != cout
        self.entry = nn.Sequential(*_conv_bn(cin, self.mid + (cout if self.project else 0), 1, relu=False))
        self.body = nn.Sequential(*_conv_bn(self.mid, self.mid, 3), *_conv_bn(self.mid, cout, 1, relu=False))
        nn.init.zeros_(self.body[-1].weight)  # start as the shortcut alone (the usual zero-init residual)

    def forward(self, x: Tensor) -> Tensor:
        entry = self.entry(x)
        shortcut = entry[:, self.mid:] if self.project else x
        return torch.relu(self.body(torch.relu(entry[:, :self.mid])) + shortcut)


class UpBlock(nn.Module):
    """3x3 conv (cin -> width), BN, ReLU, pixel shuffle x2 (-> width / 4), concat skip, bottleneck (-> width)."""

    def __init__(self, cin: int, skip: int, width: int):
        super().__init__()
        if width % 4:
            raise ValueError(f"block width must be a multiple of 4 (pixel shuffle x2), got {width}")
        self.up = nn.Sequential(*_conv_bn(cin, width, 3), nn.PixelShuffle(2))
        self.merge = Bottleneck(width // 4 + skip, width)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:  # inputs that are not a multiple of the deepest stride
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        return self.merge(torch.cat([x, skip.to(x.dtype)], dim=1))


class MaskGenerator(nn.Module):
    """U-Net decoder over multi-level features (shallow to deep) -> raw map (B, out_channels, h, w) at the
    resolution of the first (shallowest) level, times 2 ** ``extra_upsamples``.

    Args:
        feature_channels: channels of the levels, shallow to deep (``BlackBox.feature_channels``).
        widths: block widths, deep to shallow (one per level but the last; see :func:`generator_widths`).
        out_channels: 1 (BT / CT / x^2) or 2 (MGnet ratio head).
        extra_upsamples: blocks of 3x3 conv (-> the last width), BN, ReLU, pixel shuffle x2 after the last skip
            level, without a skip (ours, for the mask-resolution ablation; the paper stops at stride 4).
    """

    def __init__(self, feature_channels: Sequence[int], widths: Sequence[int], out_channels: int = 1,
                 extra_upsamples: int = 0):
        super().__init__()
        channels = [int(c) for c in feature_channels]
        if len(channels) < 2 or len(widths) != len(channels) - 1:
            raise ValueError(f"need >= 2 feature levels and one width per skip level; got channels {channels}, "
                             f"widths {list(widths)}")
        if extra_upsamples < 0:
            raise ValueError(f"extra_upsamples must be >= 0, got {extra_upsamples}")
        self.feature_channels, self.widths = channels, [int(w) for w in widths]
        self.extra_upsamples = int(extra_upsamples)
        cins = [channels[-1], *self.widths[:-1]]
        skips = channels[-2::-1]
        self.blocks = nn.ModuleList(UpBlock(cin, skip, w) for cin, skip, w in zip(cins, skips, self.widths))
        last = self.widths[-1]
        self.extra = nn.Sequential(*[layer for i in range(self.extra_upsamples)
                                     for layer in (*_conv_bn(last if i == 0 else last // 4, last, 3),
                                                   nn.PixelShuffle(2))])
        self.head = nn.Conv2d(last // 4 if self.extra_upsamples else last, out_channels, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.feature_channels):
            raise ValueError(f"expected {len(self.feature_channels)} feature levels, got {len(features)}")
        x = features[-1]
        for block, skip in zip(self.blocks, list(features)[-2::-1]):
            x = block(x, skip)
        return self.head(self.extra(x))


class MaskPredictorNet(nn.Module):
    """Feature filter (frozen) -> :class:`MaskGenerator` -> distribution controller.

    ``forward(features, classes)``: ``features`` = ``BlackBox.features(images)`` (shallow to deep),
    ``classes`` (B,) the explained classes -> M^d (B, 1, h_0, w_0) (values in [0, 1] for CT / x^2 / MGnet, >= 0
    for BT). ``mask(features, classes, size)`` upsamples it bilinearly to the image size.

    Args:
        feature_channels, num_classes: of the black box.
        widths: generator block widths (see :func:`generator_widths`).
        controller: ``"ct"``, ``"bt"``, ``"square"`` (the x^2 transformer) or ``"none"`` (MGnet's two-channel
            ratio head).
        eta, h, trainable_controller: CT's parameters.
        filter_bias: b of the feature filter at inference.
        extra_upsamples: see :class:`MaskGenerator` (0: the paper's stride-4 mask).
    """

    def __init__(self, feature_channels: Sequence[int], num_classes: int, widths: Sequence[int],
                 controller: str = "ct", eta: float = 1.5, h: float = 2.5, trainable_controller: bool = False,
                 filter_bias: float = 0.0, extra_upsamples: int = 0):
        super().__init__()
        self.filter = FeatureFilter(feature_channels[-1], num_classes, bias=filter_bias)
        self.filter.requires_grad_(False)
        self.controller: Controller = make_controller(controller, eta, h, trainable_controller)
        self.generator = MaskGenerator(feature_channels, widths, self.controller.in_channels, extra_upsamples)
        self.num_classes = int(num_classes)

    def train(self, mode: bool = True) -> "MaskPredictorNet":
        super().train(mode)
        self.filter.train(False)  # frozen
        return self

    def raw(self, features: Sequence[Tensor], classes: Tensor) -> Tensor:
        """The generator's raw map M^g (B, 1 or 2, h_0, w_0)."""
        features = list(features)
        features[-1] = self.filter(features[-1], classes)
        return self.generator(features)

    def forward(self, features: Sequence[Tensor], classes: Tensor) -> Tensor:
        return self.controller(self.raw(features, classes))

    def mask(self, features: Sequence[Tensor], classes: Tensor, size: Sequence[int]) -> Tensor:
        """M^d upsampled bilinearly to ``size`` = (H, W): (B, 1, H, W)."""
        return upsample(self(features, classes), size)

    def config(self) -> dict:
        """Plain-data constructor arguments (``weights_only``-loadable), see :meth:`from_config`."""
        ctrl = self.controller.config()
        return {"format": NET_FORMAT, "feature_channels": list(self.generator.feature_channels),
                "num_classes": self.num_classes, "widths": list(self.generator.widths), "controller": ctrl["kind"],
                "eta": ctrl.get("eta", 1.5), "h": ctrl.get("h", 2.5),
                "trainable_controller": ctrl.get("trainable", False), "filter_bias": self.filter.bias,
                "extra_upsamples": self.generator.extra_upsamples}

    @classmethod
    def from_config(cls, config: dict) -> "MaskPredictorNet":
        if config.get("format") != NET_FORMAT:
            raise ValueError(f"not a mask-predictor network config (format {config.get('format')!r}, expected "
                             f"{NET_FORMAT!r})")
        return cls(config["feature_channels"], config["num_classes"], config["widths"], config["controller"],
                   config["eta"], config["h"], config["trainable_controller"], config["filter_bias"],
                   config.get("extra_upsamples", 0))
