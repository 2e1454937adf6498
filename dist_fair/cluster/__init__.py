"""Decoding a kNN graph (or predicted edges) into clusters (METHODS.md §4, "Decoding")."""
from dist_fair.cluster.components import UnionFind, connected_components
from dist_fair.cluster.edges import choose_decoding, decode_edges
from dist_fair.cluster.grid import decoding_grid, logit_grid, quantile_grid
from dist_fair.cluster.peak import choose_peak_floor, neighbour_confidence, peak_clusters, peak_edges
from dist_fair.cluster.threshold import choose_threshold, threshold_clusters, threshold_edges

__all__ = ["UnionFind", "connected_components", "threshold_edges", "threshold_clusters", "choose_threshold",
           "neighbour_confidence", "peak_edges", "peak_clusters", "choose_peak_floor", "decode_edges",
           "choose_decoding", "logit_grid", "quantile_grid", "decoding_grid"]
