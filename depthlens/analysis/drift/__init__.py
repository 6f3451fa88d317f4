"""Representational drift: per-layer covariance similarity and translator transfer."""

from depthlens.analysis.drift.covariance import (
    LayerCovariances,
    remove_top_components,
    similarity_matrix,
    stream_covariances,
)
from depthlens.analysis.drift.interval import rho_interval, rho_samples
from depthlens.analysis.drift.transfer import Transfer, drift_correlation, tokens_per_byte, transfer_matrix

__all__ = [
    "LayerCovariances",
    "Transfer",
    "drift_correlation",
    "remove_top_components",
    "rho_interval",
    "rho_samples",
    "similarity_matrix",
    "stream_covariances",
    "tokens_per_byte",
    "transfer_matrix",
]
