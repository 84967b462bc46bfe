"""Lightning callbacks that evaluate explainers during training (metrics, figures, sanity checks) and draw
what the modules measure (the mask histogram)."""

from saliency_lab.callbacks.evaluation import ExplainerEvaluation
from saliency_lab.callbacks.figures import curves_figure, overlay_grid
from saliency_lab.callbacks.mask_histogram import MaskHistogram
from saliency_lab.callbacks.sanity import LabelRandomisationCheck, ModelRandomisationCheck, label_randomisation, model_randomisation

__all__ = ["ExplainerEvaluation", "LabelRandomisationCheck", "MaskHistogram", "ModelRandomisationCheck",
           "curves_figure", "label_randomisation", "model_randomisation", "overlay_grid"]
