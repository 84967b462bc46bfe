"""Saliency metrics: pure functions over tensors plus thin torchmetrics wrappers (docs/protocols.md), and the
per-image rows they produce with the reports made from them (``metrics.rows``, ``metrics.report``).

Stands on ``core`` only: ``import metrics`` loads no explainer, no captum and no LightningModule."""

from saliency_lab.metrics.accumulators import (
    CausalMetric,
    FaithfulnessMetric,
    IoUF1Metric,
    PointingGameMetric,
    PRAUCMetric,
    ValueMean,
)
from saliency_lab.metrics.causal import (
    HELDOUT_PRESETS,
    PROTOCOL_PRESETS,
    TARGET_RULES,
    CausalProtocol,
    CausalResult,
    FaithfulnessResult,
    MinMaxResult,
    causal_curves,
    explained_class,
    faithfulness_mf,
    make_protocol,
    minmax_across_methods,
    normalised_area,
)
from saliency_lab.metrics.rows import RowStore
from saliency_lab.metrics.suite import LOCALISATION_NAMES, METRIC_NAMES, EvaluationSettings, SaliencyScores, score_saliency
from saliency_lab.metrics.localisation import (
    default_pointing_tolerance,
    iou_f1,
    iou_f1_pixel_level,
    pointing_game,
    pr_auc,
    saliency_region,
)

__all__ = [
    "HELDOUT_PRESETS",
    "LOCALISATION_NAMES",
    "METRIC_NAMES",
    "PROTOCOL_PRESETS",
    "TARGET_RULES",
    "RowStore",
    "make_protocol",
    "EvaluationSettings",
    "SaliencyScores",
    "score_saliency",
    "CausalMetric",
    "CausalProtocol",
    "CausalResult",
    "FaithfulnessMetric",
    "FaithfulnessResult",
    "IoUF1Metric",
    "MinMaxResult",
    "PRAUCMetric",
    "PointingGameMetric",
    "ValueMean",
    "causal_curves",
    "default_pointing_tolerance",
    "explained_class",
    "faithfulness_mf",
    "iou_f1",
    "iou_f1_pixel_level",
    "minmax_across_methods",
    "normalised_area",
    "pointing_game",
    "pr_auc",
    "saliency_region",
]
