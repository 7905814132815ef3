"""fMRI-LM (arXiv 2511.21760): a neural tokenizer of ROI series, then a causal LM over fMRI
tokens + text.

Stage 1, :class:`VqTokenizer`: input ``(B, R, L)`` (paper: ``(B, 450, 160)``, Tian S3 +
Schaefer-400 at TR 2 s). Each parcel's series is embedded (a linear map of its ``L``
values plus a learned parcel embedding), mixed across parcels by transformer blocks, and
quantised to the nearest of ``codebook_size`` codes (cosine similarity of l2-normalised
vectors): one token per ROI. A mirrored decoder
reconstructs the series. Loss: MSE of the reconstruction + VQ-VAE codebook and commitment
terms (van den Oord et al. 2017, arXiv 1711.00937), straight-through gradients.

Stage 2, :class:`FmriLanguageModel`: the frozen tokenizer's code vectors of a window are
projected into the embedding space of a Hugging Face causal LM (any model id or path, or a
tiny randomly initialised GPT-2 for tests), followed by the text; LoRA adapters (``peft``)
and the projector are trained with the LM's next-token loss on the text only (the fMRI
positions are not scored). The text is :func:`fmri_data.train.descriptors.describe` of the
window unless the batch brings its own ``text``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SettingError
from ...imports import load_module
from ..blocks import Block, trunc_normal_
from ..configs import FmriLmConfig


class VqTokenizer(nn.Module):
    def __init__(self, cfg: FmriLmConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.series_in = nn.Linear(cfg.frames, d)
        self.roi_embed = nn.Parameter(torch.zeros(cfg.n_rois, d))
        self.enc = nn.ModuleList(Block(d, cfg.heads) for _ in range(cfg.depth))
        self.enc_norm = nn.LayerNorm(d)
        self.to_code = nn.Linear(d, cfg.code_dim)
        self.codebook = nn.Parameter(torch.empty(cfg.codebook_size, cfg.code_dim))
        self.from_code = nn.Linear(cfg.code_dim, d)
        self.dec = nn.ModuleList(Block(d, cfg.heads) for _ in range(cfg.depth))
        self.dec_norm = nn.LayerNorm(d)
        self.series_out = nn.Linear(d, cfg.frames)
        trunc_normal_(self)
        nn.init.trunc_normal_(self.roi_embed, std=0.02)
        nn.init.normal_(self.codebook)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != (self.cfg.n_rois, self.cfg.frames):
            raise SettingError(f"fMRI-LM input has shape {tuple(x.shape[1:])}, expected ({self.cfg.n_rois}, {self.cfg.frames}) "
                             f"(set model.n_rois / model.frames to the store's ROI series)")

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """(B, R, L) -> (B, R, code_dim) before quantisation, unit length."""
        self._check(x)
        h = self.series_in(x) + self.roi_embed
        for blk in self.enc:
            h = blk(h)
        return F.normalize(self.to_code(self.enc_norm(h)), dim=-1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R, d) unit vectors -> (codes (B, R) int64, unit code vectors (B, R, d)): the
        nearest code by cosine similarity (l2-normalised codebook, as in ViT-VQGAN, arXiv 2110.04627)."""
        book = F.normalize(self.codebook, dim=-1)
        codes = (z @ book.T).argmax(-1)
        return codes, book[codes]

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """One code per ROI: (B, R, L) -> (B, R) int64."""
        return self.quantize(self.encode_continuous(x))[0]

    def encode(self, batch: dict) -> torch.Tensor:
        """Quantised code vectors ``(B, R, code_dim)`` (probe features)."""
        return self.quantize(self.encode_continuous(batch["data"]))[1]

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        x = batch["data"]
        z = self.encode_continuous(x)
        codes, q = self.quantize(z)
        vq = F.mse_loss(q, z.detach()) + self.cfg.commitment * F.mse_loss(z, q.detach())
        h = self.from_code(z + (q - z).detach()) + self.roi_embed
        for blk in self.dec:
            h = blk(h)
        recon = F.mse_loss(self.series_out(self.dec_norm(h)).float(), x.float())
        used = torch.bincount(codes.flatten(), minlength=self.cfg.codebook_size).float()
        p = used / used.sum()
        perplexity = float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
        return recon + vq, {"recon_mse": recon.item(), "vq_loss": vq.item(), "code_perplexity": perplexity}


def _text_model(cfg: FmriLmConfig):
    """(tokenizer, causal LM, pretrained?) from ``cfg.lm_name``, or a tiny random GPT-2 offline."""
    transformers = load_module("transformers")

    if cfg.lm_name:
        tok = transformers.AutoTokenizer.from_pretrained(cfg.lm_name)
        lm = transformers.AutoModelForCausalLM.from_pretrained(cfg.lm_name)
        return tok, lm, True
    tok = transformers.ByT5Tokenizer()  # byte-level, needs no vocabulary file
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=cfg.n_rois + cfg.max_text_tokens + 8,
                                     n_embd=cfg.lm_dim, n_layer=cfg.lm_layers, n_head=2, bos_token_id=tok.eos_token_id,
                                     eos_token_id=tok.eos_token_id)
    return tok, transformers.AutoModelForCausalLM.from_config(config), False


class FmriLanguageModel(nn.Module):
    """Stage 2. ``tokenizer_model`` is a trained :class:`VqTokenizer` (kept frozen)."""

    def __init__(self, cfg: FmriLmConfig, tokenizer_model: VqTokenizer):
        super().__init__()
        peft = load_module("peft")

        self.cfg = cfg
        self.vq = tokenizer_model.requires_grad_(False).eval()
        self.text_tokenizer, lm, self.pretrained = _text_model(cfg)
        if self.text_tokenizer.pad_token_id is None:
            self.text_tokenizer.pad_token = self.text_tokenizer.eos_token
        lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                               target_modules=cfg.lora_targets, task_type="CAUSAL_LM")
        self.lm = peft.get_peft_model(lm, lora)
        width = lm.get_input_embeddings().weight.shape[1]
        self.projector = nn.Sequential(nn.Linear(cfg.code_dim, width), nn.GELU(), nn.Linear(width, width))
        self.fmri_start = nn.Parameter(torch.zeros(width))
        nn.init.trunc_normal_(self.fmri_start, std=0.02)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vq.eval()
        return self

    def checkpoint_keys(self) -> set[str] | None:
        """State-dict keys a checkpoint must hold: everything for a random LM, else only what
        is trained (a pretrained LM is reloaded from ``lm_name``)."""
        if not self.pretrained:
            return None
        return {k for k, p in self.named_parameters() if p.requires_grad}

    def _inputs(self, x: torch.Tensor, texts: list[str]):
        with torch.no_grad():
            _, q = self.vq.quantize(self.vq.encode_continuous(x))
        fmri = torch.cat([self.fmri_start.expand(x.shape[0], 1, -1), self.projector(q)], 1)
        tok = self.text_tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens,
                                  return_tensors="pt")
        ids, att = tok["input_ids"].to(x.device), tok["attention_mask"].to(x.device)
        emb = self.lm.get_input_embeddings()(ids)
        inputs = torch.cat([fmri.to(emb.dtype), emb], 1)
        attention = torch.cat([torch.ones(fmri.shape[:2], dtype=att.dtype, device=x.device), att], 1)
        labels = torch.cat([torch.full(fmri.shape[:2], -100, device=x.device), ids.masked_fill(att == 0, -100)], 1)
        return inputs, attention, labels

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        inputs, attention, labels = self._inputs(batch["data"], batch["text"])
        out = self.lm(inputs_embeds=inputs, attention_mask=attention, labels=labels)
        return out.loss, {"text_tokens": int((labels != -100).sum())}

    def encode(self, batch: dict) -> torch.Tensor:
        """Last-layer LM hidden states at the fMRI positions, ``(B, R + 1, width)``."""
        inputs, attention, _ = self._inputs(batch["data"], [""] * batch["data"].shape[0])
        r = self.cfg.n_rois + 1
        out = self.lm(inputs_embeds=inputs[:, :r], attention_mask=attention[:, :r], output_hidden_states=True)
        return out.hidden_states[-1]

    @torch.no_grad()
    def generate(self, x: torch.Tensor, max_new_tokens: int = 64) -> list[str]:
        """Greedy text for windows ``(B, R, L)``."""
        inputs, attention, _ = self._inputs(x, [""] * x.shape[0])
        r = self.cfg.n_rois + 1
        ids = self.lm.generate(inputs_embeds=inputs[:, :r], attention_mask=attention[:, :r], max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=self.text_tokenizer.pad_token_id)
        return self.text_tokenizer.batch_decode(ids, skip_special_tokens=True)
