"""One run: sources -> every output of the recipe -> one atomic commit."""

from __future__ import annotations

import errno
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..discover import RunSpec, Source
from ..errors import FmriDataError, one_line
from ..config.recipe import Recipe, recipe_hash
from ..read.remote import local_copies
from ..resample.temporal import output_times
from ..store.root import Store
from ..store.layout import now, software_versions
from .context import RunInputs
from .outputs import OUTPUT_KINDS
from .outputs.base import build_outputs

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Outcome of one run: ``complete``, ``exists`` (already in the store), ``claimed`` (another
    converter holds it), ``failed`` or ``skipped``."""

    run_id: str
    status: str
    entities: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    tr_s: float | None = None
    n_frames: int | None = None
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        return asdict(self)


def _no_output_reason(spec: RunSpec, recipe: Recipe) -> str:
    kinds = sorted({f"{s.kind} ({s.space})" for s in spec.sources()})
    return f"no output of recipe '{recipe['name']}' applies to this run's sources: {', '.join(kinds)}"


def _localized(spec: RunSpec, mapping: dict[str, str]) -> RunSpec:
    """A copy of ``spec`` whose file paths point at local copies."""

    def source(src: Source | None) -> Source | None:
        return None if src is None else replace(src, path=mapping.get(src.path, src.path))

    out = replace(spec)
    out.volume = source(spec.volume)
    out.cifti_dense = source(spec.cifti_dense)
    out.surface = {h: source(s) for h, s in spec.surface.items()} if spec.surface else None
    out.parcellated = [source(s) for s in spec.parcellated]
    for name in ("mask", "confounds", "events"):
        value = getattr(spec, name)
        setattr(out, name, mapping.get(value, value) if value else None)
    return out


def _file_paths(spec: RunSpec) -> list[str]:
    return [s.path for s in spec.sources()] + [p for p in (spec.mask, spec.confounds, spec.events) if p]


def _build(run: RunInputs) -> dict[str, Any] | None:
    """Write every output the recipe asks for (:data:`~.outputs.OUTPUT_KINDS`, in order) and
    return the run attributes; None when none applies to this run."""
    attrs = build_outputs(run, OUTPUT_KINDS)
    if attrs is None:
        return None
    spec = run.spec
    temporal = run.recipe["temporal"]
    if "n_frames_source" in attrs:  # the run has time series (not only tables)
        resampled = not math.isclose(attrs["tr_s"], attrs["source_tr_s"], rel_tol=1e-9)
        times = (output_times(attrs["n_frames_source"], attrs["source_tr_s"], attrs["tr_s"], temporal["grid"])
                 if resampled else np.arange(attrs["n_frames"]) * attrs["source_tr_s"])
        attrs["temporal"] = {"grid": temporal["grid"], "interpolation": temporal["interpolation"],
                             "antialias": temporal["antialias"],
                             "frame_times_s": [round(float(v), 6) for v in times[: attrs["n_frames"]]]}
    attrs.update(
        run_id=spec.run_id,
        entities=spec.entities,
        sources=run.finished_sources(),
        participant=spec.participant,
        metadata=spec.metadata,
        recipe_hash=run.recipe_hash,
        software=software_versions(),
        created=now(),
        warnings=run.warnings,
    )
    return attrs


def convert_run(
    spec: RunSpec,
    recipe: Recipe,
    store_url: str,
    *,
    atlas_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
    input_options: dict[str, Any] | None = None,
) -> RunResult:
    """Convert one run into the store. Never raises for bad input: returns a failed result.

    The run is first claimed in the store (so that converters running at the same time
    never write the same run), its remote files are fetched into a private temporary
    folder, every output is written into a staging group, and the group is committed
    atomically.

    Args:
        spec: the run, from :func:`fmri_data.discover.discover`.
        recipe: resolved recipe.
        store_url: an existing store (see :meth:`Store.create`).
        atlas_dir: folder of atlas files.
        storage_options: fsspec options of the store.
        input_options: fsspec options of remote input files.

    Returns:
        :class:`RunResult` with status ``complete``, ``exists`` (finished by another
        converter meanwhile), ``claimed`` (being converted by another converter),
        ``skipped`` (no output applies) or ``failed`` (``error`` names the file and cause).
    """
    started = time.perf_counter()
    result = RunResult(spec.run_id, "failed", entities=dict(spec.entities))
    if spec.error:
        result.error = spec.error
        return result
    warnings: list[str] = list(spec.notes)  # the run's log, kept past a failure
    writer = None
    store = None
    mapping: dict[str, str] = {}
    try:
        store = Store.open(store_url, storage_options)
        if not store.claim(spec.run_id):
            result.status = "claimed"
            return result
        if store.is_complete(spec.run_id):
            result.status = "exists"
            return result
        store.clear_staging(spec.run_id)
        with local_copies(_file_paths(spec), input_options) as mapping:
            writer = store.begin_run(spec.run_id)
            run = RunInputs(
                _localized(spec, mapping), recipe, recipe_hash(recipe), atlas_dir, writer,
                origin={local: original for original, local in mapping.items()}, warnings=warnings,
            )
            attrs = _build(run)
            if attrs is None:
                result.status, result.error = "skipped", _no_output_reason(spec, recipe)
                return result
            writer.commit(attrs)
        result.status = "complete"
        result.tr_s, result.n_frames = attrs["tr_s"], attrs["n_frames"]
        result.outputs = list(writer.outputs)
    except FmriDataError as exc:
        result.error = _with_origins(str(exc), mapping)
    except MemoryError:
        result.error = f"{spec.primary.path}: out of memory while converting"
    except OSError as exc:  # the store or an input cannot be read or written (disk full, read-only, ...)
        result.error = _with_origins(_os_error(exc, spec, store_url), mapping)
    except Exception as exc:  # a storage backend's own error, a bug or an unforeseen file defect: keep converting others
        log.debug("unexpected error converting %s", spec.run_id, exc_info=True)  # --verbose shows it
        result.error = _with_origins(_backend_error(exc, spec, store_url), mapping)
    finally:
        if writer is not None and result.status != "complete":
            try:
                writer.abort()
            except Exception:  # best effort: a staged run is redone by the next conversion
                pass
        if store is not None and result.status != "claimed":
            try:
                store.release(spec.run_id)
            except Exception as exc:  # e.g. the object store went away: the claim expires by itself
                warnings.append(f"claim not released ({type(exc).__name__}: {exc}); it expires after its timeout")
        result.warnings = [_with_origins(w, mapping) for w in warnings]
        result.error = one_line(result.error) if result.error else None
        result.seconds = time.perf_counter() - started
    return result


def _os_error(exc: OSError, spec: RunSpec, store_url: str) -> str:
    """One line for an operating-system error: the store's when the failing path is in the
    store (or the cause is a full disk / read-only filesystem), else the input's."""
    path = str(exc.filename or "")
    cause = exc.strerror or str(exc)
    store_side = exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) or (path and path.startswith(store_url.removeprefix("file://")))
    if store_side:
        return f"{store_url}: cannot write the store ({cause}{': ' + path if path else ''})"
    return f"{path or spec.primary.path}: {cause}"


#: modules whose exceptions are a storage backend failing (object storage, HTTP, Zarr)
BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "fsspec", "zarr", "google")


def _backend_error(exc: Exception, spec: RunSpec, store_url: str) -> str:
    """One line for an exception that is not fmri-data's own: a storage backend's error
    names the store or the input, whichever is remote (both when both are); anything else
    is reported as unexpected, against the run's source file."""
    what = f"{type(exc).__name__}: {exc}"
    if type(exc).__module__.split(".")[0] not in BACKEND_MODULES:
        return f"{spec.primary.path}: unexpected {what}"
    remote_store = "://" in store_url and not store_url.startswith("file://")
    remote_input = "://" in spec.primary.path
    if remote_store and not remote_input or type(exc).__module__.startswith("zarr"):
        return f"{store_url}: store unavailable ({what})"
    if remote_input and not remote_store:
        return f"{spec.primary.path}: input unavailable ({what})"
    return f"{spec.primary.path} -> {store_url}: storage unavailable ({what})"


def _with_origins(text: str, mapping: dict[str, str]) -> str:
    """Replace temporary local copies in a message by the URLs they were fetched from."""
    for original, local in mapping.items():
        if local != original:
            text = text.replace(local, original)
    return text
