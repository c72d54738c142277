"""Attention on the residual stream's path (a learned-probe attention pool, SigLIP): the encoder's
blocks and heads are expanded through it, exactly, and per-head contributions agree with the
independent hook-based reference (tests/reference_heads.py). And no silent collapse: a model
whose stream is swallowed by a nonlinear op raises a CollapseError naming that op."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fxdecomp

try:
    from .reference_heads import reference_timm_vit
    from .test_reference_heads import perturb_
except ImportError:
    from reference_heads import reference_timm_vit
    from test_reference_heads import perturb_

TOL = 1e-5
SIGLIP = dict(depth=3, embed_dim=64, num_heads=4, img_size=32, patch_size=8, num_classes=0)


@functools.lru_cache(maxsize=None)
def siglip() -> nn.Module:
    """timm's SigLIP ViT (global_pool='map': AttentionPoolLatent), shrunk, perturbed weights."""
    import timm
    torch.manual_seed(0)
    return perturb_(timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **SIGLIP))


def image(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@functools.lru_cache(maxsize=None)
def decomposed(granularity: str):
    model = siglip()
    return fxdecomp.decompose(model, image(), granularity=granularity)


@pytest.mark.parametrize("granularity", ["blocks", "heads", "tokens"])
def test_siglip_pool_expands_the_encoder_exactly(granularity):
    dm = decomposed(granularity)
    x = image(1)                                   # another batch than the example
    with torch.no_grad():
        d = dm(x)
        ref = siglip()(x)
    assert _rel(d.components.sum(0), ref) <= TOL
    names = [l.name for l in d.labels]
    layers = {l.layer for l in d.labels if l.kind in ("attn", "attn_head", "attn_head_token")}
    assert layers == {0, 1, 2}, names               # every encoder block's attention is there
    assert {f"blocks.{i}.mlp" for i in range(3)} <= set(names)
    assert dm.block_coverage.absorbed == () and dm.block_coverage.expanded == 4  # 3 + the pool's
    # the pool's MLP is one component, its biases terms of their own
    assert [l.kind for l in d.labels if l.name == "attn_pool"] == ["mlp"]
    assert {"attn_pool.kv.bias", "attn_pool.proj.bias", "attn_pool.mlp.fc2.bias"} <= set(names)
    if granularity == "heads":
        assert sum(l.kind == "attn_head" for l in d.labels) == 3 * 4
    if granularity == "tokens":
        assert sum(l.kind == "attn_head_token" for l in d.labels) == 3 * 4 * 16   # 16 patches


def test_siglip_heads_match_the_reference():
    """Per-head contributions (every block, the last included), the MLPs and the pool's MLP
    against hand-written float64 math with hooks (no export, no fx)."""
    model, x = siglip(), image(2)
    ref = reference_timm_vit(model, x)
    assert ref.relative_error() <= 1e-6, ref.checks
    assert all(v <= 1e-6 for v in ref.checks.values()), ref.checks
    with torch.no_grad():
        d = decomposed("heads")(x)
    scale = ref.output.double().abs().max()
    for (layer, h), term in ref.heads.items():
        got = d[f"blocks.{layer}.attn.h{h}"].double()
        assert float((got - term).abs().max() / scale) <= TOL, (layer, h)
    for layer, term in ref.mlp.items():
        assert float((d[f"blocks.{layer}.mlp"].double() - term).abs().max() / scale) <= TOL
    pool_mlp = d["attn_pool"].double() + d["attn_pool.mlp.fc2.bias"].double()
    assert float((pool_mlp - ref.constants["attn_pool.mlp"]).abs().max() / scale) <= TOL
    # the heads are not vacuous: the last block's heads differ from each other
    last = torch.stack([ref.heads[(2, h)] for h in range(4)])
    assert float((last[0] - last[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("granularity", ["blocks", "heads"])
def test_pool_sums_tokens_before_its_value_projection(granularity):
    """The pool's frozen P is applied to each component as one weighted sum over the tokens per
    pool head (``rt.pooled_values``) before W_v: the kv linear is never applied to the
    components at every token (its key half is never needed), its bias is a term of its own,
    and the output and the pool's value terms agree with the forward's (the exactness and the
    per-head reference above are the independent checks)."""
    from fxdecomp.rewrite import runtime as rt
    dm = decomposed(granularity)
    calls = [n for n in dm.graph_module.graph.nodes if n.op == "call_function"]
    pooled = [n for n in calls if n.target is rt.pooled_values]
    assert pooled                                  # (one call per chunk of the pool's input)
    kv = {n for n in dm.graph_module.graph.nodes
          if n.op == "get_attr" and str(n.target).endswith("attn_pool.kv.weight")}
    maps = (rt.linear_terms, rt.blocked_linear, rt.fold_linear)
    per_token = [n for n in calls if n.target in maps and kv & set(n.all_input_nodes)]
    assert not per_token, per_token
    assert any(n.target is rt.pooled_bias for n in calls)
    with torch.no_grad():
        d = dm(image(4))
    assert _rel(d.components.sum(0), siglip()(image(4))) <= TOL
    assert float(d["attn_pool.kv.bias"].abs().max()) > 0


def test_tokens_through_the_pool_are_never_made_at_every_token():
    """Tokens mode: each block's per-token terms reach the pool as a probe and leave it as σ
    (the pool's P composed with the block's own P) times the value rows mapped per (head, pool
    head) (``rt.pooled_probe_values``), pending, so the out-projection and output directions fold
    in first: no per-token term is unfactored at every token. Exact, and the projected
    components (``project=D``) equal the tokens components times D."""
    from fxdecomp.rewrite import runtime as rt
    dm = decomposed("tokens")
    x, d_dirs = image(5), torch.randn(64, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        d = dm(x)
        p = dm(x, project=d_dirs)
        ref = siglip()(x)
    assert _rel(d.components.sum(0), ref) <= TOL
    assert _rel(p.components, d.components @ d_dirs) <= TOL
    for gm in (dm.graph_module, dm._graph_for(2, project=True)):
        names = [getattr(n.target, "__name__", "") for n in gm.graph.nodes
                 if n.op == "call_function"]
        assert names.count("pooled_probe_values") == 3, names      # one per block
        assert "unfactor" not in names and "probe_factors" not in names


@pytest.mark.parametrize("rows", ["own", "shuffled"])
def test_pooled_probe_values_equal_the_pool_of_the_terms_at_every_token(rows):
    """``rt.pooled_probe_values`` against the terms made at every token, mapped by the kv
    linear and pooled with P as the model does (``own``: each image's rows of its own
    attention; ``shuffled``: rows of the other image, the general path)."""
    from fxdecomp.rewrite import runtime as rt
    g = torch.Generator().manual_seed(0)
    b, n, heads_l, b_l, e, split, index = 2, 5, 3, 4, 6, (2, 2, 3), 1
    probs_l = torch.randn(b, heads_l, n, n, generator=g).softmax(-1)
    v_l = torch.randn(b, heads_l, n, b_l, generator=g)
    omega = torch.rand(1, b, n, 1, generator=g) + 0.5
    r = torch.arange(b * n).view(1, b, n, 1)
    if rows == "shuffled":
        r = r.flip(1)
    w_l = torch.randn(e, heads_l * b_l, generator=g)                       # the pending map
    probs = torch.randn(b, split[1], 1, n, generator=g).softmax(-1)       # the pool's P
    weight = torch.randn(split[0] * split[1] * split[2], e, generator=g)  # the kv linear
    with torch.no_grad():
        got = rt.pooled_probe_values(omega, r, probs_l, v_l, probs, weight, split, index,
                                     w_l, heads_l)
        s, wmap, vv = rt.probe_factors(omega, r, probs_l, v_l)
        x_terms = rt.blocked_linear(rt.unfactor(s, vv, wmap), w_l, heads_l, "torch")
        kv = (x_terms @ weight.t()).unflatten(-1, split)[..., index, :, :]   # [c, B, N, H, dh]
        want = torch.einsum("bhln,cbnhd->cbhld", probs, kv)
    assert got.shape == want.shape == (heads_l * n, b, split[1], 1, split[2])
    torch.testing.assert_close(got, want)


def test_encoder_carries_a_real_share_of_the_output():
    """Before this rule the pool was one component carrying the whole output (encoder share 0,
    pool 1.0). Now the encoder blocks' components carry a share of it. With random weights
    (timm's init: weights of std 0.02, perturbed biases of std 0.1) the constant terms dominate
    every output, so only a modest share is promised (measured: encoder 0.08, pool MLP 0.22,
    the pool's output bias 0.76 of the output norm)."""
    with torch.no_grad():
        d = decomposed("blocks")(image(3))
    out = d.output.norm()
    enc = d.select(layer=[0, 1, 2]).components.sum(0).norm() / out
    pool = d["attn_pool"].norm() / out
    assert enc > 0.05 and pool < 0.5, (float(enc), float(pool))


# ------------------------------------------------------------------------------------ collapse
class SwallowedStream(nn.Module):
    """Two residual blocks, then tanh on the whole stream, then a residual MLP block: the
    encoder reaches the output only through the tanh."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            for _ in range(2))
        self.squash = nn.Tanh()
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, x):                       # x: [B, 1, 4, 4] or [B, 16]
        x = x.flatten(1)
        for blk in self.blocks:
            x = x + blk(x)
        x = self.squash(x)
        return x + self.head(x)


def test_swallowed_stream_raises_naming_the_op():
    torch.manual_seed(0)
    model, x = SwallowedStream().eval(), torch.randn(2, 16)
    with pytest.raises(fxdecomp.CollapseError, match=r"only 1 of the model's 3 residual blocks"
                       r"(.|\n)*'tanh' at module squash(.|\n)*allow_collapse=True"):
        fxdecomp.decompose(model, x)
    dm = fxdecomp.decompose(model, x, granularity="blocks", allow_collapse=True)
    assert dm.block_coverage.absorbed == ("blocks.0", "blocks.1")
    assert dm.verify(x) <= TOL


def test_coverage_reports_collapse_and_blocks_expanded(monkeypatch, capsys):
    """``fxdecomp coverage``: the swallowed stream fails with the reason, SigLIP passes with
    every block expanded (a blocks=E/T column)."""
    from fxdecomp.capture import adapters
    from fxdecomp.cli import run

    def load(name, random_init, checkpoint, seed, output):
        torch.manual_seed(seed)
        model = SwallowedStream() if name == "swallowed" else siglip()
        size = (1, 4, 4) if name == "swallowed" else (3, 32, 32)
        return model.eval(), {"input_size": size, "output": None}
    monkeypatch.setitem(adapters.SOURCES, "e12", load)
    code = run(["coverage", "e12:swallowed", "e12:siglip", "--random-init"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL  e12:swallowed" in out and "CollapseError" in out and "'tanh'" in out
    assert "pass  e12:siglip" in out and "blocks=4/4" in out
