"""BIDS indexing speed: bids2table (what fmri-data uses) vs pybids, on one synthetic tree.

The tree mimics a large fMRIPrep'd cohort: N subjects x 2 sessions x 4 runs, each with the
raw BOLD + sidecar + events and, under derivatives/fmriprep, preprocessed BOLD in two
spaces, a brain mask, confounds and GIFTI surfaces. Files are empty: indexing only reads
names (and, for pybids, JSON sidecars, which are written for real).

Prints seconds for each indexer, and the ratio pybids / bids2table (higher = bids2table
faster). Also times fmri-data's full discovery (indexing + run assembly + sidecars).

    python benchmarks/bench_discover.py --subjects 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def build_tree(root: Path, subjects: int) -> int:
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 0.8, "TaskName": "rest"}))
    deriv = root / "derivatives" / "fmriprep"
    deriv.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(
        json.dumps({"Name": "fmriprep", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep"}]})
    )
    n = 0
    for s in range(subjects):
        for ses in ("01", "02"):
            raw = root / f"sub-{s:04d}" / f"ses-{ses}" / "func"
            der = deriv / f"sub-{s:04d}" / f"ses-{ses}" / "func"
            raw.mkdir(parents=True)
            der.mkdir(parents=True)
            for run in range(1, 5):
                base = f"sub-{s:04d}_ses-{ses}_task-rest_run-{run:02d}"
                names = [(raw, f"{base}_bold.nii.gz"), (raw, f"{base}_events.tsv"), (der, f"{base}_desc-confounds_timeseries.tsv")]
                for space in ("MNI152NLin6Asym_res-2", "MNI152NLin2009cAsym_res-2"):
                    names += [(der, f"{base}_space-{space}_desc-preproc_bold.nii.gz"), (der, f"{base}_space-{space}_desc-brain_mask.nii.gz")]
                names += [(der, f"{base}_hemi-{h}_space-fsaverage5_bold.func.gii") for h in "LR"]
                for folder, name in names:
                    (folder / name).touch()
                (raw / f"{base}_bold.json").write_text(json.dumps({"SliceTiming": [0.0, 0.4]}))
                n += len(names) + 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ds"
        root.mkdir()
        n_files = build_tree(root, args.subjects)
        print(f"synthetic tree: {args.subjects} subjects, {n_files} files")

        import bids2table

        start = time.perf_counter()
        rows = sum(len(bids2table.index_dataset(d)) for d in bids2table.find_bids_datasets(root))
        t_b2t = time.perf_counter() - start
        print(f"bids2table index_dataset: {t_b2t:8.2f} s  ({rows} files)")

        from fmri_data.discover import discover

        start = time.perf_counter()
        runs = discover(root)
        t_discover = time.perf_counter() - start
        print(f"fmri-data discover:       {t_discover:8.2f} s  ({len(runs)} runs, sidecars and run assembly included)")

        try:
            import bids
        except ImportError:
            print("pybids not installed (pip install pybids): no baseline")
            return
        start = time.perf_counter()
        layout = bids.BIDSLayout(root, validate=False, derivatives=True)
        files = len(layout.get()) + sum(len(d.get()) for d in layout.derivatives.values())
        t_pybids = time.perf_counter() - start
        print(f"pybids BIDSLayout:        {t_pybids:8.2f} s  ({files} files)")
        print(f"ratio pybids / bids2table: {t_pybids / t_b2t:.1f}x")


if __name__ == "__main__":
    main()
