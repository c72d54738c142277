"""Attention written as einsum: split per head and per source token in tokens mode, like
scaled_dot_product_attention and P @ V; an einsum the split does not understand is refused,
naming the op, never left as one silent ``attn`` component."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdecomp

B, N, D, H = 2, 5, 8, 2
DH = D // H


class EinsumAttention(nn.Module):
    def __init__(self, pv_equation: str):
        super().__init__()
        self.pv_equation = pv_equation
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def parts(self, h):
        q, k, v = self.qkv(h).unflatten(-1, (3, H, DH)).permute(2, 0, 3, 1, 4)   # [B, H, N, dh]
        probs = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * DH ** -0.5, dim=-1)
        return probs, v

    def forward(self, h):
        probs, v = self.parts(h)
        if self.pv_equation == "bhqk,bhkd->bhqd":
            o = torch.einsum(self.pv_equation, probs, v)
        else:  # the same product, written with V transposed
            o = torch.einsum(self.pv_equation, probs, v.transpose(-1, -2))
        return self.proj(o.transpose(1, 2).flatten(2))


class EinsumAttentionNet(nn.Module):
    """embed -> h + attn(h) -> h + mlp(h) -> norm -> token 0; attention written in einsums."""

    def __init__(self, pv_equation: str):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.attn = EinsumAttention(pv_equation)
        self.mlp = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h)
        h = h + self.mlp(h)
        return self.norm(h)[:, 0]


def _model(eq):
    torch.manual_seed(0)
    return EinsumAttentionNet(eq).eval(), torch.randn(B, N, D)


def test_einsum_attention_split_per_head_and_token():
    model, x = _model("bhqk,bhkd->bhqd")
    dt = fxdecomp.decompose(model, x, granularity="tokens")
    dh = fxdecomp.decompose(model, x, granularity="heads")
    with torch.no_grad():
        t, h, ref = dt(x), dh(x), model(x)
        probs, v = model.attn.parts(model.embed(x))
    scale = float(ref.abs().max())
    assert float((t.components.sum(0) - ref).abs().max()) <= 1e-5 * scale
    toks = [lab for lab in t.labels if lab.kind == "attn_head_token"]
    assert [(lab.head, lab.token) for lab in toks] == [(i, j) for i in range(H) for j in range(N)]
    assert not [lab for lab in t.labels if lab.kind == "attn"]
    merged = t.sum_tokens()
    for i in range(H):
        name = next(lab.name for lab in h.labels if lab.kind == "attn_head" and lab.head == i)
        assert float((merged[name] - h[name]).abs().max()) <= 1e-5 * scale
    # one (head, token) term against P[h, 0, t] · V[h, t] through proj and the frozen final norm
    with torch.no_grad():
        stream = model.embed(x) + model.attn(model.embed(x))
        y = (stream + model.mlp(stream))[:, 0]
        sigma = torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + model.norm.eps)
        for i, j in [(0, 0), (1, 3)]:
            c = (probs[:, i, 0, j, None] * v[:, i, j]) @ model.attn.proj.weight[:, i * DH:(i + 1) * DH].T
            want = (c - c.mean(-1, keepdim=True)) / sigma * model.norm.weight
            got = t[next(lab.name for lab in toks if (lab.head, lab.token) == (i, j))]
            assert float((got - want).abs().max()) <= 1e-5 * scale


def test_unsplittable_einsum_attention_refused_in_tokens_mode():
    model, x = _model("bhqk,bhdk->bhqd")
    with torch.no_grad():
        d = fxdecomp.decompose(model, x, granularity="heads")(x)
        assert float((d.components.sum(0) - model(x)).abs().max()) <= 1e-5 * float(model(x).abs().max())
    with pytest.raises(fxdecomp.UnsupportedGraphError, match=r"einsum attention .*'bhqk,bhdk->bhqd'"):
        fxdecomp.decompose(model, x, granularity="tokens")


def test_tokens_mode_runs_the_fused_attention_once():
    """In tokens mode P is computed for the split anyway, so the rewritten forward reads P @ V
    instead of running scaled_dot_product_attention a second time (fp32): no fused attention is
    left in the graph, and the decomposition is exact; heads mode keeps the model's own kernel."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              img_size=32, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    codes = {}
    for granularity in ("heads", "tokens"):
        dm = fxdecomp.decompose(model, x, granularity=granularity)
        with torch.no_grad():
            d, y = dm(x), model(x)
        torch.testing.assert_close(d.components.sum(0), y, rtol=1e-5, atol=1e-5)
        codes[granularity] = dm.code
    assert "scaled_dot_product_attention" in codes["heads"]
    assert "scaled_dot_product_attention" not in codes["tokens"]
    assert "attention_probs" in codes["tokens"]
