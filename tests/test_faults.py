"""Faults a hostile but realistic user meets: an unreachable cluster, filters matching nothing,
a full disk, a store that cannot be written, an object store that is down, Ctrl-C.

Every one must end in one clear line (no traceback), leave nothing half-written that the
next run cannot resume, and never create an empty store. The fault campaign of issue 17
(hostile inputs, SIGKILL, concurrent converters, corruptions) lives beside these tests in
``tests/convert/test_bad_input_property.py``, ``tests/convert/test_scale.py`` and
``tests/store/``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import DS_REAL, make_bids
from fmri_data.cli.convert import print_warnings
from fmri_data.cli.main import app
from fmri_data.convert import ConvertReport, convert
from fmri_data.convert.run import RunResult
from fmri_data.discover import discover
from fmri_data.errors import ComputeError, InputError, one_line
from fmri_data.store.root import Store

runner = CliRunner()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_unreachable_scheduler_fails_at_once_without_a_store(tmp_path, atlas_dir):
    out = tmp_path / "o.zarr"
    address = f"tcp://127.0.0.1:{_closed_port()}"
    result = runner.invoke(app, ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir, "--scheduler", address])
    assert result.exit_code == 2
    assert f"Dask scheduler {address} is not reachable" in _one_error_line(result.output)
    assert not out.exists()
    result = runner.invoke(app, ["convert", str(DS_REAL), str(out), "--scheduler", "thread"])
    assert "unknown scheduler 'thread'" in _one_error_line(result.output) and not out.exists()


def test_slurm_without_sbatch_fails_at_once_without_a_store(tmp_path, atlas_dir, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    out = tmp_path / "o.zarr"
    result = runner.invoke(app, ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir, "--cluster", "slurm"])
    assert result.exit_code == 2 and "`sbatch` is not on PATH" in _one_error_line(result.output)
    assert not out.exists()


def test_filters_matching_nothing_name_the_filter_and_what_exists(tmp_path, atlas_dir):
    out = tmp_path / "o.zarr"
    result = runner.invoke(app, ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir,
                                 "--participant-label", "me2", "--task", "Rest"])
    line = _one_error_line(result.output)
    assert result.exit_code == 2 and "no BOLD run matches --participant-label me2 --task Rest" in line
    assert "haxby1" in line and "objectviewing" in line and not out.exists()
    anat_only = make_bids(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.json": "{}"})  # a dataset without BOLD
    with pytest.raises(InputError, match="no BOLD runs found"):
        convert(anat_only, str(out), atlas_dir=atlas_dir, progress=False)
    assert not out.exists()


def test_remote_dataset_down_is_one_line_naming_the_url():
    options = {"anon": True, "endpoint_url": f"http://127.0.0.1:{_closed_port()}",
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(InputError) as caught:
        discover("s3://bucket/ds000105", storage_options=options)
    assert str(caught.value).startswith("s3://bucket/ds000105: cannot list dataset (EndpointConnectionError")
    assert "\n" not in str(caught.value)


def test_library_messages_keep_one_line():
    assert one_line("header:\n  pixdim[1] should be positive\r\n") == "header: pixdim[1] should be positive"
    assert str(InputError("f.nii", "bad\nheader")) == "f.nii: bad header"


def test_store_write_failure_is_the_store_s_one_line_error(tmp_path, atlas_dir, monkeypatch, caplog):
    out = tmp_path / "o.zarr"

    def disk_full(self, run_id):
        raise OSError(errno.ENOSPC, "No space left on device", f"{self.path}/_staging/{run_id}/bold/c/0")

    monkeypatch.setattr(Store, "begin_run", disk_full)
    with caplog.at_level(logging.DEBUG - 1, logger="fmri_data"):
        report = convert(DS_REAL, str(out), atlas_dir=atlas_dir, participant_label=["me1"], progress=False)
    (failed,) = report.failed
    assert failed.error.startswith(f"{report.store_url}: cannot write the store (No space left on device: ")
    assert not [r for r in caplog.records if r.exc_info], "no traceback for an environment failure"


def test_index_write_failure_keeps_the_runs_and_says_so(tmp_path, atlas_dir, monkeypatch):
    out = tmp_path / "o.zarr"

    def read_only(self, rows):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Store, "write_index", read_only)
    result = runner.invoke(app, ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir, "--participant-label", "me1"])
    assert result.exit_code == 1
    assert "1 converted" in result.output and "index.parquet / qa.parquet not updated (Read-only file system)" in result.output
    monkeypatch.undo()
    assert Store.open(str(out)).run_ids() == ["sub-me1_task-visual"]
    again = runner.invoke(app, ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir, "--participant-label", "me1"])
    assert again.exit_code == 0 and "1 already present" in again.output
    assert list(Store.open(str(out)).read_index()["run_id"]) == ["sub-me1_task-visual"]


def test_claim_not_released_is_a_warning_not_a_failure(tmp_path, atlas_dir, monkeypatch):
    class EndpointConnectionError(Exception):  # what botocore raises when S3 goes away
        pass

    def endpoint_gone(self, run_id):
        raise EndpointConnectionError("Could not connect to the endpoint URL")

    monkeypatch.setattr(Store, "release", endpoint_gone)
    report = convert(DS_REAL, str(tmp_path / "o.zarr"), atlas_dir=atlas_dir, participant_label=["me1"], progress=False)
    (run,) = report.results
    assert run.status == "complete"
    assert any(w.startswith("claim not released (EndpointConnectionError") for w in run.warnings)


def test_warnings_are_summarised_once_per_message(capsys):
    results = [RunResult(f"sub-{i:02d}_task-rest", "complete", warnings=["resampled by world coordinates"]) for i in range(40)]
    results.append(RunResult("sub-99_task-rest", "complete", warnings=["58 parcels have no voxel"]))
    results.append(RunResult("sub-98_task-rest", "failed", warnings=["not shown: the failure line says it"]))
    print_warnings(results)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "warning (40 runs, e.g. sub-00_task-rest): resampled by world coordinates",
        "warning (sub-99_task-rest): 58 parcels have no voxel",
    ]


def test_raw_file_set_aside_for_its_derivative_is_reported(tmp_path, atlas_dir):
    result = runner.invoke(app, ["convert", str(DS_REAL), str(tmp_path / "o.zarr"), "--atlas-dir", atlas_dir,
                                 "--participant-label", "me1"])
    assert result.exit_code == 0, result.output
    assert ("warning (sub-me1_task-visual): raw volume sub-me1_task-visual_bold.nii.gz not used: "
            "sub-me1_task-visual_desc-preproc_bold.nii.gz is (recipe inputs.prefer=derivatives)") in result.output


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fmri_data.cli.main import main; main()", *args]


def test_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path, atlas_dir):
    out = tmp_path / "o.zarr"
    args = ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir, "--participant-label", "haxby1", "--workers", "1"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not any(p.name.startswith("sub-") for p in (out / "runs").glob("*")) and time.monotonic() < deadline:
        time.sleep(0.2)  # interrupt once one run is committed and the next is being written
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip() == f"interrupted: finished runs are kept in {out}; run the same command again to resume"
    kept = Store.open(str(out)).run_ids()
    assert 1 <= len(kept) < 12
    done = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{12 - len(kept)} converted, {len(kept)} already present" in done.stdout
    assert subprocess.run(_cli("validate", str(out), "--deep"), capture_output=True, timeout=300).returncode == 0


def _tmpfs(mount: Path, size: str):
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and a container that allows it)")
    return mount


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 3 MiB tmpfs: a disk that fills up."""
    yield _tmpfs(tmp_path / "tiny", "3m")
    subprocess.run(["umount", "-l", str(tmp_path / "tiny")], check=False)


@pytest.fixture
def remountable_filesystem(tmp_path):
    """A 256 MiB tmpfs that a test can remount read-only."""
    yield _tmpfs(tmp_path / "fs", "256m")
    subprocess.run(["umount", "-l", str(tmp_path / "fs")], check=False)


def test_read_only_filesystem_resumes_nothing_and_loses_nothing(remountable_filesystem, atlas_dir):
    out = remountable_filesystem / "o.zarr"
    args = ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir, "--participant-label", "me1"]
    assert runner.invoke(app, args).exit_code == 0
    subprocess.run(["mount", "-o", "remount,ro", str(remountable_filesystem)], check=True)
    again = runner.invoke(app, args)  # nothing to do: nothing is written
    assert again.exit_code == 0 and "1 already present" in again.output, again.output
    more = runner.invoke(app, [*args, "--participant-label", "hcp1"])
    assert more.exit_code == 2
    assert "cannot write the store (read-only or no permission); 1 runs left to convert" in _one_error_line(more.output)
    assert runner.invoke(app, ["validate", str(out), "--deep"]).exit_code == 0


def test_full_disk_fails_each_run_in_one_line_naming_the_store(tiny_filesystem, atlas_dir):
    out = tiny_filesystem / "o.zarr"
    result = runner.invoke(app, ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir, "--participant-label", "me1",
                                 "--participant-label", "hcp1"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed")]
    assert failed and all("cannot write the store (No space left on device" in line for line in failed), result.output
    assert all(str(out) in line for line in failed)


def test_compute_check_accepts_local_schedulers_and_a_live_address():
    from fmri_data.convert.engine import check_compute

    for name in ("threads", "processes", "synchronous"):
        check_compute(name)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_compute(f"tcp://127.0.0.1:{server.getsockname()[1]}")
    with pytest.raises(ComputeError, match="unknown cluster kind 'pbs'"):
        check_compute(cluster="pbs")


def test_read_only_store_is_refused_before_any_run(tmp_path, atlas_dir, monkeypatch):
    out = tmp_path / "o.zarr"
    assert runner.invoke(app, ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir, "--participant-label", "me1"]).exit_code == 0
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out and mode == os.W_OK else real_access(p, mode))
    result = runner.invoke(app, ["convert", str(DS_REAL), str(out), "--atlas-dir", atlas_dir, "--participant-label", "hcp1"])
    assert result.exit_code == 2
    assert "cannot write the store (read-only or no permission); 1 runs left to convert" in _one_error_line(result.output)
    assert Store.open(str(out)).run_ids() == ["sub-me1_task-visual"]


# -- inputs that used to be accepted silently (synthetic headers: the test needs an exact known defect)

def test_qform_disagreeing_with_sform_is_a_warning_naming_both(tmp_path):
    import nibabel as nib
    import numpy as np

    from fmri_data.read import open_volume

    img = nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    shifted = np.diag([3.0, 3.0, 3.0, 1.0])
    shifted[:3, 3] = [0.0, 12.0, 0.0]
    img.set_qform(shifted, code=1)
    img.set_sform(np.diag([3.0, 3.0, 3.0, 1.0]), code=4)
    nib.save(img, tmp_path / "x_bold.nii.gz")
    vol = open_volume(tmp_path / "x_bold.nii.gz")
    assert vol.warnings == ["qform and sform disagree by up to 12 mm; using the sform (as nibabel, FSL and fMRIPrep do; "
                            "ITK/ANTs would use the qform)"]
    np.testing.assert_array_equal(vol.affine, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.set_qform(np.diag([3.0, 3.0, 3.0, 1.0]), code=1)
    nib.save(img, tmp_path / "y_bold.nii.gz")
    assert open_volume(tmp_path / "y_bold.nii.gz").warnings == []


def test_complex_data_is_refused_in_one_line(tmp_path):
    import nibabel as nib
    import numpy as np

    from fmri_data.read import open_volume

    data = (np.ones((4, 4, 4, 3)) + 1j).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "c_bold.nii.gz")
    with pytest.raises(InputError, match=r"c_bold.nii.gz: complex-valued data \(complex64\)"):
        open_volume(tmp_path / "c_bold.nii.gz")


def test_task_label_with_a_space_fails_naming_the_source_file(tmp_path, atlas_dir):
    bad = "sub-01/func/sub-01_task-rest ing_bold.nii.gz"
    ds = make_bids(tmp_path / "ds", {bad: Path(DS_REAL / "sub-me1/func/sub-me1_task-visual_bold.nii.gz"),
                                     "sub-01/func/sub-01_task-rest ing_bold.json": '{"RepetitionTime": 2.0}'})
    report = convert(ds, str(tmp_path / "o.zarr"), atlas_dir=atlas_dir, progress=False)
    (failed,) = report.failed
    assert failed.error == f"{ds / bad}: BIDS task label 'rest ing' is not alphanumeric (BIDS labels are [a-zA-Z0-9]+)"


def test_local_cluster_keeps_the_terminal_to_fmri_data_s_lines(tmp_path, atlas_dir):
    args = ["convert", str(DS_REAL), str(tmp_path / "o.zarr"), "--atlas-dir", atlas_dir, "--participant-label", "me1",
            "--scheduler", "processes", "--workers", "2"]
    done = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "" and "1 converted" in done.stdout
    args[2] = str(tmp_path / "verbose.zarr")
    verbose = subprocess.run(_cli("--verbose", *args), capture_output=True, text=True, timeout=600)
    assert verbose.returncode == 0 and "INFO distributed.scheduler" in verbose.stderr


def test_object_store_outage_is_the_store_s_one_line_error(atlas_dir, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    def endpoint_gone(self, run_id):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket")

    monkeypatch.setattr(Store, "begin_run", endpoint_gone)
    url = f"memory://faults-{os.getpid()}/o.zarr"
    report = convert(DS_REAL, url, atlas_dir=atlas_dir, participant_label=["me1"], progress=False)
    (failed,) = report.failed
    assert failed.error == (f"{report.store_url}: store unavailable (EndpointConnectionError: Could not connect to the "
                            'endpoint URL: "http://127.0.0.1:9/bucket")')


class _Proxy:
    """A loopback TCP proxy that can be cut (every connection closed, new ones refused) and
    restored, to take an object store away in the middle of a conversion."""

    def __init__(self, target_port: int):
        import threading

        self.target = ("127.0.0.1", target_port)
        self.port = _closed_port()
        self.up = threading.Event()
        self.conns: list[socket.socket] = []
        self.server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        import threading

        self.server = socket.create_server(("127.0.0.1", self.port))
        self.up.set()
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def cut(self) -> None:
        self.up.clear()
        self.server.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self.conns.clear()

    def _accept(self, server: socket.socket) -> None:
        import threading

        while self.up.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_object_store_cut_mid_conversion_fails_runs_in_one_line_and_resumes(tmp_path, atlas_dir):
    """A real S3 API (moto) behind a proxy that is cut once the first run is committed: the
    other run fails in one line naming the store, the tables' failure is reported (not
    raised), and the rerun after the outage finishes, taking over the claim the outage
    left behind."""
    import threading

    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto_port = _closed_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    server.start()
    try:
        proxy = _Proxy(moto_port)
        direct = {"endpoint_url": f"http://127.0.0.1:{moto_port}", "key": "testing", "secret": "testing"}
        options = {**direct, "endpoint_url": f"http://127.0.0.1:{proxy.port}",
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
        import s3fs

        bucket = f"faults-{os.getpid()}-{time.monotonic_ns()}"  # moto's state is shared within the process
        s3fs.S3FileSystem(**direct).mkdir(bucket)
        me1 = DS_REAL / "sub-me1/func/sub-me1_task-visual_bold.nii.gz"
        ds = make_bids(tmp_path / "ds", {
            **{f"sub-{s}/func/sub-{s}_task-visual_bold.nii.gz": me1 for s in ("01", "02")},
            "task-visual_bold.json": '{"RepetitionTime": 2.0}',
        })
        url = f"s3://{bucket}/o.zarr"
        reports = []

        def first_conversion():
            try:
                reports.append(convert(ds, url, atlas_dir=atlas_dir, workers=1, progress=False, storage_options=options))
            except Exception as exc:  # noqa: BLE001 - shown by the assertion below
                reports.append(exc)

        worker = threading.Thread(target=first_conversion)
        worker.start()
        watcher = s3fs.S3FileSystem(**direct)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not watcher.glob(f"{bucket}/o.zarr/runs/sub-*/zarr.json"):
            time.sleep(0.2)
            watcher.invalidate_cache()
        proxy.cut()
        worker.join(timeout=600)
        (report,) = reports
        assert isinstance(report, ConvertReport), f"convert raised {type(report).__name__}: {report}"
        assert report.count("complete") >= 1 and report.failed
        assert report.errors and "index.parquet / qa.parquet not updated (EndpointConnectionError" in report.errors[0]
        for run in report.failed:
            assert run.error.startswith(f"{report.store_url}: store unavailable ("), run.error
            assert "\n" not in run.error
        proxy.restore()
        again = convert(ds, url, atlas_dir=atlas_dir, progress=False, storage_options=options)
        assert sorted(r.status for r in again.results) == sorted(["exists"] * report.count("complete")
                                                                  + ["complete"] * len(report.failed))
        assert Store.open(url, direct).run_ids() == ["sub-01_task-visual", "sub-02_task-visual"]
    finally:
        server.stop()
