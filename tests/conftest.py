"""Shared fixtures. Real data lives in ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FMRI_DATA_TEST_DATA", REPO.parent / "shared" / "data")).resolve()
DS_REAL = DATA / "bids" / "ds-real"
ATLASES = DATA / "atlases"
ROI_DIR = DATA / "roi"
SURFACES = DATA / "surfaces"
HCP_PTSERIES = ROI_DIR / "hcp-rest_schaefer400x17+subcortex19_tr-0.72.ptseries.nii"
HAXBY = DS_REAL / "sub-haxby1" / "func"
ME1_PREPROC = DS_REAL / "derivatives" / "preproc" / "sub-me1" / "func"


def haxby_run(n: int) -> Path:
    return HAXBY / f"sub-haxby1_task-objectviewing_run-{n:02d}_bold.nii.gz"


def require_data() -> None:
    """Fail the calling fixture in one line when the real data is missing (tests of pure
    functions do not use these fixtures and run without it)."""
    if not DS_REAL.is_dir():
        pytest.fail(f"test data not found at {DATA} (set FMRI_DATA_TEST_DATA)", pytrace=False)


@pytest.fixture(scope="session")
def atlas_dir() -> str:
    require_data()
    return str(ATLASES)


@pytest.fixture(scope="session")
def real_store(tmp_path_factory, atlas_dir) -> str:
    """ds-real converted once with the default recipe (shared by read-only tests)."""
    from fmri_data.convert import convert

    out = tmp_path_factory.mktemp("store") / "ds-real.zarr"
    report = convert(DS_REAL, str(out), "default", atlas_dir=atlas_dir, progress=False)
    assert not report.failed, [r.error for r in report.failed]
    return str(out)


@pytest.fixture(scope="session")
def flat_store(tmp_path_factory, atlas_dir) -> str:
    """The real fsaverage5 resting-state run of ds-real converted with the flat_mae recipe
    (flat (912, 224, 560) float16 + flat_mask), shared by read-only tests."""
    from fmri_data.convert import convert

    out = tmp_path_factory.mktemp("flat") / "flat_mae.zarr"
    report = convert(DS_REAL, str(out), "flat_mae", atlas_dir=atlas_dir, participant_label=["010188"], progress=False)
    assert not report.failed and report.count("complete") == 1, [r.error for r in report.failed]
    return str(out)


def make_bids(root: Path, files: dict[str, Path | bytes | str], description: dict | None = None) -> Path:
    """Build a small BIDS tree: ``files`` maps relative paths to a file to copy or content."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps(description or {"Name": "test", "BIDSVersion": "1.9.0", "DatasetType": "raw"})
    )
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copy(content, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root
