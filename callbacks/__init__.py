"""Lightning callbacks that evaluate explainers during training (metrics, figures, sanity checks) and draw
what the modules measure (the mask histogram)."""

from callbacks.evaluation import ExplainerEvaluation
from callbacks.figures import curves_figure, overlay_grid
from callbacks.mask_histogram import MaskHistogram
from callbacks.sanity import ModelRandomisationCheck, model_randomisation

__all__ = ["ExplainerEvaluation", "MaskHistogram", "ModelRandomisationCheck", "curves_figure", "model_randomisation",
           "overlay_grid"]
