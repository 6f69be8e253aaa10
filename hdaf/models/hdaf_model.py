"""HDAF: per-modality delta self-attention → deep CCA over the three views → attention over the
fused sequence with skip connections → 6 emotions (the paper's §4; docs/model.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from ..nn.cca import multiview_cca_loss
from ..nn.delta_attention import DeltaAttention
from ..nn.encoders import DCCAProjector, UnimodalEncoder, masked_mean, resample_valid

MODALITIES = ("text", "audio", "vision")
EMOTIONS = ("happy", "sad", "anger", "surprise", "disgust", "fear")


class _ConfigMixin:
    @classmethod
    def from_dict(cls, d: Optional[dict]):
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HDAFConfig(_ConfigMixin):
    input_dims: Dict[str, int] = field(default_factory=lambda: {"text": 300, "audio": 74, "vision": 35})
    d_model: int = 64            # d_o: unimodal representation size
    num_heads: int = 8
    conv_kernel: int = 3         # eq. 9
    max_distance: int = 16       # relative buckets: offsets clipped to [-16, 16]
    window: Optional[int] = None
    share_rpe_across_heads: bool = True
    use_delta: bool = True       # False: plain attention everywhere (the ablation)
    fusion_delta: bool = False   # the paper's eq. 15: plain attention over the fused sequence
    d_cca: int = 16              # d_r << d_o
    cca_ridge: float = 1e-3
    fusion_heads: int = 8
    fused_len: int = 32          # unaligned mode: common length of the resampled views
    aligned: Optional[bool] = None  # None: aligned iff the three sequences have one length
    dropout: float = 0.1
    num_classes: int = 6
    head: str = "softmax"        # "softmax" (eq. 17) or "sigmoid" (multi-label)
    unimodal_heads: bool = True
    backend: str = "auto"

    def __post_init__(self):
        if self.head not in ("softmax", "sigmoid"):
            raise ValueError(f"head must be 'softmax' or 'sigmoid', got {self.head!r}")
        missing = [m for m in MODALITIES if m not in self.input_dims]
        if missing:
            raise ValueError(f"input_dims must give {MODALITIES}, missing {missing}")


class HDAF(nn.Module):
    """``forward(batch) -> {"logits" [B,6], "unimodal_logits" {m: [B,6]}, "cca_loss" scalar,
    "fused" [B,Tf,d_model], "fused_mask" [B,Tf]}``; batch keys ``text, audio, vision`` ([B,T_m,D_m])
    and ``<m>_mask`` ([B,T_m] bool, True = padding)."""

    def __init__(self, config: HDAFConfig):
        super().__init__()
        self.config = c = config
        self.encoders = nn.ModuleDict({
            m: UnimodalEncoder(c.input_dims[m], c.d_model, c.num_heads, c.conv_kernel, c.max_distance,
                               c.window, c.share_rpe_across_heads, c.use_delta, c.dropout,
                               c.num_classes if c.unimodal_heads else None, c.backend)
            for m in MODALITIES})
        self.projectors = nn.ModuleDict({m: DCCAProjector(c.d_model, c.d_cca) for m in MODALITIES})
        self.fuse_in = nn.Linear(len(MODALITIES) * c.d_cca, c.d_model)
        self.fused_attn = DeltaAttention(c.d_model, c.fusion_heads, max_distance=c.max_distance,
                                         window=c.window, use_delta=c.use_delta and c.fusion_delta,
                                         dropout=c.dropout,
                                         share_rpe_across_heads=c.share_rpe_across_heads,
                                         backend=c.backend)
        self.norm = nn.LayerNorm(c.d_model)
        self.out = nn.Linear(c.d_model, c.num_classes)

    # -- the paper's stage-wise schedule ------------------------------------------------------
    def stage_parameters(self, stage: str, modality: Optional[str] = None) -> Iterator[nn.Parameter]:
        if stage == "unimodal":
            mods = [modality] if modality else list(MODALITIES)
            return iter([p for m in mods for p in self.encoders[m].parameters()])
        if stage == "dcca":
            return iter(list(self.projectors.parameters()))
        if stage == "fusion":
            return iter([p for mod in (self.fuse_in, self.fused_attn, self.norm, self.out)
                         for p in mod.parameters()])
        raise ValueError(f"stage must be 'unimodal', 'dcca' or 'fusion', got {stage!r}")

    def modality_parameters(self, modality: str):
        return self.encoders[modality].parameters()

    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, object]:
        c = self.config
        hs, zs, masks, uni = {}, {}, {}, {}
        for m in MODALITIES:
            if m not in batch:
                raise KeyError(f"batch has no {m!r} (keys: {sorted(batch)})")
            mask = batch.get(f"{m}_mask")
            h, logits = self.encoders[m](batch[m], mask)
            hs[m], masks[m], zs[m] = h, mask, self.projectors[m](h, mask)
            if logits is not None:
                uni[m] = logits
        lengths = {hs[m].shape[1] for m in MODALITIES}
        aligned = c.aligned if c.aligned is not None else len(lengths) == 1
        if aligned and len(lengths) != 1:
            raise ValueError(f"aligned=True needs one sequence length, got {[hs[m].shape[1] for m in MODALITIES]}")
        if aligned:
            # Time steps pair up across views: CCA samples are the positions every view holds.
            ms = [masks[m] for m in MODALITIES if masks[m] is not None]
            fused_mask = torch.stack(ms).all(0) if ms else None
            both = ~torch.stack(ms).any(0) if ms else None
            z = {m: zs[m] for m in MODALITIES}
            skip = sum(hs[m] for m in MODALITIES)
            if both is None:
                views = [zs[m].reshape(-1, c.d_cca) for m in MODALITIES]
            elif int(both.sum()) > c.d_cca:
                views = [zs[m][both] for m in MODALITIES]
            else:  # too few shared positions: pair the segments' pooled views instead
                views = [masked_mean(zs[m], masks[m]) for m in MODALITIES]
        else:
            # Unaligned: each view's valid steps are resampled onto fused_len points; CCA pairs
            # the segments' pooled views (time steps of different modalities do not pair up).
            z = {m: resample_valid(zs[m], masks[m], c.fused_len) for m in MODALITIES}
            skip = sum(resample_valid(hs[m], masks[m], c.fused_len) for m in MODALITIES)
            fused_mask = None
            views = [masked_mean(zs[m], masks[m]) for m in MODALITIES]
        cca_loss = multiview_cca_loss(views, ridge=c.cca_ridge) if views[0].shape[0] >= 2 \
            else zs["text"].sum() * 0.0
        y = self.fuse_in(torch.cat([z[m] for m in MODALITIES], -1)) + skip  # skip connections
        y = self.norm(y + self.fused_attn(y, key_padding_mask=fused_mask))
        logits = self.out(masked_mean(y, fused_mask))
        return {"logits": logits, "unimodal_logits": uni, "cca_loss": cca_loss, "fused": y,
                "fused_mask": fused_mask}
