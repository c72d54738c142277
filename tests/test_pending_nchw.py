"""Pending per-head projections through channels-first (NCHW) stages (MaxViT's layout).

A tiny model, written here: NCHW stages whose attention runs channels-last between two
permutes (NCHW -> NHWC -> NCHW), a convolution branch added to the stream, a downsampling
shortcut (2x2 average pool + 1x1 convolution with a bias), a second attention stage, then a
global average pool over H, W, a LayerNorm over the channels (permuted last) and a flatten.
Checked:

- the components sum to the output (<= 1e-5) and each first-stage head agrees with a
  hand-written float64 reference (P, V recomputed from the recorded input; the final
  LayerNorm's 1/σ frozen at the recorded value, each term centred on its own);
- the first stage's heads are never evaluated at full width: no value computed from them is
  larger than their head-blocked form (B·64·C numbers), where one head's term alone would be
  [H, B, C, 8, 8] (H times more): they stay pending through the permutes, the pool and the
  1x1 convolution (folded into W) down to the final mean. On a build without channel-aware
  pending terms they are evaluated at the first NHWC -> NCHW permute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp

from .pending_checks import assert_exact_and_heads_match, record_inputs, sizes_after_first_heads
from .reference_heads import TinyAttention

C, HEADS = 8, 2


class AttnStage(nn.Module):
    """NCHW in and out; attention over all positions, channels last."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(dim), TinyAttention(dim, HEADS)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1)                                   # NHWC
        x = x + self.attn(self.norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)
        return x.permute(0, 3, 1, 2)                                # NCHW


class TinyNCHW(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 4, 4)
        self.stage1 = AttnStage(C)
        self.conv = nn.Sequential(nn.BatchNorm2d(C), nn.Conv2d(C, C, 3, padding=1), nn.GELU())
        self.expand = nn.Conv2d(C, 2 * C, 1)                        # the shortcut's 1x1 conv
        self.down = nn.Sequential(nn.Conv2d(C, 2 * C, 3, 2, 1), nn.GELU())
        self.stage2 = AttnStage(2 * C)
        self.norm = nn.LayerNorm(2 * C)
        for m in self.modules():          # non-trivial γ, β and batch-norm statistics
            if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.3)
                nn.init.normal_(m.bias, 0.0, 0.3)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, img):
        x = self.stage1(self.embed(img))                            # [B, C, 8, 8]
        x = x + self.conv(x)
        x = self.expand(F.avg_pool2d(x, 2)) + self.down(x)          # [B, 2C, 4, 4]
        x = self.stage2(x)
        x = F.adaptive_avg_pool2d(x, 1)                             # [B, 2C, 1, 1]
        return self.norm(x.permute(0, 2, 3, 1)).flatten(1)          # [B, 2C]


def _model_and_input():
    torch.manual_seed(0)
    return TinyNCHW().eval(), torch.randn(3, 3, 32, 32)


def _reference_stage1_heads(model, x):
    """Hand-written float64 per-head contributions of stage1's attention to the output."""
    rec = record_inputs(model, x, {"a": model.stage1.attn, "n": model.norm})
    with torch.no_grad():
        p, v = model.stage1.attn.probs_values(rec["a"])
        p, v = p.double(), v.double()
        w_o = model.stage1.attn.proj.weight.double()
        w_e = model.expand.weight.double()[:, :, 0, 0]              # [2C, C]
        stream = rec["n"].double()                                  # [B, 1, 1, 2C]
        inv = 1.0 / torch.sqrt(stream.var(-1, unbiased=False, keepdim=True) + model.norm.eps)
        d, b = C // HEADS, x.shape[0]
        out = {}
        for h in range(HEADS):
            term = (p[:, h] @ v[:, h]) @ w_o[:, h * d:(h + 1) * d].t()  # [B, 64, C]
            term = term.reshape(b, 8, 8, C).permute(0, 3, 1, 2)     # NCHW
            term = F.avg_pool2d(term, 2).mean((2, 3)) @ w_e.t()     # pool, 1x1 conv, global mean
            term = term.reshape(b, 1, 1, 2 * C)
            t = (term - term.mean(-1, keepdim=True)) * inv * model.norm.weight.double()
            out[h] = t.flatten(1)
    return out


def test_heads_exact_and_match_a_hand_written_reference():
    model, x = _model_and_input()
    assert_exact_and_heads_match(model, x, _reference_stage1_heads(model, x), lambda m: m.startswith("stage1"), HEADS)


def test_first_stage_heads_stay_pending_through_nchw():
    model, x = _model_and_input()
    dm = fxdecomp.decompose(model, x, granularity="heads")
    assert "fold_linear" in dm.code   # the 1x1 convolution folded into W
    first, numel, shapes = sizes_after_first_heads(dm, x)
    limit = x.shape[0] * 64 * C
    assert first == limit
    big = {n: k for n, k in numel.items() if k > limit}
    assert not big, big
