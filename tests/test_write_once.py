"""Write once and projected outputs (issue 13).

* Each component's final value is written once: in tokens/heads mode on a ViT the rewritten
  graph evaluates the per-head projections only where all terms of the output are gathered
  (``write_terms``), with the final LayerNorm's centring, γ and 1/σ folded in: no
  ``layer_norm_terms``, ``cat_chunks`` or separately evaluated ``blocked_linear`` remain.
* ``dm(x, project=D)`` equals ``dm(x).components @ D`` to fp32 rounding (CLS ViT, mean-pooled
  ViT, Swin, tokens mode), and its output is ``model(x) @ D``.
* Gradients flow through the same graph (the slab path is no-grad only): the gradient of the
  summed components equals the model's own gradient.
"""
from __future__ import annotations

import pytest
import torch

import fxdecomp
from fxdecomp.rewrite import runtime as rt
from fxdecomp.capture.adapters import example_input, load_model

REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def _model(name, **kw):
    torch.manual_seed(0)
    model, info = load_model("timm:" + name, random_init=True, seed=0, model_kwargs=kw or None)
    return model, example_input(info, batch=2, seed=0)


CASES = {   # small depths keep the file fast; the structure (CLS / mean pool / windows) is kept
    "cls": ("deit_small_patch16_224", dict(depth=2), None),
    "gap": ("vit_medium_patch16_reg4_gap_256", dict(depth=2), None),
    "swin": ("swin_tiny_patch4_window7_224", dict(depths=(1, 1, 1, 1), embed_dim=48,
                                                  num_heads=(1, 2, 2, 4)), [-1]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_project_equals_components_times_directions(case):
    name, kw, layers = CASES[case]
    model, x = _model(name, **kw)
    dm = fxdecomp.decompose(model, x, granularity="tokens", layers=layers)
    with torch.no_grad():
        d = dm(x)
        D = torch.randn(d.components.shape[-1], 8, generator=torch.Generator().manual_seed(3))
        p = dm(x, project=D)
        ref_out = model(x) @ D
    ref = d.components @ D
    assert p.components.shape == (len(dm.labels), 2, 8)
    assert rel_err(p.components, ref) <= REL_TOL
    assert rel_err(p.output, ref_out) <= REL_TOL
    assert rel_err(p.components.sum(0), ref_out) <= REL_TOL


def test_written_once_on_a_cls_vit():
    """deit (CLS read through the final LayerNorm), tokens and heads mode: the output's terms
    are one ``write_terms`` (every component written once into one slab), the only place a
    per-head projection is evaluated, with the norm folded in; nothing else passes over them."""
    model, x = _model("deit_small_patch16_224", depth=2)
    for gran in ("tokens", "heads"):
        dm = fxdecomp.decompose(model, x, granularity=gran)
        graph = dm.graph_module.graph
        out = next(n for n in graph.nodes if n.op == "output").args[0][1]
        assert out.target is rt.write_terms
        pending = [p for p in out.args[0] if isinstance(p, tuple)]
        assert len(pending) == 2 * (2 if gran == "heads" else 1) or len(pending) >= 2
        assert all(p[1].target is rt.fold_centering for p in pending)   # LN folded into W
        writes = [n for n in graph.nodes if n.target is rt.write_terms]
        assert all(not any(isinstance(p, tuple) for p in n.args[0]) for n in writes if n is not out)
        for absent in (rt.cat_chunks, rt.blocked_linear):
            assert not any(n.target is absent for n in graph.nodes), f"{gran}: {absent.__name__}"
        # the norm runs on the few unprojected components (MLPs, biases) one by one, never on
        # a gathered tensor
        assert all(n.args[0].target is not rt.write_terms for n in graph.nodes
                   if n.target is rt.layer_norm_terms)
        assert dm.verify(x) <= REL_TOL


def test_layer_scale_and_norm_fold_exactly():
    """A LayerScale ViT (dinov2: x + γ ⊙ attn(x)): the layer scale folds into the pending
    projection too; per-token components still sum to the heads-mode heads."""
    model, x = _model("vit_small_patch14_dinov2", depth=2, img_size=70)
    dt = fxdecomp.decompose(model, x, granularity="tokens")
    dh = fxdecomp.decompose(model, x, granularity="heads")
    assert "fold_rows(" in dt.code and "blocked_linear(" not in dt.code
    with torch.no_grad():
        t, h, ref = dt(x), dh(x), model(x)
    assert rel_err(t.components.sum(0), ref) <= REL_TOL
    merged = t.sum_tokens()
    for lab in h.labels:
        if lab.kind == "attn_head":
            assert float((merged[lab.name] - h[lab.name]).abs().max()) <= REL_TOL * float(ref.abs().max())


def test_gradients_through_the_decomposition():
    """With autograd recording, the terms are concatenated instead of written into a slab:
    d(Σ components)/dx equals d(model(x))/dx, and the values equal the no-grad ones."""
    model, x = _model("deit_small_patch16_224", depth=2)
    dm = fxdecomp.decompose(model, x, granularity="heads")
    with torch.no_grad():
        plain = dm(x).components
    xg = x.clone().requires_grad_(True)
    comps = dm(xg).components
    assert rel_err(comps, plain) <= 1e-6
    w = torch.randn(comps.shape[1:], generator=torch.Generator().manual_seed(1))
    (g_dec,) = torch.autograd.grad((comps.sum(0) * w).sum(), xg)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((model(xr) * w).sum(), xr)
    assert rel_err(g_dec, g_ref) <= 1e-4


def test_project_bad_input():
    model, x = _model("deit_small_patch16_224", depth=1)
    dm = fxdecomp.decompose(model, x, granularity="heads")
    with pytest.raises(fxdecomp.errors.InputError, match="project"):
        dm(x, project=torch.randn(10, 3))
    with pytest.raises(fxdecomp.errors.InputError, match="project"):
        dm(x, project=torch.randn(384))
