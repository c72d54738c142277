"""Tokens mode through window attention: per-source-token terms stay windowed (issue 13, Swin).

Window attention folds the windows into the batch, so each (head, source token) term stands for
one component per window. Those are no longer split at the attention (K·windows terms, each as
wide as every window); the terms are carried as [K, B·windows, ...] with a window map that the
layout ops move (window reverse, shift, patch merging, where a merged position keeps one window
id per sub-position), and separated by window where the positions are reduced.

A tiny hierarchical model written here: a 6x6 grid in 3x3 windows (4 windows), shifted by one,
then a 2x2 patch merging whose blocks straddle the windows (3 is odd), a second (global)
attention stage, a final LayerNorm and a mean over tokens (or a flatten: the windows are then
split at the output). Checked:

- components sum to the output (<= 1e-5) and every first-stage component (head, token, window)
  equals a float64 reference computed independently, one source token and one window at a time
  (P, V recomputed from the recorded input; every LayerNorm's 1/σ frozen at the recorded value);
- the labels are one per (head, source token, window), named ``.h{h}.t{t}.w{w}``, with their
  grid positions;
- no value computed from the first stage's terms is larger than those terms (a split at the
  attention makes one ``windows`` times larger).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fxdecomp
from fxdecomp.rewrite import runtime as rt

from .pending_checks import decompose_exactly, downstream, record_inputs, tensor_shapes
from .reference_heads import TwoStageLayers, merge_gather

C, HEADS, GRID, WS = 8, 2, 6, 3
WINDOWS = (GRID // WS) ** 2
SHIFT = 1


def partition(x):   # [B, 6, 6, C] -> [4B, 9, C] (3x3 windows)
    b, _, _, c = x.shape
    n = GRID // WS
    return x.reshape(b, n, WS, n, WS, c).permute(0, 1, 3, 2, 4, 5).reshape(b * WINDOWS, WS * WS, c)


def reverse(w):     # [4B, 9, C] -> [B, 6, 6, C], then the shift back
    b, c, n = w.shape[0] // WINDOWS, w.shape[-1], GRID // WS
    x = w.reshape(b, n, n, WS, WS, c).permute(0, 1, 3, 2, 4, 5).reshape(b, GRID, GRID, c)
    return x.roll((SHIFT, SHIFT), (1, 2))


def cat_gather(x):  # torchvision Swin's form of the 2x2 gather: strided slices, cat on channels
    return torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)


class TinyWindows(TwoStageLayers):
    def __init__(self, pool: str = "mean", merge: str = "gather"):
        super().__init__(C, HEADS)
        self.pool, self.merge = pool, merge
        self.gather = cat_gather if merge == "cat" else merge_gather
        # merge="pool": MaxViT's downsampling shortcut instead (NCHW: 2x2 average pool, 1x1 conv)
        self.downsample = torch.nn.Conv2d(C, 2 * C, 1)

    def downsample_nchw(self, x):   # [B, 6, 6, C] -> [B, 3, 3, 2C] through NCHW (a copy too)
        pooled = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2).clone(), 2)
        return self.downsample(pooled).permute(0, 2, 3, 1)

    def forward(self, img):
        x = self.embed(img).permute(0, 2, 3, 1)                       # [B, 6, 6, C]
        b = x.shape[0]
        x = x + reverse(self.attn1(partition(self.n1(x).roll((-SHIFT, -SHIFT), (1, 2)))))
        x = x + self.mlp(self.n2(x))
        x = self.downsample_nchw(x) if self.merge == "pool" else \
            self.reduction(self.merge_norm(self.gather(x)))           # [B, 3, 3, 2C]
        x = x + self.attn2(self.n3(x).reshape(b, 9, 2 * C)).reshape(b, 3, 3, 2 * C)
        x = self.norm(x)
        if self.pool == "nchw":   # torchvision's head: to NCHW, pool to one position, flatten
            return torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), 1).flatten(1)
        return x.mean((1, 2)) if self.pool == "mean" else x.flatten(1)


def _model_and_input(pool, merge="gather"):
    torch.manual_seed(0)
    return TinyWindows(pool, merge).eval(), torch.randn(2, 3, 24, 24)


def _frozen_ln(t, stream, ln):
    """LayerNorm on a term t with 1/σ frozen at the stream's value: centre t, scale, γ."""
    inv = 1.0 / torch.sqrt(stream.var(-1, unbiased=False, keepdim=True) + ln.eps)
    return (t - t.mean(-1, keepdim=True)) * inv * ln.weight.double()


def _reference_stage1_tokens(model, x):
    """float64 contribution of every (head h, source token t, window w) of attn1 to the output,
    one at a time: P[b', h, :, t] V[b', h, t, :] on the rows b' of window w only, through the
    output projection's slice of head h and the layers after it. {(h, t, w): [B, out]}."""
    rec = record_inputs(model, x, {"a": model.attn1, "m": model.merge_norm, "n": model.norm})
    with torch.no_grad():
        p, v = model.attn1.probs_values(rec["a"])
        p, v = p.double(), v.double()                                 # [4B, H, 9, 9], [4B, H, 9, d]
        w_o = model.attn1.proj.weight.double()
        d = C // HEADS
        out = {}
        for h in range(HEADS):
            for t in range(WS * WS):
                for w in range(WINDOWS):
                    o = torch.zeros_like(v[:, h])                     # [4B, 9, d]
                    rows = torch.arange(o.shape[0]) % WINDOWS == w
                    o[rows] = p[rows, h, :, t, None] * v[rows, h, t, None, :]
                    term = reverse(o @ w_o[:, h * d:(h + 1) * d].t())     # [B, 6, 6, C]
                    if model.merge == "pool":
                        pooled = torch.nn.functional.avg_pool2d(term.permute(0, 3, 1, 2), 2)
                        w_d = model.downsample.weight.double().flatten(1)   # [2C, C]
                        term = pooled.permute(0, 2, 3, 1) @ w_d.t()       # [B, 3, 3, 2C]
                    else:
                        term = _frozen_ln(merge_gather(term), rec["m"].double(), model.merge_norm)
                        term = term @ model.reduction.weight.double().t()     # [B, 3, 3, 2C]
                    term = _frozen_ln(term, rec["n"].double(), model.norm)
                    out[h, t, w] = term.flatten(1) if model.pool == "flatten" else term.mean((1, 2))
    return out


@pytest.mark.parametrize("pool,merge", [("mean", "gather"), ("flatten", "gather"), ("mean", "cat"),
                                        ("nchw", "cat"), ("mean", "pool"), ("nchw", "pool")])
def test_tokens_per_window_exact_and_match_reference(pool, merge):
    """``merge="cat"``: the patch merging written as torchvision's Swin writes it (strided
    slices concatenated on the channel dim), the same function as the reshape form: the windows
    pass it too (sub-blocks concatenated, W block diagonal), and match the same reference.
    ``pool="nchw"``: torchvision's head (a permute to NCHW, an adaptive average pool to one
    position, a flatten): the windows pass the permute with the channels moved out of the last
    dim and are reduced per window at the pool. ``merge="pool"``: MaxViT's downsampling (NCHW,
    a 2x2 average pool whose cells straddle the windows, a 1x1 convolution): the pooled
    positions become sub-blocks that keep their windows, the convolution folds into W."""
    model, x = _model_and_input(pool, merge)
    assert torch.equal(cat_gather(torch.arange(72.).view(1, 6, 6, 2)),
                       merge_gather(torch.arange(72.).view(1, 6, 6, 2)))
    with warnings.catch_warnings():
        # the windows pass every op up to the output (a flatten output holds one term per
        # window and position: that split is what the output is, not a warned blow-up)
        warnings.simplefilter("error", fxdecomp.WindowSplitWarning)
        dm, d = decompose_exactly(model, x, "tokens")
    got = {(lab.head, lab.token, int(lab.name.rsplit(".w", 1)[1])): (i, lab)
           for i, lab in enumerate(d.labels) if lab.kind == "attn_head_token" and lab.module == "attn1"}
    ref = _reference_stage1_tokens(model, x)
    assert sorted(got) == sorted(ref)            # one component per head, source token, window
    scale = max(float(r.abs().max()) for r in ref.values())
    for key, r in ref.items():
        i, lab = got[key]
        assert lab.name == "attn1.h{}.t{}.w{}".format(*key)
        assert lab.position is not None and lab.position.kind == "patch"
        assert float((d.components[i].double() - r).abs().max()) <= 1e-5 * scale, key
    assert sum(float(r.abs().max()) > 1e-3 * scale for r in ref.values()) > len(ref) // 2
    # projected outputs (D folded into the per-head projection: 3 directions, narrower than dh)
    dirs = torch.randn(d.components.shape[-1], 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = dm(x, project=dirs)
    want = d.components.double() @ dirs.double()
    assert float((p.components.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_a_split_per_window_is_warned_naming_the_op_and_module():
    """DaViT's spatial block transposes its tokens to channels-first ([B, N, C] -> [B, C, N])
    and views them as an image for its convolutional position encoding, which the windowed path
    does not pass: its terms are split per window there (exact, but windows times larger). The
    build says so, naming the op and the module."""
    timm = pytest.importorskip("timm")
    from fxdecomp.capture.adapters import timm_target
    torch.manual_seed(0)
    m = timm.create_model("davit_tiny", pretrained=False, num_classes=0, depths=(1, 1),
                          embed_dims=(32, 64), num_heads=(2, 4)).eval()
    target = timm_target(m, output="pooled").eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(fxdecomp.WindowSplitWarning,
                      match=r"aten\.transpose\.int at stages\.0\.blocks\.0\.0 \(\d+ windows\)"):
        decompose_exactly(target, x, "tokens")


def _small_maxvit():
    timm = pytest.importorskip("timm")
    from fxdecomp.capture.adapters import timm_target
    m = timm.create_model("maxvit_tiny_tf_224", pretrained=False, num_classes=0, img_size=64,
                          depths=(1, 1), embed_dim=(32, 64)).eval()
    # block and grid attention in each stage: 1 head of 32 channels in stage 0, 2 in stage 1
    return timm_target(m, output="pooled").eval(), torch.randn(2, 3, 64, 64), 6


def _small_torchvision_swin():
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    m = swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1],
                             num_heads=[1, 2, 2], window_size=[2, 2], num_classes=5).eval()
    return m, torch.randn(2, 3, 32, 32), 5


@pytest.mark.parametrize("make", [_small_maxvit, _small_torchvision_swin],
                         ids=["maxvit", "torchvision_swin"])
def test_nchw_windows_stay_windowed_and_sum_to_their_heads(make):
    """MaxViT (NCHW MBConv blocks between NHWC block and grid attentions, average-pool
    downsampling with a 1x1 convolution, a pooled LayerNorm head) and torchvision's Swin (a
    permute to NCHW, an adaptive average pool to one position and a flatten at the end; with
    2x2 windows, fewer rows per window than sub-blocks at the pool after two mergings): the
    per-token terms pass every permute, pool and convolution windowed (no split is warned; the
    tiny model's float64 reference above checks each (head, token, window) through the same
    ops), the tokens mode is exact, and each head's tokens sum to its heads-mode component."""
    torch.manual_seed(0)
    target, x, n_heads = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxdecomp.WindowSplitWarning)
        dm, tokens = decompose_exactly(target, x, "tokens")
    assert "split_by_map" not in dm.code and "split_windows" not in dm.code
    _, heads = decompose_exactly(target, x, "heads")
    by_head = {}
    for i, lab in enumerate(tokens.labels):
        if lab.kind == "attn_head_token":
            by_head[lab.module, lab.head] = by_head.get((lab.module, lab.head), 0) + \
                tokens.components[i].double()
    want = {(lab.module, lab.head): heads.components[i].double()
            for i, lab in enumerate(heads.labels) if lab.kind == "attn_head"}
    assert sorted(by_head) == sorted(want) and len(want) == n_heads
    scale = float(heads.output.abs().max())
    for key, w in want.items():
        assert float((by_head[key] - w).abs().max()) <= 1e-5 * scale, key


def test_torchvision_swin_heads_read_moved_inputs_in_place():
    """torchvision's Swin slices each stage's output four ways (strided rows) and concatenates
    the slices, and ends with a permute to NCHW and a pool to one position. In heads mode the
    slices are taken on positions maps (all four parts keep reading one input, so the cat
    concatenates maps), the permute moves the maps' sub-positions with the channels, and the
    pool reads the input in place (``rt.reduce_positions``): a moved input is gathered only
    where the output's terms are written, never into a cat or a pool."""
    torch.manual_seed(0)
    target, x, _ = _small_torchvision_swin()
    dm, _ = decompose_exactly(target, x, "heads")
    nodes = list(dm.graph_module.graph.nodes)
    gathers = [n for n in nodes if n.target is rt.gather_positions]
    early = {n.name: sorted({str(u.target) for u in n.users}) for n in gathers
             if any(u.target is not rt.write_terms for u in n.users)}
    assert not early, early
    assert any(n.target is rt.reduce_positions for n in nodes)


@pytest.mark.parametrize("pool,merge", [("mean", "gather"), ("mean", "cat"), ("nchw", "cat"),
                                        ("nchw", "pool")])
def test_window_terms_are_never_split_at_full_width(pool, merge):
    """Every value computed from the first stage's per-token terms (or their factors, P and V)
    is at most as large as the terms [K, B·windows, 1, 9, dh] (before the final write of all
    components): the windows are separated only where the mean reduces the positions.
    Splitting them at the attention (K·4 terms of the same width) makes a value 4 times
    larger."""
    model, x = _model_and_input(pool, merge)
    dm = fxdecomp.decompose(model, x, granularity="tokens")
    assert "window_reduce" in dm.code and "split_windows" not in dm.code
    assert ("cat_last" in dm.code) == (merge == "cat") and "split_by_map" not in dm.code
    assert ("pool_gather" in dm.code) == (merge == "pool")
    g = dm.graph_module.graph
    first = next(n for n in g.nodes if n.target in (rt.split_heads_tokens, rt.token_probe))
    after = downstream([first], lambda u: u.target in (rt.write_terms, rt.group_components)
                       or u.op == "output")
    numel = {n: math.prod(shape) for n, shape in tensor_shapes(dm.graph_module, x).items()}
    limit = HEADS * 9 * x.shape[0] * WINDOWS * 9 * (C // HEADS)   # the terms [K, B·4, 1, 9, dh]
    big = {n.name: numel[n] for n in after if numel.get(n, 0) > limit}
    assert not big, big


@pytest.mark.parametrize("b,same", [(1, True), (16, True), (16, False)])
def test_window_reduce_equals_split_then_reduce(b, same):
    """rt.window_reduce (each index_add path, and scatter_add where kept rows differ) equals
    splitting the terms by window (rt.split_by_map) and reducing each: the reference."""
    g = torch.Generator().manual_seed(0)
    c, windows, sub = 3, 5, 2
    t = torch.randn(c, 2, 4, 3, sub * b, generator=g, dtype=torch.float64)
    wmap = torch.randint(0, 4 * windows, (1, 1 if same else 2, 4, 3, sub), generator=g)
    wmap = wmap.expand(1, 2, 4, 3, sub)
    got = rt.window_reduce(t, wmap, windows, [1, 2], False, True)
    want = rt.split_by_map(t, wmap, windows).mean((2, 3))
    assert got.shape == want.shape == (c * windows, 2, sub * b)
    torch.testing.assert_close(got, want)
    kept = rt.window_reduce(t, wmap, windows, [2], True, False)
    torch.testing.assert_close(kept, rt.split_by_map(t, wmap, windows).sum(3, keepdim=True))


@pytest.mark.parametrize("sub", [1, 4, 6])
@pytest.mark.parametrize("e", [3, 40])
def test_factored_linear_equals_blocked_linear(e, sub):
    """Σ_j σ_j (v W_j), in row blocks, equals the per-head projection of the outer product, for
    E narrower (v W first) and wider (σ ⊗ v first) than the value rows, with one, a few
    (accumulated in place) and more sub-blocks."""
    g = torch.Generator().manual_seed(0)
    heads, per, b = 2, 7, 5
    sigma = torch.randn(heads * per, 3, sub, generator=g)
    v = torch.randn(heads * per, 3, b, generator=g)
    w = torch.randn(e, heads * sub * b, generator=g)
    want = rt.blocked_linear(rt.outer_terms(sigma, v), w, heads, "torch")
    torch.testing.assert_close(rt.factored_linear(sigma, v, w, heads, "torch", rows=4), want)
    # rows=1: head by head in one-row blocks (rows=4 takes all heads at once when E is narrow)
    torch.testing.assert_close(rt.factored_linear(sigma, v, w, heads, "torch", rows=1), want)


def test_timm_swin_padded_windows_sum_to_heads():
    """timm's Swin on a grid its windows do not divide (18x18 in 4x4 windows: zero pad, then a
    crop after the window reverse), shifted windows and a patch merging, all layers in tokens
    mode: exact, nothing split at full width, and each head's per-(token, window) components sum
    to that head's component of a heads-mode decomposition (a separate path)."""
    import timm
    from fxdecomp.capture.adapters import timm_target
    torch.manual_seed(0)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                          img_size=72, window_size=4, depths=(2, 1), num_heads=(2, 2),
                          embed_dim=16).eval()
    target = timm_target(m).eval()
    x = torch.randn(2, 3, 72, 72)
    dt = fxdecomp.decompose(target, x, granularity="tokens")
    assert "split_by_map" not in dt.code and "split_windows" not in dt.code
    # the other pending terms (MLPs, biases, the embedding) keep their deferred moves (positions
    # map, issue 13f) beside the windowed ones: the final mean reads both kinds
    assert "reduce_positions" in dt.code and "window_reduce" in dt.code
    dh = fxdecomp.decompose(target, x, granularity="heads")
    with torch.no_grad():
        t, h, y = dt(x), dh(x), target(x)
    assert t.reconstruction_error() <= 1e-5
    heads = {lab.name: i for i, lab in enumerate(h.labels) if lab.kind == "attn_head"}
    summed = {}
    for i, lab in enumerate(t.labels):
        if lab.kind == "attn_head_token":
            key = f"{lab.module}.h{lab.head}"
            summed[key] = summed.get(key, 0) + t.components[i].double()
    assert sorted(summed) == sorted(heads)
    scale = float(y.abs().max())
    for name, i in heads.items():
        assert float((summed[name] - h.components[i].double()).abs().max()) <= 1e-5 * scale, name


def test_write_terms_factored_parts_sharing_one_weight():
    """Factored parts (σ, W, 1, v) written by ``rt.write_terms`` equal their unfactored
    projection even when two share one W tensor and σ has the value's shape (they are written
    by ``factored_linear``, never grouped with plain pending parts (t, W, 1) as one matmul)."""
    g = torch.Generator().manual_seed(0)
    b, sub, e, rows = 3, 2, 5, 4
    ref = torch.randn(rows, e, generator=g)                                   # the value [4, E]
    w = torch.randn(e, sub * b, generator=g)
    parts = [(torch.randn(c, rows, sub, generator=g), w, 1, torch.randn(c, rows, b, generator=g))
             for c in (2, 3)]
    want = torch.cat([rt.blocked_linear(rt.outer_terms(s, v), w, 1, "torch") for s, _, _, v in parts])
    with torch.no_grad():
        got = rt.write_terms(parts, ref, "torch")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("granularity", ["heads", "tokens"])
def test_cat_merge_gives_the_components_of_the_reshape_merge(granularity):
    """The same model with its patch merging written both ways (reshape/permute, timm; strided
    slices + cat, torchvision) has the same components, label for label: in heads mode the
    pending heads pass the cat with their moves deferred (positions maps concatenated), in
    tokens mode with their window maps."""
    a, x = _model_and_input("mean", "gather")
    b, _ = _model_and_input("mean", "cat")
    _, da = decompose_exactly(a, x, granularity)
    dm, db = decompose_exactly(b, x, granularity)
    assert "cat_last" in dm.code and "place_in_cat" not in dm.code
    assert [lab.name for lab in db.labels] == [lab.name for lab in da.labels]
    torch.testing.assert_close(db.components, da.components, rtol=1e-4, atol=1e-6)
