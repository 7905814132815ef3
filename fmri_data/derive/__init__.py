"""Derived quantities, pure numerics on resampled series: brain masks and normalization, parcel means, flat maps, the window grid, motion, saliency scorers, QA metrics."""
