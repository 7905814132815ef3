"""Frozen-encoder probes: features of a pre-trained model, then a linear or attentive classifier.

- ``linear``: features mean-pooled over tokens ``(N, C)`` (or flattened), standardised on the training
  split, multinomial logistic regression (scikit-learn ``LogisticRegression``, L2).
- ``attentive``: a learned query cross-attends the frozen tokens ``(N, T, C)`` (one
  multi-head attention layer, then a linear layer; as the attentive probes of V-JEPA,
  arXiv 2404.08471), trained with AdamW on the training split.
- ``prompt`` (NeuroSTORM only): task-specific prompt tuning as NeuroSTORM fine-tunes its
  pre-trained backbone (arXiv 2506.11167): the backbone frozen, the learnable prompt tokens
  prepended to every window of every block (``model.n_prompts``, added as zeros to a
  backbone pre-trained without them) and a linear head on the mean-pooled tokens are
  trained end to end with cross-entropy on the training split; gradients flow through the
  frozen backbone to the prompts, so every step runs the whole encoder.

Windows come from :func:`fmri_data.train.data.family_index` (e.g. ``source="events"``:
one window per event, starting at onset + HRF delay) and are split by run label values,
so the test runs are never seen by the classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import SettingError
from ..imports import load_module
from ..load import collate_windows
from .configs import Config
from .data import eval_dataset, family_index, prepare
from .registry import get_family


@dataclass
class ProbeResult:
    accuracy: float           # on the test windows
    chance: float             # accuracy of always predicting the most frequent training class
    n_train: int
    n_test: int
    classes: list[Any]

    def __str__(self) -> str:
        return (f"accuracy {self.accuracy:.3f} on {self.n_test} held-out windows "
                f"({len(self.classes)} classes, chance {self.chance:.3f}; {self.n_train} training windows)")


#: ``progress(done, total, what)``: called as a long probe advances (the CLI draws a bar)
Progress = Callable[[int, int, str], None]


@torch.no_grad()
def features(model: nn.Module, cfg: Config, index, device: torch.device, batch_size: int = 8,
             progress: Progress | None = None) -> torch.Tensor:
    """Frozen tokens ``(N, T, C)`` float32 on CPU of every window of ``index`` (index order)."""
    model.eval()
    ds = eval_dataset(index, cfg)
    feats = []
    for lo in range(0, len(ds), batch_size):
        batch = collate_windows([ds[i] for i in range(lo, min(lo + batch_size, len(ds)))])
        feats.append(model.encode(prepare(batch, cfg, device, ds)).float().cpu())
        if progress is not None:
            progress(min(lo + batch_size, len(ds)), len(ds), "encoding windows")
    return torch.cat(feats)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Predicted classes of ``test_x`` (N, C) from logistic regression on standardised features."""
    LogisticRegression = load_module("sklearn.linear_model").LogisticRegression
    make_pipeline = load_module("sklearn.pipeline").make_pipeline
    StandardScaler = load_module("sklearn.preprocessing").StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return clf.fit(train_x, train_y).predict(test_x)


class AttentiveProbe(nn.Module):
    def __init__(self, dim: int, n_classes: int, heads: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), h, h)
        return self.head(pooled[:, 0])


def attentive_probe(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, n_classes: int,
                    epochs: int = 200, lr: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Predicted classes of ``test_x`` (N, T, C) from an attentive probe trained full-batch."""
    torch.manual_seed(seed)
    mean, std = train_x.mean((0, 1)), train_x.std((0, 1)).clamp_min(1e-6)
    probe = AttentiveProbe(train_x.shape[-1], n_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-2)
    y = torch.as_tensor(train_y)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(probe((train_x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return probe((test_x - mean) / std).argmax(-1).numpy()


CACHE_BYTES = 1 << 30  # prompt tuning keeps prepared training windows in memory up to this size


def with_prompts(model: nn.Module, cfg: Config, n_prompts: int = 4) -> tuple[nn.Module, Config]:
    """A NeuroSTORM ``model`` with learnable prompt tokens: itself when it has them, else the
    same weights in a model built with ``n_prompts`` prompts per block (initialised to 0).

    Raises:
        SettingError: not a NeuroSTORM model.
    """
    if not get_family(cfg.family).prompt_tuning:
        raise SettingError(f"prompt tuning is NeuroSTORM's; this is a {cfg.family} model")
    if cfg.model.n_prompts:
        return model, cfg
    from .trainer import build_model

    prompted_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_prompts=int(n_prompts)))
    prompted = build_model(prompted_cfg)  # prompts are created as zeros; every other weight is loaded
    missing, unexpected = prompted.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith("prompts") for k in missing):
        raise SettingError(f"cannot add prompts: missing {missing}, unexpected {unexpected}")
    return prompted.to(next(model.parameters()).device), prompted_cfg


def prompt_tune(model: nn.Module, cfg: Config, index, train: np.ndarray, train_y: np.ndarray, test: np.ndarray,
                n_classes: int, device: torch.device, *, epochs: int = 10, lr: float = 1e-2, batch_size: int = 4,
                seed: int = 0, progress: Progress | None = None) -> np.ndarray:
    """Predicted classes of windows ``test`` after prompt tuning on windows ``train`` (labels
    ``train_y``, class indices) of ``index`` (see the module doc; ``model`` from :func:`with_prompts`).

    Each epoch reads every training window again unless the prepared windows fit in
    :data:`CACHE_BYTES` (then they are prepared once).

    Returns:
        ``(len(test),)`` int64 predicted class indices.
    """
    torch.manual_seed(seed)
    ds = eval_dataset(index, cfg)
    prompts = model.freeze_backbone()
    model.eval()  # the frozen backbone keeps its inference behaviour (dropout, norms)
    cache: dict[int, dict[str, Any]] = {}  # prepared windows, kept while they fit in CACHE_BYTES
    cached = 0

    def window(i: int) -> dict[str, Any]:
        nonlocal cached
        if i in cache:
            return cache[i]
        inputs = prepare(collate_windows([ds[i]]), cfg, device, ds)
        size = sum(v.numel() * v.element_size() for v in inputs.values() if isinstance(v, torch.Tensor))
        if cached + size <= CACHE_BYTES:
            cache[i], cached = inputs, cached + size
        return inputs

    def tokens(ids) -> torch.Tensor:
        parts = [window(int(i)) for i in ids]
        inputs = {k: torch.cat([p[k] for p in parts]) for k, v in parts[0].items() if isinstance(v, torch.Tensor)}
        return model.encode(inputs).float().mean(1)   # (B, C)

    with torch.no_grad():
        dim = tokens(train[:1]).shape[-1]
    head = nn.Linear(dim, n_classes).to(device)
    opt = torch.optim.AdamW([*prompts, *head.parameters()], lr=lr, weight_decay=0.0)
    y = torch.as_tensor(train_y, device=device)
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(train) // batch_size)
    for epoch in range(epochs):
        perm = torch.randperm(len(train), generator=order).numpy()
        for step, lo in enumerate(range(0, len(train), batch_size)):
            pick = perm[lo:lo + batch_size]
            loss = nn.functional.cross_entropy(head(tokens(train[pick])), y[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress is not None:
                progress(epoch * steps_per_epoch + step + 1, epochs * steps_per_epoch, "prompt tuning")
    with torch.no_grad():
        return torch.cat([head(tokens(test[lo:lo + batch_size])).argmax(-1).cpu()
                          for lo in range(0, len(test), batch_size)]).numpy()


def run_probe(model: nn.Module, cfg: Config, url: str, *, label: str, test: dict[str, Any], kind: str = "linear",
              pool: str = "mean", source: str = "events", where: dict[str, Any] | None = None,
              device: str | torch.device = "cpu", seed: int = 0, progress: Progress | None = None) -> ProbeResult:
    """Probe a frozen ``model`` on label ``label`` of a store's windows.

    Args:
        test: label values of the held-out windows (``{"run": ["10", "11", "12"]}``); every
            other window of the index trains the classifier.
        kind: ``linear``, ``attentive`` or ``prompt`` (NeuroSTORM prompt tuning; updates
            ``model``'s prompts in place when it has them); source: window source
            (``events``, ``sliding``).
        pool: linear probe features: ``mean`` over tokens (C,) or ``flatten`` (T * C,) —
            per-ROI tokens (fMRI-LM) keep their parcel identity only when flattened.
        where: restrict the index (``{"task": "objectviewing"}``).
        progress: ``progress(done, total, what)`` as windows are encoded / prompt tuning steps.

    Raises:
        SettingError: no windows, an unknown ``kind``, prompt tuning of another family than
            NeuroSTORM, or a split without both train and test windows.
    """
    if kind not in ("linear", "attentive", "prompt") or pool not in ("mean", "flatten"):
        raise SettingError(f"probe kind must be linear, attentive or prompt and pool mean or flatten, not '{kind}', '{pool}'")
    device = torch.device(device)
    if kind == "prompt":
        model, cfg = with_prompts(model.to(device), cfg)
    index = family_index(url, cfg, source=source, where=where)
    labels = [index.labels(i) for i in range(len(index))]
    y_all = [lab.get(label) for lab in labels]
    held_values = {k: {str(v) for v in (vals if isinstance(vals, (list, tuple)) else [vals])} for k, vals in test.items()}
    held = np.array([all(str(lab.get(k)) in values for k, values in held_values.items()) for lab in labels])
    has = np.array([v is not None for v in y_all])
    tr, te = has & ~held, has & held
    if not tr.any() or not te.any():
        raise SettingError(f"probe split has {int(tr.sum())} training and {int(te.sum())} test windows labelled '{label}'")
    classes = sorted({y_all[i] for i in np.flatnonzero(tr)}, key=str)
    code = {c: k for k, c in enumerate(classes)}
    te = te & np.array([v in code for v in y_all])
    y = np.array([code.get(v, -1) for v in y_all])
    if kind == "prompt":
        pred = prompt_tune(model, cfg, index, np.flatnonzero(tr), y[tr], np.flatnonzero(te), len(classes), device,
                           seed=seed, progress=progress)
    else:
        tokens = features(model.to(device), cfg, index, device, progress=progress)
        if kind == "linear":
            pooled = (tokens.mean(1) if pool == "mean" else tokens.flatten(1)).numpy()
            pred = linear_probe(pooled[tr], y[tr], pooled[te], seed)
        else:
            pred = attentive_probe(tokens[tr], y[tr], tokens[te], len(classes), seed=seed)
    majority = np.bincount(y[tr]).argmax()
    return ProbeResult(float((pred == y[te]).mean()), float((y[te] == majority).mean()), int(tr.sum()), int(te.sum()),
                       classes)
