"""Loading windows for training: order, partitioning, resume, labels, saliency windows,
integrity errors — on the store converted from ../shared/data/bids/ds-real."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import HAXBY
from fmri_data.load import (
    ChunkError, WindowDataset, WindowLoader, WindowMapDataset, build_index, collate_windows, epoch_order,
    event_starts, layout, normalize_frames, rank_positions, sliding_starts, split_of, worker_positions,
)
from fmri_data.load.index import split_key
from fmri_data.load.reader import WindowReader
from fmri_data.errors import StoreError
from fmri_data.store.root import Store

ROI = "roi/schaefer400_7n"  # the default recipe's atlas: every volume and surface run has it
HAXBY_RUN = "sub-haxby1_task-objectviewing_run-{:02d}"


# ----------------------------------------------------------------------------- pure order functions
def test_epoch_order_depends_only_on_seed_and_epoch_and_keeps_shards_together():
    blocks = np.repeat(np.arange(40), 5)  # 40 shards of 5 windows
    a = epoch_order(blocks, seed=3, epoch=0, mix=1)
    assert sorted(a) == list(range(200))
    assert np.array_equal(a, epoch_order(blocks, seed=3, epoch=0, mix=1))
    assert not np.array_equal(a, epoch_order(blocks, seed=3, epoch=1, mix=1))
    assert not np.array_equal(a, epoch_order(blocks, seed=4, epoch=0, mix=1))
    # mix=1: each shard's windows are read one after the other (one shard at a time)
    runs = blocks[a].reshape(40, 5)
    assert (runs == runs[:, :1]).all() and len(set(runs[:, 0])) == 40
    # mix=4: every 20 consecutive windows come from exactly 4 shards
    b = epoch_order(blocks, seed=3, epoch=0, mix=4)
    assert all(len(set(blocks[b[i:i + 20]])) == 4 for i in range(0, 200, 20))
    assert np.array_equal(epoch_order(blocks, 0, 0, shuffle=False), np.arange(200))


@pytest.mark.parametrize("n", [0, 1, 7, 24, 25, 101])
@pytest.mark.parametrize("world,batch", [(1, 1), (2, 3), (3, 2), (4, 4)])
def test_rank_positions_are_equal_disjoint_and_rebuild_the_global_order(n, world, batch):
    parts = [rank_positions(n, world, r, batch) for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    per_rank = -(-n // world)
    pad = per_rank * world - n
    assert Counter(np.concatenate(parts).tolist()) == Counter(list(range(n)) + [p % n for p in range(pad)])
    # the global order: rank 0's batch, rank 1's batch, ... (the last partial global batch
    # split equally) equals one rank's order at batch world*batch, then the padding
    full = per_rank // batch
    glued = [i for g in range(full) for p in parts for i in p[g * batch:(g + 1) * batch].tolist()]
    glued += [i for p in parts for i in p[full * batch:].tolist()]
    assert glued == rank_positions(n, 1, 0, world * batch).tolist() + [p % n for p in range(pad)]
    dropped = [rank_positions(n, world, r, batch, drop_last=True) for r in range(world)]
    assert sorted(np.concatenate(dropped).tolist()) == list(range((n // world) * world))


def test_worker_positions_round_robin_by_batch():
    parts = [worker_positions(23, 4, w, 3) for w in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(23))
    assert parts[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15] and parts[2].tolist() == [8, 9, 10, 11, 20, 21, 22]
    with pytest.raises(ValueError):
        worker_positions(5, 1, 3, 3)


def test_window_grids_and_splits():
    assert sliding_starts(121, 20, 20).tolist() == [0, 20, 40, 60, 80, 100]
    assert sliding_starts(10, 20, 5).tolist() == []
    starts, rows, dropped = event_starts(
        [{"onset": 15.0, "duration": 22.5, "trial_type": "face"}, {"onset": 290.0, "duration": 22.5, "trial_type": "cat"},
         {"onset": None, "duration": 1.0}], tr_s=2.5, n_frames=121, length=9, hrf_delay_s=5.0)
    assert starts.tolist() == [8] and rows[0]["trial_type"] == "face" and dropped == 2  # 295 s / 2.5 = 118 + 9 > 121
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    subjects = [f"s{i:03d}" for i in range(500)]
    got = [split_of(s, 7, fractions) for s in subjects]
    assert got == [split_of(s, 7, fractions) for s in subjects]
    assert abs(got.count("train") / 500 - 0.6) < 0.08 and got != [split_of(s, 8, fractions) for s in subjects]
    assert split_key({"sub": "haxby1", "task": "objectviewing", "run": "03"}, "run") == "sub-haxby1_task-objectviewing_run-03"
    with pytest.raises(ValueError, match="sum to 1"):
        split_of("a", 0, {"train": 0.5})


def test_layouts_and_frame_normalization_known_answer():
    # synthetic values with a known answer: frame t of window b is constant c + t inside the mask
    buf = torch.zeros(2, 3, 4, 5, 6)  # (B, L, X, Y, Z)
    mask = torch.zeros(2, 4, 5, 6, dtype=torch.bool)
    mask[:, :2] = True
    buf[:, :, :2] = torch.randn(2, 3, 2, 5, 6)
    assert layout("neurostorm").view(buf).shape == (2, 1, 4, 5, 6, 3)
    assert torch.equal(layout("neurostorm").view(buf)[1, 0, :, :, :, 2], buf[1, 2])
    assert layout("flat").view(torch.zeros(2, 16, 7, 9)).shape == (2, 1, 16, 7, 9)
    assert layout("roi").view(torch.zeros(2, 20, 400)).shape == (2, 400, 20)
    for name in ("time_first", "neurostorm"):
        lay = layout(name)
        z = normalize_frames(lay.view(buf.half()), lay, mask, clamp=2.5)
        back = z if name == "time_first" else z[:, 0].movedim(-1, 1)
        inside = back[:, :, :2].reshape(2, 3, -1)
        assert z.dtype == torch.float32 and float(back[:, :, 2:].abs().max()) == 0.0
        assert float(inside.clamp(-2.5, 2.5).sub(inside).abs().max()) == 0.0 and float(inside.abs().max()) <= 2.5
        raw = normalize_frames(lay.view(buf[:, :, :2]), lay)
        np.testing.assert_allclose(raw.mean(dim=lay.spatial(raw.ndim)).numpy(), 0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown layout"):
        layout("nchw")


# ----------------------------------------------------------------------------- real store
def _order_of(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["index"]]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_mid_epoch_gives_the_uninterrupted_sequence(real_store):
    index = build_index(real_store, length=16, stride=8, array=ROI)
    assert len(index) > 100 and "sub-hcp1_task-rest" in index.dropped  # HCP has only its own parcellation
    make = lambda: WindowDataset(index, batch_size=5, seed=11, rank=0, world_size=1)
    full = WindowLoader(make(), num_workers=2)
    uninterrupted = _order_of(full) + _order_of(full)  # epochs 0 and 1
    assert sorted(uninterrupted[: len(index)]) == list(range(len(index)))
    assert uninterrupted[: len(index)] != uninterrupted[len(index):]  # a new order each epoch

    first = WindowLoader(make(), num_workers=2)
    seen = []
    for k, batch in enumerate(first):
        seen += batch["index"].tolist()
        if k == 6:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["consumed"] == 35
    resumed = WindowLoader(make(), num_workers=3, persistent_workers=True)  # other worker count, persistent
    resumed.load_state_dict(state)
    seen += _order_of(resumed)
    assert resumed.state_dict()["epoch"] == 1
    seen += _order_of(resumed)
    assert seen == uninterrupted
    # a state from another seed is refused
    with pytest.raises(ValueError, match="seed"):
        WindowDataset(index, batch_size=5, seed=12).load_state_dict(state)
    # in-process iteration counts on its own, also across a break
    ds = make()
    it = iter(ds)
    part = [next(it)["index"].tolist() for _ in range(3)]
    it.close()
    again = make()
    again.load_state_dict(ds.state_dict())
    assert sum(part, []) + [i for b in again for i in b["index"].tolist()] == uninterrupted[: len(index)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_two_ranks_three_workers_read_every_window_once_in_the_global_order(real_store):
    index = build_index(real_store, length=20, stride=10, array=ROI)
    n = len(index)
    ranks = []
    for rank in (0, 1):
        ds = WindowDataset(index, batch_size=4, seed=5, rank=rank, world_size=2, prefetch=3)
        ranks.append([b["index"].tolist() for b in WindowLoader(ds, num_workers=3)])
    flat = [i for r in ranks for b in r for i in b]
    order = epoch_order(index.blocks(), 5, 0)
    pad = len(flat) - n
    assert 0 <= pad < 2 and Counter(flat) == Counter(list(range(n)) + order[:pad].tolist())
    assert len(sum(ranks[0], [])) == len(sum(ranks[1], []))
    # the same global batch size on one rank: batches of 8 = rank 0's 4 then rank 1's 4
    single = [b["index"].tolist() for b in WindowLoader(WindowDataset(index, batch_size=8, seed=5, world_size=1, rank=0))]
    glued = [i for b0, b1 in zip(ranks[0], ranks[1]) for i in b0 + b1]
    assert glued[:n] == sum(single, [])


def test_a_late_worker_partitions_from_where_the_iteration_started(real_store, monkeypatch):
    """Regression: a worker that starts after the main process has consumed batches of the
    other workers must still take its own share of the epoch (worker 2 is delayed here)."""
    import time

    import fmri_data.load.dataset as dataset_module

    real_info = dataset_module.get_worker_info

    def slow_for_worker_2():
        info = real_info()
        if info is not None and info.id == 2:
            time.sleep(1.0)
        return info

    monkeypatch.setattr(dataset_module, "get_worker_info", slow_for_worker_2)
    index = build_index(real_store, length=20, stride=10, array=ROI)
    ds = WindowDataset(index, batch_size=4, seed=5, prefetch=0)
    got = [i for b in WindowLoader(ds, num_workers=3, multiprocessing_context="fork") for i in b["index"].tolist()]
    assert got == ds.windows_of_epoch(0).tolist()


def test_read_ahead_by_default_only_for_large_windows(real_store):
    roi = build_index(real_store, length=20, stride=10, array=ROI)  # 20 x 400 float32: 32 kB
    bold = build_index(real_store, length=20, stride=40, array="bold", run_ids=[HAXBY_RUN.format(1)])  # 35 MB
    assert WindowDataset(roi, batch_size=2).prefetch == 0
    assert WindowDataset(bold, batch_size=2).prefetch == 2
    assert WindowDataset(roi, batch_size=2, prefetch=3).prefetch == 3  # an explicit value is kept


def test_windows_hold_the_stored_frames_in_each_layout(real_store):
    store = Store.open(real_store)
    index = build_index(real_store, length=20, stride=40, array="bold", run_ids=[HAXBY_RUN.format(1), HAXBY_RUN.format(2)])
    assert len(index) == 6 and index.runs[0].frame_shape == (96, 96, 96)
    ds = WindowDataset(index, batch_size=2, shuffle=False, layout="neurostorm", mask="brain_mask", prefetch=2)
    batch = next(iter(ds))
    assert batch["data"].shape == (2, 1, 96, 96, 96, 20) and batch["data"].dtype == torch.float16
    assert batch["mask"].shape == (2, 96, 96, 96) and batch["run_id"] == [HAXBY_RUN.format(1)] * 2
    bold = store.run(HAXBY_RUN.format(1))["bold"]
    np.testing.assert_array_equal(batch["data"][1, 0].numpy(), np.moveaxis(bold[40:60], 0, -1))
    on = ds.to_device(batch, "cpu", normalize=True, clamp=4.0)
    assert on["data"].dtype == torch.float32 and float(on["data"].abs().max()) <= 4.0
    roi = WindowMapDataset(build_index(real_store, length=16, array=ROI), layout="roi")
    sample = roi[3]
    key = sample["run_id"]
    np.testing.assert_array_equal(sample["data"].numpy(), store.run(key)[ROI][int(sample["start"]):int(sample["start"]) + 16].T)
    assert collate_windows([roi[0], roi[1]])["data"].shape == (2, 400, 16)


def test_haxby_event_locked_windows_carry_the_events_tsv_labels(real_store):
    delay = 5.0
    index = build_index(real_store, length=4, array=ROI, source="events", hrf_delay_s=delay, where={"task": "objectviewing"})
    assert {r.tr_s for r in index.runs} == {2.5} and len(index.runs) == 12
    expected = []
    for n in range(1, 13):
        events = pd.read_csv(HAXBY / f"sub-haxby1_task-objectviewing_run-{n:02d}_events.tsv", sep="\t")
        for onset, trial_type in zip(events["onset"], events["trial_type"]):
            start = int(round((onset + delay) / 2.5))
            if start + 4 <= 121:
                expected.append((HAXBY_RUN.format(n), start, trial_type))
    got = [(index.run_id(i), int(index.start[i]), index.labels(i)["trial_type"]) for i in range(len(index))]
    assert sorted(got) == sorted(expected) and len(got) >= 90
    assert set(index.classes("trial_type")) == {"bottle", "cat", "chair", "face", "house", "scissors", "scrambledpix", "shoe"}
    ds = WindowDataset(index, batch_size=16, seed=0, targets=("trial_type", "run"))
    batch = next(iter(ds))
    classes = index.classes("trial_type")
    assert [classes[c] for c in batch["targets"]["trial_type"].tolist()] == [lab["trial_type"] for lab in batch["labels"]]
    assert all(lab["sub"] == "haxby1" and lab["site"] == "princeton" and lab["sex"] is None for lab in batch["labels"])
    # within-subject decoding: held-out runs, never a run in two splits
    fractions = {"train": 0.5, "val": 0.25, "test": 0.25}
    parts = {s: index.split(s, by="run", seed=1, fractions=fractions) for s in fractions}
    runs = {s: {p.run_id(i) for i in range(len(p))} for s, p in parts.items()}
    assert sum(len(p) for p in parts.values()) == len(index)
    assert not (runs["train"] & runs["val"]) and not (runs["train"] & runs["test"]) and not (runs["val"] & runs["test"])
    # subject splits keep every subject whole
    everything = build_index(real_store, length=16, array=ROI)
    parts = {s: everything.split(s, seed=3) for s in ("train", "val", "test")}
    subs = {s: {p.labels(i)["sub"] for i in range(len(p))} for s, p in parts.items()}
    assert sum(len(p) for p in parts.values()) == len(everything)
    assert not (subs["train"] & subs["val"]) and not (subs["train"] & subs["test"]) and not (subs["val"] & subs["test"])


def _roi_copy(real_store: str, dest: Path, run_ids: list[str]) -> str:
    """A store with some runs of real_store and their ROI series only (no bold: fast to copy)."""
    dest.mkdir()
    shutil.copy(Path(real_store, "zarr.json"), dest / "zarr.json")
    (dest / "runs").mkdir()
    shutil.copy(Path(real_store, "runs", "zarr.json"), dest / "runs" / "zarr.json")
    for run_id in run_ids:
        shutil.copytree(Path(real_store, "runs", run_id), dest / "runs" / run_id, ignore=shutil.ignore_patterns("bold"))
    return str(dest)


def test_only_top_k_saliency_windows(real_store, tmp_path):
    from fmri_data.saliency import score_store

    runs = [HAXBY_RUN.format(n) for n in (1, 2, 3)] + ["sub-hcp1_task-rest"]
    url = _roi_copy(real_store, tmp_path / "sal.zarr", runs)
    score_store(url, ["dvars"], window=16, stride=8, k=3, source=["roi"])
    index = build_index(url, length=16, array="roi", source="saliency", scorer="dvars")
    store = Store.open(url)
    for run_id in runs:
        group = store.run(run_id)["saliency/dvars"]
        top = group["starts"][...][group["topk"][...]]
        got = [int(index.start[i]) for i in range(len(index)) if index.run_id(i) == run_id]
        assert got == sorted(top.tolist()) and len(got) == 3
        ranks = [index.labels(i)["saliency_rank"] for i in range(len(index)) if index.run_id(i) == run_id]
        assert [int(top[r]) for r in ranks] == got
    assert {r.array for r in index.runs} == {ROI, "roi/Schaefer400x17subcortex19"}
    with pytest.raises(StoreError, match="windows of 16 frames, not 20"):
        build_index(url, length=20, array="roi", source="saliency", scorer="dvars")


def test_corrupt_or_missing_shard_is_named_or_skipped(real_store, tmp_path, caplog):
    run = HAXBY_RUN.format(4)
    url = tmp_path / "broken.zarr"
    url.mkdir()
    for name in ("zarr.json",):
        shutil.copy(Path(real_store, name), url / name)
    (url / "runs").mkdir()
    shutil.copy(Path(real_store, "runs", "zarr.json"), url / "runs" / "zarr.json")
    shutil.copytree(Path(real_store, "runs", run), url / "runs" / run)
    shard = url / "runs" / run / "bold" / "c" / "1" / "0" / "0" / "0"  # frames [100, 121)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (url / "runs" / run / "roi" / "schaefer400_7n" / "c" / "0" / "0").unlink()  # frames [0, 100)

    bold = build_index(str(url), length=20, stride=20, array="bold")
    ds = WindowDataset(bold, batch_size=2, shuffle=False, prefetch=0)
    with pytest.raises(ChunkError) as err:
        list(ds)
    assert err.value.run_id == run and err.value.array == "bold" and err.value.frames == (100, 120)
    assert f"runs/{run}/bold: chunk of frames [100, 120) in shard runs/{run}/bold/c/1/0/0/0: unreadable" in str(err.value)

    roi = build_index(str(url), length=20, stride=20, array=ROI)
    with pytest.raises(ChunkError, match=rf"{run}/{ROI}: chunk of frames \[0, 100\) in shard runs/{run}/{ROI}/c/0/0: shard file missing"):
        WindowMapDataset(roi)[0]
    with caplog.at_level(logging.WARNING, logger="fmri_data.load"):
        skip = WindowLoader(WindowDataset(roi, batch_size=2, shuffle=False, on_error="skip"), num_workers=0)
        got = _order_of(skip)
    assert got == [5] and skip.state_dict()["epoch"] == 1  # windows 0-4 start in the missing shard
    assert sum("shard file missing" in r.getMessage() for r in caplog.records) == 5
    ds = WindowDataset(bold, batch_size=2, shuffle=False, on_error="skip")
    assert [i for b in ds for i in b["index"].tolist()] == [0, 1, 2, 3, 4]
    # in workers too, where the batch missing a window is a copy and its reused buffer goes back
    reader = WindowReader(bold)
    for _ in range(2):
        batches = list(WindowLoader(ds, num_workers=2, persistent_workers=True))
        assert [i for b in batches for i in b["index"].tolist()] == [0, 1, 2, 3, 4]
        for b in batches:
            for row, i in zip(b["data"], b["index"].tolist()):
                np.testing.assert_array_equal(row.numpy(), reader.read(i))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pinned_batches_and_normalization_on_the_gpu(real_store):  # pragma: no cover - needs a GPU
    index = build_index(real_store, length=20, stride=40, array="bold", run_ids=[HAXBY_RUN.format(1)])
    ds = WindowDataset(index, batch_size=2, shuffle=False, layout="neurostorm", mask="brain_mask", pin_memory=True)
    batch = next(iter(ds))
    assert batch["data"].is_pinned()
    on = ds.to_device(batch, "cuda", normalize=True, clamp=5.0)
    off = ds.to_device(batch, "cpu", normalize=True, clamp=5.0)
    assert on["data"].is_cuda
    torch.testing.assert_close(on["data"].cpu(), off["data"], atol=1e-4, rtol=1e-4)


def test_cli_windows_counts_event_locked_windows(real_store):
    from typer.testing import CliRunner

    from fmri_data.cli.main import app

    result = CliRunner().invoke(app, ["windows", real_store, "--length", "4", "--array", ROI, "--source", "events", "--label", "trial_type"])
    assert result.exit_code == 0, result.output
    assert "96 windows of 4 frames (events) in 12 runs" in result.output and "face=12" in result.output
    assert "sub-me1_task-visual: no events" in result.output
    bad = CliRunner().invoke(app, ["windows", real_store, "--length", "4", "--source", "saliency"])
    assert bad.exit_code == 2 and "needs a scorer" in bad.output



def test_memory_filesystem_store_gives_the_local_windows(real_store, tmp_path):
    import fsspec

    runs = [HAXBY_RUN.format(1), "sub-hcp1_task-rest"]
    local = _roi_copy(real_store, tmp_path / "mem-src.zarr", runs)
    fs = fsspec.filesystem("memory")
    fs.put(local, "/loader-test.zarr", recursive=True)
    try:
        for array in (ROI, "roi/Schaefer400x17subcortex19"):
            a = build_index("memory://loader-test.zarr", 16, 16, array=array)
            b = build_index(local, 16, 16, array=array)
            assert len(a) > 0 and a.fingerprint() == b.fingerprint()
            for x, y in zip(WindowDataset(a, batch_size=3, seed=2), WindowDataset(b, batch_size=3, seed=2)):
                assert torch.equal(x["data"], y["data"]) and x["run_id"] == y["run_id"]
    finally:
        fs.rm("/loader-test.zarr", recursive=True)


def test_direct_chunk_decoding_equals_zarr_reads(real_store, tmp_path, monkeypatch):
    """Frames decoded straight from shard files (fmri_data.store.direct) equal Zarr's reads:
    windows across chunk and shard borders, the short edge chunk, never-written chunks.
    The small array is synthetic so that one chunk is all fill value (Zarr then writes none)."""
    import fsspec
    import zarr

    from fmri_data.store.direct import direct_layout, read_frames, shard_index
    from fmri_data.load.reader import WindowReader
    from fmri_data.store.layout import compressors

    index = build_index(real_store, length=21, stride=5, array="bold", run_ids=[HAXBY_RUN.format(2)])
    reader = WindowReader(index)
    bold = Store.open(real_store).run(HAXBY_RUN.format(2))["bold"]
    assert direct_layout(bold) is not None and index.start[-1] + 21 == bold.shape[0] == 121
    for i in range(len(index)):
        s = int(index.start[i])
        np.testing.assert_array_equal(reader.read(i), bold[s:s + 21])
    # read-ahead hints ask the kernel for exactly the byte ranges read() reads
    import fmri_data.load.reader as reader_module

    hinted, read = [], []
    monkeypatch.setattr(reader_module, "will_need", lambda path, offset, nbytes: hinted.append((path, offset, nbytes)))
    cat_file = reader.store().fs.cat_file

    def recording_cat_file(path, start=None, end=None):
        if end is not None:  # a chunk (the shard index is read from the end: start < 0, no end)
            read.append((path, start, end - start))
        return cat_file(path, start=start, end=end)

    monkeypatch.setattr(reader.store().fs, "cat_file", recording_cat_file)
    i = 19  # frames [95, 116): chunk 4 (the last of shard 0) and chunk 5 (the first of shard 1)
    reader.advise(i)
    reader.read(i)
    assert len(hinted) == 2 and hinted[0][0] != hinted[1][0] and hinted == read

    values = np.arange(38 * 3 * 4, dtype=np.float16).reshape(38, 3, 4)
    values[10:15] = 0  # chunk 2 = fill value
    spec = {"cname": "lz4hc", "clevel": 5, "shuffle": "shuffle"}
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=values.shape, dtype="float16", chunks=(5, 3, 4),
                            shards=(20, 3, 4), compressors=compressors(spec, 2), fill_value=0)
    arr[:] = values
    layout = direct_layout(arr)
    assert layout.chunks_per_shard == 4
    fs = fsspec.filesystem("file")
    path = lambda t: str(tmp_path / "a.zarr" / "c" / str(t) / "0" / "0")  # noqa: E731
    assert int(shard_index(fs, path(0), layout)[2, 0]) == 2**64 - 1  # chunk 2 was never written
    for start in range(38):
        for stop in range(start + 1, 39):
            out = np.full((stop - start, 3, 4), np.nan, np.float16)
            read_frames(fs, path, lambda t: shard_index(fs, path(t), layout), layout, start, stop, out)
            np.testing.assert_array_equal(out, values[start:stop])
    plain = zarr.create_array(str(tmp_path / "b.zarr"), shape=(8, 3), dtype="float32", chunks=(4, 3))
    assert direct_layout(plain) is None  # unsharded: read through Zarr
