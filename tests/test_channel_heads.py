"""Heads wherever heads exist: channel groups that stay disjoint through per-channel ops until a
linear map are split per head (fxdecomp/analyse/channel_heads.py), checked against hand math
with hooks; where a split does not exist the decomposition says which block stayed whole and
why (a warning and ``dm.whole_attention``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp

C, HEADS = 16, 4


class StridedAttention(nn.Module):
    """(a) attention at a strided lower resolution -> bilinear upsample -> GELU -> 1x1 projection."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Conv2d(C, 3 * C, 2, stride=2)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(C, C, 1)

    def forward(self, x):
        B, _, H, W = x.shape
        q, k, v = (self.qkv(x).flatten(2).transpose(1, 2)
                   .reshape(B, -1, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4))
        o = F.scaled_dot_product_attention(q, k, v)                       # [B, h, N/4, dh]
        o = o.transpose(1, 2).reshape(B, H // 2, W // 2, C).permute(0, 3, 1, 2)
        o = F.interpolate(o, size=(H, W), mode="bilinear", align_corners=False)
        return self.proj(self.act(o))


class ConvHeads(nn.Module):
    """(b) grouped conv, one group per head -> per-channel norm -> GELU -> 1x1 projection;
    ``mix=True`` puts a LayerNorm over the channels in between (the heads mix: no split);
    ``groups`` other than HEADS (depthwise: one channel per group) is no head structure."""

    def __init__(self, mix: bool = False, groups: int = HEADS):
        super().__init__()
        self.gconv = nn.Conv2d(C, C, 3, padding=1, groups=groups)
        self.norm = nn.GroupNorm(1, C) if mix else nn.BatchNorm2d(C)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.proj(self.act(self.norm(self.gconv(x))))


class Block(nn.Module):
    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.norm = nn.BatchNorm2d(C)
        self.attn = mixer
        self.mlp = nn.Sequential(nn.Conv2d(C, 2 * C, 1), nn.GELU(), nn.Conv2d(2 * C, C, 1))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class Net(nn.Module):
    """stem -> 2 blocks -> spatial mean: a branch's contribution to the output is the spatial
    mean of its output (the stream is only summed and averaged)."""

    def __init__(self, mixer):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 2, stride=2)
        self.blocks = nn.Sequential(Block(mixer()), Block(mixer()))

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def _model(mixer, seed=0):
    torch.manual_seed(seed)
    model = Net(mixer).eval()
    with torch.no_grad():   # non-trivial norm statistics and biases
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.bias.normal_(0, 0.5)
    return model


def _reference_heads(model: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hand math with hooks: head h of block i = spatial mean of proj's weight restricted to
    head h's channel block applied to the recorded input of proj (no bias), float64."""
    rec = {}
    hooks = [blk.attn.proj.register_forward_pre_hook(
        lambda m, a, i=i: rec.__setitem__(i, a[0].detach().double()))
        for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out, b = {}, C // HEADS
    for i, blk in enumerate(model.blocks):
        w = blk.attn.proj.weight.detach().double()[:, :, 0, 0]           # [C, C]
        for h in range(HEADS):
            part = torch.einsum("oc,bchw->bohw", w[:, h * b:(h + 1) * b], rec[i][:, h * b:(h + 1) * b])
            out[f"blocks.{i}.attn.h{h}"] = part.mean((2, 3))
    return out


@pytest.mark.parametrize("mixer", [StridedAttention, ConvHeads], ids=["strided-attn", "conv-heads"])
def test_channel_groups_are_heads(mixer, recwarn):
    model = _model(mixer)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    dm = fxdecomp.decompose(model, x, granularity="heads")
    assert dm.whole_attention == {} and not [w for w in recwarn if "stay whole" in str(w.message)]
    x2 = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        d = dm(x2)
        out = model(x2)
    assert float((d.components.double().sum(0) - out).abs().max() / out.abs().max()) <= 1e-5
    ref = _reference_heads(model, x2)
    assert sorted(ref) == sorted(l.name for l in d.labels if l.kind == "attn_head")
    scale = out.double().abs().max()
    for name, term in ref.items():
        assert float((d[name].double() - term).abs().max() / scale) <= 1e-5, name
    assert float((ref["blocks.1.attn.h0"] - ref["blocks.1.attn.h1"]).abs().max()) > 1e-4
    # blocks granularity keeps one component per branch
    assert "blocks.0.attn" in [l.name for l in fxdecomp.decompose(model, x, "blocks").labels]


@pytest.mark.parametrize("kwargs", [{"mix": True}, {"groups": C}],
                         ids=["norm-mixes-channels", "depthwise"])
def test_no_split_says_which_block_and_why(kwargs):
    model = _model(lambda: ConvHeads(**kwargs))
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="stay whole"):
        dm = fxdecomp.decompose(model, x, granularity="heads")
    assert sorted(dm.whole_attention) == ["blocks.0.attn", "blocks.1.attn"]
    assert "gelu" in dm.whole_attention["blocks.0.attn"]
    assert not any(l.kind == "attn_head" for l in dm.labels)
    assert dm.verify(x) <= 1e-5
