"""Pending per-head projections through windows, rolls and a patch merging (Swin's layout).

A tiny hierarchical model, written here: windowed attention (partition, reverse, roll), an MLP,
a patch merging (2x2 gather -> LayerNorm -> Linear), a second attention stage, a final
LayerNorm and a mean over tokens. Checked:

- the components sum to the output (<= 1e-5) and each first-stage head agrees with a
  hand-written float64 reference (P, V recomputed from the recorded input; every LayerNorm
  1/σ frozen at the stream's recorded value, each term centred on its own);
- the first stage's heads are never evaluated at full resolution: no value of the rewritten
  graph has a component axis of >= 2 heads over the first stage's [B, 8, 8, C] positions (they
  stay pending: per-head inputs, reduced by the final mean before W applies);
- the window moves, rolls, the merge's gather and the per-token 1/σ are applied to a positions
  map, never to the head inputs themselves, which the final mean reads once;
- folded weights are kept between calls but recomputed after an in-place weight update.
"""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import fxdecomp

from .pending_checks import assert_exact_and_heads_match, record_inputs, sizes_after_first_heads
from .reference_heads import TwoStageLayers, merge_gather

C, HEADS = 8, 2


def partition(x):   # [B, 8, 8, C] -> [4B, 16, C] (4x4 windows)
    b, _, _, c = x.shape
    return x.reshape(b, 2, 4, 2, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 16, c)


def reverse(w):     # [4B, 16, C] -> [B, 8, 8, C], then the shift back
    b, c = w.shape[0] // 4, w.shape[-1]
    x = w.reshape(b, 2, 2, 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 8, 8, c)
    return x.roll((1, 1), (1, 2))


class TinyMerge(TwoStageLayers):
    def __init__(self):
        super().__init__(C, HEADS)
        self.pos = nn.Parameter(torch.randn(1, 8, 8, C) * 0.5)   # unbroadcast constant term

    def forward(self, img):
        x = self.embed(img).permute(0, 2, 3, 1) + self.pos
        b = x.shape[0]
        x = x + reverse(self.attn1(partition(self.n1(x).roll((-1, -1), (1, 2)))))
        x = x + self.mlp(self.n2(x))
        x = self.reduction(self.merge_norm(merge_gather(x)))          # [B, 4, 4, 2C]
        x = x + self.attn2(self.n3(x).reshape(b, 16, 2 * C)).reshape(b, 4, 4, 2 * C)
        return self.norm(x).mean((1, 2))


def _model_and_input():
    torch.manual_seed(0)
    return TinyMerge().eval(), torch.randn(3, 3, 32, 32)


def _frozen_ln(t, stream, ln):
    """LayerNorm applied to a term t with 1/σ frozen at the stream's value: centre t, scale, γ."""
    inv = 1.0 / torch.sqrt(stream.var(-1, unbiased=False, keepdim=True) + ln.eps)
    return (t - t.mean(-1, keepdim=True)) * inv * ln.weight.double()


def _reference_stage1_heads(model, x):
    """Hand-written float64 per-head contributions of attn1 to the output: {h: [B, 2C]}."""
    rec = record_inputs(model, x, {"a": model.attn1, "m": model.merge_norm, "n": model.norm})
    with torch.no_grad():
        p, v = model.attn1.probs_values(rec["a"])
        p, v = p.double(), v.double()
        w_o = model.attn1.proj.weight.double()
        d = C // HEADS
        out = {}
        for h in range(HEADS):
            o = p[:, h] @ v[:, h]                                   # [4B, 16, d]
            term = reverse(o @ w_o[:, h * d:(h + 1) * d].t())       # [B, 8, 8, C]
            t = _frozen_ln(merge_gather(term), rec["m"].double(), model.merge_norm)
            t = t @ model.reduction.weight.double().t()             # [B, 4, 4, 2C]
            t = _frozen_ln(t, rec["n"].double(), model.norm)
            out[h] = t.mean((1, 2))
    return out


def test_heads_exact_and_match_a_hand_written_reference():
    model, x = _model_and_input()
    assert_exact_and_heads_match(model, x, _reference_stage1_heads(model, x), lambda m: m == "attn1", HEADS)


def test_first_stage_heads_stay_pending():
    """The first stage's head terms are never evaluated E wide: every value computed from them
    is no larger than their head-blocked form [H, 4B, 1, 16, dh] (B·64·C numbers), where one
    materialised head term alone would be [H, B, 8, 8, C] (H times more)."""
    model, x = _model_and_input()
    dm = fxdecomp.decompose(model, x, granularity="heads")
    assert "block_diagonal_heads" in dm.code   # W widened at the merge, not the terms
    first, numel, shapes = sizes_after_first_heads(dm, x)
    limit = x.shape[0] * 64 * C
    assert first == limit
    big = {n: k for n, k in numel.items() if k > limit}
    assert not big, big
    # what flows instead: the heads' inputs reduced by the final mean, 4 positions x dh wide
    assert (HEADS, 3, 4 * (C // HEADS)) in shapes


def test_first_stage_heads_moved_and_scaled_never():
    """The window reverse, the rolls, the merge's gather and the per-token 1/σ of the merge norm
    and the final norm never touch the first stage's head inputs: they act on a positions map
    (index and weight per row), and the final mean reads the inputs once, reducing them
    (``rt.reduce_positions``). Only the attention's own layout ops before its output projection
    (transpose, reshape: 2 values) hold them at full size."""
    model, x = _model_and_input()
    dm = fxdecomp.decompose(model, x, granularity="heads")
    assert "reduce_positions" in dm.code
    first, numel, _ = sizes_after_first_heads(dm, x)
    full = sorted(n for n, k in numel.items() if k >= first)
    assert len(full) <= 2, full
    with torch.no_grad():
        d = dm(x)
        y = model(x)
    err = float((d.components.double().sum(0) - y.double()).abs().max() / y.double().abs().max())
    assert err <= 1e-5, err


def test_folded_weights_follow_in_place_updates():
    model, x = _model_and_input()
    dm = fxdecomp.decompose(model, x, granularity="heads")
    with torch.no_grad():
        dm(x)                                     # folds computed and kept
        model.reduction.weight.mul_(-1.5)         # in place: the version counter moves
        model.merge_norm.weight.add_(0.25)
        d = dm(x)
        y = model(x)
    assert torch.allclose(d.output, y, rtol=1e-5, atol=1e-6)
    err = float((d.components.double().sum(0) - y.double()).abs().max() / y.double().abs().max())
    assert err <= 1e-5, err


@pytest.mark.parametrize("granularity,project", [("heads", False), ("tokens", False),
                                                 ("tokens", True)])
def test_a_second_call_computes_no_fold(monkeypatch, granularity, project):
    """Folds depend on the weights (and D) only: the first call computes them, a second call
    with the same weights finds every one kept (a fold that is not kept, e.g. a patch merging's
    block-diagonal W', makes every fold after it miss as well, since it keys on the identity
    of its inputs)."""
    from fxdecomp.rewrite import runtime as rt
    model, x = _model_and_input()
    dm = fxdecomp.decompose(model, x, granularity=granularity)
    D = torch.randn(model(x).shape[-1], 3, generator=torch.Generator().manual_seed(2))
    misses = collections.Counter()

    class Counting(dict):
        def get(self, key, default=None):
            out = super().get(key, default)
            if out is None:
                misses[key[0]] += 1
            return out

    monkeypatch.setattr(rt, "_FOLDED", Counting())
    with torch.no_grad():
        dm(x, project=D) if project else dm(x)
        assert sum(misses.values()) > 0          # the folds went through the cache
        misses.clear()
        d = dm(x, project=D) if project else dm(x)
        y = model(x) @ D if project else model(x)
    assert not misses, dict(misses)
    err = float((d.components.double().sum(0) - y.double()).abs().max() / y.double().abs().max())
    assert err <= 1e-5, err


@pytest.mark.parametrize("granularity", ["heads", "tokens"])
def test_the_mlp_term_is_reduced_before_its_bias_is_taken_off(granularity):
    """The stage-1 MLP's term (its output less fc2's bias) reaches nothing but the final mean,
    through the merge and the norms: the graph reduces fc2's own output there and subtracts
    the bias's share after, so no ``linear_output_terms`` is left, with or without output
    directions; the MLP component equals a float64 reference (the term through the frozen
    merge norm, the reduction, the frozen final norm and the mean), projected = it @ D, and
    the components still sum to the output."""
    from fxdecomp.rewrite import runtime as rt
    model, x = _model_and_input()
    dm = fxdecomp.decompose(model, x, granularity=granularity)
    rec = record_inputs(model, x, {"mlp": model.mlp, "m": model.merge_norm, "n": model.norm})
    D = torch.randn(2 * C, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        d, dp = dm(x), dm(x, project=D)
        y = model(x)
        term = (model.mlp(rec["mlp"]) - model.mlp[2].bias).double()           # [B, 8, 8, C]
        t = _frozen_ln(merge_gather(term), rec["m"].double(), model.merge_norm)
        t = t @ model.reduction.weight.double().t()
        ref = _frozen_ln(t, rec["n"].double(), model.norm).mean((1, 2))
    for gm in (dm.graph_module, dm._graph_for(x.shape[0], project=True)):
        assert not any(n.target is rt.linear_output_terms for n in gm.graph.nodes)
    (i,) = [k for k, lab in enumerate(d.labels) if lab.kind == "mlp"]
    for got, want in ((d.components[i], ref), (dp.components[i], ref @ D.double())):
        assert float((got.double() - want).abs().max() / want.abs().max()) <= 1e-5
    for dd, want in ((d, y), (dp, y @ D)):
        err = (dd.components.double().sum(0) - want.double()).abs().max() / want.abs().max()
        assert float(err) <= 1e-5, float(err)


def test_gradients_through_deferred_moves():
    """The positions map carries the frozen 1/σ as weights: with autograd recording through
    the input, d(Σ components · w)/dx equals d(model(x) · w)/dx (the 1/σ depend on x)."""
    model, x = _model_and_input()
    dm = fxdecomp.decompose(model, x, granularity="heads")
    xg = x.clone().requires_grad_(True)
    comps = dm(xg).components
    w = torch.randn(comps.shape[1:], generator=torch.Generator().manual_seed(1))
    (g_dec,) = torch.autograd.grad((comps.sum(0) * w).sum(), xg)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((model(xr) * w).sum(), xr)
    assert float((g_dec - g_ref).abs().max() / g_ref.abs().max()) <= 1e-5
