"""Write one run into the store's staging area and commit it atomically (:class:`RunWriter`)."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from ..errors import StoreError
from ..config.schema import to_json, validate

from .direct import ShardEncoder
from .export import array_dimensions, run_coordinates
from .layout import ATTRS_CHECKSUM, RUNS, STAGING, ContentDigest, attrs_digest, compressors, content_digest, is_local

if TYPE_CHECKING:  # pragma: no cover
    from .root import Store



class RunWriter:
    """Writes one run into ``_staging/`` and moves it into ``runs/`` on :meth:`commit`."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.staging = f"{STAGING}/{run_id}.{secrets.token_hex(4)}"
        self.group = zarr.open_group(store=store.zarr_store, path=self.staging, mode="w", attributes={"status": "writing"})
        self.outputs: list[str] = []
        self.checksums: dict[str, str] = {}
        self._last_beat = time.monotonic()

    def write_series(
        self,
        name: str,
        n_frames: int,
        frame_shape: tuple[int, ...],
        dtype: str,
        chunk_frames: int,
        shard_chunks: int,
        compression: dict[str, Any],
        block: Callable[[int, int], np.ndarray],
        attrs: dict[str, Any] | None = None,
        dimension_names: tuple[str, ...] | None = None,
    ) -> zarr.Array:
        """Create a time-first array and fill it chunk by chunk.

        Args:
            name: array path inside the run group (``"bold"``, ``"roi/schaefer400_7n"``).
            n_frames: length of the time axis.
            frame_shape: shape of one frame.
            dtype: numpy dtype name of the stored values.
            chunk_frames: frames per chunk (a training window).
            shard_chunks: chunks per shard.
            compression: the recipe's ``store.compression``.
            block: ``block(start, stop)`` returns frames ``[start, stop)`` with shape
                ``(stop - start, *frame_shape)``; called once per chunk, in order. A chunk is
                hashed (:class:`~fmri_data.store.layout.ContentDigest`), then encoded in
                background threads while the next one is produced, so a block function that
                reuses buffers must alternate two (the frames returned by one call are
                released when the call after next begins). Chunks are encoded
                by :class:`~fmri_data.store.direct.ShardEncoder` (Zarr's bytes, without its
                copies) and each shard file is written atomically, behind the next chunks.
            attrs: array attributes.
            dimension_names: Zarr v3 dimension names.
        """
        shard_frames = chunk_frames * shard_chunks
        array = self.group.create_array(
            name,
            shape=(n_frames, *frame_shape),
            chunks=(chunk_frames, *frame_shape),
            shards=(shard_frames, *frame_shape),
            dtype=dtype,
            compressors=compressors(compression, np.dtype(dtype).itemsize),
            fill_value=0,
            attributes=to_json(attrs or {}),
            dimension_names=dimension_names,
            config={"write_empty_chunks": True},  # every shard exists: a missing one is detectable
        )
        digest = ContentDigest()
        # chunks encoded here, as Zarr would write them (store/direct.py), else shards by Zarr
        encoder = ShardEncoder.of(array)
        shard_values = None if encoder is not None else np.empty((shard_frames, *frame_shape), dtype=dtype)
        threads = max(1, min(os.cpu_count() or 1, shard_chunks))
        with ThreadPoolExecutor(threads) as coders, ThreadPoolExecutor(1) as files:
            busy: deque = deque()  # encodes of the chunks whose frames may still be read
            encoded: list = []  # this shard's chunk encodes
            writes: deque = deque()
            for start in range(0, n_frames, chunk_frames):
                stop = min(start + chunk_frames, n_frames)
                while len(busy) >= 2:  # the block function reuses the frames of the call before last
                    busy.popleft().result()
                values = np.ascontiguousarray(np.asarray(block(start, stop), dtype=dtype))
                if values.shape != (stop - start, *frame_shape):
                    raise ValueError(f"{name}: block [{start}, {stop}) has shape {values.shape}")
                digest.update(values)  # XXH3: about 0.04 s per GB
                first = start - start % shard_frames
                if encoder is not None:
                    encoded.append(coders.submit(encoder.chunk, values))
                    busy.append(encoded[-1])
                else:  # copied here: nothing reads the frames later
                    shard_values[start - first:stop - first] = values
                if stop - first < shard_frames and stop < n_frames:
                    continue
                if encoder is None:
                    array[first:stop] = shard_values[:stop - first]
                    continue
                key = f"{self.staging}/{name}/{encoder.key(first // shard_frames)}"
                writes.append(files.submit(self._write_shard, key, encoder, encoded))
                encoded = []
                while len(writes) > 1:  # at most one finished shard waits for its file
                    writes.popleft().result()
                self._heartbeat()
            for job in [*busy, *writes]:
                job.result()
        self._written(name, digest.value())
        return array

    def _write_shard(self, key: str, encoder: ShardEncoder, chunks: list) -> None:
        """Write one shard file from its chunks' encodes (futures), atomically."""
        self.store.write_bytes(key, encoder.pieces([job.result() for job in chunks]))

    def _heartbeat(self) -> None:
        if time.monotonic() - self._last_beat > 60:
            self.store.refresh_claim(self.run_id)
            self._last_beat = time.monotonic()

    def _written(self, name: str, checksum: str) -> None:
        self.outputs.append(name)
        self.checksums[name] = checksum

    def write_array(
        self,
        name: str,
        values: np.ndarray,
        compression: dict[str, Any],
        attrs: dict[str, Any] | None = None,
        dimension_names: tuple[str, ...] | None = None,
        listed: bool = True,
    ) -> zarr.Array:
        """Write a small array whole, as one chunk (masks, normalization maps); ``listed=False``:
        not an output (coordinate arrays, derived from the attributes: no ``outputs`` entry or checksum)."""
        values = np.asarray(values)
        array = self.group.create_array(
            name,
            shape=values.shape,
            chunks=values.shape if values.size else (1,) * values.ndim,
            dtype=values.dtype,
            compressors=compressors(compression, values.dtype.itemsize),
            fill_value=np.zeros((), dtype=values.dtype).item(),
            attributes=to_json(attrs or {}),
            dimension_names=dimension_names,
            config={"write_empty_chunks": True},
        )
        array[...] = values
        if listed:
            self._written(name, content_digest([values]))
        return array

    def commit(self, attrs: dict[str, Any]) -> None:
        """Validate the run attributes, name the arrays' dimensions and add their xarray
        coordinates (:meth:`_label`), write the attributes with their SHA-256 (``attrs_sha256``,
        :func:`~fmri_data.store.layout.attrs_digest`), and move the run into ``runs/``.

        Raises:
            StoreError: the attributes break run.schema.json (the staging group is removed).
        """
        attrs = to_json({**attrs, "status": "complete", "outputs": list(self.outputs), "checksums": dict(self.checksums)})
        attrs[ATTRS_CHECKSUM] = attrs_digest(attrs)
        try:
            validate(attrs, "run", f"{self.store.url}/{RUNS}/{self.run_id}")
        except StoreError:
            self.abort()
            raise
        self._label(attrs)
        self.group.attrs.put(attrs)
        self.store.remove_run(self.run_id)
        self._move_into_place()

    def _label(self, attrs: dict[str, Any]) -> None:
        """Name every array's dimensions the xarray way and add coordinate arrays of those
        dimensions from the run attributes (:mod:`fmri_data.store.export`), so that
        ``xarray.open_zarr(store, group="runs/<run_id>")`` gives labelled dimensions."""
        arrays = {p: a for p, a in self.group.members(max_depth=None) if isinstance(a, zarr.Array)}
        rois = [p[4:] for p in arrays if p.startswith("roi/")]
        dims = {}
        for path, array in arrays.items():
            names = array_dimensions(path, array.ndim, rois) or tuple(array.metadata.dimension_names or ())
            if names and names != tuple(array.metadata.dimension_names or ()):  # staging: not yet visible
                key = f"{self.store.path}/{self.staging}/{path}/zarr.json"
                meta = json.loads(self.store.fs.cat_file(key))
                self.store.fs.pipe_file(key, json.dumps({**meta, "dimension_names": list(names)}, indent=2).encode())
            dims[path] = names
        compression = self.store.recipe["store"]["compression"]
        coordinates = run_coordinates(attrs, dims, {p: dict(a.attrs) for p, a in arrays.items()})
        for path, coord in coordinates.items():
            if path not in arrays:
                self.write_array(path, coord.values, compression, coord.attrs, coord.dims, listed=False)

    def _move_into_place(self) -> None:
        """Local disk: one directory rename (atomic). Object stores: copy every object, the
        run group's ``zarr.json`` (which says ``status: complete``) last, then delete the staging
        objects; a reader never sees a complete-looking run with missing arrays."""
        fs, base = self.store.fs, self.store.path
        source, target = f"{base}/{self.staging}", f"{base}/{RUNS}/{self.run_id}"
        if is_local(fs):
            fs.makedirs(f"{base}/{RUNS}", exist_ok=True)
            os.replace(source, target)
            return
        files = sorted(fs.find(source))
        head = f"{source}/zarr.json"
        body = [f for f in files if f != head]
        if body:
            fs.copy(body, [target + f[len(source):] for f in body])
        fs.copy(head, f"{target}/zarr.json")
        fs.rm(source, recursive=True)

    def abort(self) -> None:
        """Remove the staging group (nothing under ``runs/`` is touched)."""
        path = f"{self.store.path}/{self.staging}"
        if self.store.fs.exists(path):
            self.store.fs.rm(path, recursive=True)

