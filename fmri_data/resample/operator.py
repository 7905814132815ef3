"""Sparse operator x dense frames: the one kernel behind spatial, temporal and parcel resampling.

Every resampling step of conversion is linear and fixed over a run, so it is a sparse
matrix ``M`` (CSR, rows = outputs) applied to a dense array ``x`` whose rows are the
inputs and whose columns are independent series:

- spatial interpolation: rows = target voxels (<= 8 non-zeros), ``x = (source voxels, frames)``;
- parcel means: rows = parcels, ``x = (source voxels, frames)``;
- TR resampling: rows = output frames, ``x = (source frames, voxels | vertices | parcels)``.

Backends (``method``):

- ``"numba"``: a CPU kernel compiled with ``parallel=True`` (rows split over threads,
  the inner loop runs over contiguous columns) and ``cache=True`` (compiled once, then
  loaded from numba's on-disk cache by each new process);
- ``"torch"``: ``torch.sparse.mm`` on a CSR tensor (cuSPARSE on CUDA; ``method="auto"``
  uses it when a CUDA device is present and measured faster than numba on this machine,
  :func:`cuda_is_faster`, unless ``device="cpu"``);
- ``"sparse"`` / ``"reference"``: ``scipy.sparse`` ``M @ x``, the reference result.

Columns are processed in chunks of bounded bytes, so a backend never holds more than one
chunk of converted input (and, on a GPU, of input and output) besides the operator.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Callable

# numba's OpenMP threading layer (GNU libgomp, read when numba loads it on the first parallel
# kernel): idle worker threads sleep instead of spinning between kernels, unless the user
# chose otherwise. A conversion runs a kernel per block of frames while a decoding thread
# and the shard encoders need the same cores; spinning took about 1 CPU second from them
# on an HCP-sized run on 2 cores (benchmarks/bench_convert.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from ..errors import SettingError  # noqa: E402
from ..imports import load_module  # noqa: E402

METHODS = ("auto", "numba", "torch", "sparse", "reference")
DEVICES = ("auto", "cpu", "cuda")

#: Bytes of dense input converted (cast, copied or sent to the GPU) at a time.
CHUNK_BYTES = 128 * 2**20

#: Columns per numba call for wide inputs (TR resampling of many voxels): a row of the
#: output chunk stays in cache while the operator's non-zeros of that row are summed.
NUMBA_COLUMNS = 4096


@numba.njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
def _csr_times_dense(indptr, indices, data, x, out):  # pragma: no cover - compiled
    """``out[r, :] = sum_k data[k] * x[indices[k], :]`` over ``k in indptr[r]:indptr[r+1]``.

    Rows are split over threads; ``x`` and ``out`` are C-contiguous so that the inner loop
    runs over contiguous columns (vectorized, fused multiply-add); accumulates in the
    dtype of ``out``.
    """
    n_rows, n_cols = out.shape
    for r in numba.prange(n_rows):
        acc = out[r]
        for c in range(n_cols):
            acc[c] = 0.0
        for k in range(indptr[r], indptr[r + 1]):
            w = data[k]
            row = x[indices[k]]
            for c in range(n_cols):
                acc[c] += w * row[c]


@numba.njit(parallel=True, cache=True, nogil=True)
def _csr_times_rows(indptr, indices, data, x, out):  # pragma: no cover - compiled
    """``out[t, r] = sum_k data[k] * x[t, indices[k]]`` over ``k in indptr[r]:indptr[r+1]``:
    the operator applied to frame rows (``x (C, n_inputs)``, ``out (C, n_outputs)``).

    Frames are split over threads; each output value is a gather of its row's inputs from
    one frame (contiguous in ``x``), summed in float64 and stored in ``out``'s dtype.
    """
    n_frames, n_rows = out.shape
    for t in numba.prange(n_frames):
        frame = x[t]
        target = out[t]
        for r in range(n_rows):
            acc = 0.0
            for k in range(indptr[r], indptr[r + 1]):
                acc += data[k] * frame[indices[k]]
            target[r] = acc


@numba.njit(parallel=True, cache=True, nogil=True)
def _gather_rows(source, x, out):  # pragma: no cover - compiled
    """``out[t, r] = x[t, source[r]] + 0`` (0 where ``source[r] < 0``): :func:`_csr_times_rows`
    for an operator whose rows hold at most one weight, each exactly 1 (a template grid
    that is an integer shift of the source grid: nearest neighbour, or trilinear weights
    at whole-voxel offsets, as fMRIPrep's MNI152NLin6Asym 2 mm runs onto 96^3), value for
    value (``+ 0`` turns -0.0 into +0.0 as that kernel's sum does), about 4x faster."""
    n_frames, n_rows = out.shape
    for t in numba.prange(n_frames):
        frame = x[t]
        target = out[t]
        for r in range(n_rows):
            i = source[r]
            target[r] = frame[i] + 0.0 if i >= 0 else 0.0


def unit_gather(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> np.ndarray | None:
    """The input each output copies, ``(n_outputs,)`` int64 (-1: none), when every row of the
    CSR operator has at most one weight and every weight is exactly 1; else None."""
    counts = np.diff(indptr)
    if counts.size == 0 or counts.max() > 1 or not np.all(data == 1):
        return None
    source = np.full(counts.size, -1, dtype=np.int64)
    one = counts == 1
    source[one] = indices[indptr[:-1][one]]
    return source


_LAYER_LOCK = threading.Lock()
_LAYER = {"threadsafe": False}


def run_numba_parallel(kernel, *args) -> None:
    """Call a numba ``parallel=True`` kernel; serialized while the threading layer is not
    known to be thread-safe.

    Conversion runs several runs in threads. numba picks TBB, then OpenMP, then its own
    ``workqueue`` layer, and ``workqueue`` aborts the process when two threads enter a
    parallel kernel together; so calls hold a lock until the first one has shown which
    layer is in use, and keep holding it when that is ``workqueue``.
    """
    if _LAYER["threadsafe"]:
        kernel(*args)
        return
    with _LAYER_LOCK:
        kernel(*args)
        _LAYER["threadsafe"] = numba.threading_layer() != "workqueue"


def _run_kernel(indptr, indices, data, x, out, kernel=_csr_times_dense) -> None:
    """Run an operator kernel through :func:`run_numba_parallel`."""
    run_numba_parallel(kernel, indptr, indices, data, x, out)


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA device (torch is imported only here).

    On Linux without a GPU driver's device files (``/dev/nvidiactl``, ``/dev/dxg`` of WSL,
    ``/dev/kfd`` of ROCm) and torch not yet imported, False without importing torch (about
    1.5 s of a conversion's start-up).
    """
    if importlib.util.find_spec("torch") is None:
        return False
    if sys.platform == "linux" and "torch" not in sys.modules and not any(
        os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
    ):
        return False
    return bool(load_module("torch").cuda.is_available())


def resolve_backend(method: str = "auto", device: str = "auto") -> tuple[str, str]:
    """Backend and device for a request.

    Args:
        method: ``"auto"`` (torch on CUDA when a CUDA device is present, ``device``
            allows it and :func:`cuda_is_faster` measured it faster than numba on this
            machine; else numba), ``"numba"``, ``"torch"``, ``"sparse"`` or ``"reference"``
            (both scipy).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` accepted).

    Returns:
        ``(backend, device)`` with backend in ``numba | torch | sparse`` and device
        ``cpu`` or a CUDA device name.

    Raises:
        SettingError: unknown method or device, CUDA requested but not available, or a
            CPU-only method asked to run on CUDA.
    """
    if method not in METHODS:
        raise SettingError(f"unknown resampling method {method!r}; use one of {', '.join(METHODS)}")
    if device.split(":")[0] not in DEVICES:
        raise SettingError(f"unknown device {device!r}; use auto, cpu or cuda")
    wants_cuda = device.startswith("cuda")
    if wants_cuda and not cuda_available():
        raise SettingError(f"device {device!r} requested but torch sees no CUDA device")
    if method in ("sparse", "reference", "numba"):
        if wants_cuda:
            raise SettingError(f"method {method!r} runs on the CPU only; use method 'torch' or 'auto' for {device}")
        return ("sparse" if method == "reference" else method), "cpu"
    if method == "auto" and not wants_cuda:
        on_gpu = device == "auto" and cuda_available() and cuda_is_faster()
    else:
        on_gpu = wants_cuda or (device == "auto" and cuda_available())
    if method == "auto" and not on_gpu:
        return "numba", "cpu"
    return "torch", (device if wants_cuda else "cuda") if on_gpu else "cpu"


def fastest(candidates: dict[str, Callable[[], object]], repeats: int = 3) -> str:
    """The key of the candidate whose call is fastest (median of ``repeats`` timed calls,
    after one untimed warm-up call that pays compilation and device start-up)."""
    import time

    timings = {}
    for name, call in candidates.items():
        call()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        timings[name] = sorted(samples)[len(samples) // 2]
    return min(timings, key=timings.get)


@functools.lru_cache(maxsize=1)
def cuda_is_faster() -> bool:
    """Whether torch on the CUDA device applies a spatial-resampling-sized operator
    (110,592 target voxels x 8 weights over 65,536 source voxels, 32 frames, host arrays in
    and out, transfers included) faster than the numba kernel on this machine's cores.

    Measured once per process (about a second) the first time ``method="auto"`` meets a
    CUDA device, because neither wins everywhere: on an H200 with 16 cores, the per-chunk
    synchronous copies made torch-CUDA ten times slower than numba (issue 20).
    """
    import logging

    rng = np.random.default_rng(0)
    rows, cols, frames = 48**3, 2**16, 32
    matrix = sp.csr_matrix(
        (rng.random(rows * 8, dtype=np.float32), rng.integers(0, cols, rows * 8), np.arange(0, rows * 8 + 1, 8)),
        shape=(rows, cols),
    )
    x = rng.standard_normal((cols, frames), dtype=np.float32)
    ops = {"cuda": PreparedOperator(matrix, "torch", "cuda"), "numba": PreparedOperator(matrix, "numba", "cpu")}
    winner = fastest({name: functools.partial(op, x) for name, op in ops.items()})
    logging.getLogger(__name__).info("resampling method 'auto': %s measured faster on this machine", winner)
    return winner == "cuda"


class PreparedOperator:
    """A CSR operator made ready for repeated application by one backend.

    Calling it maps ``x (n_inputs, C)`` (any real dtype; rows = operator columns, columns
    = independent series such as frames or voxels) to ``(n_outputs, C)`` float32.

    Args:
        matrix: ``(n_outputs, n_inputs)`` scipy sparse matrix.
        method, device: see :func:`resolve_backend`.
        dtype: dtype of the weights and of the accumulation (float32 is enough for
            interpolation with <= 8 terms; float64 for long sums such as parcel means).
        chunk_bytes: bytes of input converted (cast, copied) or moved to the device at a
            time; the numba kernel uses a C-contiguous float32 ``x`` of at most
            :data:`NUMBA_COLUMNS` columns in place.
    """

    def __init__(self, matrix: sp.spmatrix, method: str = "auto", device: str = "auto", dtype=np.float32, chunk_bytes: int = CHUNK_BYTES):
        self.backend, self.device = resolve_backend(method, device)
        csr = sp.csr_matrix(matrix)
        csr.sort_indices()
        self.shape = csr.shape
        self.chunk_bytes = int(chunk_bytes)
        self.dtype = np.dtype(dtype)
        if self.backend == "sparse":
            self._matrix = csr.astype(np.float64)
        elif self.backend == "numba":
            self._indptr = csr.indptr.astype(np.int64)
            self._indices = csr.indices.astype(np.int64)
            self._data = csr.data.astype(self.dtype)
            self._gather = unit_gather(self._indptr, self._indices, self._data)
        else:
            self._torch = torch = load_module("torch")
            tdtype = torch.float64 if self.dtype == np.float64 else torch.float32
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                self._matrix = torch.sparse_csr_tensor(
                    torch.from_numpy(csr.indptr.astype(np.int64)),
                    torch.from_numpy(csr.indices.astype(np.int64)),
                    torch.from_numpy(csr.data.astype(self.dtype)),
                    size=csr.shape,
                    dtype=tdtype,
                    device=self.device,
                    check_invariants=False,  # built from a valid scipy CSR
                )

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Apply to ``x (n_inputs, C)``; writes into ``out (n_outputs, C)`` (any layout) if given.

        Raises:
            SettingError: ``x`` or ``out`` has the wrong shape.
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] != self.shape[1]:
            raise SettingError(f"operator takes ({self.shape[1]}, C) input, got {x.shape}")
        if out is None:
            out = np.empty((self.shape[0], x.shape[1]), dtype=np.float32)
        elif out.shape != (self.shape[0], x.shape[1]):
            raise SettingError(f"output must be {(self.shape[0], x.shape[1])}, got {out.shape}")
        if self.backend == "sparse":
            out[...] = self._matrix @ x
            return out
        n_cols = x.shape[1]
        by_bytes = max(1, self.chunk_bytes // max(1, 4 * x.shape[0]))
        if self.backend == "torch":
            step = by_bytes
        elif x.dtype == np.float32 and x.flags.c_contiguous and n_cols <= NUMBA_COLUMNS:
            step = n_cols  # used in place: no copy
        else:
            step = min(NUMBA_COLUMNS, by_bytes)
        for c0 in range(0, n_cols, step):
            chunk = np.ascontiguousarray(x[:, c0 : c0 + step], dtype=np.float32)
            target = out[:, c0 : c0 + step]
            if self.backend == "torch":
                target[...] = self._torch_apply(chunk)
            elif target.flags.c_contiguous and target.dtype == self.dtype:
                _run_kernel(self._indptr, self._indices, self._data, chunk, target)
            else:  # a transposed or strided view, or wider accumulation than float32
                result = np.empty(target.shape, dtype=self.dtype)
                _run_kernel(self._indptr, self._indices, self._data, chunk, result)
                target[...] = result
        return out

    def apply_rows(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Apply to frame rows: ``x (C, n_inputs)`` -> ``(C, n_outputs)`` float32 (into ``out``
        if given, C-contiguous), i.e. ``(M @ x.T).T`` without transposing ``x``: the layout
        in which a NIfTI block is decoded (:meth:`~fmri_data.read.nifti.VolumeSeries.iter_frame_rows`).

        The numba kernel gathers each output value from one frame and sums in float64
        (:func:`_csr_times_rows`; :func:`_gather_rows` when each row copies one input);
        torch and scipy apply ``M`` to ``x.T``.

        Raises:
            SettingError: ``x`` or ``out`` has the wrong shape.
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.shape[1]:
            raise SettingError(f"operator takes (C, {self.shape[1]}) frame rows, got {x.shape}")
        if out is None:
            out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        elif out.shape != (x.shape[0], self.shape[0]):
            raise SettingError(f"output must be {(x.shape[0], self.shape[0])}, got {out.shape}")
        if self.backend != "numba":
            self(x.T, out=out.T)
            return out
        x = np.ascontiguousarray(x, dtype=np.float32)
        target = out if out.flags.c_contiguous and out.dtype in (np.float32, np.float64) else \
            np.empty(out.shape, dtype=np.float32)
        if self._gather is not None:
            run_numba_parallel(_gather_rows, self._gather, x, target)
        else:
            _run_kernel(self._indptr, self._indices, self._data, x, target, _csr_times_rows)
        if target is not out:
            out[...] = target
        return out

    def apply_band(self, rows: tuple[int, int], x: np.ndarray, first_input: int, out: np.ndarray) -> np.ndarray:
        """Operator rows ``[r0, r1)`` applied to a window of its inputs: ``x (n, C)`` holds
        inputs ``[first_input, first_input + n)``, which must cover every non-zero of those
        rows; writes ``(r1 - r0, C)`` into ``out``. The numba kernel of :meth:`__call__`,
        value for value (:func:`_csr_times_dense`): how a banded operator (TR resampling)
        is applied to frames as they stream in (:class:`~fmri_data.resample.temporal.TemporalStream`).

        Raises:
            SettingError: the backend is not numba, ``x``/``out`` are not C-contiguous
                float32 of matching shapes, or the window misses an input of those rows.
        """
        r0, r1 = rows
        if self.backend != "numba":
            raise SettingError(f"apply_band runs on the numba backend, not {self.backend}")
        if not (x.dtype == out.dtype == self.dtype == np.float32 and x.flags.c_contiguous and out.flags.c_contiguous
                and out.shape == (r1 - r0, x.shape[1])):
            raise SettingError(f"apply_band needs C-contiguous float32 x (n, C) and out ({r1 - r0}, C), "
                               f"got {x.dtype} {x.shape} and {out.dtype} {out.shape}")
        lo, hi = self._indptr[r0], self._indptr[r1]
        indices = self._indices[lo:hi] - first_input
        if indices.size and (indices.min() < 0 or indices.max() >= x.shape[0]):
            raise SettingError(f"rows [{r0}, {r1}) need inputs outside [{first_input}, {first_input + x.shape[0]})")
        _run_kernel(self._indptr[r0:r1 + 1] - lo, indices, self._data[lo:hi], x, out)
        return out

    def _torch_apply(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        dense = torch.from_numpy(x).to(device=self.device, dtype=self._matrix.dtype)
        with torch.no_grad():
            result = torch.sparse.mm(self._matrix, dense)
        return result.to(dtype=torch.float32).cpu().numpy()


def permute_columns(matrix: sp.spmatrix, position: np.ndarray) -> sp.csr_matrix:
    """The operator with input ``c`` moved to input ``position[c]`` (``position`` a
    permutation, ``(n_inputs,)`` int): ``permute_columns(M, p) @ y == M @ x`` when
    ``y[p] == x``. Used to apply an operator built on RAS+ voxel order to frames in the
    file's own voxel order (:meth:`~fmri_data.read.nifti.VolumeSeries.frame_order`)."""
    csr = sp.csr_matrix(matrix, copy=True)
    csr.indices = np.asarray(position, dtype=np.int64)[csr.indices].astype(csr.indices.dtype, copy=False)
    csr.has_sorted_indices = False
    csr.sort_indices()
    return csr


def apply_operator(matrix: sp.spmatrix, x: np.ndarray, method: str = "auto", device: str = "auto", dtype=np.float32) -> np.ndarray:
    """``matrix @ x`` as float32 with the chosen backend (see :class:`PreparedOperator`).

    Args:
        matrix: ``(n_outputs, n_inputs)`` scipy sparse matrix.
        x: ``(n_inputs, C)`` dense input.
        method, device: see :func:`resolve_backend`.
        dtype: weight / accumulation dtype.

    Returns:
        ``(n_outputs, C)`` float32.
    """
    return PreparedOperator(matrix, method, device, dtype)(x)
