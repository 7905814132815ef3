import json
import subprocess
import sys

from typer.testing import CliRunner

from conftest import DS_REAL
from fmri_data.cli.main import app

runner = CliRunner()


def test_convert_inspect_validate(tmp_path, atlas_dir):
    out = str(tmp_path / "out.zarr")
    args = ["convert", str(DS_REAL), out, "--atlas-dir", atlas_dir, "--participant-label", "hcp1", "--participant-label", "010188"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 converted" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "2 already present" in again.output

    shown = runner.invoke(app, ["inspect", out])
    assert shown.exit_code == 0
    assert "sub-hcp1_task-rest" in shown.output and "0.72" in shown.output and "1.4" in shown.output
    summary = json.loads(runner.invoke(app, ["inspect", out, "--json"]).output)
    assert {r["run_id"]: r["tr_s"] for r in summary["runs"]} == {
        "sub-010188_ses-02_task-rest_acq-AP_run-01": 1.4,
        "sub-hcp1_task-rest": 0.72,
    }
    assert runner.invoke(app, ["validate", out]).exit_code == 0


def test_errors_are_one_line_and_exit_nonzero(tmp_path, atlas_dir):
    result = runner.invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "o.zarr"), "--atlas-dir", atlas_dir])
    assert result.exit_code == 2 and "missing: BIDS root is not a directory" in result.output
    result = runner.invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 1 and "not an fmri-data store" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / 'nope.zarr'}: no such store (nothing at this path)"
    result = runner.invoke(app, ["convert", str(DS_REAL), str(tmp_path / "o.zarr"), "--recipe", "nope"])
    assert result.exit_code == 2 and "unknown recipe 'nope'" in result.output


def test_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "fmri_data", "recipes"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "neurostorm" in done.stdout


def test_version():
    from fmri_data import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"fmri-data {__version__}"
