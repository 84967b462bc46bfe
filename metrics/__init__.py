"""Saliency metrics: pure functions over tensors plus thin torchmetrics wrappers (PROTOCOLS.md), and the
per-image rows they produce with the reports made from them (``metrics.rows``, ``metrics.report``).

Stands on ``core`` only: ``import metrics`` loads no explainer, no captum and no LightningModule."""

from metrics.accumulators import (
    CausalMetric,
    FaithfulnessMetric,
    IoUF1Metric,
    PointingGameMetric,
    PRAUCMetric,
    ValueMean,
)
from metrics.causal import (
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
from metrics.rows import RowStore
from metrics.suite import METRIC_NAMES, EvaluationSettings, SaliencyScores, score_saliency
from metrics.localisation import (
    default_pointing_tolerance,
    iou_f1,
    iou_f1_pixel_level,
    pointing_game,
    pr_auc,
    saliency_region,
)

__all__ = [
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
