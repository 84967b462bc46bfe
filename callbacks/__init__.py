"""Lightning callbacks that evaluate explainers during training (metrics, figures, sanity checks) and draw
what the modules measure (the mask histogram)."""

from callbacks.evaluation import ExplainerEvaluation
from callbacks.figures import curves_figure, overlay_grid
from callbacks.mask_histogram import MaskHistogram
from callbacks.sanity import LabelRandomisationCheck, ModelRandomisationCheck, label_randomisation, model_randomisation

__all__ = ["ExplainerEvaluation", "LabelRandomisationCheck", "MaskHistogram", "ModelRandomisationCheck",
           "curves_figure", "label_randomisation", "model_randomisation", "overlay_grid"]
