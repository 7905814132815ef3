"""The store in the terms of other tools: xarray dimension names and coordinates, an xarray
``DataTree`` of the runs, and a run written back as NIfTI, CIFTI or TSV.

* **Dimension names** (Zarr v3 ``dimension_names``, :func:`array_dimensions`) and
  **coordinate arrays** (:func:`run_coordinates`) are written into every run at its commit
  (:meth:`fmri_data.store.writer.RunWriter.commit`), so ``xarray.open_zarr(store,
  group="runs/<run_id>")`` gives labelled dimensions: ``time`` in seconds (the run's
  ``temporal.frame_times_s``), ``x``/``y``/``z`` in mm (the world coordinate of each voxel
  index along each axis of the stored affine), ``parcel`` labels (the atlas order of
  ``roi/<key>``), ``confound`` column names at ``time_source`` (the source frames).
* :func:`open_datatree`: the complete runs as one ``xarray.DataTree``, without the store's
  bookkeeping (``index.parquet``, ``qa.parquet``, ``_claims/``, ``_staging/``, ``stats/``).
* :func:`export_run`: ``bold`` (or a mask) as a 4D (3D) NIfTI-1 with the stored affine and the
  TR in ``pixdim[4]``; ``roi/<key>`` or ``confounds`` as a TSV whose header is the parcel
  labels (column names); a parcel series read from a CIFTI-2 ``.ptseries.nii`` back as a
  ``.ptseries.nii`` with the source's parcel axis. Written to a temporary file renamed into
  place; an existing file is never replaced unless asked.

xarray is imported only by :func:`open_datatree` (it is not a core dependency).
"""

from __future__ import annotations

import gzip
import os
import posixpath
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ..errors import SettingError, StoreError
from ..imports import load_module
from ..read.common import file_sha256
from .layout import RUNS, SALIENCY

if TYPE_CHECKING:  # pragma: no cover
    import xarray

#: ``--to`` formats of :func:`export_run`.
FORMATS = ("nifti", "cifti", "tsv")

# Dimension names by array path inside a run (``None``: keep the name given at write time).
_FIXED: dict[str, tuple[str, ...]] = {
    "bold": ("time", "x", "y", "z"),
    "brain_mask": ("x", "y", "z"),
    "flat": ("time", "row", "col"),
    "flat_mask": ("row", "col"),
    "confounds": ("time_source", "confound"),
}


def parcel_dimension(key: str, roi_keys: Sequence[str]) -> str:
    """The parcel dimension of ``roi/<key>``: ``"parcel"`` when the run has one ROI array,
    ``"parcel_<key>"`` when it has several (xarray needs one size per dimension name)."""
    return "parcel" if len(roi_keys) <= 1 else f"parcel_{key}"


def array_dimensions(path: str, ndim: int, roi_keys: Sequence[str]) -> tuple[str, ...] | None:
    """xarray dimension names of the run array ``path``.

    Args:
        path: array path inside the run (``"bold"``, ``"roi/schaefer400_7n"``,
            ``"saliency/dvars/topk"``).
        ndim: number of dimensions of the array.
        roi_keys: the run's ``roi/`` array keys (decides :func:`parcel_dimension`).

    Returns:
        ``bold`` (time, x, y, z) in stored voxel order (RAS+, or LAS when
        ``volume.orientation`` says so: the names follow the stored axes, the ``x``
        coordinate then decreases); ``brain_mask``/``norm_*`` (x, y, z); ``flat`` (time,
        row, col); ``flat_mask`` (row, col); ``confounds`` (time_source, confound) at the
        source TR; ``roi/<key>`` (time, parcel); ``saliency/<scorer>/topk`` (rank,), the
        other saliency arrays (window,). None for any other path, or when ``ndim`` does not
        match (the name given at write time is kept).
    """
    if path.startswith("roi/"):
        names: tuple[str, ...] | None = ("time", parcel_dimension(path[4:], roi_keys))
    elif path.startswith("norm_"):
        names = _FIXED["brain_mask"]
    elif path.startswith(f"{SALIENCY}/") and path.count("/") == 2:
        names = ("rank",) if path.endswith("/topk") else ("window",)
    else:
        names = _FIXED.get(path)
    return names if names is not None and len(names) == ndim else None


@dataclass(frozen=True)
class Coordinate:
    """One xarray coordinate array: ``values`` along the dimensions ``dims``, with ``attrs``
    (``units``, ``long_name``)."""

    values: np.ndarray
    dims: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


def frame_times(attrs: Mapping[str, Any]) -> np.ndarray:
    """``(n_frames,)`` float64: time of each stored frame in seconds from the first source
    frame: the run attribute ``temporal.frame_times_s`` when present, else ``j * tr_s``.

    Raises:
        KeyError: the attributes have neither ``temporal.frame_times_s`` nor ``n_frames`` and ``tr_s``.
    """
    times = (attrs.get("temporal") or {}).get("frame_times_s")
    if times is not None:
        return np.asarray(times, dtype=np.float64)
    return np.arange(int(attrs["n_frames"]), dtype=np.float64) * float(attrs["tr_s"])


def axis_coordinates(affine: Sequence[Sequence[float]], shape: Sequence[int]) -> dict[str, np.ndarray] | None:
    """World coordinates (mm) of the voxel indices along each axis of an axis-aligned grid.

    Args:
        affine: 4x4 stored voxel index -> world (mm) affine.
        shape: ``(X, Y, Z)``.

    Returns:
        ``{"x": (X,), "y": (Y,), "z": (Z,)}`` float64, ``affine[a, a] * i + affine[a, 3]``;
        None when the 3x3 part is not diagonal (a rotated or permuted grid has no per-axis
        world coordinate).
    """
    a = np.asarray(affine, dtype=np.float64)
    linear = a[:3, :3]
    if np.any(linear[~np.eye(3, dtype=bool)] != 0) or np.any(np.diag(linear) == 0):
        return None
    return {name: a[axis, axis] * np.arange(int(n), dtype=np.float64) + a[axis, 3]
            for axis, (name, n) in enumerate(zip("xyz", shape))}


def run_coordinates(
    attrs: Mapping[str, Any], dims: Mapping[str, tuple[str, ...]], array_attrs: Mapping[str, Mapping[str, Any]]
) -> dict[str, Coordinate]:
    """Coordinate arrays of a run's dimensions, from its attributes.

    Args:
        attrs: the run attributes (``n_frames``, ``tr_s``, ``temporal``, ``source_tr_s``,
            ``n_frames_source``, ``volume.affine``/``shape``).
        dims: ``{array path inside the run: dimension names}`` of the run's arrays.
        array_attrs: ``{array path: attributes}`` (``roi/<key>``: ``labels``;
            ``confounds``: ``columns``).

    Returns:
        ``{path: Coordinate}``: ``time`` (T,) float64 s (:func:`frame_times`), and
        ``roi/time`` too when the run has ROI arrays (xarray opens one group at a time);
        ``time_source`` (T_source,) float64 s, ``k * source_tr_s``; ``x``, ``y``, ``z``
        float64 mm (:func:`axis_coordinates` of ``volume.affine``); ``confound`` (C,) str;
        ``roi/<parcel dimension>`` (R,) str, the labels in stored order. Only dimensions
        some array uses, and only values whose length matches the array.
    """
    used: dict[str, set[str]] = {}  # group ("" or "roi") -> dimension names its arrays use
    for path, names in dims.items():
        used.setdefault(path.rsplit("/", 1)[0] if "/" in path else "", set()).update(names)
    out: dict[str, Coordinate] = {}

    def add(group: str, name: str, values: np.ndarray, attrs_: dict[str, Any]) -> None:
        if name in used.get(group, set()):
            out[f"{group}/{name}" if group else name] = Coordinate(values, (name,), attrs_)

    if "n_frames" in attrs and "tr_s" in attrs:
        times = frame_times(attrs)
        time_attrs = {"units": "s", "long_name": "time of each stored frame from the first source frame"}
        for group in ("", "roi"):
            add(group, "time", times, time_attrs)
    if "n_frames_source" in attrs and "source_tr_s" in attrs:
        add("", "time_source", np.arange(int(attrs["n_frames_source"]), dtype=np.float64) * float(attrs["source_tr_s"]),
            {"units": "s", "long_name": "time of each source frame from the first one"})
    volume = attrs.get("volume")
    if volume:
        axes = axis_coordinates(volume["affine"], volume["shape"])
        for name, values in (axes or {}).items():
            add("", name, values, {"units": "mm", "long_name": f"{volume['space']} {name} (world coordinate of the voxel)"})
    columns = (array_attrs.get("confounds") or {}).get("columns")
    if columns is not None:
        add("", "confound", _strings(columns), {"long_name": "confound column"})
    for path, names in dims.items():
        labels = (array_attrs.get(path) or {}).get("labels")
        if path.startswith("roi/") and labels is not None and len(names) == 2:
            add("roi", names[1], _strings(labels), {"long_name": f"parcel label of {path} (stored order)"})
    return out


def _strings(values: Sequence[Any]) -> np.ndarray:
    """Variable-length UTF-8 strings (Zarr v3 ``string``; numpy ``StringDType``)."""
    return np.asarray([str(v) for v in values], dtype=np.dtypes.StringDType())


# ---------------------------------------------------------------------------- xarray
def open_datatree(url: str, storage_options: dict[str, Any] | None = None) -> xarray.DataTree:
    """The store's complete runs as one ``xarray.DataTree``, lazily.

    ``xarray.open_datatree(url, engine="zarr")`` on a store also walks its bookkeeping
    (``index.parquet``, ``qa.parquet`` and ``_claims/`` each warn that they are "not
    recognized", ``_staging/`` shows runs still being written); this opens the root
    attributes (``/``) and each complete run ``/runs/<run_id>`` with its subgroups
    (``roi``, ``saliency/<scorer>``) only.

    Returns:
        ``DataTree``: root attributes = the store's (recipe, schema_version, ...); node
        ``/runs/<run_id>`` = the run's arrays with dimension names and coordinates
        (:func:`array_dimensions`, :func:`run_coordinates`) and its attributes.

    Raises:
        StoreError: not an fmri-data store.
        ImportError: xarray is not installed (``pip install xarray``).
    """
    xr = load_module("xarray")

    from .root import Store

    store = Store.open(url, storage_options)
    groups: dict[str, xr.Dataset] = {"/": xr.Dataset(attrs=store.attrs)}
    for run_id in store.run_ids():
        found = xr.open_groups(store.zarr_store, engine="zarr", group=f"{RUNS}/{run_id}", consolidated=False)
        for path, dataset in found.items():  # path relative to the run: ".", "roi", "saliency/dvars"
            groups[posixpath.normpath(f"/{RUNS}/{run_id}/{path}")] = dataset
    return xr.DataTree.from_dict(groups)


# ---------------------------------------------------------------------------- export
def default_output(run_id: str, array: str, to: str) -> str:
    """``<run_id>_<array with / as ->`` + ``.nii.gz`` | ``.ptseries.nii`` | ``.tsv``."""
    suffix = {"nifti": ".nii.gz", "cifti": ".ptseries.nii", "tsv": ".tsv"}[to]
    return f"{run_id}_{array.replace('/', '-')}{suffix}"


def export_run(
    url: str,
    run_id: str,
    to: str,
    *,
    array: str | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write one array of a run back as a file other tools read (FSLeyes, Connectome
    Workbench, pandas).

    Args:
        url: the store.
        run_id: a complete run.
        to: ``"nifti"``: ``bold`` (T, X, Y, Z) -> NIfTI-1 (X, Y, Z, T) float32 (stored values:
            float16 widens exactly), affine = the run's ``volume.affine`` (stored voxel order,
            mm) as sform and qform (code 4, MNI152, when the source was in the template space;
            2, aligned, when resampled by world coordinates), ``xyzt_units`` mm and s,
            ``pixdim[4]`` = ``tr_s``, ``toffset`` = the first frame time; a 3D array
            (``brain_mask`` as uint8, ``norm_*``) as a 3D image. ``"tsv"``: ``roi/<key>``
            (header = parcel labels in stored order) or ``confounds`` (header = its
            columns), one row per frame, tab-separated. ``"cifti"``: ``roi/<key>`` read from a
            parcellated CIFTI-2 source -> ``.ptseries.nii`` with that source's parcel axis
            (the file must still exist with the SHA-256 recorded at conversion) and a series
            axis of ``tr_s`` seconds.
        array: the array (default: ``bold`` for nifti; for tsv and cifti the run's only
            suitable ``roi/`` array).
        out: output file (default :func:`default_output`, in the working directory; a
            ``.gz`` NIfTI name is gzip-compressed).
        overwrite: replace an existing ``out``.
        storage_options: fsspec options of the store.

    Returns:
        The path written. It is written to a hidden temporary file in the same folder and
        renamed into place (created exclusively unless ``overwrite``).

    Raises:
        StoreError: no complete run ``run_id``; ``out`` exists and not ``overwrite``.
        SettingError: unknown ``to``; an array the run does not have or that this format
            cannot hold (one line naming the run, the array and why).
    """
    from .root import Store

    if to not in FORMATS:
        raise SettingError(f"--to {to!r}: expected one of {', '.join(FORMATS)}")
    store = Store.open(url, storage_options)
    attrs = store.run_attrs(run_id)
    group = store.run(run_id)
    outputs = list(attrs["outputs"])
    name = array or _default_array(store.url, run_id, to, outputs, group)
    where = f"{store.url}/{RUNS}/{run_id}"
    if name not in outputs:
        raise SettingError(f"{where}: no array {name!r} (it has {', '.join(outputs)})")
    target = Path(out if out is not None else default_output(run_id, name, to))
    if target.exists() and not overwrite:
        raise StoreError(f"{target}: exists; not overwritten (pass --overwrite)")
    values = group[name]
    if to == "nifti":
        header, blocks = _nifti(where, name, values, attrs)
        gz = target.name.endswith(".gz")
        _atomic(target, overwrite, lambda fh: _write_nifti(fh, header, blocks, gz))
    elif to == "tsv":
        labels = _column_labels(where, name, dict(values.attrs), values.ndim)
        _atomic(target, overwrite, lambda fh: _write_tsv(fh, values, labels))
    else:
        image = _cifti(where, name, values, attrs)
        _atomic(target, overwrite, lambda fh: fh.write(image.to_bytes()))
    return str(target)


def _default_array(url: str, run_id: str, to: str, outputs: list[str], group: Any) -> str:
    if to == "nifti":
        return "bold"
    rois = [o for o in outputs if o.startswith("roi/")]
    if to == "cifti":
        rois = [o for o in rois if group[o].attrs.get("source") == "cifti_parcels"]
    if len(rois) == 1:
        return rois[0]
    what = "parcel series read from a CIFTI .ptseries.nii" if to == "cifti" else "roi/ array"
    if not rois:
        raise SettingError(f"{url}/{RUNS}/{run_id}: no {what} to write as {to}"
                           + (" (CIFTI keeps parcel geometry only for runs converted from a CIFTI parcellated series)"
                              if to == "cifti" else ""))
    raise SettingError(f"{url}/{RUNS}/{run_id}: several {what}s ({', '.join(rois)}); choose one with --array")


def _nifti(where: str, name: str, values: Any, attrs: Mapping[str, Any]):
    """The NIfTI-1 header of ``values`` and its data blocks, each (n, X, Y, Z) or (X, Y, Z)."""
    nib = load_module("nibabel")

    volume = attrs.get("volume")
    if volume is None or values.ndim not in (3, 4) or tuple(values.shape[-3:]) != tuple(volume["shape"]):
        raise SettingError(f"{where}/{name}: not a volume on the run's grid; --to nifti writes bold, brain_mask or norm_*")
    dtype = np.uint8 if values.dtype == np.bool_ else np.float32
    affine = np.asarray(volume["affine"], dtype=np.float64)
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    code = 4 if volume.get("alignment") == "template" and str(volume["space"]).startswith("MNI152") else 2
    header.set_sform(affine, code=code)
    header.set_qform(affine, code=code)
    header.set_xyzt_units("mm", "sec")
    zooms = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    if values.ndim == 4:
        header.set_data_shape((*values.shape[1:], values.shape[0]))
        header.set_zooms((*zooms, float(attrs["tr_s"])))
        header["toffset"] = float(frame_times(attrs)[0])
        step = values.shards[0] if values.shards is not None else values.chunks[0]
        blocks = ((values[start:start + step], dtype) for start in range(0, values.shape[0], step))
    else:
        header.set_data_shape(values.shape)
        header.set_zooms(zooms)
        blocks = iter([(values[...][None], dtype)])
    header["descrip"] = f"fmri-data {name}"[:80].encode()
    return header, blocks


def _write_nifti(fh: IO[bytes], header: Any, blocks, gz: bool) -> None:
    """Header, then each block of frames in NIfTI (Fortran, x fastest) order."""
    stream = gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1, mtime=0) if gz else fh
    header.write_to(stream)  # 348 bytes + the 4-byte "no extension" flag: data at vox_offset 352
    for frames, dtype in blocks:  # (n, X, Y, Z) -> bytes of (Z, Y, X) per frame, frame after frame
        stream.write(np.ascontiguousarray(np.asarray(frames).transpose(0, 3, 2, 1), dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    if gz:
        stream.close()


def _column_labels(where: str, name: str, array_attrs: Mapping[str, Any], ndim: int) -> list[str]:
    labels = array_attrs.get("labels") if name.startswith("roi/") else array_attrs.get("columns")
    if ndim != 2 or labels is None:
        raise SettingError(f"{where}/{name}: not a (time, column) table; --to tsv writes roi/<atlas> or confounds")
    return [str(v) for v in labels]


def _write_tsv(fh: IO[bytes], values: Any, labels: list[str]) -> None:
    pd = load_module("pandas")

    frame = pd.DataFrame(np.asarray(values[...]), columns=labels)
    fh.write(frame.to_csv(sep="\t", index=False, lineterminator="\n").encode("utf-8"))


def _cifti(where: str, name: str, values: Any, attrs: Mapping[str, Any]):
    """A ``.ptseries.nii`` image of ``roi/<key>`` with the parcel axis of its CIFTI source."""
    nib = load_module("nibabel")

    array_attrs = dict(values.attrs)
    if array_attrs.get("source") != "cifti_parcels":
        raise SettingError(f"{where}/{name}: not read from a CIFTI parcellated series (source "
                           f"{array_attrs.get('source', 'unknown')}); --to cifti keeps parcel geometry only for those")
    source = next((s for s in attrs["sources"] if s["kind"] == "cifti_parcels"
                   and s["path"] == (array_attrs.get("atlas") or {}).get("file", s["path"])), None)
    if source is None or not Path(source["path"]).is_file():
        path = source["path"] if source else (array_attrs.get("atlas") or {}).get("file", "?")
        raise SettingError(f"{path}: CIFTI source of {where}/{name} not found; --to cifti copies its parcel axis")
    if file_sha256(source["path"]) != source["sha256"]:
        raise SettingError(f"{source['path']}: changed since the conversion (SHA-256 differs); its parcel axis "
                           f"may not match {where}/{name}")
    parcels = nib.load(source["path"]).header.get_axis(1)
    if list(parcels.name) != [str(v) for v in array_attrs["labels"]]:
        raise SettingError(f"{source['path']}: parcel names differ from the labels of {where}/{name}")
    times = frame_times(attrs)
    series = nib.cifti2.SeriesAxis(start=float(times[0]), step=float(attrs["tr_s"]), size=values.shape[0], unit="SECOND")
    image = nib.Cifti2Image(np.asarray(values[...], dtype=np.float32), header=(series, parcels))
    image.nifti_header.set_intent("ConnParcelSries")  # nibabel writes "ConnUnknown" unless told
    return image


def _atomic(target: Path, overwrite: bool, write: Callable[[IO[bytes]], None]) -> None:
    """``write(fh)`` into a hidden temporary file beside ``target``, then rename it into place
    (``os.replace`` when ``overwrite``, else a hard link that fails if ``target`` appeared
    meanwhile). The temporary file is removed whatever happens.

    Raises:
        StoreError: ``target`` exists and not ``overwrite``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # atomic create-if-absent
            except FileExistsError:
                raise StoreError(f"{target}: exists; not overwritten (pass --overwrite)") from None
            except OSError:  # a filesystem without hard links
                if target.exists():
                    raise StoreError(f"{target}: exists; not overwritten (pass --overwrite)") from None
                os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
