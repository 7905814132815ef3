import json

import pytest

from conftest import DS_REAL, haxby_run, make_bids
from fmri_data.discover import discover, make_run_id, sidecar_metadata
from fmri_data.errors import InputError


@pytest.fixture(scope="module")
def runs():
    return {r.run_id: r for r in discover(DS_REAL)}


def test_every_run_of_ds_real_is_found(runs):
    haxby = [f"sub-haxby1_task-objectviewing_run-{i:02d}" for i in range(1, 13)]
    expected = set(haxby) | {"sub-me1_task-visual", "sub-010188_ses-02_task-rest_acq-AP_run-01", "sub-hcp1_task-rest"}
    assert set(runs) == expected


def test_tr_comes_from_inherited_sidecars(runs):
    # task-objectviewing_bold.json at the dataset root gives the Haxby TR
    assert runs["sub-haxby1_task-objectviewing_run-03"].metadata["RepetitionTime"] == 2.5
    assert runs["sub-me1_task-visual"].metadata["RepetitionTime"] == 2.0
    assert runs["sub-010188_ses-02_task-rest_acq-AP_run-01"].metadata["RepetitionTime"] == 1.4
    assert runs["sub-hcp1_task-rest"].metadata["RepetitionTime"] == 0.72


def test_sources_and_companions(runs):
    me1 = runs["sub-me1_task-visual"]
    assert me1.volume.derivative and me1.volume.path.endswith("desc-preproc_bold.nii.gz")
    assert me1.mask.endswith("desc-brain_mask.nii.gz")
    assert me1.alternatives == [str(DS_REAL / "sub-me1/func/sub-me1_task-visual_bold.nii.gz")]
    haxby = runs["sub-haxby1_task-objectviewing_run-07"]
    assert haxby.volume.path == str(haxby_run(7)) and not haxby.volume.derivative
    assert haxby.events.endswith("run-07_events.tsv")
    assert haxby.confounds.endswith("run-07_desc-confounds_timeseries.tsv")
    assert haxby.participant == {"sex": None, "age": None, "site": "princeton"}
    surface = runs["sub-010188_ses-02_task-rest_acq-AP_run-01"]
    assert surface.volume is None and set(surface.surface) == {"L", "R"}
    assert surface.surface["L"].space == "fsaverage5"
    hcp = runs["sub-hcp1_task-rest"]
    assert [p.entities["seg"] for p in hcp.parcellated] == ["Schaefer400x17subcortex19"]


def test_prefer_raw_picks_the_raw_file():
    (me1,) = discover(DS_REAL, participant_label=["sub-me1"], prefer="raw")
    assert not me1.volume.derivative and me1.mask is None


def test_filters():
    assert [r.run_id for r in discover(DS_REAL, participant_label=["me1"])] == ["sub-me1_task-visual"]
    assert {r.run_id for r in discover(DS_REAL, task=["rest"])} == {
        "sub-010188_ses-02_task-rest_acq-AP_run-01",
        "sub-hcp1_task-rest",
    }
    assert [r.run_id for r in discover(DS_REAL, space=["fsaverage5"])] == ["sub-010188_ses-02_task-rest_acq-AP_run-01"]


def test_run_id_order():
    assert make_run_id({"run": "01", "task": "rest", "sub": "01", "ses": "2", "acq": "AP"}) == "sub-01_ses-2_task-rest_acq-AP_run-01"


def test_broken_sidecar_fails_only_its_run(tmp_path):
    root = make_bids(
        tmp_path / "ds",
        {
            "sub-01/func/sub-01_task-a_bold.nii.gz": haxby_run(1),
            "sub-01/func/sub-01_task-a_bold.json": '{"RepetitionTime": 2.5,',
            "sub-02/func/sub-02_task-a_bold.nii.gz": haxby_run(2),
            "sub-02/func/sub-02_task-a_bold.json": json.dumps({"RepetitionTime": 2.5}),
        },
    )
    runs = {r.run_id: r for r in discover(root)}
    assert "sub-01_task-a_bold.json" in runs["sub-01_task-a"].error and "not valid JSON" in runs["sub-01_task-a"].error
    assert runs["sub-02_task-a"].error is None
    assert sidecar_metadata(root / "sub-02/func/sub-02_task-a_bold.nii.gz", root)["RepetitionTime"] == 2.5


def test_not_a_bids_dataset(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a BIDS dataset"):
        discover(tmp_path / "empty")


def test_participants_table_with_a_byte_order_mark(tmp_path):
    """A participants.tsv saved with a UTF-8 BOM (as Excel does) keeps its rows; a table
    without a participant_id column is refused naming the file (it used to drop every row)."""
    table = "participant_id\tsite\nsub-haxby1\tprinceton\n"
    root = make_bids(tmp_path / "bom", {"participants.tsv": b"\xef\xbb\xbf" + table.encode(),
                                        "sub-haxby1/func/sub-haxby1_task-x_bold.nii.gz": haxby_run(1),
                                        "task-x_bold.json": '{"RepetitionTime": 2.5}'})
    (run,) = discover(root)
    assert run.participant == {"site": "princeton"}
    root = make_bids(tmp_path / "noid", {"participants.tsv": "subject\tsite\nsub-haxby1\tprinceton\n",
                                         "sub-haxby1/func/sub-haxby1_task-x_bold.nii.gz": haxby_run(1),
                                         "task-x_bold.json": '{"RepetitionTime": 2.5}'})
    with pytest.raises(InputError, match=r"participants\.tsv: participants table has no 'participant_id' column"):
        discover(root)
