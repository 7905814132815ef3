"""The Zarr v3 training store: layout, the root, run writers, the direct shard reader, validation, summaries.

Every write to a store goes through :class:`~fmri_data.store.root.Store` and
:class:`~fmri_data.store.writer.RunWriter`; nothing else opens groups for writing or moves paths.
"""
