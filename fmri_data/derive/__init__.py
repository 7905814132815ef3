"""Derived outputs computed from resampled series: volumes, ROI series."""
