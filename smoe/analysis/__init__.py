"""Diagnostics that read what the layers return (``MoEAux``), never module internals."""

from smoe.analysis.routing_stats import RoutingStatsAccumulator, load_summary, summarize_layers

__all__ = ["RoutingStatsAccumulator", "load_summary", "summarize_layers"]
