"""Which window comes when, on which rank and worker: small pure functions on integer arrays.

The order of an epoch is a permutation of the ``N`` windows that depends only on
``(seed, epoch)`` and the index (never on the number of ranks or workers):

1. *shard-aware block shuffle* (the idea of MosaicML streaming's block shuffles): windows
   starting in the same shard of the same run form a block; blocks are permuted, then
   windows are shuffled within groups of ``mix`` consecutive (permuted) blocks, so a
   reader touches about ``mix`` shards at a time instead of one shard per window;
2. the epoch order is cut into *global batches* of ``world_size * batch_size`` windows;
   rank ``r`` takes the ``r``-th slice of ``batch_size`` windows of each global batch (the
   last, partial global batch is split equally), so every rank gets the same count and
   the global order — rank 0's batch, then rank 1's, ... — is the same for any world size
   at the same global batch size;
3. within a rank, batch ``j`` of the remaining windows goes to DataLoader worker
   ``j % num_workers``: PyTorch's DataLoader collects worker batches round-robin, so the
   rank's batches arrive in order, whatever the number of workers.

Equal counts per rank: with ``drop_last=False`` the order is padded to a multiple of the
world size by repeating its first windows (as ``torch.utils.data.DistributedSampler``);
with ``drop_last=True`` it is cut to a multiple.
"""

from __future__ import annotations

import numpy as np


def epoch_order(blocks: np.ndarray, seed: int, epoch: int, *, shuffle: bool = True, mix: int = 4) -> np.ndarray:
    """Window positions of one epoch, in the order they are read.

    Args:
        blocks: ``(N,) int64`` block id of each window (non-decreasing; see
            :meth:`WindowIndex.blocks`).
        seed, epoch: non-negative integers; the permutation depends on these only.
        shuffle: False gives ``arange(N)`` (index order).
        mix: blocks whose windows are shuffled together (>= 1; 1 = one shard at a time).

    Returns:
        ``(N,) int64`` permutation of ``arange(N)``.

    Raises:
        ValueError: negative seed/epoch or ``mix < 1``.
    """
    n = len(blocks)
    if seed < 0 or epoch < 0 or mix < 1:
        raise ValueError(f"seed and epoch must be >= 0 and mix >= 1 (got {seed}, {epoch}, {mix})")
    if not shuffle or n == 0:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    _, block = np.unique(np.asarray(blocks), return_inverse=True)
    n_blocks = int(block.max()) + 1
    place = np.empty(n_blocks, dtype=np.int64)
    place[rng.permutation(n_blocks)] = np.arange(n_blocks)
    group = place[block] // mix
    return np.lexsort((rng.random(n), group)).astype(np.int64)


def rank_positions(n: int, world_size: int, rank: int, batch_size: int, *, drop_last: bool = False) -> np.ndarray:
    """Positions in the epoch order (``[0, n)``) that rank ``rank`` reads, in its order.

    Global batch ``g`` holds positions ``[g*W*b, (g+1)*W*b)`` (``W`` = world size,
    ``b`` = batch size per rank); rank ``r`` takes ``[g*W*b + r*b, g*W*b + (r+1)*b)``; the
    last partial global batch of ``t`` positions gives each rank ``t / W`` consecutive
    positions. Positions ``>= n`` (padding) wrap to the start of the order.

    Returns:
        ``(ceil(n / W),)`` (``floor`` with ``drop_last``) int64 positions.

    Raises:
        ValueError: ``world_size < 1``, ``rank`` outside ``[0, world_size)``, ``batch_size < 1``.
    """
    if world_size < 1 or not 0 <= rank < world_size or batch_size < 1:
        raise ValueError(f"need world_size >= 1, 0 <= rank < world_size, batch_size >= 1 (got {world_size}, {rank}, {batch_size})")
    per_rank = n // world_size if drop_last else -(-n // world_size)
    total = per_rank * world_size
    step = world_size * batch_size
    full = total // step
    head = (np.arange(full)[:, None] * step + rank * batch_size + np.arange(batch_size)[None, :]).ravel()
    tail_each = (total - full * step) // world_size
    tail = full * step + rank * tail_each + np.arange(tail_each)
    positions = np.concatenate([head, tail]).astype(np.int64)
    return positions % n if n else positions


def worker_positions(n: int, batch_size: int, worker: int, num_workers: int) -> np.ndarray:
    """Positions in a rank's remaining sequence (``[0, n)``) that DataLoader worker ``worker`` reads.

    Batch ``j`` (positions ``[j*b, (j+1)*b)``) goes to worker ``j % num_workers``.

    Raises:
        ValueError: ``num_workers < 1``, ``worker`` outside ``[0, num_workers)``, ``batch_size < 1``.
    """
    if num_workers < 1 or not 0 <= worker < num_workers or batch_size < 1:
        raise ValueError(f"need num_workers >= 1, 0 <= worker < num_workers, batch_size >= 1 (got {num_workers}, {worker}, {batch_size})")
    positions = np.arange(n, dtype=np.int64)
    return positions[(positions // batch_size) % num_workers == worker]
