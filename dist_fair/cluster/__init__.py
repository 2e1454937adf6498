"""Decoding a kNN graph (or predicted edges) into clusters (METHODS.md §4, "Decoding")."""
from dist_fair.cluster.components import connected_components
from dist_fair.cluster.threshold import choose_threshold, threshold_edges, threshold_clusters

__all__ = ["connected_components", "threshold_edges", "threshold_clusters", "choose_threshold"]
