"""Spatial and temporal resampling (the hot path of conversion)."""

from .operator import PreparedOperator, apply_operator, resolve_backend
from .spatial import (
    grid_indices, inside_source, nearest_index, resample_mask, resample_volume, resampling_matrix,
    source_coordinates, trilinear_weights,
)
from .temporal import (
    antialias_filter, lowpass, n_output_frames, resample_tr, resample_tr_reference, temporal_operator,
)

__all__ = [
    "PreparedOperator",
    "apply_operator",
    "antialias_filter",
    "grid_indices",
    "inside_source",
    "lowpass",
    "n_output_frames",
    "nearest_index",
    "resample_tr",
    "resample_tr_reference",
    "resample_mask",
    "resample_volume",
    "resampling_matrix",
    "resolve_backend",
    "source_coordinates",
    "temporal_operator",
    "trilinear_weights",
]
