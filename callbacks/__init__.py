"""Lightning callbacks that evaluate explainers during training: metrics, figures and sanity checks."""

from callbacks.evaluation import ExplainerEvaluation
from callbacks.figures import curves_figure, overlay_grid
from callbacks.sanity import LabelRandomisationCheck, ModelRandomisationCheck, label_randomisation, model_randomisation

__all__ = ["ExplainerEvaluation", "LabelRandomisationCheck", "ModelRandomisationCheck", "curves_figure",
           "label_randomisation", "model_randomisation", "overlay_grid"]
