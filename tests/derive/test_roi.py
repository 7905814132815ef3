"""Parcel series agree with nilearn's NiftiLabelsMasker; atlases come in each model's order."""

import warnings

import nibabel as nib
import numpy as np
import pytest
from nilearn.image import resample_img
from nilearn.maskers import NiftiLabelsMasker

from conftest import ATLASES, ME1_PREPROC, haxby_run
from fmri_data.reference.atlases import load_atlas
from fmri_data.derive.roi import volume_parcel_operator
from fmri_data.errors import InputError, RecipeError
from fmri_data.read.nifti import open_volume
from fmri_data.resample import grid_indices, inside_source, source_coordinates


@pytest.mark.parametrize(
    "path, atlas_name",
    [
        (ME1_PREPROC / "sub-me1_task-visual_desc-preproc_bold.nii.gz", "schaefer400_7n"),
        (haxby_run(5), "tian_s3"),
    ],
)
def test_parcel_means_match_nilearn(path, atlas_name):
    atlas = load_atlas(atlas_name, ATLASES)
    (component,) = atlas.components
    vol = open_volume(path)
    frames = vol.read(0, 12)
    operator = volume_parcel_operator(atlas, vol.shape[:3], vol.affine)
    ours = (operator.matrix @ frames.reshape(-1, frames.shape[3])).T

    # nilearn: the run resampled onto the atlas grid with linear interpolation
    # (resample_img), then NiftiLabelsMasker on that grid (so the masker itself does not
    # resample: its own default is cubic), restricted to the atlas voxels inside the run's
    # field of view (ours leaves the others out of the mean instead of averaging zeros).
    coords = source_coordinates(vol.affine, component.affine, grid_indices(component.data.shape))
    fov = inside_source(coords, vol.shape[:3]).reshape(component.data.shape)
    on_atlas_grid = resample_img(
        nib.Nifti1Image(frames, vol.affine), target_affine=component.affine, target_shape=component.data.shape,
        interpolation="linear", force_resample=True, copy_header=True,
    )
    labels_img = nib.Nifti1Image(component.data.astype(np.int32), component.affine)
    masker = NiftiLabelsMasker(
        labels_img, mask_img=nib.Nifti1Image(fov.astype(np.uint8), component.affine), resampling_target="labels", strategy="mean"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = masker.fit_transform(on_atlas_grid)
    ids = [int(v) for k, v in masker.region_ids_.items() if k != "background"]  # label value of each column
    position = {int(v): i for i, v in enumerate(component.values)}
    columns = [position[i] for i in ids]
    assert len(columns) == len(atlas.labels) - len(operator.missing) > 10
    tol = 1e-4 * float(np.ptp(frames))
    np.testing.assert_allclose(ours[:, columns], theirs, rtol=0, atol=tol)
    missing_rows = [position[int(v)] for v in component.values if int(v) not in ids]
    assert np.all(ours[:, missing_rows] == 0)


def test_registered_atlas_orders():
    schaefer = load_atlas("schaefer400_7n", ATLASES)
    assert schaefer.labels[:2] == ["LH_Vis_1", "LH_Vis_2"] and schaefer.labels[-1] == "RH_Default_PCC_9"
    assert schaefer.n_parcels == 400
    assert load_atlas("schaefer400_17n", ATLASES).labels[0] == "LH_VisCent_ExStr_1"
    tian = load_atlas("tian_s3", ATLASES)
    assert tian.n_parcels == 50 and tian.labels[0] == "HIP-head-m-rh"
    combined = load_atlas("tian_s3+schaefer400_7n", ATLASES)
    assert combined.n_parcels == 450
    assert combined.labels[:50] == tian.labels and combined.labels[50:] == schaefer.labels  # subcortex first
    assert load_atlas("tian_s3_schaefer400", ATLASES).labels == combined.labels
    a424 = load_atlas("a424", ATLASES)
    assert a424.n_parcels == 424 and a424.labels[0] == "A424_001" and a424.labels[-1] == "A424_424"


def test_orientation_does_not_change_the_atlas():
    # Tian S3 is stored RAS, Schaefer LAS: both must land on the same RAS+ grid
    tian, schaefer = load_atlas("tian_s3", ATLASES).components[0], load_atlas("schaefer400_7n", ATLASES).components[0]
    np.testing.assert_array_equal(tian.affine, schaefer.affine)
    assert nib.aff2axcodes(tian.affine) == ("R", "A", "S")
    # left-hemisphere parcels must sit at negative x
    x = (schaefer.affine @ np.c_[np.argwhere(schaefer.data == 1), np.ones((np.sum(schaefer.data == 1), 1))].T)[0]
    assert schaefer.labels[0].startswith("LH") and x.mean() < -10


def test_atlas_errors(tmp_path):
    with pytest.raises(RecipeError, match="unknown atlas 'nope'"):
        load_atlas("nope", ATLASES)
    with pytest.raises(InputError, match="atlas file not found"):
        load_atlas("schaefer400_7n", tmp_path)
    # an atlas on another grid (the same labels shifted by one voxel)
    for name in ("atlas-Schaefer2018_desc-400Parcels7Networks_labels.txt",):
        (tmp_path / name).write_bytes((ATLASES / name).read_bytes())
    src = nib.load(ATLASES / "tpl-MNI152NLin6Asym_res-02_atlas-Schaefer2018_desc-400Parcels7Networks_dseg.nii.gz")
    shifted = src.affine.copy()
    shifted[:3, 3] += 2.0
    nib.save(
        nib.Nifti1Image(np.asarray(src.dataobj), shifted),
        tmp_path / "tpl-MNI152NLin6Asym_res-02_atlas-Schaefer2018_desc-400Parcels7Networks_dseg.nii.gz",
    )
    with pytest.raises(InputError, match="dseg.nii.gz: atlas grid .* does not match MNI152NLin6Asym res-2"):
        load_atlas("schaefer400_7n", tmp_path)


def test_atlas_by_path_uses_its_label_table(tmp_path):
    path = ATLASES / "tpl-MNI152NLin6Asym_res-02_atlas-TianS3_dseg.nii.gz"
    copy = tmp_path / "tpl-MNI152NLin6Asym_res-02_atlas-TianS3_dseg.nii.gz"
    copy.write_bytes(path.read_bytes())
    (tmp_path / "tpl-MNI152NLin6Asym_res-02_atlas-TianS3_dseg.tsv").write_bytes((ATLASES / "atlas-TianS3_dseg.tsv").read_bytes())
    atlas = load_atlas(str(copy))
    assert atlas.labels == load_atlas("tian_s3", ATLASES).labels and atlas.components[0].space == "MNI152NLin6Asym"


@pytest.fixture
def templateflow_home(tmp_path, monkeypatch):
    """A TemplateFlow home laid out as TemplateFlow lays it out, holding the real Schaefer-400
    7N image (a link to ../shared/data) and its label table in TemplateFlow's format
    (index, name with the network prefix, color), written from Schaefer's labels.txt."""
    folder = tmp_path / "templateflow" / "tpl-MNI152NLin6Asym"
    folder.mkdir(parents=True)
    image = "tpl-MNI152NLin6Asym_res-02_atlas-Schaefer2018_desc-400Parcels7Networks_dseg.nii.gz"
    (folder / image).symlink_to(ATLASES / image)
    names = (ATLASES / "atlas-Schaefer2018_desc-400Parcels7Networks_labels.txt").read_text().split()
    rows = [f"{i}\t7Networks_{n}\t#000000" for i, n in enumerate(names, 1)]
    (folder / "tpl-MNI152NLin6Asym_atlas-Schaefer2018_desc-400Parcels7Networks_dseg.tsv").write_text(
        "index\tname\tcolor\n" + "\n".join(rows) + "\n")
    # TemplateFlow's skeleton holds empty placeholders for files not yet downloaded
    (folder / "tpl-MNI152NLin6Asym_res-02_atlas-Schaefer2018_desc-400Parcels17Networks_dseg.nii.gz").write_bytes(b"")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "templateflow"))
    monkeypatch.delenv("FMRI_DATA_ATLAS_DIR", raising=False)
    return tmp_path / "templateflow"


def test_atlas_from_templateflow_equals_the_atlas_folder(templateflow_home, tmp_path, atlas_dir):
    empty = tmp_path / "no-atlases"
    from_tf = load_atlas("schaefer400_7n", empty).components[0]
    from_folder = load_atlas("schaefer400_7n", atlas_dir).components[0]
    assert from_tf.labels == from_folder.labels and from_tf.labels[0] == "LH_Vis_1"
    np.testing.assert_array_equal(from_tf.values, from_folder.values)
    np.testing.assert_array_equal(from_tf.data, from_folder.data)
    assert from_tf.files["volume"]["path"].startswith(str(templateflow_home))


def test_atlas_found_nowhere_names_both_places(templateflow_home, tmp_path):
    with pytest.raises(InputError) as caught:
        load_atlas("schaefer400_17n", tmp_path / "no-atlases")  # only an empty placeholder in TemplateFlow
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "no-atlases" / "tpl-MNI152NLin6Asym_res-02_atlas-Schaefer2018"))
    assert f"in TemplateFlow ({templateflow_home / 'tpl-MNI152NLin6Asym'})" in message
    assert "--atlas-dir" in message and "$TEMPLATEFLOW_HOME" in message


def test_convert_without_atlas_dir_uses_templateflow(templateflow_home, tmp_path):
    from typer.testing import CliRunner

    from conftest import DS_REAL
    from fmri_data.cli.main import app

    result = CliRunner().invoke(app, ["convert", str(DS_REAL), str(tmp_path / "o.zarr"), "--participant-label", "me1"])
    assert result.exit_code == 0 and "1 converted" in result.output, result.output
