"""Training layer: the four families train on real data (loss falls), resume exactly, and a
frozen encoder is probed on Haxby's event-locked windows.

Data: ``real_store`` (ds-real, default recipe: Haxby / sub-me1 volumes, HCP parcel series
with 419 parcels), a store of ds-real with the fmri_lm recipe (450 parcels, TR 2 s),
``flat_store`` (the real fsaverage5 run as 224 x 560 flat-map videos, flat_mae recipe), and,
for the flat-map MAE's masking invariants and the GPU step, small flat-map-shaped tensors
made by reshaping the real fsaverage5 run's left-hemisphere vertices into a 64 x 160 image
(not a real flat map; medial-wall vertices = invalid pixels). Synthetic inputs only where a
test needs a known answer (graph metrics, masking invariants), as noted there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DS_REAL
from fmri_data.train import StoreBatches, TensorBatches, Trainer, build_model, get_config, load_pretrained
from fmri_data.train.descriptors import describe, graph_metrics, network_of

STEPS, HALF = 24, 12
HCP_ROI = "roi/Schaefer400x17subcortex19"
FSAVERAGE5_L = (DS_REAL / "derivatives" / "preproc" / "sub-010188" / "ses-02" / "func"
                / "sub-010188_ses-02_task-rest_acq-AP_run-01_hemi-L_space-fsaverage5_bold.func.gii")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, more threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory, atlas_dir) -> str:
    from fmri_data.convert import convert

    out = str(tmp_path_factory.mktemp("train") / "fmri_lm.zarr")
    report = convert(DS_REAL, out, "fmri_lm", atlas_dir=atlas_dir, progress=False)
    assert not report.failed, [r.error for r in report.failed]
    return out


@pytest.fixture(scope="module")
def flat_like() -> tuple[torch.Tensor, torch.Tensor]:
    """(40, 1, 16, 64, 160) windows of the real fsaverage5 run, frame-z-scored on valid pixels,
    and the (64, 160) valid mask (vertices with signal)."""
    from fmri_data.read.gifti import open_gifti_series

    series = open_gifti_series(FSAVERAGE5_L)
    x = series.read()
    x = x if x.shape[0] == series.n_frames else x.T                       # (T, V)
    x = torch.from_numpy(np.ascontiguousarray(x[:, : 64 * 160], dtype=np.float32))
    valid = x.std(0) > 0
    x = (x - x[:, valid].mean(1, keepdim=True)) / x[:, valid].std(1, keepdim=True) * valid
    n = x.shape[0] // 16
    return x[: n * 16].reshape(n, 1, 16, 64, 160), valid.reshape(64, 160)


def _cfg(family: str, *extra: str):
    return get_config(family, "tiny", [f"train.steps={STEPS}", f"train.checkpoint_every={HALF}", *extra])


def _fit(cfg, make_batches, out, until=None, resume=False):
    trainer = Trainer(build_model(cfg), make_batches(cfg), cfg, out, device="cpu", resume=resume)
    return trainer, trainer.fit(until)


def _falls_and_resumes(cfg, make_batches, tmp_path) -> list[float]:
    """Loss falls over STEPS steps; stopping at HALF and resuming gives the same step-HALF loss."""
    _, full = _fit(cfg, make_batches, tmp_path / "full")
    losses = full["losses"]
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    _fit(cfg, make_batches, tmp_path / "part", until=HALF)
    trainer, resumed = _fit(cfg, make_batches, tmp_path / "part", until=HALF + 1, resume=True)
    assert resumed["steps"] == 1 and trainer.step == HALF + 1
    assert resumed["losses"][0] == pytest.approx(losses[HALF], rel=1e-5, abs=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(HALF + 1))
    assert (tmp_path / "part" / "metrics.csv").read_text().count("\n") == HALF + 2
    return losses


def store_batches(url: str):
    return lambda cfg: StoreBatches(url, cfg, "cpu")


# ----------------------------------------------------------------------------- families
def test_neurostorm_trains_and_resumes(real_store, tmp_path):
    cfg = _cfg("neurostorm")
    batch = next(StoreBatches(real_store, cfg, "cpu"))
    assert batch["data"].shape == (2, 1, 24, 24, 24, 4) and batch["data"].dtype == torch.float32
    _falls_and_resumes(cfg, store_batches(real_store), tmp_path)


def test_slim_brain_trains_and_resumes(real_store, tmp_path):
    _falls_and_resumes(_cfg("slim_brain"), store_batches(real_store), tmp_path)


def test_flat_mae_trains_and_resumes_on_real_flat_maps(flat_store, tmp_path):
    cfg = _cfg("flat_mae", "model.shape=[224, 560]")
    batch = next(StoreBatches(flat_store, cfg, "cpu"))
    assert batch["data"].shape == (2, 1, 16, 224, 560) and batch["mask"].shape[-2:] == (224, 560)
    _falls_and_resumes(cfg, store_batches(flat_store), tmp_path)


def test_fmri_lm_tokenizer_trains_and_resumes(real_store, tmp_path):
    cfg = _cfg("fmri_lm", "model.n_rois=419", f"model.roi_array={HCP_ROI}", "model.zscore_window=true")
    assert next(StoreBatches(real_store, cfg, "cpu"))["data"].shape == (2, 419, 32)
    _falls_and_resumes(cfg, store_batches(real_store), tmp_path)


def test_fmri_lm_language_model_trains_and_resumes(real_store, tmp_path):
    pytest.importorskip("peft")
    stage1 = _cfg("fmri_lm", "model.n_rois=419", f"model.roi_array={HCP_ROI}", "model.zscore_window=true", "train.steps=4")
    _fit(stage1, store_batches(real_store), tmp_path / "tokenizer")
    ckpt = tmp_path / "tokenizer" / "checkpoints" / "step-000004.safetensors"
    cfg = _cfg("fmri_lm", "model.n_rois=419", f"model.roi_array={HCP_ROI}", "model.zscore_window=true", "model.stage=2",
               f"model.tokenizer_checkpoint={ckpt}")
    batch = next(StoreBatches(real_store, cfg, "cpu"))
    assert len(batch["text"]) == 2 and "global efficiency" in batch["text"][0]
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("projector", "fmri_start")) for n in trainable)
    _falls_and_resumes(cfg, store_batches(real_store), tmp_path)


# ----------------------------------------------------------------------------- invariants
def test_flat_mae_masks_only_valid_patches_and_scores_valid_pixels(flat_like):
    """Synthetic edits of real windows: values on invalid pixels cannot change the loss."""
    x, valid = flat_like
    cfg = get_config("flat_mae", "tiny")
    model = build_model(cfg)
    patch_valid = model.patch_valid(valid[None].expand(3, -1, -1))
    keep, keep_pad, pred, pred_pad = model.tube_mask(patch_valid, torch.Generator().manual_seed(1))
    s = model.n_spatial
    for b in range(3):
        visible, hidden = set((keep[b][keep_pad[b]] % s).tolist()), set((pred[b][pred_pad[b]] % s).tolist())
        ok = set(torch.nonzero(patch_valid[b]).flatten().tolist())
        assert visible | hidden == ok and not visible & hidden
        assert len(visible) == round(0.1 * len(ok))
    batch = {"data": x[:2].clone(), "mask": valid}
    with torch.no_grad():
        loss = float(model(batch, torch.Generator().manual_seed(0))[0])
        batch["data"][:, :, :, ~valid] = 1e3
        assert float(model(batch, torch.Generator().manual_seed(0))[0]) == pytest.approx(loss, rel=1e-6)


def test_neurostorm_masks_windows_and_prompt_tuning_freezes_backbone():
    cfg = get_config("neurostorm", "tiny", ["model.n_prompts=2", "model.temporal_mask_ratio=0"])
    model = build_model(cfg)
    masked, dropped = model.masks(2, torch.Generator().manual_seed(0), "cpu")
    assert masked.float().mean() == pytest.approx(0.5) and not dropped.any()
    units = masked.view(2, 2, 2, 2, 2, 2, 2, 4)     # (B, ux, wx, uy, wy, uz, wz, T): whole windows
    assert torch.all(units.amin((2, 4, 6, 7)) == units.amax((2, 4, 6, 7)))
    prompts = model.freeze_backbone()
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in prompts}


def test_slim_brain_deletes_masked_units_before_the_encoder():
    cfg = get_config("slim_brain", "tiny")
    model = build_model(cfg)
    x = torch.randn(2, 1, 16, 16, 16, 8)   # synthetic: only shapes matter here
    _, metrics = model({"data": x}, torch.Generator().manual_seed(0))
    assert model.n_units == 32 and metrics["visible_tokens"] == round(0.3 * 32) * 16
    before = [p.clone() for p in model.target.parameters()]
    model.after_step(0, 10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.target.parameters()))  # encoder == target still


def test_descriptors_of_real_and_known_graphs(real_store):
    from fmri_data.store.root import Store

    assert network_of("LH_Vis_1") == "visual" and network_of("17Networks_RH_DefaultA_3") == "default mode"
    assert network_of("HIP-head-m-rh") == "subcortex" and network_of("THALAMUS_LEFT") == "subcortex"
    # known answers (synthetic graphs): a complete graph; a 4-node path 0-1-2-3
    assert graph_metrics(np.ones((5, 5)) - np.eye(5), density=1.0) == pytest.approx((1.0, 1.0))
    path = np.zeros((4, 4))
    for i in range(3):
        path[i, i + 1] = path[i + 1, i] = 1
    # efficiency = mean of 1/d over ordered pairs: d = 1 (3 pairs), 2 (2 pairs), 3 (1 pair)
    assert graph_metrics(path, density=0.5) == pytest.approx((0.0, (3 * 1 + 2 / 2 + 1 / 3) / 6))
    arr = Store.open(real_store).run("sub-hcp1_task-rest")[HCP_ROI]
    text = describe(arr[:32].T, list(arr.attrs["labels"]))
    assert text == describe(arr[:32].T, list(arr.attrs["labels"]))
    assert "network" in text and "global efficiency" in text
    with pytest.raises(ValueError, match="labels"):
        describe(arr[:32].T, ["LH_Vis_1"])


# ----------------------------------------------------------------------------- probe
def test_linear_probe_on_haxby_event_windows(lm_store, tmp_path, capsys):
    """Frozen fMRI-LM tokenizer (450 parcels), pre-trained briefly on the store, probed on the
    8 Haxby categories with runs 10-12 held out. The accuracy is reported, not asserted."""
    from fmri_data.train.probe import run_probe

    cfg = get_config("fmri_lm", "tiny", ["model.frames=8", "train.steps=30", "train.checkpoint_every=30"])
    _fit(cfg, store_batches(lm_store), tmp_path)
    model, loaded = load_pretrained(tmp_path / "checkpoints" / "step-000030.safetensors")
    assert loaded.to_dict() == cfg.to_dict()
    split = dict(label="trial_type", test={"run": ["10", "11", "12"]}, where={"task": "objectviewing"})
    result = run_probe(model, loaded, lm_store, **split)
    assert result.n_train == 72 and result.n_test == 24 and len(result.classes) == 8
    assert 0.0 <= result.accuracy <= 1.0
    baseline = run_probe(RawWindows(), loaded, lm_store, pool="flatten", **split)   # the input itself
    with capsys.disabled():
        print(f"\nHaxby 8-way linear probe, frozen fMRI-LM tokenizer (mean-pooled codes): {result}"
              f"\n  baseline, raw parcel windows flattened: {baseline}")


def test_neurostorm_prompt_tuning_on_haxby_event_windows(real_store, tmp_path, capsys):
    """A tiny NeuroSTORM pre-trained briefly without prompts gets prompts (zeros) and is
    prompt-tuned on the 8 Haxby categories, runs 10-12 held out: only the prompts change
    in the backbone. The accuracy is reported, not asserted."""
    from fmri_data.train.probe import run_probe, with_prompts

    cfg = get_config("neurostorm", "tiny", ["train.steps=4", "train.checkpoint_every=4"])
    _fit(cfg, store_batches(real_store), tmp_path)
    model, loaded = load_pretrained(tmp_path / "checkpoints" / "step-000004.safetensors")
    prompted, prompted_cfg = with_prompts(model, loaded, 2)
    assert loaded.model.n_prompts == 0 and prompted_cfg.model.n_prompts == 2
    same = {k: v for k, v in prompted.state_dict().items() if not k.endswith("prompts")}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in same.items())
    before = {k: v.clone() for k, v in prompted.state_dict().items()}
    split = dict(label="trial_type", test={"run": ["10", "11", "12"]}, where={"task": "objectviewing"})
    calls = []
    result = run_probe(prompted, prompted_cfg, real_store, kind="prompt", progress=lambda *a: calls.append(a), **split)
    assert calls[-1] == (10 * 18, 10 * 18, "prompt tuning")   # 10 epochs of 72 windows in batches of 4
    assert [c[0] for c in calls] == list(range(1, 181))
    changed = {k for k, v in prompted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith("prompts") for k in changed), changed
    assert result.n_train == 72 and result.n_test == 24 and len(result.classes) == 8
    with pytest.raises(ValueError, match="NeuroSTORM"):
        with_prompts(model, get_config("flat_mae", "tiny"))
    with capsys.disabled():
        print(f"\nHaxby 8-way NeuroSTORM prompt tuning (tiny, 4 pre-training steps): {result}")


class RawWindows(torch.nn.Module):
    """The probe's baseline: the window itself as features, ``(B, R, L)``."""

    def encode(self, batch):
        return batch["data"]


# ----------------------------------------------------------------------------- CLI
def test_cli_train_resume_and_probe(lm_store, tmp_path):
    from typer.testing import CliRunner

    from fmri_data.cli.main import app

    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", "--family", "fmri_lm", "--store", lm_store, "--config", "tiny", "--out", str(out), "--device", "cpu",
            "--set", "model.frames=8", "--set", "train.checkpoint_every=2"]
    first = runner.invoke(app, [*args, "--set", "train.steps=2"])
    assert first.exit_code == 0, first.output
    assert "samples/s" in first.output and "peak RSS" in first.output and "trainable parameters" in first.output
    again = runner.invoke(app, [*args, "--set", "train.steps=3"])
    assert again.exit_code == 0, again.output
    assert "resumed from" in again.output and "step-000002" in again.output
    assert (out / "checkpoints" / "step-000003.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    probe = runner.invoke(app, ["probe", "--checkpoint", str(out / "checkpoints" / "step-000003.safetensors"), "--store",
                                lm_store, "--test", "run=10,11,12", "--where", "task=objectviewing", "--device", "cpu"])
    assert probe.exit_code == 0, probe.output
    assert "accuracy" in probe.output and "24 held-out windows" in probe.output
    bad = runner.invoke(app, ["train", "--family", "flat_mae", "--store", lm_store, "--out", str(tmp_path / "f")])
    assert bad.exit_code == 2 and "flat" in bad.output
    wrong = runner.invoke(app, ["train", "--family", "nope", "--store", lm_store])
    assert wrong.exit_code == 2 and "unknown family" in wrong.output


# ----------------------------------------------------------------------------- base configs, GPU
def test_base_configs_keep_the_papers_input_contracts():
    shapes = {}
    for family in ("neurostorm", "slim_brain", "flat_mae"):
        cfg = get_config(family, "base")
        with torch.device("meta"):   # shapes only: no memory, no initialisation cost
            model = build_model(cfg)
        shapes[family] = getattr(model, "input_shape", None) or (cfg.model.frames, *cfg.model.shape)
    assert shapes == {"neurostorm": (96, 96, 96, 20), "slim_brain": (96, 96, 96, 40), "flat_mae": (16, 224, 560)}
    ns, slim, flat, lm = (get_config(f, "base").model for f in ("neurostorm", "slim_brain", "flat_mae", "fmri_lm"))
    assert ns.patch == (6, 6, 6, 1) and ns.mask_ratio == 0.5
    assert slim.patch == (1, 4, 4, 4) and slim.mask_ratio == 0.7 and slim.saliency_scorer
    assert (flat.patch, flat.t_patch, flat.mask_ratio) == (16, 16, 0.9)
    assert (lm.n_rois, lm.frames) == (450, 160)
    with pytest.raises(ValueError, match="no field"):
        get_config("neurostorm", "base", ["model.nope=1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_step_of_every_family(flat_like, tmp_path):  # pragma: no cover - GPU only
    x, valid = flat_like
    for family in ("neurostorm", "slim_brain", "flat_mae", "fmri_lm"):
        cfg = get_config(family, "tiny", ["train.steps=2"])
        m = cfg.model
        if family == "flat_mae":
            data = {"data": x[:2]}
        elif family == "fmri_lm":
            data = {"data": torch.randn(4, m.n_rois, m.frames)}
        else:
            data = {"data": torch.randn(2, 1, *(s // m.downsample for s in m.shape), m.frames)}
        batches = TensorBatches(data, 2, shared={"mask": valid} if family == "flat_mae" else None, device="cuda")
        summary = Trainer(build_model(cfg), batches, cfg, tmp_path / family, device="cuda").fit()
        assert np.all(np.isfinite(summary["losses"])) and summary["peak_memory_bytes"] > 0
