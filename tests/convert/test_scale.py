"""Scale-out and fault tolerance: distributed = threaded, object storage, kill -9 and resume,
concurrent converters, checksums."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import ATLASES, DS_REAL, HCP_PTSERIES, haxby_run
from fmri_data.convert import convert
from fmri_data.convert.engine import slurm_cluster
from fmri_data.store.root import Store
from fmri_data.store.validate import validate_store

VOLATILE = {"created", "software", "sources", "seconds", "attrs_sha256"}  # the checksum covers the timestamps


def assert_same_runs(a_url: str, b_url: str, run_ids: list[str] | None = None, options=None) -> None:
    """Two stores hold identical runs: every array bit for bit, attributes except timestamps
    and source locations (sha256 of the sources must match)."""
    a, b = Store.open(a_url), Store.open(b_url, options)
    run_ids = run_ids or a.run_ids()
    assert set(run_ids) <= set(b.run_ids()), set(run_ids) - set(b.run_ids())
    for run_id in run_ids:
        attrs_a, attrs_b = a.run_attrs(run_id), b.run_attrs(run_id)
        assert {k: v for k, v in attrs_a.items() if k not in VOLATILE} == {k: v for k, v in attrs_b.items() if k not in VOLATILE}
        assert sorted(s["sha256"] for s in attrs_a["sources"]) == sorted(s["sha256"] for s in attrs_b["sources"])
        group_a, group_b = a.run(run_id), b.run(run_id)
        for name in attrs_a["outputs"]:
            np.testing.assert_array_equal(group_a[name][...], group_b[name][...], err_msg=f"{run_id}/{name}")
            assert _located(dict(group_a[name].attrs)) == _located(dict(group_b[name].attrs))


def _located(attrs: dict) -> dict:
    """Array attributes without the source file location (a local path vs an s3:// URL)."""
    if isinstance(attrs.get("atlas"), dict) and "file" in attrs["atlas"]:
        attrs = {**attrs, "atlas": {k: v for k, v in attrs["atlas"].items() if k != "file"}}
    return attrs


def test_local_cluster_of_two_processes_equals_threads_bit_for_bit(real_store, tmp_path, atlas_dir):
    from distributed import LocalCluster

    out = str(tmp_path / "distributed.zarr")
    # an existing cluster reached by its address, as a lab's cluster would be
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        report = convert(DS_REAL, out, atlas_dir=atlas_dir, scheduler=cluster.scheduler_address, progress=False)
    assert report.count("complete") == 15 and not report.failed
    assert_same_runs(real_store, out)
    assert Store.open(out).run_ids() == Store.open(real_store).run_ids()


# --------------------------------------------------------------------------- object storage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A real S3 API (moto server) on loopback; yields fsspec storage options."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bids")
    fs.mkdir("stores")
    yield options
    server.stop()


def _upload_subset(fs, prefix: str) -> None:
    files = [
        "dataset_description.json",
        "participants.tsv",
        "task-objectviewing_bold.json",
        "sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_bold.nii.gz",
        "sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_events.tsv",
        "sub-haxby1/func/sub-haxby1_task-objectviewing_run-02_bold.nii.gz",
        "sub-haxby1/func/sub-haxby1_task-objectviewing_run-02_events.tsv",
        "derivatives/preproc/dataset_description.json",
        "derivatives/preproc/sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_desc-confounds_timeseries.tsv",
        "derivatives/preproc/sub-haxby1/func/sub-haxby1_task-objectviewing_run-02_desc-confounds_timeseries.tsv",
        "derivatives/preproc/sub-hcp1/func/sub-hcp1_task-rest_space-fsLR_seg-Schaefer400x17subcortex19_bold.json",
        "derivatives/preproc/sub-hcp1/func/sub-hcp1_task-rest_space-fsLR_seg-Schaefer400x17subcortex19_bold.ptseries.nii",
    ]
    for rel in files:
        fs.put_file(str(DS_REAL / rel), f"{prefix}/{rel}")


def test_round_trip_through_s3(s3, real_store, atlas_dir):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    _upload_subset(fs, "bids/ds")
    report = convert(
        "s3://bids/ds", "s3://stores/out.zarr", atlas_dir=atlas_dir, progress=False, storage_options=s3, input_options=s3
    )
    assert {r.run_id: r.status for r in report.results} == {
        "sub-haxby1_task-objectviewing_run-01": "complete",
        "sub-haxby1_task-objectviewing_run-02": "complete",
        "sub-hcp1_task-rest": "complete",
    }
    store = Store.open("s3://stores/out.zarr", s3)
    sources = store.run_attrs("sub-hcp1_task-rest")["sources"]
    assert sources[0]["path"].startswith("s3://bids/ds/derivatives/")
    assert not validate_store("s3://stores/out.zarr", s3, deep=True)
    assert_same_runs(real_store, "s3://stores/out.zarr", store.run_ids(), options=s3)
    _loader_reads_the_same_windows_from_s3(s3, real_store, store.run_ids())
    assert not fs.find("stores/out.zarr/_claims") and not [p for p in fs.find("stores/out.zarr/_staging") if not p.endswith("zarr.json")]
    # a second run resumes: nothing to do
    again = convert("s3://bids/ds", "s3://stores/out.zarr", atlas_dir=atlas_dir, progress=False, storage_options=s3, input_options=s3)
    assert {r.status for r in again.results} == {"exists"}


def _loader_reads_the_same_windows_from_s3(s3, real_store, run_ids):
    """The loader (2 DataLoader workers, store opened inside each) reads from S3 exactly the
    windows of the local store."""
    from fmri_data.load import WindowDataset, WindowLoader, build_index

    for array in ("bold", "roi/Schaefer400x17subcortex19"):
        remote = build_index("s3://stores/out.zarr", 20, 50, array=array, storage_options=s3)
        local = build_index(real_store, 20, 50, array=array, run_ids=run_ids)
        assert len(remote) > 0 and remote.fingerprint() == local.fingerprint()
        got = [WindowLoader(WindowDataset(ix, batch_size=2, seed=1), num_workers=n) for ix, n in ((remote, 2), (local, 0))]
        for a, b in zip(*got):
            assert a["index"].tolist() == b["index"].tolist() and a["run_id"] == b["run_id"]
            np.testing.assert_array_equal(a["data"].numpy(), b["data"].numpy())


def test_missing_remote_file_names_the_url(s3, atlas_dir):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.put_file(str(DS_REAL / "dataset_description.json"), "bids/broken/dataset_description.json")
    fs.pipe_file("bids/broken/sub-x/func/sub-x_task-a_bold.json", b'{"RepetitionTime": 2.0}')
    fs.pipe_file("bids/broken/sub-x/func/sub-x_task-a_bold.nii.gz", haxby_run(1).read_bytes()[:5000])
    report = convert("s3://bids/broken", "s3://stores/broken.zarr", atlas_dir=atlas_dir, progress=False, storage_options=s3, input_options=s3)
    (result,) = report.results
    assert result.status == "failed" and result.error.startswith("s3://bids/broken/sub-x/func/sub-x_task-a_bold.nii.gz: ")


# --------------------------------------------------------------------------- crash safety


def _convert_cmd(out: str) -> list[str]:
    return [
        sys.executable, "-m", "fmri_data", "convert", str(DS_REAL), out,
        "--atlas-dir", str(ATLASES), "--participant-label", "haxby1", "--participant-label", "hcp1",
        "--workers", "2", "--no-progress",
    ]


def test_sigkill_then_restart_gives_the_uninterrupted_store(real_store, tmp_path):
    out = str(tmp_path / "killed.zarr")
    rng = random.Random(os.getpid())
    proc = subprocess.Popen(_convert_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = rng.uniform(3.0, 12.0)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store.open(out).run_ids() if Path(out, "zarr.json").exists() else []
    done = subprocess.run(_convert_cmd(out), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    store = Store.open(out)
    assert len(store.run_ids()) == 13, (delay, partial)
    assert_same_runs(real_store, out, store.run_ids())
    assert not validate_store(out, deep=True)
    assert not os.listdir(Path(out, "_claims")) if Path(out, "_claims").exists() else True


def test_two_converters_at_once_finish_the_store_together(real_store, tmp_path):
    out = str(tmp_path / "shared.zarr")
    # create the store first so both converters open the same one
    convert(DS_REAL, out, participant_label=["me1"], atlas_dir=str(ATLASES), progress=False)
    procs = [subprocess.Popen(_convert_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    store = Store.open(out)
    assert len(store.run_ids()) == 14
    assert_same_runs(real_store, out, store.run_ids())
    assert not validate_store(out)


def test_claims_are_exclusive_and_abandoned_ones_are_taken_over(tmp_path):
    from fmri_data.config.recipe import load_recipe, recipe_hash

    recipe = load_recipe("default")
    store = Store.create(str(tmp_path / "c.zarr"), recipe, recipe_hash(recipe))
    assert store.claim("sub-01_task-a")
    assert not store.claim("sub-01_task-a")  # held by this live process
    # a claim left by a process that no longer exists on this host
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = Path(tmp_path, "c.zarr", "_claims", "sub-02_task-a.json")
    path.write_text(f'{{"host": "{socket.gethostname()}", "pid": {int(dead.stdout)}, "started": 0, "heartbeat": {time.time()}}}')
    assert store.claim("sub-02_task-a")
    # a claim from another host whose heartbeat stopped long ago
    path = Path(tmp_path, "c.zarr", "_claims", "sub-03_task-a.json")
    path.write_text('{"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": 0}')
    assert store.claim("sub-03_task-a")
    path.write_text(f'{{"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": {time.time()}}}')
    store.release("sub-03_task-a")  # not ours: stays
    assert path.exists() and not store.claim("sub-03_task-a")
    store.release("sub-01_task-a")
    assert not Path(tmp_path, "c.zarr", "_claims", "sub-01_task-a.json").exists()


# --------------------------------------------------------------------------- integrity


def test_deep_validation_names_corrupt_and_missing_chunks(real_store, tmp_path):
    out = tmp_path / "copy.zarr"
    shutil.copytree(real_store, out)
    assert not validate_store(str(out), deep=True)
    run = "sub-haxby1_task-objectviewing_run-04"
    shard = out / "runs" / run / "bold" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "runs" / "sub-hcp1_task-rest" / "roi" / "Schaefer400x17subcortex19" / "c" / "3" / "0").unlink()
    problems = validate_store(str(out), deep=True)
    assert any(f"{run}/bold: frames [100, 121) unreadable" in p for p in problems), problems
    assert any("sub-hcp1_task-rest/roi/Schaefer400x17subcortex19/c/3/0: shard missing" in p for p in problems), problems
    assert not validate_store(str(out))  # the shallow check only reads metadata


def test_slurm_cluster_job_script():
    cluster = slurm_cluster({"cores": 4, "processes": 2, "memory": "12GB", "walltime": "01:30:00", "queue": "short", "account": "lab"})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p short", "#SBATCH -A lab", "#SBATCH --cpus-per-task=4", "#SBATCH -t 01:30:00", "--nworkers 2"):
        assert line in script, script
    with pytest.raises(ValueError, match="unknown SLURM settings"):
        slurm_cluster({"gpus": 1})


def test_compute_settings_do_not_change_the_recipe_hash():
    from fmri_data.config.recipe import load_recipe, recipe_hash

    base = load_recipe("default")
    assert recipe_hash(base) == recipe_hash(load_recipe("default", ["compute.memory_per_worker=6GB", "compute.slurm.cores=8"]))
    assert HCP_PTSERIES.exists() and zarr.__version__.startswith("3")
