"""Projected per-token terms through window attention (issue 13h, Swin-T projected at batch 8).

In tokens mode a window attention's per-(head, source token) terms are rank one: P[:, q, t]
times V[t]. They are carried as a *probe* (``rt.token_probe``): one weight and one attention
row per position (ω, r [1, *rest, S]) move through the window reverse, shifts and patch
mergings instead of P's column for every (head, token) ([H·N, *rest, S]), and P is read at the
moved rows once, where the final mean reduces them per window (``rt.window_reduce_probe``).
When a window has fewer rows than the final sub-blocks (after two or more patch mergings), each
window is projected from its rows (``rt.window_rows`` / ``factored_linear``): Σ_q weights_q ·
(v W_{slot q}) instead of σ per sub-block. Checked on timm's Swin (shifted windows, two
mergings; and a grid its windows do not divide: padded windows):

- ``dm(x, project=D)`` equals ``dm(x).components @ D`` (same labels; the tokens-mode path
  unfactors the same probe, so this compares two contractions) and sums to ``model(x) @ D``;
- the per-window-row path agrees with the dense σ path and with splitting by window
  (``rt.split_by_map``, the reference) on random factors, padded windows included;
- nothing downstream of the probe, before the reduction, holds more than one row per position
  (the old factored path moved s with H·N rows).
"""
from __future__ import annotations

import pytest
import torch

import fxdecomp
from fxdecomp.rewrite import runtime as rt

from .pending_checks import downstream, tensor_shapes


def _swin(img: int, window: int, depths: tuple, seed: int = 0):
    import timm
    from fxdecomp.capture.adapters import timm_target
    torch.manual_seed(seed)
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                          img_size=img, window_size=window, depths=depths,
                          num_heads=(2,) * len(depths), embed_dim=16).eval()
    return timm_target(m).eval()


CASES = {
    # 8x8 grid in 2x2 windows (4 rows each), shifted, then two mergings: 16 sub-blocks per window
    "rows": (32, 2, (2, 1, 1)),
    # 18x18 grid in 4x4 windows: padded, cropped after the window reverse
    "padded": (72, 4, (2, 1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_projected_tokens_equal_tokens_times_directions(case):
    img, window, depths = CASES[case]
    target = _swin(img, window, depths)
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(1))
    dm = fxdecomp.decompose(target, x, granularity="tokens")
    e = int(target(x).shape[-1])
    d = torch.randn(e, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        p, t, y = dm(x, project=d), dm(x), target(x)
    assert p.labels == t.labels
    assert sum(lab.kind == "attn_head_token" for lab in p.labels) > 0
    want = t.components.double() @ d.double()
    scale = float(want.abs().max())
    assert float((p.components.double() - want).abs().max()) <= 1e-5 * scale
    total = p.components.double().sum(0)
    assert float((total - y.double() @ d.double()).abs().max()) <= 1e-5 * scale
    code = dm._graph_for(x.shape[0], project=True).code
    assert "window_reduce_probe" in code
    # a second input through the same graphs: the probe's constants, made once per shape
    # (``rt.token_probe``), are read again, and no op wrote into them
    x2 = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        p2, t2 = dm(x2, project=d), dm(x2)
    want2 = t2.components.double() @ d.double()
    assert float((p2.components.double() - want2).abs().max()) <= 1e-5 * float(want2.abs().max())
    assert rt._PROBES
    for (rows, q, _, _, _), (omega, r) in rt._PROBES.items():
        assert torch.equal(r.flatten(), torch.arange(rows * q)) and bool((omega == 1).all())


def test_probe_moves_one_row_per_position():
    """Every value computed from the probe before the per-window reduction has one row (ω or
    r), not one per (head, token)."""
    img, window, depths = CASES["rows"]
    target = _swin(img, window, depths)
    x = torch.randn(2, 3, img, img)
    dm = fxdecomp.decompose(target, x, granularity="tokens")
    d = torch.randn(int(target(x).shape[-1]), 4)
    with torch.no_grad():
        dm(x, project=d)
    gm = dm._graph_for(2, project=True)
    starts = [n for n in gm.graph.nodes if n.target is rt.token_probe]
    assert starts
    after = downstream(starts, lambda u: u.target in (rt.window_reduce_probe, rt.write_terms))
    rows = {n.name: shape[0] for n, shape in tensor_shapes(gm, x, d).items() if n in after}
    moved = {k: v for k, v in rows.items() if not k.startswith("getitem")}
    assert moved, "the probe is never moved"
    assert all(v == 1 for v in moved.values()), moved


@pytest.mark.parametrize("padded", [False, True])
def test_window_rows_reduction_equals_split_by_window(padded):
    """window_reduce_probe (each window's rows, then the per-row projection) and the dense σ
    it stands for both equal splitting the unfactored terms by window and reducing each (fp32:
    the kernels take no float64); padded: one row of window 3 is cropped (its slot reads
    window 0, weight 0), so windows have 5 and 3 rows (the general path, not whole windows
    read in P's order)."""
    g = torch.Generator().manual_seed(0)
    images, windows, q, heads, n_tok, b, sub, e = 2, 8, 4, 2, 3, 3, 8, 5
    probs = torch.rand(images * windows, heads, q, n_tok, generator=g)
    v = torch.randn(images * windows, heads, n_tok, b, generator=g)
    # the final layout [B, 2, 2, S]: each image's 32 (position, sub-block) slots hold its 8
    # windows' 4 rows (a fixed shuffle, the same for every image)
    perm = torch.randperm(windows * q, generator=g)
    w_of, q_of = perm // q, perm % q
    if padded:
        drop = int((perm == 3 * q).nonzero()[0])
        w_of[drop], q_of[drop] = 0, 0
    r = torch.stack([(i * windows + w_of) * q + q_of for i in range(images)])
    omega = torch.rand(images, windows * q, generator=g)
    if padded:
        omega[:, drop] = 0
    shape = (1, images, 2, 2, sub)
    omega, r = omega.view(shape), r.view(shape)
    _, _, vals = rt.token_probe(probs, v)
    weight = torch.randn(e, heads * sub * b, generator=g)
    with torch.no_grad():
        got, got_rows = rt.window_reduce_probe(omega, r, probs, vals, windows, [1, 2], False, True)
        y = rt.factored_linear(got, got_rows, weight, heads)
        s, bmap, vv = rt.probe_factors(omega, r, probs, vals)
        terms = rt.unfactor(s, vv, bmap)
        want = rt.blocked_linear(rt.split_by_map(terms, bmap, windows).mean((2, 3)), weight,
                                 heads, "torch")
        dense = rt.blocked_linear(rt.outer_terms(got, got_rows), weight, heads, "torch")
    assert isinstance(got_rows, tuple)       # fewer rows per window (<= 5) than sub-blocks (8)
    assert got_rows[1].shape == (windows, 5 if padded else q)     # slot: window x row
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(dense, want)


def test_reduce_positions_of_a_broadcast_row():
    """A constant broadcast over every position (a bias) reduced through a positions map (moves
    and per-row scales deferred) equals the mean of its gathered rows: Σ_r w[r]·row / n."""
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 1, 1, 1, 6, generator=g)
    t = row.expand(1, 2, 4, 4, 6)                                    # [1, B, 4, 4, E], stride 0
    positions = rt.home_positions(t[0])
    positions = rt.scale_positions(positions, torch.rand(2, 4, 4, 1, generator=g) + 0.5)
    got = rt.reduce_positions(t, positions, (1, 2), False, True)
    want = rt.gather_positions(t.contiguous(), positions).mean((2, 3))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("c", [1, 3, 80])
def test_reduce_positions_reads_strided_rows_in_place(c):
    """Terms that are a permuted view of channels-last memory (the 2x2 sub-positions of
    a patch merging taken from a [B, H, W, E] value) are reduced from their memory rows, no
    copy: the result equals the reduction of the same terms made contiguous, for one component
    (``embedding_bag``) and many (a gather), with moves and per-row scales deferred."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(c, 2, 8, 8, 5, generator=g)                             # [c, B, H, W, E]
    t = base.view(c, 2, 4, 2, 4, 2, 5).permute(0, 1, 2, 4, 3, 5, 6)   # [c, B, 4, 4, 2, 2, E]
    assert not t.is_contiguous()
    flat, rowmap = rt._memory_rows(t)
    assert rowmap is not None and flat.data_ptr() == base.data_ptr()          # no copy
    positions = rt.home_positions(t[0])
    positions = rt.scale_positions(positions, torch.rand(t.shape[1:-1] + (1,), generator=g) + 0.5)
    dims = (1, 2)
    got = rt.reduce_positions(t, positions, dims, False, True)
    want = rt.reduce_positions(t.contiguous(), positions, dims, False, True)
    torch.testing.assert_close(got, want)
    ref = rt.gather_positions(t.contiguous(), positions).mean((2, 3))          # independent path
    torch.testing.assert_close(got, ref)


def test_take_of_evenly_spaced_rows_is_a_view():
    """A demand for every other row (a patch merging's x[0::2] as a demand) is served by a
    strided view, not a copy; other row sets are gathered. Both equal index_select."""
    t = torch.randn(3, 2, 8, 5)
    for index in [(0, 2, 4, 6), (1, 3, 5, 7), (1, 4, 7), (0, 1, 5), (2,), (3, 4, 5)]:
        got = rt.take(t, 2, index)
        torch.testing.assert_close(got, t.index_select(2, torch.tensor(index)))
        evenly = len(index) == 1 or len({b - a for a, b in zip(index, index[1:])}) == 1
        assert (got.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()) == evenly, index


def _shuffled_rows(g, images: int, windows: int, q: int, padded: bool):
    """Each image's windows x q attention rows (b'·Q + q) in one fixed shuffle over the final
    (position, sub-block) slots, and their weights ω; ``padded``: one row of window 3 cropped
    (its slot reads window 0 with weight 0)."""
    perm = torch.randperm(windows * q, generator=g)
    w_of, q_of = perm // q, perm % q
    omega = torch.rand(images, windows * q, generator=g)
    if padded:
        drop = int((perm == 3 * q).nonzero()[0])
        w_of[drop], q_of[drop] = 0, 0
        omega[:, drop] = 0
    return torch.stack([(i * windows + w_of) * q + q_of for i in range(images)]), omega


@pytest.mark.parametrize("sub,padded", [(2, False), (8, False), (8, True)],
                         ids=["sigma", "p_order", "window_rows"])
def test_reduced_factors_reshape_and_scale_in_every_form(sub, padded):
    """The factors a per-window reduction returns come in three forms (σ per sub-block when
    windows have no fewer rows than sub-blocks; weights in P's order for whole windows with
    fewer; each window's rows otherwise). Reduced with keepdim ([B, 1, 1] kept, as an adaptive
    pool to one position leaves them), each form viewed as [B] (``rt.reshape_reduced``) gives
    the same terms, and a per-row factor (``rt.scale_reduced``, a norm's frozen 1/σ after the
    pool) scales the terms of each image, against ``outer_terms`` of the unchanged factors."""
    g = torch.Generator().manual_seed(0)
    images, windows, q, heads, n_tok, b = 3, 8, 4, 2, 3, 2
    grid = {2: 4, 8: 2}[sub]                 # grid² positions x sub slots = windows x q rows
    probs = torch.rand(images * windows, heads, q, n_tok, generator=g)
    v = torch.randn(images * windows, heads, n_tok, b, generator=g)
    r, omega = _shuffled_rows(g, images, windows, q, padded)
    shape = (1, images, grid, grid, sub)
    _, _, vals = rt.token_probe(probs, v)
    with torch.no_grad():
        sigma, rows = rt.window_reduce_probe(omega.view(shape), r.view(shape), probs, vals,
                                             windows, [1, 2], True, True)
        form = "sigma" if isinstance(rows[0], str) else \
            "p_order" if len(rows) == 5 else "window_rows"
        terms = rt.outer_terms(sigma, rows)                       # [c·W, B, 1, 1, S·b]
        ref = torch.zeros(images, 5)                              # the value [B, E] after
        flat = rt.outer_terms(*rt.reshape_reduced(sigma, rows, ref, 1))
        factor = torch.rand(images, 1, 1, 1, generator=g) + 0.5
        scaled = rt.outer_terms(rt.scale_reduced(sigma, rows, factor), rows)
    assert form == {(2, False): "sigma", (8, False): "p_order", (8, True): "window_rows"}[sub, padded]
    assert terms.shape == (heads * n_tok * windows, images, 1, 1, sub * b)
    torch.testing.assert_close(flat, terms.reshape(terms.shape[0], images, sub * b))
    torch.testing.assert_close(scaled, terms * factor)


@pytest.mark.parametrize("sub,q,padded", [(2, 4, False), (8, 16, False), (8, 4, False),
                                           (8, 4, True)],
                         ids=["sigma", "sigma_wide", "p_order", "window_rows"])
@pytest.mark.parametrize("rows", [4096, 5])
def test_factored_linear_reads_every_form_of_reduced_factors(sub, q, padded, rows):
    """``factored_linear`` of each form of reduced factors (read where they lie: σ and V as the
    attention holds them, weights in P's order, each window's rows), with V a strided view of a
    qkv output as a model's attention reads it, equals ``blocked_linear`` of the dense terms
    (``outer_terms``); ``rows`` = 5 splits the work into blocks of a few images."""
    g = torch.Generator().manual_seed(1)
    images, windows, heads, n_tok, b, e = 3, 8, 2, 3, 4, 3
    grid = int((windows * q // sub) ** 0.5)   # grid² positions x sub slots = windows x q rows
    probs = torch.rand(images * windows, heads, q, n_tok, generator=g)
    qkv = torch.randn(images * windows, n_tok, 3, heads, b, generator=g)
    v = qkv.permute(2, 0, 3, 1, 4)[2]                    # [B', H, N, b], strided like timm's
    r, omega = _shuffled_rows(g, images, windows, q, padded)
    shape = (1, images, grid, grid, sub)
    weight = torch.randn(e, heads * sub * b, generator=g)
    _, _, vals = rt.token_probe(probs, v)
    with torch.no_grad():
        sigma, got = rt.window_reduce_probe(omega.view(shape), r.view(shape), probs, vals,
                                            windows, [1, 2], False, True)
        y = rt.factored_linear(sigma, got, weight, heads, "torch", rows=rows)
        want = rt.blocked_linear(rt.outer_terms(sigma, got), weight, heads, "torch")
    form = "sigma" if isinstance(got[0], str) else "p_order" if len(got) == 5 else "window_rows"
    assert form == ("window_rows" if padded else "sigma" if q >= sub else "p_order")
    assert y.shape == (heads * n_tok * windows, images, e)
    torch.testing.assert_close(y, want)


def test_gather_of_unmoved_rows_is_a_view():
    """Positions that kept every row where it was in memory and scaled nothing (a transpose of
    a size-1 dim, a reshape) gather the input as it is, without a copy; any move or scale
    gathers a copy. Both equal the gather written out."""
    t = torch.randn(3, 4, 1, 5, 2)                                # [c, B, 1, H, b]
    home = rt.home_positions(t[0])                                # [2, 4, 1, 5, 1]
    moved = home.transpose(2, 3).reshape(2, 4, 1, 5)              # [2, B, 1, K = H]
    got = rt.gather_positions(t.transpose(2, 3).reshape(3, 4, 5, 1, 2)[:, :, :, 0], moved)
    assert got.data_ptr() == t.data_ptr()
    want = t.transpose(2, 3).reshape(3, 4, 1, 10)
    torch.testing.assert_close(got, want)
    scaled = rt.scale_positions(moved, torch.full((4, 1, 1), 2.0))
    got2 = rt.gather_positions(t.transpose(2, 3).reshape(3, 4, 5, 1, 2)[:, :, :, 0], scaled)
    assert got2.data_ptr() != t.data_ptr()
    torch.testing.assert_close(got2, 2 * want)
    flipped = moved.flip(-1)
    got3 = rt.gather_positions(t.transpose(2, 3).reshape(3, 4, 5, 1, 2)[:, :, :, 0], flipped)
    torch.testing.assert_close(got3, t.flip(3).transpose(2, 3).reshape(3, 4, 1, 10))


@pytest.mark.parametrize("granularity", ["heads", "tokens"])
def test_no_runtime_call_is_made_twice(granularity):
    """The rewritten graphs (the plain one, and with output directions) make no call of the
    runtime twice with the same arguments (``emit._common_calls``): rules emit per chunk, so
    every chunk made pending at a merge got its own identity W, and its own folds of the
    merge's norm and linear after it; one of each remains, and the components still sum to the
    output."""
    from fxdecomp.rewrite.emit import _frozen
    img, window, depths = CASES["rows"]
    target = _swin(img, window, depths)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
    dm = fxdecomp.decompose(target, x, granularity=granularity)
    e = int(target(x).shape[-1])
    d = torch.randn(e, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        p, y = dm(x, project=d), target(x)
    want = y.double() @ d.double()
    assert float((p.components.double().sum(0) - want).abs().max()) <= 1e-5 * float(want.abs().max())
    for gm in (dm.graph_module, dm._graph_for(x.shape[0], project=True)):
        calls = [n for n in gm.graph.nodes if n.op == "call_function"
                 and getattr(n.target, "__module__", None) == rt.__name__]
        assert any(n.target is rt.identity_weight for n in calls)
        keys = []
        for n in calls:
            try:
                key = (n.target, _frozen(n.args), _frozen(n.kwargs))
                hash(key)
            except TypeError:      # not hashable: never merged
                continue
            keys.append(key)
        assert len(keys) == len(set(keys))
