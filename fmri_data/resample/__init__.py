"""Spatial and temporal resampling (the hot path of conversion)."""

from .spatial import (
    grid_indices,
    inside_source,
    nearest_index,
    resample_volume,
    resampling_matrix,
    source_coordinates,
    trilinear_weights,
)
from .temporal import antialias_filter, lowpass, n_output_frames, resample_tr

__all__ = [
    "antialias_filter",
    "grid_indices",
    "inside_source",
    "lowpass",
    "n_output_frames",
    "nearest_index",
    "resample_tr",
    "resample_volume",
    "resampling_matrix",
    "source_coordinates",
    "trilinear_weights",
]
