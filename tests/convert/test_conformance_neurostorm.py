"""`--recipe neurostorm` against NeuroSTORM's released preprocessing.

Reference: CUHK-AIM-Group/NeuroSTORM @ a8dc38f665b104fc7559404def44695c332b47b4,
``datasets/preprocessing_volume.py`` (+ ``pad_to_96`` at load). Every expected value here is
computed from the reference's documented semantics (re-implemented in numpy below, in the
reference's order and array order), not from this project's code.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from fmri_data.config.recipe import load_recipe
from fmri_data.convert import convert
from fmri_data.derive.volume import global_zscore_elements
from fmri_data.store.root import Store

from conftest import DS_REAL, haxby_run, make_bids

# FSL / HCP MNI152 2 mm volume as on disk: 91 x 109 x 91, LAS (x runs right -> left)
MNI_LAS = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
MNI_SHAPE = (91, 109, 91)


# ---- the reference, in numpy -------------------------------------------------------------

def _select_middle_96(x: np.ndarray) -> np.ndarray:
    """NeuroSTORM select_middle_96: each spatial axis longer than 96 starts at (dim - 96) // 2."""
    index = tuple(slice((d - 96) // 2, (d - 96) // 2 + 96) if d > 96 else slice(None) for d in x.shape[:3])
    return x[index]


def _pad_to_96(y: np.ndarray) -> np.ndarray:
    """NeuroSTORM pad_to_96: ceil(pad / 2) before, floor(pad / 2) after, value y.flatten()[0]."""
    pads = [(math.ceil((96 - d) / 2), (96 - d) // 2) if d < 96 else (0, 0) for d in y.shape[:3]]
    return np.pad(y, pads + [(0, 0)], constant_values=y.flatten()[0])


def _reference(data: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(X, Y, Z, T) raw on-disk array already at 2 mm and TR 0.8 -> (96, 96, 96, T) as
    NeuroSTORM feeds it: crop -> background -> negatives -> z-score (unbiased) -> min fill -> pad."""
    data = _select_middle_96(data.astype(np.float64))
    if mask is None:
        background = data == 0
    else:
        background = np.broadcast_to((_select_middle_96(mask[..., None]) == 0), data.shape)
    data = data.copy()
    data[background] = 0
    data[data < 0] = 0
    brain = data[~background]
    z = (data - brain.mean()) / brain.std(ddof=1)
    z[background] = z[~background].min()
    return _pad_to_96(z)


def _save(path, data, affine, tr):
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    nib.save(img, path)
    return path


def _synthetic(tmp_path, n_frames=4):
    """A 91x109x91 LAS MNI run at TR 0.8 (no temporal change): a brain box with negatives, a
    voxel that is zero at frame 1 only, zeros everywhere else."""
    rng = np.random.default_rng(0)
    data = np.zeros(MNI_SHAPE + (n_frames,), dtype=np.float32)
    # asymmetric in x so that a wrong flip or offset cannot pass
    data[10:70, 20:100, 15:80] = rng.normal(50.0, 30.0, size=(60, 80, 65, n_frames))
    data[12, 30, 40, 1] = 0.0       # background at frame 1 only
    data[2, 8, 4, :] = 5.0          # isolated voxel near the LAS origin corner (inside the y crop)
    assert (data < 0).any()
    return data


def _convert_synthetic(tmp_path, data, overrides=(), name="synth"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = _save(tmp_path / "bold.nii.gz", data, MNI_LAS, 0.8)
    root = make_bids(tmp_path / name, {
        "sub-s1/func/sub-s1_task-rest_space-MNI152NLin6Asym_res-2_bold.nii.gz": src,
        "sub-s1/func/sub-s1_task-rest_space-MNI152NLin6Asym_res-2_bold.json": '{"RepetitionTime": 0.8}',
    })
    out = str(tmp_path / f"{name}.zarr")
    report = convert(root, out, "neurostorm", overrides=list(overrides), progress=False)
    assert not report.failed, [r.error for r in report.failed]
    store = Store.open(out)
    (run_id,) = store.run_ids()
    return store.run_attrs(run_id), store.run(run_id)


# ---- tests -------------------------------------------------------------------------------

def test_recipe_names_reference_defaults_and_default_recipe_unchanged():
    """The neurostorm recipe's defaults are the reference's (TR grid round(T*TR/0.8) linear, no
    anti-alias, mask file or element-wise non-zero, negatives zeroed, unbiased std, LAS);
    the default recipe keeps this project's (RAS, keep, auto mask, population std)."""
    ns, default = load_recipe("neurostorm"), load_recipe("default")
    assert ns["temporal"] == {"tr": 0.8, "grid": "neurostorm", "interpolation": "linear", "antialias": False}
    assert {k: ns["volume"][k] for k in ("mask", "negatives", "orientation", "std_ddof", "background", "shape")} == {
        "mask": "file_or_nonzero", "negatives": "zero", "orientation": "LAS", "std_ddof": 1, "background": "min",
        "shape": [96, 96, 96]}
    assert {k: default["volume"][k] for k in ("mask", "negatives", "orientation", "std_ddof")} == {
        "mask": "auto", "negatives": "keep", "orientation": "RAS", "std_ddof": 0}
    assert default["temporal"]["grid"] == "exact" and default["temporal"]["antialias"] is True


def test_zscore_zeroes_negatives_after_background_with_unbiased_std():
    """Known answer by hand: x = [[0, -2, 4], [6, 0, 2]] element-wise. Background = the two
    exact zeros; -2 -> 0 but stays brain, so brain = [0, 4, 6, 2]: mean 3, unbiased std
    sqrt(20/3); background = min z = -3/sqrt(20/3)."""
    x = np.array([[0.0, -2.0, 4.0], [6.0, 0.0, 2.0]], dtype=np.float32)
    z, params = global_zscore_elements(x, elementwise=True, negatives="zero", ddof=1, block_frames=1)
    std = math.sqrt(20 / 3)
    assert params["mean"] == pytest.approx(3.0) and params["std"] == pytest.approx(std)
    assert params["n_brain_elements"] == 4
    low = -3 / std
    expected = np.array([[low, low, 1 / std], [3 / std, low, -1 / std]])
    np.testing.assert_allclose(z, expected, rtol=1e-6)
    # keeping negatives gives a different answer (the test can tell them apart)
    _, kept = global_zscore_elements(x, elementwise=True, negatives="keep", ddof=1)
    assert kept["mean"] == pytest.approx(2.5)


def test_synthetic_run_equals_reference_pipeline(tmp_path):
    """A 91x109x91 LAS MNI run at TR 0.8 converted with --recipe neurostorm equals the
    reference (select_middle_96 -> data==0 background in 4D -> negatives to 0 -> z-score with
    unbiased std -> min fill -> pad_to_96), voxel for voxel in the stored (LAS) array order:
    x/z padded 3 before and 2 after, y cropped [6:102]."""
    data = _synthetic(tmp_path)
    attrs, group = _convert_synthetic(tmp_path, data)
    expected = _reference(data)                                   # (96, 96, 96, T)
    stored = np.asarray(group["bold"][:], dtype=np.float32)       # (T, 96, 96, 96)
    assert stored.shape == (4, 96, 96, 96) and attrs["volume"]["orientation"] == "LAS"
    assert attrs["volume"]["mask"] == "nonzero_elementwise"
    params = attrs["volume"]["normalization"]
    brain = np.maximum(data[data != 0], 0).astype(np.float64)   # every non-zero lies inside the 96 crop
    assert params["mean"] == pytest.approx(brain.mean(), rel=1e-6)
    assert params["std"] == pytest.approx(brain.std(ddof=1), rel=1e-6)
    np.testing.assert_allclose(stored, np.moveaxis(expected, -1, 0), atol=2e-3 * np.abs(expected).max())
    # LAS source (12, 30, 40) -> stored (12 + 3, 30 - 6, 40 + 3): data at frame 0, background at frame 1
    assert stored[0, 12 + 3, 30 - 6, 40 + 3] != params["background"]
    assert stored[1, 12 + 3, 30 - 6, 40 + 3] == pytest.approx(params["background"], abs=1e-2)


def test_elementwise_nonzero_mask(tmp_path):
    """Without a mask file the reference's background is data == 0 per element: a voxel zero at
    one frame only holds the background (min z) at that frame and data elsewhere, and the
    stored brain_mask (voxels non-zero in some frame) contains it; voxels zero at every frame
    are outside it."""
    data = _synthetic(tmp_path)
    attrs, group = _convert_synthetic(tmp_path, data)
    mask = np.asarray(group["brain_mask"][:])
    background = attrs["volume"]["normalization"]["background"]
    i = (12 + 3, 30 - 6, 40 + 3)                                 # LAS source (12, 30, 40) after crop/pad
    assert mask[i]
    series = np.asarray(group["bold"][:, i[0], i[1], i[2]], dtype=np.float32)
    assert series[1] == pytest.approx(background, abs=1e-2)
    assert np.all(np.abs(series[[0, 2, 3]] - background) > 1e-2)
    expected_mask = _pad_to_96(_select_middle_96((data != 0).any(axis=-1)[..., None]).astype(np.uint8))[..., 0]
    np.testing.assert_array_equal(mask, expected_mask.astype(bool))
    assert attrs["volume"]["n_brain_voxels"] == int(expected_mask.sum())


def test_las_is_ras_flipped_on_x_and_affines_agree(tmp_path):
    """Stored LAS == stored RAS flipped on x on the uncropped 91x109x91 grid, and with the
    96^3 crop/pad the two stores agree by affine: the voxel at stored index l (LAS) and the
    RAS voxel at inv(A_ras) @ A_las @ l hold the same value (affine @ index = same mm)."""
    data = _synthetic(tmp_path)
    full = {o: _convert_synthetic(tmp_path / o, data, [f"volume.orientation={o}", "volume.shape=null"], o)
            for o in ("LAS", "RAS")}
    las, ras = (np.asarray(full[o][1]["bold"][:], dtype=np.float32) for o in ("LAS", "RAS"))
    assert las.shape == (4,) + MNI_SHAPE
    np.testing.assert_array_equal(las, ras[:, ::-1])
    np.testing.assert_allclose(full["LAS"][0]["volume"]["affine"], MNI_LAS)
    np.testing.assert_array_equal(np.asarray(full["LAS"][1]["brain_mask"][:]), np.asarray(full["RAS"][1]["brain_mask"][:])[::-1])

    cropped = {o: _convert_synthetic(tmp_path / f"c{o}", data, [f"volume.orientation={o}"], f"c{o}") for o in ("LAS", "RAS")}
    a_las, a_ras = (np.asarray(cropped[o][0]["volume"]["affine"]) for o in ("LAS", "RAS"))
    las, ras = (np.asarray(cropped[o][1]["bold"][0], dtype=np.float32) for o in ("LAS", "RAS"))
    ijk = np.argwhere(np.ones((96, 96, 96), dtype=bool))
    mapped = (np.linalg.inv(a_ras) @ a_las @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3].round().astype(int)
    inside = np.all((mapped >= 0) & (mapped < 96), axis=1)
    assert inside.mean() > 0.98                                   # the two crops differ by one x voxel
    vals_las = las[tuple(ijk[inside].T)]
    vals_ras = ras[tuple(mapped[inside].T)]
    np.testing.assert_array_equal(vals_las, vals_ras)
    # LAS stored voxel 0 on x is world x = +96 mm (3 voxels of pad before x = +90 on the right)
    assert (a_las @ [0, 0, 0, 1])[0] == pytest.approx(96.0)


@pytest.fixture(scope="module")
def real_neurostorm(tmp_path_factory, atlas_dir):
    """sub-me1 (160 frames at TR 2.0, with a mask file) from ds-real and one Haxby run (121 frames
    at TR 2.5, no mask file) converted with --recipe neurostorm."""
    tmp = tmp_path_factory.mktemp("ns")
    out = {}
    report = convert(DS_REAL, str(tmp / "me1.zarr"), "neurostorm", atlas_dir=atlas_dir, participant_label=["me1"],
                     progress=False)
    assert not report.failed, [r.error for r in report.failed]
    out["me1"] = Store.open(str(tmp / "me1.zarr"))
    haxby = make_bids(tmp / "haxby", {
        "sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_bold.nii.gz": haxby_run(1),
    })
    report = convert(haxby, str(tmp / "haxby.zarr"), "neurostorm", atlas_dir=atlas_dir, progress=False)
    assert not report.failed, [r.error for r in report.failed]
    out["haxby"] = Store.open(str(tmp / "haxby.zarr"))
    return out


@pytest.mark.parametrize("name,frames,mask_mode", [("me1", 400, "file"), ("haxby", 378, "nonzero_elementwise")])
def test_real_runs(real_neurostorm, name, frames, mask_mode):
    """Real runs: round(T * TR / 0.8) frames (160 * 2.0 / 0.8 = 400; 121 * 2.5 / 0.8 = 378.1 ->
    378), 96^3 LAS with a truthful affine (x step -2 mm), the reference mask rule, and the stored
    brain elements z-scored (mean ~0, std ~1 over non-background elements), background = min."""
    store = real_neurostorm[name]
    (run_id,) = store.run_ids()
    attrs, group = store.run_attrs(run_id), store.run(run_id)
    volume = attrs["volume"]
    assert attrs["n_frames"] == frames and group["bold"].shape == (frames, 96, 96, 96)
    assert volume["orientation"] == "LAS" and volume["affine"][0][0] == -2.0 and volume["mask"] == mask_mode
    assert volume["negatives"] == "zero" and volume["std_ddof"] == 1
    background = volume["normalization"]["background"]
    bold = np.asarray(group["bold"][::25], dtype=np.float32)
    assert bold.min() == pytest.approx(background, abs=1e-2)
    mask = np.asarray(group["brain_mask"][:])
    assert not np.any(np.abs(bold[:, ~mask] - background) > 1e-2)
    inside = bold[:, mask]
    brain = inside[np.abs(inside - background) > 1e-2] if mask_mode == "nonzero_elementwise" else inside
    assert abs(float(brain.mean())) < 0.1 and abs(float(brain.std()) - 1) < 0.1
