"""Saliency explainers behind one contract (docs/architecture.md, "The explainer contract").

    explainer = explainers.build("rise", blackbox, n_masks=4000, seed=0, max_forward_batch=256)
    explainer = explainers.build("predictor_ct", blackbox, checkpoint="ct.ckpt")   # a trained method
    saliency = explainer(images, targets)        # (B,3,H,W) in [0,1], (B,) -> (B,1,H,W)
    explainer.cost                               # Cost(forwards, backwards, images) of that call

One registry lists every method (``available()``), the trained predictors included. This package stands
on ``core`` (black box, perturbation, seeding) and ``networks`` (the predictor's plain networks); it never
imports ``metrics`` or a LightningModule.
"""

from saliency_lab.explainers.base import Cost, Explainer, preserved_state
from saliency_lab.explainers.registry import available, build, is_trained, recorded_name, register
from saliency_lab.explainers.specs import ExplainerSpec, build_explainer, explainer_key, explainer_keys, parse_spec

# Imported for their @register side effect: every module listed here holds registered methods.
from saliency_lab.explainers import cam, finv, gradients, iassa, igos, lime, mask_predictor, mpert, rise, xpert  # noqa: E402,F401  isort: skip

__all__ = ["Cost", "Explainer", "ExplainerSpec", "available", "build", "build_explainer", "explainer_key",
           "explainer_keys", "is_trained", "parse_spec", "preserved_state", "recorded_name", "register"]
