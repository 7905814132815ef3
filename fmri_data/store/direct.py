"""Shard files written and read directly: a run of frames decoded straight into a caller's
array, and a time shard encoded as Zarr's sharding codec encodes it (:class:`ShardEncoder`).

The store writes every time series as a Zarr v3 array sharded along time only: shards of
``shard_chunks`` chunks of ``chunk_frames`` whole frames, each chunk ``bytes`` (little
endian) -> Blosc -> CRC-32C, the shard index (``(offset, nbytes)`` uint64 pairs, then its
CRC-32C) at the end of the shard file (Zarr v3 sharding codec, ``index_location: end``).
For that layout this module reads the chunk's bytes with one ranged read, checks its
CRC-32C and has Blosc decompress it directly into the output window; Zarr's own path
decompresses into a freshly allocated buffer and copies it into the output, which costs
more than the decompression itself (a 20-frame 96^3 float16 BOLD chunk of ds-real, Blosc
lz4hc 5: 42 ms of CPU through ``zarr.Array.get_basic_selection(out=...)``, 12 ms here).
Anything else (another codec chain, another sharding layout, a big-endian dtype) gives
:func:`direct_layout` ``None`` and the caller reads through Zarr.

Writing goes the same way round (:class:`ShardEncoder`): Zarr's own path fills a fresh
chunk buffer with the fill value and copies each chunk into it before encoding, and copies
each encoded chunk again to append its checksum — about twice the CPU time of the Blosc
encode itself on an HCP-sized run (``benchmarks/bench_convert.py``). The encoder compresses
each chunk in place (the writer runs it in parallel threads) and produces the same bytes as
Zarr (tested against Zarr's own writes).

Threads: each chunk is decompressed by one thread (Zarr sets ``numcodecs.blosc.use_threads
= False``, so numcodecs uses Blosc's contextual, single-threaded call, which releases the
GIL). Parallelism comes from the loader instead: ``prefetch`` read-ahead threads per
process, times the DataLoader workers, each decoding a different window. Blosc's internal
threads are left off on purpose: on top of those they would only oversubscribe the cores,
and enabling them switches numcodecs to Blosc's global, lock-serialised context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numcodecs.blosc
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

EMPTY = 2**64 - 1  # offset and nbytes of a chunk that was never written (all fill value)


@dataclass(frozen=True)
class DirectLayout:
    """What :func:`read_frames` needs to know about one array.

    ``chunk_frames``/``shard_frames``: frames per chunk and per shard; ``chunk_shape``:
    the full shape of a decoded chunk, ``(chunk_frames, *frame_shape)``; ``dtype``;
    ``fill_value``; ``n_frames``; ``chunks_per_shard``.
    """

    chunk_frames: int
    shard_frames: int
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: Any
    n_frames: int

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_frames // self.chunk_frames


def direct_layout(array) -> DirectLayout | None:
    """The layout of a Zarr v3 array if :func:`read_frames` can decode it, else None.

    Accepted: one sharding codec (index at the end, ``bytes`` + CRC-32C index codecs)
    whose chunks are ``bytes`` (little endian or single byte) -> Blosc -> CRC-32C, shards and
    chunks whole frames (only the time axis split).
    """
    codecs = getattr(array.metadata, "codecs", None)
    if not codecs or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner, index = tuple(sharding.codecs), tuple(sharding.index_codecs)
    if [type(c) for c in inner] != [BytesCodec, BloscCodec, Crc32cCodec]:
        return None
    if [type(c) for c in index] != [BytesCodec, Crc32cCodec] or str(getattr(sharding.index_location, "value", "")) != "end":
        return None
    dtype = np.dtype(array.dtype)
    if dtype.itemsize > 1 and (inner[0].endian is None or inner[0].endian.value != "little" or not dtype.isnative):
        return None
    chunks, shards = tuple(sharding.chunk_shape), tuple(array.shards or ())
    shape = tuple(array.shape)
    if len(chunks) != len(shape) or chunks[1:] != shape[1:] or shards[1:] != shape[1:] or shards[0] % chunks[0]:
        return None
    return DirectLayout(int(chunks[0]), int(shards[0]), chunks, dtype, array.metadata.fill_value, int(shape[0]))


def _checked(data: bytes, what: str) -> np.ndarray:
    """``data`` without its trailing CRC-32C; ValueError when the checksum does not match."""
    if len(data) < 4:
        raise ValueError(f"{what}: {len(data)} bytes, too short for its CRC-32C")
    body = np.frombuffer(data, dtype=np.uint8)[:-4]
    if google_crc32c.value(body) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{what}: stored and computed CRC-32C do not match")
    return body


def shard_index(fs, path: str, layout: DirectLayout) -> np.ndarray:
    """The ``(chunks_per_shard, 2)`` uint64 ``(offset, nbytes)`` table at the end of shard ``path``.

    Raises ValueError when the index fails its CRC-32C; FileNotFoundError when absent.
    """
    n = layout.chunks_per_shard
    data = fs.cat_file(path, start=-(16 * n + 4))
    return np.frombuffer(_checked(data, f"{path} (shard index)"), dtype="<u8").reshape(n, 2)


def chunk_spans(index, layout: DirectLayout, start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """``(k, t, offset, nbytes)`` of each chunk holding frames ``[start, stop)``: chunk number
    ``k`` (frames ``[k * chunk_frames, (k + 1) * chunk_frames)``), its time shard ``t`` and its
    byte range in that shard file (both :data:`EMPTY` for a chunk never written).
    ``index(t)`` gives shard ``t``'s table (:func:`shard_index`)."""
    c, per = layout.chunk_frames, layout.chunks_per_shard
    spans = []
    for k in range(start // c, (stop - 1) // c + 1):
        t, j = divmod(k, per)
        offset, nbytes = (int(v) for v in index(t)[j])
        spans.append((k, t, offset, nbytes))
    return spans


def read_frames(fs, shard_path, index, layout: DirectLayout, start: int, stop: int, out: np.ndarray) -> np.ndarray:
    """Decode frames ``[start, stop)`` into ``out`` (C-contiguous, ``(stop - start, *frame_shape)``).

    Args:
        fs: the fsspec filesystem of the store.
        shard_path: ``shard_path(t)`` gives the path of time shard ``t``.
        index: ``index(t)`` gives that shard's ``(offset, nbytes)`` table (:func:`shard_index`).
        layout: from :func:`direct_layout`.
        start, stop: frames, ``0 <= start < stop <= n_frames``.
        out: the destination; chunks that lie wholly inside it are decompressed in place,
            others through one chunk-sized temporary.

    Raises:
        ValueError: a chunk fails its CRC-32C or does not decompress to a whole chunk.
        RuntimeError: Blosc cannot decompress a chunk.
    """
    c = layout.chunk_frames
    scratch = None
    for k, t, offset, nbytes in chunk_spans(index, layout, start, stop):
        a, b = k * c, (k + 1) * c
        lo, hi = max(a, start), min(b, stop)
        dest = out[lo - start:hi - start]
        if offset == EMPTY and nbytes == EMPTY:
            dest[...] = layout.fill_value
            continue
        path = shard_path(t)
        body = _checked(fs.cat_file(path, start=offset, end=offset + nbytes), f"{path} (chunk of frames [{a}, {b}))")
        if lo == a and hi == b:
            numcodecs.blosc.decompress(body, dest)  # in place: the chunk is exactly this slice
        else:
            if scratch is None:
                scratch = np.empty(layout.chunk_shape, layout.dtype)
            numcodecs.blosc.decompress(body, scratch)
            dest[...] = scratch[lo - a:hi - a]
    return out


def will_need(path: str, offset: int, nbytes: int) -> None:
    """Ask the kernel to start reading bytes ``[offset, offset + nbytes)`` of a local file into
    the page cache in the background (``posix_fadvise(POSIX_FADV_WILLNEED)``); a no-op where
    the platform has no ``posix_fadvise``. Raises OSError when the file cannot be opened."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


class ShardEncoder:
    """Encode a time shard of an array of :func:`direct_layout` into the bytes of its shard
    file, exactly as Zarr's sharding codec writes them: each chunk ``bytes`` -> Blosc (the
    array's own Blosc settings) -> CRC-32C, in order, a partial last chunk padded with the
    fill value, chunks wholly past the array's end absent (index entries :data:`EMPTY`),
    then the index and its CRC-32C.

    Use :meth:`of` (None when the array's layout is not the direct one).
    """

    def __init__(self, layout: DirectLayout, blosc: BloscCodec):
        self.layout = layout
        self._blosc = numcodecs.blosc.Blosc(cname=blosc.cname.value, clevel=int(blosc.clevel),
                                            shuffle=_SHUFFLE[blosc.shuffle.value], blocksize=int(blosc.blocksize),
                                            typesize=int(blosc.typesize))

    @classmethod
    def of(cls, array) -> ShardEncoder | None:
        """The encoder of a Zarr v3 array, or None when :func:`direct_layout` refuses it."""
        layout = direct_layout(array)
        if layout is None:
            return None
        return cls(layout, array.metadata.codecs[0].codecs[1])

    def key(self, shard: int) -> str:
        """The shard file's path inside the array (Zarr's default chunk key: ``c/<t>/0/0/0``)."""
        return "/".join(["c", str(int(shard))] + ["0"] * (len(self.layout.chunk_shape) - 1))

    def chunk(self, values: np.ndarray) -> tuple[bytes, bytes]:
        """One chunk's stored bytes and their CRC-32C: ``values`` C-contiguous ``(t, *frame_shape)``
        of the array's dtype, ``t <= chunk_frames`` (fewer only for the array's last chunk:
        padded with the fill value). Thread-safe (Blosc's contextual call, GIL released).

        Raises:
            ValueError: ``values`` has the wrong shape, dtype or layout.
        """
        lay = self.layout
        if values.shape[1:] != lay.chunk_shape[1:] or not 0 < len(values) <= lay.chunk_frames \
                or values.dtype != lay.dtype or not values.flags.c_contiguous:
            raise ValueError(f"a chunk is C-contiguous {lay.dtype} {lay.chunk_shape}, got {values.dtype} {values.shape}")
        if len(values) < lay.chunk_frames:
            padded = np.full(lay.chunk_shape, lay.fill_value, dtype=lay.dtype)
            padded[:len(values)] = values
            values = padded
        data = self._blosc.encode(values)
        return data, _crc(data)

    def pieces(self, chunks: list[tuple[bytes, bytes]]) -> list[bytes]:
        """The shard file as a list of byte strings to write in order: each chunk and its
        checksum (:meth:`chunk`, the shard's chunks in order), then the index and its checksum."""
        index = np.full((self.layout.chunks_per_shard, 2), EMPTY, dtype="<u8")
        offset, out = 0, []
        for k, (data, crc) in enumerate(chunks):
            index[k] = offset, len(data) + len(crc)
            offset += len(data) + len(crc)
            out += [data, crc]
        table = index.tobytes()
        return out + [table + _crc(table)]


_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _crc(data: bytes) -> bytes:
    """The CRC-32C of ``data`` as Zarr's ``crc32c`` codec stores it (little-endian uint32)."""
    return int(google_crc32c.value(data)).to_bytes(4, "little")
