"""The distribution of a mask predictor's mask values, drawn after every validation / test epoch.

The LightningModule computes the distribution (``MaskPredictor.mask_distribution``: a histogram on
[0, upper], values beyond ``upper`` in the last bin, and the skewness), reduced over DDP ranks, and logs its
scalars; this callback only draws it: a PNG under ``{default_root_dir}/eval/`` and, for every
``WandbLogger``, a W&B histogram and the image. Rank 0 only.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.loggers import WandbLogger


class MaskHistogram(pl.Callback):
    """Draw ``pl_module.mask_distribution`` (``{"hist", "edges", "skewness", ...}``) at validation and test
    end as ``{val|test}_mask_histogram_epoch{E}.png`` and log it to W&B as ``{val|test}/mask_histogram``
    (histogram) and ``{val|test}/mask_histogram_png`` (image). Skips the sanity check."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_*_end, not on_*_epoch_end: Lightning runs the callbacks' epoch-end hooks before the module's,
        # which is where the distribution is computed.
        self._draw(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, pl_module, "test")

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> None:
        stats = getattr(pl_module, "mask_distribution", None)
        if trainer.sanity_checking or stats is None or not trainer.is_global_zero:
            return
        counts, edges = stats["hist"].cpu().numpy(), stats["edges"].cpu().numpy()
        figure = Figure(figsize=(4.5, 3), layout="constrained")
        FigureCanvasAgg(figure)
        axis = figure.subplots()
        axis.bar(edges[:-1], counts / max(counts.sum(), 1), width=edges[1] - edges[0], align="edge")
        open_ended = edges[-1] > 1  # BT masks are unbounded: their histogram stops at an upper value
        axis.set_xlabel("mask value" + (f" (> {edges[-1]:g} in the last bin)" if open_ended else ""))
        axis.set_ylabel("fraction")
        name = pl_module.explainer_name() if callable(getattr(pl_module, "explainer_name", None)) else "mask"
        axis.set_title(f"{name} epoch {pl_module.current_epoch}: skewness {float(stats['skewness']):.2f}",
                       fontsize=9)
        folder = Path(trainer.default_root_dir) / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{split}_mask_histogram_epoch{pl_module.current_epoch:03d}.png"
        figure.savefig(path, dpi=100)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb  # the W&B client itself only where a W&B logger is attached

                logger.log_metrics({f"{split}/mask_histogram": wandb.Histogram(np_histogram=(counts, edges))},
                                   step=pl_module.global_step)
                logger.log_image(key=f"{split}/mask_histogram_png", images=[str(path)], step=pl_module.global_step)
