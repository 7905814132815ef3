"""The Zarr v3 training store: layout, the root, run writers, atomic replacement, the direct shard reader,
validation, summaries, the reading of a run's ``saliency/`` group.

Every write to a store goes through this package: :class:`~fmri_data.store.writer.RunWriter`
writes and commits runs during a conversion; :class:`~fmri_data.store.root.Store` changes a
store afterwards (``replace_in_run``, ``write_run_attrs``, ``write_root_attrs``,
``write_file``, ``write_bytes``, ``write_index``) through :mod:`fmri_data.store.replace`.
Nothing else opens groups for writing or moves paths.
"""
