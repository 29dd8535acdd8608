"""Diagnostics and the SMoE papers' measurements, as functions over what the layers return (``MoEAux``) and over
tensors: routing statistics, representation collapse, routing fluctuation, expert specialisation, 2-D embeddings,
robustness (corruption error, contaminated text) and the adaptive-compute capacity curve. The probe
(:mod:`smoe.analysis.probe`) collects a model's routing with forward hooks; nothing here reads module internals."""

from smoe.analysis.capacity_curve import capacity_curve, capacity_layers
from smoe.analysis.collapse import class_covariances, representation_collapse
from smoe.analysis.embedding import embed_2d, plot_embedding
from smoe.analysis.fluctuation import fluctuation_series, routing_fluctuation
from smoe.analysis.probe import LayerProbe, probe_routing
from smoe.analysis.robustness import (
    accuracy,
    contaminated_loss,
    corruption_table,
    mean_corruption_error,
    substitute_tokens,
)
from smoe.analysis.routing_stats import RoutingStatsAccumulator, load_summary, summarize_layers
from smoe.analysis.specialisation import (
    inter_run_consistency,
    mutual_information,
    normalized_mutual_information,
    purity,
)

__all__ = [
    "RoutingStatsAccumulator",
    "load_summary",
    "summarize_layers",
    "representation_collapse",
    "class_covariances",
    "routing_fluctuation",
    "fluctuation_series",
    "mutual_information",
    "normalized_mutual_information",
    "purity",
    "inter_run_consistency",
    "embed_2d",
    "plot_embedding",
    "probe_routing",
    "LayerProbe",
    "accuracy",
    "corruption_table",
    "mean_corruption_error",
    "substitute_tokens",
    "contaminated_loss",
    "capacity_curve",
    "capacity_layers",
]
