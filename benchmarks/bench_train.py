"""Training throughput and peak memory of the four model families, with NeuroSTORM's
sequential selective scan as the named baseline of its chunked scan.

Every measurement is one training step as ``fmri-data train`` runs it
(:meth:`fmri_data.train.trainer.Trainer.train_step`: AdamW, gradient clipping, the EMA update
of SLIM-Brain; bf16 autocast on CUDA, float32 on the CPU) of a model built by the project's
registry (:func:`fmri_data.train.get_config` + :func:`fmri_data.train.build_model`), on one
synthetic batch of the config's input shape, already on the device (random normal values:
speed does not depend on them; flat maps get a mask of two ellipses, one per hemisphere,
67 % of the 224 x 560 pixels). ``--warmup`` untimed steps, then ``--steps`` timed ones, in
each of ``--rounds`` fresh processes (the two scans of a pair alternate: sequential,
chunked, chunked, sequential, ...); samples/s = batch / median step time over all rounds
(the median and the alternation, because a shared machine's load spikes hit single steps
and single processes). ``CPU s``: the median CPU time of the process per step (all threads;
on a CPU shared with other jobs it moves far less than wall time, so the pairs' ratios are
also given by CPU time). Peak memory: GPU memory
allocated by torch on CUDA (``max_memory_allocated``, from before the first step), the
process's peak resident set on the CPU (imports and model included). Each measurement
runs in fresh Python processes, so peaks do not mix (the largest of its rounds is printed).

NeuroSTORM runs twice on the same batch and masks: ``scan="sequential"`` (the baseline:
one torch step per token) and ``scan="chunked"`` (:func:`fmri_data.train.ssm.chunked_scan`);
the ratio of their samples/s is printed, with the relative difference of their losses at
the last step (same weights, batch, masks and steps; at the models' own initialisation the
state term is tiny, so this is a smoke check: ``tests/train/test_ssm.py`` checks losses and
gradients of a model whose scan matters). On CUDA with ``mamba-ssm`` installed, a third run
uses its fused kernel (``scan="auto"``). A second pair times the scan alone, forward +
backward, at the base config's stage-0 shapes (windows of 4 x 4 x 4 x 4 = 256 tokens, 72
channels, 16 states; ``--scan-windows`` windows: 640 is the base config's batch of 2),
because the tiny config's windows are only 16 tokens long.

Defaults: ``--config tiny`` on the CPU (a few minutes on 2 cores), ``base`` on CUDA, batch
sizes of the base configs as in issue 20 (2 for the volume models, 32 for flat maps and ROI
series; 2 for every tiny config).

    python benchmarks/bench_train.py
    python benchmarks/bench_train.py --device cuda --config base --steps 10
    python benchmarks/bench_train.py --families neurostorm --config tiny --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmri_data.train.registry import NAMES  # cheap: no torch

BASE_BATCH = {"neurostorm": 2, "slim_brain": 2, "flat_mae": 32, "fmri_lm": 32}
TINY_BATCH = 2
SCAN_SHAPE = (256, 72, 16)   # NeuroSTORM base, stage 0: tokens per window, inner width, d_state


def _device(name: str):
    from fmri_data.train.trainer import resolve_device

    return resolve_device(name)


def synthetic_batch(family: str, model, batch: int) -> dict:
    """A batch of ``model``'s input shape on the CPU (seeded); see the module docstring."""
    import torch

    g = torch.Generator().manual_seed(0)
    if family in ("neurostorm", "slim_brain"):
        return {"data": torch.randn(batch, 1, *model.input_shape, generator=g)}
    cfg = model.cfg
    if family == "flat_mae":
        h, w = cfg.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        mask = ((xx + 0.5) / 0.45) ** 2 + (yy / 0.95) ** 2 < 1
        mask |= ((xx - 0.5) / 0.45) ** 2 + (yy / 0.95) ** 2 < 1
        return {"data": torch.randn(batch, 1, cfg.frames, h, w, generator=g), "mask": mask}
    return {"data": torch.randn(batch, cfg.n_rois, cfg.frames, generator=g)}


def measure_step(job: dict) -> dict:
    """Train steps of one family (in this process); returns samples/s, peak memory, last loss."""
    import torch

    from fmri_data.train import Trainer, build_model, get_config
    from fmri_data.train.ssm import set_scan

    device = _device(job["device"])
    cfg = get_config(job["family"], job["config"], ["train.warmup_steps=0"])
    model = build_model(cfg)
    if job["scan"]:
        set_scan(model, job["scan"])
    batch = {k: v.to(device) for k, v in synthetic_batch(job["family"], model, job["batch"]).items()}
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, None, cfg, out, device=str(device))
        if device.type == "cuda":  # pragma: no cover - GPU only
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(job["warmup"]):
            trainer.train_step(batch)
            trainer.step += 1
        times, cpu = [], []
        for _ in range(job["steps"]):
            if device.type == "cuda":  # pragma: no cover
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = trainer.train_step(batch)   # .item() inside: waits for the device
            if device.type == "cuda":  # pragma: no cover
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            trainer.step += 1
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"times": times, "cpu": cpu, "peak_bytes": int(peak), "last_loss": loss}


def measure_scan(job: dict) -> dict:
    """Forward + backward of the selective scan alone at NeuroSTORM base stage-0 shapes."""
    import torch
    import torch.nn.functional as F

    from fmri_data.train.ssm import scan

    device = _device(job["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    (length, d, n), b = SCAN_SHAPE, job["batch"]
    g = torch.Generator().manual_seed(0)
    u = torch.randn(b, length, d, generator=g)
    delta = F.softplus(torch.randn(b, length, d, generator=g) - 3)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    inputs = [t.to(device, dtype).requires_grad_() for t in (u, delta, B, C)]
    A, D = A.to(device).requires_grad_(), torch.ones(d, device=device, requires_grad=True)

    def step():
        u, delta, B, C = inputs
        y = scan(u, delta, A, B, C, D, method=job["scan"])
        y.float().square().mean().backward()
        for t in (*inputs, A, D):
            t.grad = None

    if device.type == "cuda":  # pragma: no cover
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(job["warmup"]):
        step()
    times, cpu = [], []
    for _ in range(job["steps"]):
        if device.type == "cuda":  # pragma: no cover
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":  # pragma: no cover
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"times": times, "cpu": cpu, "peak_bytes": int(peak), "last_loss": None}


def run_child(job: dict) -> dict:
    """``job`` measured in a fresh interpreter (own peak memory); ``error`` on failure."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        err = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": err}
    return json.loads(lines[-1])


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--families", nargs="+", default=list(NAMES), choices=NAMES, metavar="FAMILY",
                   help=f"any of {', '.join(NAMES)} (default: all)")
    p.add_argument("--config", choices=("tiny", "base"), help="default: base on CUDA, tiny on the CPU")
    p.add_argument("--batch", type=int, help="samples per step for every family (default: see the docstring)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (default 5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="fresh processes per measurement, the two scans of a pair alternating (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--scan-windows", type=int, help="windows in the scan-only pair (default: 640 on CUDA, 8 on the CPU)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps((measure_scan if job["kind"] == "scan" else measure_step)(job)))
        return
    if min(args.steps, args.warmup, args.rounds) < 1:
        p.error("--steps, --warmup and --rounds must be >= 1")
    from fmri_data.errors import SettingError

    try:
        device = _device(args.device)
    except SettingError as e:
        p.exit(2, f"bench_train.py: {e}\n")
    import torch

    from fmri_data.train.ssm import FUSED_CUDA

    config = args.config or ("base" if device.type == "cuda" else "tiny")
    windows = args.scan_windows or (640 if device.type == "cuda" else 8)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}); torch {torch.__version__}; config {config}; "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}; {args.rounds} x ({args.warmup} warm-up + {args.steps} timed steps), median step")
    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    print(f"{'family':<12} {'scan':<11} {'batch':>5} {'samples/s':>10} {'s/step':>8} {'CPU s':>8} {memory:>16} {'last loss':>11}")
    groups = []   # measurements whose rounds interleave (the two scans of a pair)
    for family in args.families:
        batch = args.batch or (BASE_BATCH[family] if config == "base" else TINY_BATCH)
        scans = ("sequential", "chunked") if family == "neurostorm" else (None,)
        if family == "neurostorm" and device.type == "cuda" and FUSED_CUDA:  # pragma: no cover - GPU only
            scans += ("auto",)   # mamba-ssm's fused kernel
        groups.append([(family, scan, {"kind": "step", "family": family, "config": config, "scan": scan,
                                       "device": str(device), "batch": batch, "steps": args.steps,
                                       "warmup": args.warmup}) for scan in scans])
    if "neurostorm" in args.families:
        groups.append([("scan only", scan, {"kind": "scan", "scan": scan, "device": str(device), "batch": windows,
                                            "steps": args.steps, "warmup": args.warmup})
                       for scan in ("sequential", "chunked")])
    results = {}
    for group in groups:
        runs = {(family, scan): [] for family, scan, _ in group}
        for r in range(args.rounds):
            for family, scan, job in (group if r % 2 == 0 else group[::-1]):
                runs[(family, scan)].append(run_child(job))
        for family, scan, job in group:
            done = runs[(family, scan)]
            failed = [d["error"] for d in done if "error" in d]
            if failed:
                results[(family, scan)] = {}
                print(f"{family:<12} {scan or '-':<11} {job['batch']:>5}  failed: {failed[0]}")
                continue
            step = statistics.median(t for d in done for t in d["times"])
            cpu = statistics.median(t for d in done for t in d["cpu"])
            r = results[(family, scan)] = {"samples_per_s": job["batch"] / step, "last_loss": done[-1]["last_loss"],
                                           "peak_bytes": max(d["peak_bytes"] for d in done), "cpu_s": cpu}
            loss = "" if r["last_loss"] is None else f"{r['last_loss']:.6f}"
            print(f"{family:<12} {scan or '-':<11} {job['batch']:>5} {r['samples_per_s']:>10.2f} {step:>8.3f} "
                  f"{cpu:>8.3f} {_mib(r['peak_bytes']):>16} {loss:>11}")
    for family, what in (("neurostorm", "NeuroSTORM train step"),
                         ("scan only", f"selective scan alone, {windows} windows x {SCAN_SHAPE[0]} tokens")):
        seq, chunked = results.get((family, "sequential"), {}), results.get((family, "chunked"), {})
        if "samples_per_s" in seq and "samples_per_s" in chunked:
            line = (f"{what}: chunked / sequential = {chunked['samples_per_s'] / seq['samples_per_s']:.1f}x samples/s"
                    f" ({seq['cpu_s'] / chunked['cpu_s']:.1f}x by CPU time), "
                    f"{chunked['peak_bytes'] / seq['peak_bytes']:.2f}x peak memory")
            if seq["last_loss"] is not None:
                diff = abs(chunked["last_loss"] - seq["last_loss"]) / abs(seq["last_loss"])
                line += f"; last-step loss relative difference {diff:.1e}"
            print(line)
        fused = results.get((family, "auto"), {})
        if "samples_per_s" in fused and "samples_per_s" in seq:  # pragma: no cover - GPU with mamba-ssm
            print(f"{what}: mamba-ssm fused kernel (scan=auto) / sequential = "
                  f"{fused['samples_per_s'] / seq['samples_per_s']:.1f}x samples/s")


if __name__ == "__main__":
    main()
