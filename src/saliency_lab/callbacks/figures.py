"""Figures of an evaluation: saliency overlays and mean deletion / insertion curves.

Shared by :class:`saliency_lab.callbacks.ExplainerEvaluation` and ``evaluate.py``. Figures are built with
``matplotlib.figure.Figure`` on an Agg canvas instead of ``pyplot``: no global backend is switched, no
figure is registered with pyplot's manager (nothing to close, nothing leaks across epochs), and it
works on headless ranks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from saliency_lab.metrics.causal import trapezoid_area

OVERLAY_CMAP = "jet"
OVERLAY_ALPHA = 0.5
CELL_INCHES = 1.6  # side of one image cell of the overlay grid


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas; savefig renders through Agg
    return figure


def _normalise(maps: Tensor) -> Tensor:
    """(N,1,H,W) -> (N,H,W) min-max normalised per map to [0, 1]; a constant map becomes 0."""
    flat = maps.detach().float().flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = high - low
    normalised = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return normalised.view(maps.shape[0], *maps.shape[-2:])


def overlay_grid(images: Tensor, maps: Mapping[str, Tensor], titles: Sequence[str] | None = None) -> Figure:
    """A grid of saliency maps over their images.

    Rows are images, columns the image alone and then one column per method (column title = the key of
    ``maps``), each map min-max normalised per image and drawn as a ``jet`` heat map at alpha 0.5 over a
    grey copy of the image, so the heat colours are not mixed with the image's own colours.

    Args:
        images: (N,3,H,W) in [0,1].
        maps: method name -> (N,1,H,W) saliency (any range; higher = more salient), at the image size.
        titles: optional N row labels (e.g. "#12 class 3"), written above each row's image.
    """
    count = images.shape[0]
    if titles is not None and len(titles) != count:
        raise ValueError(f"{len(titles)} titles for {count} images")
    for name, saliency in maps.items():
        if saliency.shape[0] != count or saliency.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"maps[{name!r}] has shape {tuple(saliency.shape)}, images {tuple(images.shape)}")
    columns = 1 + len(maps)
    figure = _new_figure(CELL_INCHES * columns, CELL_INCHES * max(count, 1))
    axes = figure.subplots(max(count, 1), columns, squeeze=False)
    pixels = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    grey = pixels.mean(-1)
    heat = {name: _normalise(saliency).cpu().numpy() for name, saliency in maps.items()}
    for row in range(count):
        axes[row, 0].imshow(pixels[row])
        axes[row, 0].set_title(titles[row] if titles is not None else ("image" if row == 0 else ""), fontsize=8)
        for column, name in enumerate(heat, start=1):
            axes[row, column].imshow(grey[row], cmap="gray", vmin=0, vmax=1)
            axes[row, column].imshow(heat[name][row], cmap=OVERLAY_CMAP, vmin=0, vmax=1, alpha=OVERLAY_ALPHA)
            if row == 0:
                axes[row, column].set_title(name, fontsize=8)
    for axis in axes.flat:
        axis.set_axis_off()
    return figure


def overlay_image(image: Tensor, saliency: Tensor) -> Tensor:
    """One overlay as pixels, drawn as a cell of :func:`overlay_grid` is: the ``jet`` heat map of the
    min-max normalised ``saliency`` at alpha 0.5 over a grey copy of the image, at the image's full size.

    Args:
        image: (H, W, 3) uint8 (a decoded file) or (3, H, W) float in [0, 1].
        saliency: (H, W) or (1, H, W) at the image's size; any range, higher = more salient.
    Returns: (H, W, 3) uint8 RGB.
    """
    from matplotlib import colormaps

    pixels = image.float().div(255) if image.dtype == torch.uint8 else image.detach().float().permute(1, 2, 0)
    if saliency.shape[-2:] != pixels.shape[:2]:
        raise ValueError(f"saliency {tuple(saliency.shape)} does not match the image {tuple(pixels.shape)}")
    heat = _normalise(saliency.reshape(1, 1, *saliency.shape[-2:]))[0].cpu()
    cmap = colormaps[OVERLAY_CMAP]
    # the colour map's own lookup table (cmap.N entries, as imshow uses), indexed: a few bytes per pixel
    # where calling cmap on the map would hold 32 (float64 RGBA) for a multi-megapixel photo
    table = torch.from_numpy(cmap(torch.linspace(0, 1, cmap.N).numpy())[:, :3]).float()
    colour = table[(heat * (cmap.N - 1)).round().long()]
    grey = pixels.clamp(0, 1).mean(-1, keepdim=True).cpu()
    blended = OVERLAY_ALPHA * colour + (1 - OVERLAY_ALPHA) * grey
    return blended.mul(255).round().clamp(0, 255).to(torch.uint8)


def curves_figure(fractions: Tensor, mean_curves: Mapping[str, tuple[Tensor, Tensor]]) -> Figure:
    """Two panels, deletion and insertion: the mean curve of each method against the fraction of units.

    Args:
        fractions: (n+1,) x axis in [0,1] (``SaliencyScores.fractions``).
        mean_curves: method name -> (deletion (n+1,), insertion (n+1,)) mean p_c curves. The legend gives
            each curve's trapezoid area; for curves averaged over images it equals the mean area.
    """
    figure = _new_figure(9.0, 3.6)
    axes = figure.subplots(1, 2, sharey=True)
    x = fractions.detach().float().cpu().numpy()
    for panel, (axis, title) in enumerate(zip(axes, ("deletion (lower is better)", "insertion (higher is better)"))):
        for name, curves in mean_curves.items():
            curve = curves[panel].detach().float().cpu()
            area = trapezoid_area(curve.unsqueeze(0)).item()
            label = f"{name} ({area:.3f})" if math.isfinite(area) else name
            axis.plot(x, curve.numpy(), label=label)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("fraction of units removed" if panel == 0 else "fraction of units revealed")
        axis.set_xlim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_ylabel("p(explained class)")
    return figure


def agreement_figure(result: Mapping) -> Figure:
    """A heatmap of :func:`saliency_lab.metrics.agreement.metric_agreement`'s metric x metric Spearman table
    (-1 blue to +1 red, values written in the cells; an undefined pair is left blank)."""
    metrics = result["metrics"]
    grid = np.array([[result["spearman"][a][b] for b in metrics] for a in metrics], dtype=float)
    figure = _new_figure(1.0 + 0.55 * len(metrics), 0.8 + 0.5 * len(metrics))
    ax = figure.add_subplot()
    image = ax.imshow(grid, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(metrics)), metrics, rotation=60, ha="right")
    ax.set_yticks(range(len(metrics)), metrics)
    for i in range(len(metrics)):
        for j in range(len(metrics)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"Metric agreement on {len(result['methods'])} methods (Kendall's W per image "
                 f"{result['w_per_image']:.2f})", fontsize=9)
    figure.colorbar(image, ax=ax, shrink=0.8, label="Spearman of the methods' rankings")
    return figure
