"""One run: sources -> every output of the recipe -> one atomic commit."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..discover import RunSpec
from ..errors import FmriDataError
from ..recipe import Recipe, recipe_hash
from ..store import Store, now, software_versions
from .context import RunContext
from .saliency import saliency_outputs
from .surface import cifti_outputs, gifti_outputs
from .tables import table_outputs
from .volume import volume_outputs

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Outcome of one run: ``complete``, ``exists`` (already in the store), ``failed`` or ``skipped``."""

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


def convert_run(
    spec: RunSpec,
    recipe: Recipe,
    store_url: str,
    *,
    atlas_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> RunResult:
    """Convert one run into the store. Never raises for bad input: returns a failed result.

    Args:
        spec: the run, from :func:`fmri_data.discover.discover`.
        recipe: resolved recipe.
        store_url: an existing store (see :meth:`Store.create`).
        atlas_dir: folder of atlas files.
        storage_options: fsspec options of the store.

    Returns:
        :class:`RunResult` with status ``complete``, ``skipped`` or ``failed``.
    """
    started = time.perf_counter()
    result = RunResult(spec.run_id, "failed", entities=dict(spec.entities))
    if spec.error:
        result.error = spec.error
        return result
    ctx = RunContext(spec, recipe, recipe_hash(recipe), atlas_dir)
    writer = None
    try:
        store = Store.open(store_url, storage_options)
        writer = store.begin_run(spec.run_id)
        attrs: dict[str, Any] = {}
        if spec.volume is not None:
            attrs.update(volume_outputs(ctx, writer))
        has_roi = any(name.startswith("roi/") for name in writer.outputs)
        attrs.update(cifti_outputs(ctx, writer, atlas_rois=not has_roi))
        has_roi = has_roi or (spec.cifti_dense is not None and bool(recipe["roi"]))
        if spec.surface and recipe["roi"] and not has_roi:
            attrs.update(gifti_outputs(ctx, writer))
        if not writer.outputs:
            writer.abort()
            result.status, result.error = "skipped", _no_output_reason(spec, recipe)
            return result
        attrs.update(table_outputs(ctx, writer, attrs["n_frames_source"]))
        saliency_outputs(ctx, writer, attrs)
        attrs.update(
            run_id=spec.run_id,
            entities=spec.entities,
            sources=ctx.sources,
            participant=spec.participant,
            metadata=spec.metadata,
            recipe_hash=ctx.recipe_hash,
            software=software_versions(),
            created=now(),
            warnings=ctx.warnings,
        )
        writer.commit(attrs)
        result.status = "complete"
        result.tr_s, result.n_frames = attrs["tr_s"], attrs["n_frames"]
        result.outputs = list(writer.outputs)
    except FmriDataError as exc:
        result.error = str(exc)
    except MemoryError:
        result.error = f"{spec.primary.path}: out of memory while converting"
    except Exception as exc:  # a bug or an unforeseen file defect: report it, keep converting others
        log.exception("unexpected error converting %s", spec.run_id)
        result.error = f"{spec.primary.path}: unexpected {type(exc).__name__}: {exc}"
    finally:
        if writer is not None and result.status != "complete":
            try:
                writer.abort()
            except Exception:  # pragma: no cover - best effort cleanup
                pass
        result.warnings = list(ctx.warnings)
        result.seconds = time.perf_counter() - started
    return result


