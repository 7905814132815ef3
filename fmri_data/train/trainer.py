"""Training loop shared by the four families: AdamW with warm-up + cosine decay, mixed
precision on CUDA, safetensors checkpoints with exact resume, per-step metrics.

Determinism: every random draw of a step (masks, unit order) comes from a generator seeded
with ``(seed, step)`` (the global torch seed, used by dropout layers, is set likewise), and the batch stream's position is saved with the checkpoint, so a
run resumed from step ``k`` computes the same step-``k`` loss as an uninterrupted run (on
the same device and thread count).

Files in ``out_dir``::

    checkpoints/step-000010.safetensors   model + optimiser tensors; metadata: step, config,
                                          batch-stream state, optimiser hyper-parameters
    metrics.jsonl, metrics.csv            one row per logged step
"""

from __future__ import annotations

import csv
import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..errors import SettingError
from .configs import Config
from .registry import from_dict, get_family

CHECKPOINTS = "checkpoints"


def build_model(cfg: Config) -> nn.Module:
    """The family's model for ``cfg`` (weights initialised from ``cfg.train.seed``; the builder
    is the family's :class:`~fmri_data.train.registry.Family` ``build``).

    Raises:
        SettingError: an unknown family; fMRI-LM stage 2 without ``model.tokenizer_checkpoint``.
    """
    spec = get_family(cfg.family)
    torch.manual_seed(cfg.train.seed)
    return spec.build(cfg.model)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device 'cuda' asked for but CUDA is not available")
    return dev


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 10% of ``lr`` at ``steps``."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------------------- checkpoints
def write_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict[str, Any]) -> None:
    """Write ``model``'s state (``model.checkpoint_keys()`` if it defines them) and the
    optimiser's tensors to one safetensors file, atomically (temp file + rename)."""
    keys = model.checkpoint_keys() if hasattr(model, "checkpoint_keys") else None
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()
               if keys is None or k in keys}
    groups = []
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, values in state["state"].items():
            for name, value in values.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().clone().contiguous()
        groups = state["param_groups"]
    metadata = {"meta": json.dumps({**meta, "partial": keys is not None}), "param_groups": json.dumps(groups)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """(model state dict, meta, optimiser state dict or None) of a checkpoint file.

    Raises:
        FileNotFoundError: no such file; SettingError: not an fmri-data checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "meta" not in metadata:
        raise SettingError(f"{path}: not an fmri-data checkpoint (no 'meta' metadata)")
    tensors = load_file(str(path))
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    groups = json.loads(metadata["param_groups"])
    optim = None
    if groups:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        optim = {"state": state, "param_groups": groups}
    return model, json.loads(metadata["meta"]), optim


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    files = sorted((Path(out_dir) / CHECKPOINTS).glob("step-*.safetensors"))
    return files[-1] if files else None


def load_pretrained(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Config]:
    """A model and its config from a training checkpoint (for probes and evaluation)."""
    state, meta, _ = read_checkpoint(path)
    cfg = from_dict(meta["config"])
    model = build_model(cfg)
    model.load_state_dict(state, strict=not meta.get("partial", False))
    return model.to(resolve_device(device)), cfg


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """Pre-train ``model`` on ``batches`` for ``cfg.train.steps`` steps.

    Args:
        model: a family model (``forward(batch, generator) -> (loss, metrics)``).
        batches: iterator of batches on ``device`` with ``state_dict``/``load_state_dict``.
        cfg: the run's config (saved in every checkpoint).
        out_dir: checkpoints and metrics go here.
        device: ``auto`` | ``cpu`` | ``cuda``.
        resume: continue from the latest checkpoint in ``out_dir`` when there is one.
        log: called with one line per logged step and the summary.
    """

    def __init__(self, model: nn.Module, batches, cfg: Config, out_dir: str | Path, *, device: str = "auto",
                 resume: bool = False, log: Callable[[str], None] | None = None):
        self.cfg, self.out = cfg, Path(out_dir)
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.batches = batches
        self.log = log or (lambda line: None)
        self.params = params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise SettingError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                           betas=(0.9, 0.95))
        amp = cfg.train.amp if self.device.type == "cuda" else "none"
        if amp not in ("bf16", "fp16", "none"):
            raise SettingError(f"train.amp must be bf16, fp16 or none, not '{amp}'")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.step = 0
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and (ckpt := latest_checkpoint(self.out)) is not None:
            self._resume(ckpt)
        else:
            for name in ("metrics.jsonl", "metrics.csv"):
                (self.out / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        path = self.out / CHECKPOINTS / f"step-{self.step:06d}.safetensors"
        meta = {"step": self.step, "config": self.cfg.to_dict(), "batches": self.batches.state_dict()}
        write_checkpoint(path, self.model, self.optimizer, meta)
        return path

    def _resume(self, path: Path) -> None:
        state, meta, optim = read_checkpoint(path)
        self.model.load_state_dict(state, strict=not meta["partial"])
        if optim is not None:
            self.optimizer.load_state_dict(optim)
        self.batches.load_state_dict(meta["batches"])
        self.step = int(meta["step"])
        rows = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()] \
            if (self.out / "metrics.jsonl").exists() else []
        for name in ("metrics.jsonl", "metrics.csv"):
            (self.out / name).unlink(missing_ok=True)
        for row in rows:
            if row["step"] < self.step:
                self._write_metrics(row)
        self.log(f"resumed from {path} at step {self.step}")

    def _write_metrics(self, row: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        path = self.out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """One optimisation step at ``self.step``; returns (loss, model metrics)."""
        self.model.train()
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_seed = self.cfg.train.seed * 1_000_003 + self.step
        generator = torch.Generator().manual_seed(step_seed)   # masks
        torch.manual_seed(step_seed)                             # dropout (e.g. inside a Hugging Face LM)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss, metrics = self.model(batch, generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}")
        params = self.params
        if self.scaler is not None:  # pragma: no cover - CUDA fp16 only
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(self.model, "after_step"):
            self.model.after_step(self.step, self.cfg.train.steps)
        return loss.item(), {**metrics, "lr": lr}

    def fit(self, until: int | None = None) -> dict[str, Any]:
        """Train to step ``until`` (default ``cfg.train.steps``); checkpoint every
        ``checkpoint_every`` steps and at the end. Returns a summary (losses, samples/s,
        peak memory)."""
        until = self.cfg.train.steps if until is None else min(int(until), self.cfg.train.steps)
        if self.device.type == "cuda":  # pragma: no cover - GPU only
            torch.cuda.reset_peak_memory_stats(self.device)
        losses, samples, t0 = [], 0, time.perf_counter()
        while self.step < until:
            t = time.perf_counter()
            batch = next(self.batches)
            loss, metrics = self.train_step(batch)
            n = int(batch["data"].shape[0])
            if self.device.type == "cuda":  # pragma: no cover
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t
            samples += n
            losses.append(loss)
            row = {"step": self.step, "loss": loss, "samples_per_s": n / dt, "time_s": dt,
                   **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
            self.step += 1
            if (self.step - 1) % self.cfg.train.log_every == 0 or self.step == until:
                self._write_metrics(row)
                self.log(f"step {row['step']:>6}  loss {loss:.4f}  lr {row['lr']:.2e}  {row['samples_per_s']:.1f} samples/s")
            if self.step % self.cfg.train.checkpoint_every == 0 or self.step == until:
                self.save()
        elapsed = time.perf_counter() - t0
        summary = {"steps": len(losses), "losses": losses, "samples_per_s": samples / elapsed if elapsed else 0.0,
                   "peak_memory_bytes": peak_memory(self.device), "device": str(self.device)}
        self.log(f"{summary['steps']} steps, {summary['samples_per_s']:.2f} samples/s, peak "
                 f"{'GPU memory' if self.device.type == 'cuda' else 'RSS'} {summary['peak_memory_bytes'] / 2**20:.0f} MiB")
        return summary


def peak_memory(device: torch.device) -> int:
    """Peak bytes: GPU memory allocated by torch on CUDA, else the process's peak RSS."""
    if device.type == "cuda":  # pragma: no cover
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
