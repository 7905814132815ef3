"""The one adapter between the loader (:mod:`fmri_data.load`) and the trainer.

:class:`StoreBatches` turns a store into an endless, resumable stream of batches in each
family's layout (its :class:`~fmri_data.train.registry.Family` entry), on the training device:

=============  ==============================  ==========================================
family         store array, windows            ``batch["data"]``
=============  ==============================  ==========================================
neurostorm     ``bold``, sliding, L = frames    ``(B, 1, X, Y, Z, L)`` frame-z-scored, clamped
slim_brain     ``bold``, saliency top-k (or     ``(B, 1, X, Y, Z, L)`` likewise
               sliding if no scorer is set)
flat_mae       ``flat`` + ``flat_mask``         ``(B, 1, L, H, W)`` + ``mask`` ``(B, H, W)``
fmri_lm        ``roi/<key>`` / ``roi``           ``(B, R, L)`` as stored (the fmri_lm recipe z-scores
                                                each parcel over the run), or z-scored per
                                                parcel over the window (``zscore_window``)
=============  ==============================  ==========================================

Volumes are average-pooled by ``model.downsample`` (tiny configs only). Stage 2 of fMRI-LM
also gets ``batch["text"]``: :func:`~fmri_data.train.descriptors.describe` of each window
(cached per window). :class:`TensorBatches` serves batches drawn from in-memory tensors
with the same interface (used where a store lacks an array, e.g. flat maps).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..load import WindowDataset, WindowLoader, WindowMapDataset, build_index
from ..errors import SettingError
from .configs import Config
from .descriptors import describe
from .registry import get_family

def family_index(url: str, cfg: Config, *, source: str | None = None, split: str | None = None,
                 split_by: str = "subject", **kwargs: Any):
    """The :func:`~fmri_data.load.build_index` windows a family trains on (``kwargs`` pass through).

    Raises:
        SettingError: an unknown family; the store has no window of the family's array and length.
    """
    spec = get_family(cfg.family)
    array = spec.store_array(cfg.model)
    if source is None:
        scorer = getattr(cfg.model, "saliency_scorer", None)
        source, kwargs = ("saliency", {**kwargs, "scorer": scorer}) if scorer else ("sliding", kwargs)
    frames = spec.window_frames(cfg.model)
    index = build_index(url, frames, array=array, source=source, **kwargs)
    if split is not None:
        index = index.split(split, by=split_by, seed=cfg.train.seed)
    if not len(index):
        raise SettingError(f"{url}: no windows of {frames} frames of '{array}' ({source}){spec.missing_hint}: "
                         f"{index.dropped or 'no runs'}")
    return index


def prepare(batch: dict[str, Any], cfg: Config, device: torch.device, dataset) -> dict[str, Any]:
    """A loader batch -> model inputs on ``device`` (normalisation, pooling; see module doc)."""
    clamp = cfg.train.clamp
    if not get_family(cfg.family).frame_zscore:
        out = dataset.to_device(batch, device)
        x = out["data"]
        if cfg.model.zscore_window:
            x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-6)
        out["data"] = x.clamp(-clamp, clamp) if clamp else x
        return out
    out = dataset.to_device(batch, device, normalize=True, clamp=clamp)
    f = getattr(cfg.model, "downsample", 1)
    if f > 1:
        x = out["data"]                                                   # (B, 1, X, Y, Z, T)
        b, _, X, Y, Z, T = x.shape
        x = F.avg_pool3d(x[:, 0].permute(0, 4, 1, 2, 3).reshape(b * T, 1, X, Y, Z), f)
        out["data"] = x.view(b, T, *x.shape[2:]).permute(0, 2, 3, 4, 1).unsqueeze(1).contiguous()
    return out


class StoreBatches:
    """Endless batches of a store for one family; ``state_dict`` resumes exactly.

    Args:
        url: store path or URL; cfg: the run's :class:`~fmri_data.train.configs.Config`.
        device: where batches go; split: a split name of :meth:`WindowIndex.split` or None.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, url: str, cfg: Config, device: torch.device | str = "cpu", *, split: str | None = None,
                 num_workers: int = 0, **index_kwargs: Any):
        self.cfg, self.device = cfg, torch.device(device)
        self.index = family_index(url, cfg, split=split, **index_kwargs)
        spec = get_family(cfg.family)
        self.dataset = WindowDataset(self.index, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                     layout=spec.layout, mask=spec.mask, pin_memory=self.device.type == "cuda")
        self.loader = WindowLoader(self.dataset, num_workers=num_workers, persistent_workers=num_workers > 0)
        self._it = None
        self._text = spec.text(cfg.model)
        self._labels: dict[str, list[str]] = {}
        self._descriptions: dict[tuple[str, int], str] = {}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                break
            except StopIteration:
                self._it = None  # the loader moved to the next epoch
        else:
            raise RuntimeError("the window loader yielded no batch in a whole epoch")
        out = prepare(batch, self.cfg, self.device, self.dataset)
        if self._text:
            out["text"] = self.texts(batch, out["data"])
        return out

    def texts(self, batch: dict[str, Any], data: torch.Tensor) -> list[str]:
        """Descriptor sentences of each window of a batch (cached by run and start)."""
        keys = list(zip(batch["run_id"], batch["start"].tolist()))
        if any(key not in self._descriptions for key in keys):
            windows = data.float().cpu().numpy()  # one copy off the device per batch
            for k, key in enumerate(keys):
                if key not in self._descriptions:
                    self._descriptions[key] = describe(windows[k], self.parcel_labels(key[0]))
        return [self._descriptions[key] for key in keys]

    def parcel_labels(self, run_id: str) -> list[str]:
        if run_id not in self._labels:
            entry = next(r for r in self.index.runs if r.run_id == run_id)
            group = self.dataset.reader.store().run(run_id)  # the loader's store, opened once
            self._labels[run_id] = list(group[entry.array].attrs["labels"])
        return self._labels[run_id]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None


class TensorBatches:
    """Batches drawn from in-memory tensors: batch ``s`` takes rows chosen by a generator
    seeded with ``(seed, s)``, so a resumed run sees the same batches.

    Args:
        tensors: name -> tensor with the sample axis first (``data`` required); ``shared``
            name -> tensor given unchanged to every batch (e.g. a flat map's valid mask).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int = 0,
                 shared: dict[str, torch.Tensor] | None = None, device: torch.device | str = "cpu"):
        self.batch_size, self.seed, self.step, self.device = int(batch_size), int(seed), 0, torch.device(device)
        self.tensors = tensors
        self.shared = {k: v.to(self.device) for k, v in (shared or {}).items()}  # once, not per batch
        self.n = int(tensors["data"].shape[0])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        rows = torch.randperm(self.n, generator=g)[: self.batch_size]
        self.step += 1
        out = {k: v[rows].to(self.device) for k, v in self.tensors.items()}
        return {**out, **self.shared}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def eval_dataset(index, cfg: Config) -> WindowMapDataset:
    """Map-style dataset of ``index`` in the family's layout (for probes)."""
    spec = get_family(cfg.family)
    return WindowMapDataset(index, layout=spec.layout, mask=spec.mask)
