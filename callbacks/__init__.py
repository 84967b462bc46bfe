"""Lightning callbacks that evaluate explainers during training: metrics, figures and sanity checks."""

from callbacks.evaluation import ExplainerEvaluation
from callbacks.figures import curves_figure, overlay_grid
from callbacks.sanity import ModelRandomisationCheck, model_randomisation

__all__ = ["ExplainerEvaluation", "ModelRandomisationCheck", "curves_figure", "model_randomisation", "overlay_grid"]
