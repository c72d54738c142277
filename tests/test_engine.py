"""Engine behaviour beyond the coverage matrix: tokens mode, layers=, batch sizes, dtypes, the
Decomposition helpers and the errors bad input gets."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.capture.adapters import example_input, load_model

REL_TOL = 1e-5


def rel_err(total: torch.Tensor, ref: torch.Tensor) -> float:
    total, ref = total.detach().double(), ref.detach().double()
    return float((total - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def deit_small():
    model, info = load_model("timm:deit_small_patch16_224", random_init=True, seed=0)
    return model, example_input(info, batch=2, seed=1)


# ------------------------------------------------------------------------------------ tokens
TOKEN_MODELS = {
    "timm:deit_small_patch16_224": None,
    "timm:vit_small_patch14_dinov2": None,
    "open_clip:ViT-B-16": None,
    # Swin's window attention: per-token components of the last stage (one 7x7 window, so the
    # local token index is the image token index); earlier stages are one `init` term.
    "timm:swin_tiny_patch4_window7_224": [-2, -1],
}


@pytest.mark.parametrize("spec", list(TOKEN_MODELS))
def test_tokens_exact_and_sum_to_heads(spec):
    model, info = load_model(spec, random_init=True, seed=0)
    x = example_input(info, batch=2, seed=0)
    layers = TOKEN_MODELS[spec]
    dt = fxdecomp.decompose(model, x, granularity="tokens", layers=layers)
    dh = fxdecomp.decompose(model, x, granularity="heads", layers=layers)
    with torch.no_grad():
        t, h, ref = dt(x), dh(x), model(x)
    assert rel_err(t.components.sum(0), ref) <= REL_TOL
    n_tok = sum(1 for lab in t.labels if lab.kind == "attn_head_token")
    assert n_tok > 100
    # a head's per-token components sum to that head's component (heads mode, built separately),
    # to the same tolerance as the reconstruction: relative to the output's scale
    merged = t.sum_tokens()
    scale = float(ref.abs().max())
    heads = [lab.name for lab in h.labels if lab.kind == "attn_head"]
    assert heads
    worst = max(float((merged[name] - h[name]).abs().max()) for name in heads)
    assert worst <= REL_TOL * scale, f"per-token sums differ from heads by {worst / scale:.2e}"


def test_tokens_are_source_tokens(deit_small):
    """Component (head h, source token t) of the last block equals an independent computation
    from that head's attention probabilities and value vectors: P[h, CLS, t] · V[h, t], through
    the head's slice of the output projection and the final LayerNorm with its scale frozen."""
    model, x = deit_small
    dm = fxdecomp.decompose(model, x, granularity="tokens", layers=[-1])
    vit = model.model
    block, seen = vit.blocks[-1], {}
    hooks = [block.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0])),
             block.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))]
    try:
        with torch.no_grad():
            d, ref = dm(x), model(x)
    finally:
        for hk in hooks:
            hk.remove()
    toks = d.select(kind="attn_head_token", layer=11)
    assert len(toks) == 6 * 197 and {lab.token for lab in toks.labels} == set(range(197))

    attn = block.attn
    heads, dh = attn.num_heads, attn.head_dim
    with torch.no_grad():
        u = block.norm1(seen["in"])
        q, k, v = attn.qkv(u).reshape(x.shape[0], -1, 3, heads, dh).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        probs = torch.softmax((q @ k.transpose(-2, -1)) * dh ** -0.5, dim=-1)   # [B, H, N, N]
        y = seen["out"][:, 0]                                                  # stream at CLS
        sigma = torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + vit.norm.eps)
        for h, t in [(0, 0), (2, 1), (3, 17), (5, 196)]:
            o = probs[:, h, 0, t, None] * v[:, h, t]                            # [B, dh]
            c = o @ attn.proj.weight[:, h * dh:(h + 1) * dh].T                  # [B, D]
            c = block.ls1(c)
            want = (c - c.mean(-1, keepdim=True)) / sigma * vit.norm.weight
            got = d[f"blocks.11.attn.h{h}.t{t}"]
            assert float(want.abs().max()) > 0
            assert float((got - want).abs().max()) <= REL_TOL * float(ref.abs().max()), (h, t)


# ------------------------------------------------------------------------------------ layers=
def test_layers_init(deit_small):
    model, x = deit_small
    dm = fxdecomp.decompose(model, x, granularity="heads", layers=[-4, -3, -2, -1])
    with torch.no_grad():
        d = dm(x)
        ref = model(x)
    assert rel_err(d.components.sum(0), ref) <= REL_TOL
    assert [lab.kind for lab in d.labels].count("init") == 1
    layers = {lab.layer for lab in d.labels if lab.kind == "attn_head"}
    assert layers == {8, 9, 10, 11}
    assert all(lab.layer is None or lab.layer >= 8 for lab in d.labels)
    # the init term is the stream entering block 8, pushed through the rest of the network
    full = fxdecomp.decompose(model, x, granularity="heads")(x)
    early = full.select(layer=range(0, 8)).components.sum(0) \
        + full.select(kind="embed").components.sum(0)
    assert rel_err(d["init"], early) <= 1e-4


def test_argument_errors_name_what_is_expected(deit_small):
    model, x = deit_small
    with pytest.raises(fxdecomp.InputError, match=r"layer 20 out of range: the model has 12"):
        fxdecomp.decompose(model, x, layers=[20])
    with pytest.raises(fxdecomp.InputError, match=r"granularity must be one of .*'heads'"):
        fxdecomp.decompose(model, x, granularity="head")
    with pytest.raises(fxdecomp.InputError, match="backend"):
        fxdecomp.decompose(model, x, backend="cuda")
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        with pytest.raises(fxdecomp.InputError, match="triton"):   # not the kernels' RuntimeError
            fxdecomp.decompose(model, x, backend="triton")
    # ValueError too, where Python users expect one
    with pytest.raises(ValueError):
        fxdecomp.decompose(model, x, layers=[])


def test_input_dtype_and_device_errors(deit_small):
    model, x = deit_small
    for bad in (x.to(torch.uint8), x.double()):
        with pytest.raises(fxdecomp.InputError, match=r"dtype .*expects torch.float32"):
            fxdecomp.decompose(model, bad)
    dm = fxdecomp.decompose(model, x, granularity="blocks")
    with pytest.raises(fxdecomp.InputError, match=r"dtype torch.uint8; the model expects torch.float32"):
        dm((x * 50).clamp(0, 255).to(torch.uint8))
    with pytest.raises(fxdecomp.InputError, match=r"is on meta; the model expects it on cpu"):
        dm(x.to("meta"))


# ------------------------------------------------------------------------------------ batches, dtypes
def test_other_batch_sizes(deit_small):
    model, x = deit_small
    dm = fxdecomp.decompose(model, x, granularity="heads")
    for b in (1, 3):
        xb = torch.randn(b, *x.shape[1:])
        with torch.no_grad():
            d = dm(xb)
        assert d.components.shape[:2] == (len(dm.labels), b)
        assert rel_err(d.components.sum(0), model(xb)) <= REL_TOL


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_half_precision(dtype, tol):
    model, info = load_model("timm:deit_tiny_patch16_224", random_init=True, seed=0)
    model = model.to(dtype)
    x = example_input(info, batch=2, seed=0).to(dtype)
    dm = fxdecomp.decompose(model, x, granularity="heads")
    with torch.no_grad():
        d = dm(x)
    assert d.components.dtype == dtype
    assert rel_err(d.components.float().sum(0), d.output.float()) <= tol


# ------------------------------------------------------------------------------------ helpers
def test_decomposition_helpers(deit_small):
    model, x = deit_small
    with torch.no_grad():
        d = fxdecomp.decompose(model, x, granularity="heads")(x)
    heads = d.select(kind="attn_head", layer=3)
    assert [lab.head for lab in heads.labels] == list(range(6))
    merged = d.sum_heads()
    assert "blocks.3.attn" in merged.names
    assert rel_err(merged["blocks.3.attn"], heads.components.sum(0)) <= REL_TOL
    by_layer = d.group("layer")
    assert rel_err(by_layer.components.sum(0), d.output) <= REL_TOL
    rest = d.residual(kind="attn_head", layer=3)
    assert rel_err(rest + heads.components.sum(0), d.output) <= REL_TOL
    assert "blocks.3.attn.h2" in d.names and d.index("blocks.3.attn.h2") >= 0
    assert "scaled_dot_product_attention" in fxdecomp.decompose(model, x).code


def test_blocks_granularity_names(deit_small):
    model, x = deit_small
    dm = fxdecomp.decompose(model, x, granularity="blocks")
    names = {lab.name: lab for lab in dm.labels}
    assert names["blocks.3.attn"].kind == "attn" and names["blocks.3.attn"].layer == 3
    assert names["blocks.3.mlp"].kind == "mlp"
    assert names["blocks.3.attn.proj.bias"].kind == "bias"
    assert names["pos_embed"].kind == "embed" and names["cls_token"].kind == "embed"
    assert names["norm.bias"].kind == "bias"


# ------------------------------------------------------------------------------------ errors
class _Tiny(nn.Module):
    def __init__(self, tail):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.tail = tail

    def forward(self, x):
        x = self.proj(x)
        x = x + self.mlp(x)
        return self.tail(x)


class _Cumprod(nn.Module):
    def forward(self, x):
        return torch.cumprod(x, dim=-1)


def test_unsupported_op_names_op_and_module():
    model = _Tiny(_Cumprod()).eval()
    with pytest.raises(fxdecomp.UnsupportedGraphError) as e:
        fxdecomp.decompose(model, torch.randn(2, 8))
    msg = str(e.value)
    assert "cumprod" in msg and "tail" in msg


def test_tiny_model_exact():
    model = _Tiny(nn.LayerNorm(8)).eval()
    x = torch.randn(3, 8)
    d = fxdecomp.decompose(model, x, granularity="blocks")(x)
    assert rel_err(d.components.sum(0), model(x)) <= REL_TOL
    assert {"mlp", "embed", "bias"} <= {lab.kind for lab in d.labels}


def test_training_mode_refused(deit_small):
    model, x = deit_small
    model.train()
    try:
        with pytest.raises(fxdecomp.InputError, match="training mode"):
            fxdecomp.decompose(model, x)
    finally:
        model.eval()


def test_bad_inputs(deit_small):
    model, x = deit_small
    dm = fxdecomp.decompose(model, x, granularity="blocks")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(fxdecomp.InputError, match="non-finite"):
        dm(bad)
    with pytest.raises(fxdecomp.InputError, match=r"\[B, 3, 224, 224\]"):
        dm(torch.randn(2, 3, 192, 192))
    with pytest.raises(ValueError, match="granularity"):
        fxdecomp.decompose(model, x, granularity="neurons")


class _TwoOutputs(nn.Module):
    def forward(self, x):
        return x + 1, x * 2


def test_multi_output_refused():
    with pytest.raises(fxdecomp.UnsupportedGraphError, match="returns 2 values"):
        fxdecomp.decompose(_TwoOutputs().eval(), torch.randn(2, 4))


def test_groups_bound_memory_and_agree(deit_small):
    """decompose_in_groups: each group exact; their own layers' token components together equal
    the all-layers tokens decomposition."""
    model, x = deit_small
    groups = fxdecomp.decompose_in_groups(model, x, "tokens", group_size=5)
    assert [dm.expanded_layers for dm in groups] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]
    full = fxdecomp.decompose(model, x, granularity="tokens")
    with torch.no_grad():
        ref = full(x)
        for dm in groups:
            d = dm(x)
            assert rel_err(d.components.sum(0), ref.output) <= REL_TOL
            mine = d.select(kind="attn_head_token", layer=dm.expanded_layers)
            want = ref.select(kind="attn_head_token", layer=dm.expanded_layers)
            assert mine.names == want.names
            scale = float(ref.output.abs().max())
            assert float((mine.components - want.components).abs().max()) <= 1e-5 * scale


def test_torch_compile():
    """The rewritten graph compiles with torch.compile and gives the same components."""
    model, info = load_model("timm:deit_tiny_patch16_224", random_init=True, seed=0)
    x = example_input(info, batch=2, seed=0)
    dm = fxdecomp.decompose(model, x, granularity="heads")
    with torch.no_grad():
        eager = dm(x)
        compiled = dm.compile(dynamic=False)(x)
    scale = float(eager.output.abs().max())
    assert float((compiled.components - eager.components).abs().max()) <= 1e-5 * scale
    assert rel_err(compiled.components.sum(0), eager.output) <= REL_TOL


def test_static_batch_fallback(deit_small, monkeypatch):
    """Where the exporter must specialise the batch size, other batch sizes are re-captured."""
    import fxdecomp.run.decomposed as run
    real = run.capture
    monkeypatch.setattr(run, "capture", lambda m, x, dynamic_batch=True: real(m, x, False))
    model, x = deit_small
    dm = fxdecomp.decompose(model, x, granularity="heads")
    assert not dm.dynamic_batch
    xb = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        d = dm(xb)
    assert d.components.shape[1] == 3 and (3, False) in dm._static
    assert rel_err(d.components.sum(0), model(xb)) <= REL_TOL
