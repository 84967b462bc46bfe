"""Cluttered Fashion-MNIST scenes: a real object with exact ground truth on a textured, cluttered canvas.

A scene (``image_size`` x ``image_size`` RGB in [0,1]) is built from one Fashion-MNIST item:
  1. background: a smooth low-frequency colour field (3x3 random colours, bilinearly upsampled) plus
     oriented stripes, darker than the items;
  2. distractors: small fragments cut from items of *other* classes, tinted and drawn at low opacity —
     too little of an item to be classified as one;
  3. the item: scaled to ``item_scale`` of the canvas side, tinted, drawn on top with its intensity as
     alpha (opaque-ish) and as shading (so its texture survives).
Ground truth: ``mask`` = the item's alpha above 0.1 (the item is the top layer, so it is fully visible);
``box`` = the tight xyxy box of the mask in pixels (x2, y2 exclusive).

Scene ``i`` of a split with seed ``s`` depends only on (s, split, i): its generator is
``numpy.random.default_rng([s, split_code, i])``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Clutter:
    """Knobs of the scene generator (fractions are of the canvas side unless stated otherwise)."""

    distractors: int = 2
    """Number of fragments of other-class items."""
    distractor_opacity: tuple[float, float] = (0.3, 0.55)
    """Range of the fragments' opacity (the item itself is opaque)."""
    fragment_side: tuple[float, float] = (0.3, 0.45)
    """Fragment side as a fraction of the 28-px source item side."""
    texture_strength: float = 1.0
    """Amplitude multiplier of the background stripes (0 = smooth colour field only)."""
    background_brightness: float = 0.55
    """Upper bound of background colour values (items are tinted in [0.45, 1])."""
    item_scale: tuple[float, float] = (0.45, 0.6)
    """Side of the 28-px item box after scaling, as a fraction of the canvas side."""

    def __post_init__(self):
        if self.distractors < 0:
            raise ValueError(f"clutter.distractors must be >= 0, got {self.distractors}")
        for name in ("distractor_opacity", "fragment_side", "item_scale"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"clutter.{name} must be an increasing pair in [0,1], got {(lo, hi)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def coerce(cls, value: "Clutter | dict | None") -> "Clutter":
        """Accept a Clutter, a dict of its fields (as configs and saved hyper-parameters hold it) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        raise TypeError(f"clutter must be a Clutter or a dict of its fields, got {type(value).__name__}")


def _resize(gray: np.ndarray, side: int) -> torch.Tensor:
    """(h,w) uint8 -> (side,side) float in [0,1], bilinear with antialiasing."""
    t = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0, 0].clamp_(0, 1)


def _background(rng: np.random.Generator, size: int, clutter: Clutter) -> torch.Tensor:
    coarse = torch.from_numpy(rng.uniform(0, clutter.background_brightness, (1, 3, 3, 3)).astype(np.float32))
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(1.5, 5.0), rng.uniform(0, 2 * np.pi)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    stripes = torch.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    stripe_colour = torch.from_numpy(rng.uniform(-0.12, 0.12, (3, 1, 1)).astype(np.float32))
    return (field + clutter.texture_strength * stripe_colour * stripes).clamp_(0, 1)


def _paste(canvas: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor, top: int, left: int) -> None:
    """Alpha-composite colour (3,h,w) with alpha (h,w) onto canvas (3,H,W) in place."""
    h, w = alpha.shape
    region = canvas[:, top:top + h, left:left + w]
    region.mul_(1 - alpha).add_(colour * alpha)


def _fragment(rng: np.random.Generator, item: np.ndarray, side: int) -> np.ndarray:
    """A side x side crop of a 28x28 item, centred on a random bright pixel so it is never empty."""
    ys, xs = np.nonzero(item > 60)
    if len(ys) == 0:
        ys, xs = np.array([14]), np.array([14])
    k = rng.integers(len(ys))
    top = int(np.clip(ys[k] - side // 2, 0, item.shape[0] - side))
    left = int(np.clip(xs[k] - side // 2, 0, item.shape[1] - side))
    return item[top:top + side, left:left + side]


def render_scene(
    rng: np.random.Generator,
    item: np.ndarray,
    distractor_items: list[np.ndarray],
    image_size: int,
    clutter: Clutter,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render one scene.

    Args:
        rng: the scene's own generator.
        item: (28,28) uint8 Fashion-MNIST item of the scene's class.
        distractor_items: (28,28) uint8 items of other classes, one per fragment.
    Returns:
        image (3,S,S) float32 in [0,1], mask (1,S,S) bool, box (1,4) float32 xyxy (x2, y2 exclusive).
    """
    size = image_size
    canvas = _background(rng, size, clutter)
    src = item.shape[0]
    item_side = int(round(size * rng.uniform(*clutter.item_scale)))
    scale = item_side / src

    for other in distractor_items:
        frag_src = max(3, int(round(src * rng.uniform(*clutter.fragment_side))))
        frag = _resize(_fragment(rng, other, frag_src), max(2, int(round(frag_src * scale))))
        opacity = rng.uniform(*clutter.distractor_opacity)
        colour = torch.from_numpy(rng.uniform(0.3, 1.0, (3, 1, 1)).astype(np.float32)) * (0.35 + 0.65 * frag)
        h = frag.shape[0]
        top, left = rng.integers(0, size - h + 1, size=2)
        _paste(canvas, (2 * frag).clamp(0, 1) * opacity, colour, int(top), int(left))

    shade = _resize(item, item_side)
    alpha = (2 * shade).clamp(0, 1)
    tint = torch.from_numpy(rng.uniform(0.45, 1.0, (3, 1, 1)).astype(np.float32))
    top, left = (int(v) for v in rng.integers(0, size - item_side + 1, size=2))
    _paste(canvas, alpha, tint * (0.35 + 0.65 * shade), top, left)

    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, top:top + item_side, left:left + item_side] = alpha > 0.1
    # Quantised to 8-bit levels like any stored image, so exports and caches reproduce it exactly.
    image = canvas.clamp_(0, 1).mul_(255).round_().div_(255)
    return image, mask, mask_to_box(mask[0])[None]


def mask_to_box(mask: torch.Tensor) -> torch.Tensor:
    """(H,W) bool -> (4,) float xyxy tight box in pixels, x2/y2 exclusive; zeros if the mask is empty."""
    ys = torch.nonzero(mask.any(dim=1)).flatten()
    xs = torch.nonzero(mask.any(dim=0)).flatten()
    if len(ys) == 0:
        return torch.zeros(4)
    return torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
