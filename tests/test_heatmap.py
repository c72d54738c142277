"""Token positions derived from the graph, and heatmaps placed with them.

Positions are checked against layouts written out independently here (the window partition,
cyclic shift and grid partition as formulas), on small configurations of the real timm
architectures (DeiT distilled, DINOv2 with registers, Swin, MaxViT). Heatmaps are checked by
perturbing the pixels of one patch: the token whose component changes most must sit on that
patch — for a plain ViT and for a windowed Swin (global grid position, windows, shifts).
"""
from __future__ import annotations

import pytest
import timm
import torch

import fxdecomp
from fxdecomp import Decomposition
from fxdecomp.analyse import positions as P
from fxdecomp.analyse.facts import GraphFacts
from fxdecomp.analyse.walk import walk
from fxdecomp.apply.heatmap import PositionUnavailableError, token_heatmap
from fxdecomp.capture.adapters import timm_target
from fxdecomp.capture.export import capture
from fxdecomp.errors import InputError
from fxdecomp.rewrite.rules import RULES


def _target(name, output="pre_logits", **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()
    return timm_target(m, output=output).eval()


def _tables(target, size):
    x = torch.randn(2, 3, size, size)
    gm, dynamic = capture(target, x)
    w = walk(gm, GraphFacts(gm, RULES, "tokens"))
    tables = P.token_tables_for(gm, w, x, dynamic, prefix="model.")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [tables[a] for a in sorted(tables, key=order.get)]   # in forward order


def _cells(table):
    return [[(p.row, p.col) for p in row] for row in table.positions]


# ----------------------------------------------------------------------------- plain ViTs
@pytest.fixture(scope="module")
def deit_distilled():
    return _target("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2,
                   embed_dim=32, num_heads=2)


def test_positions_deit_distilled_cls_and_distillation(deit_distilled):
    for table in _tables(deit_distilled, 32):
        assert table.error is None and table.windows == 1 and table.grid == (4, 4)
        row = table.positions[0]
        assert [p.kind for p in row[:2]] == ["cls", "distillation"]
        assert [p.source for p in row[:2]] == ["cls_token[0]", "dist_token[0]"]
        assert [(p.row, p.col) for p in row[2:]] == [(r, c) for r in range(4) for c in range(4)]
        assert row[2].box == (0, 0, 8, 8) and row[-1].box == (24, 24, 32, 32)


def test_positions_dinov2_registers():
    target = _target("vit_small_patch14_reg4_dinov2", img_size=28, depth=1, embed_dim=32,
                     num_heads=2)
    (table,) = _tables(target, 28)
    row = table.positions[0]
    assert [p.kind for p in row[:5]] == ["cls"] + ["register"] * 4
    assert [p.source for p in row[1:5]] == [f"reg_token[{i}]" for i in range(4)]
    assert table.grid == (2, 2)
    assert [(p.row, p.col) for p in row[5:]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert row[5].stride == (14.0, 14.0)


# ----------------------------------------------------------------------------- windows
def _swin_cell(w, t, grid, ws, shift):
    """Window w, local key t of a (shifted) window partition on a grid x grid map: the map is
    rolled by -shift before partition, so local (i, j) of window (a, b) is global
    ((a·ws + i + shift) mod grid, (b·ws + j + shift) mod grid)."""
    per_row = grid // ws
    a, b = divmod(w, per_row)
    i, j = divmod(t, ws)
    return ((a * ws + i + shift) % grid, (b * ws + j + shift) % grid)


@pytest.fixture(scope="module")
def swin():
    return _target("swin_tiny_patch4_window7_224", img_size=64, window_size=4, depths=(2, 2),
                   num_heads=(2, 2), embed_dim=16)


def test_positions_swin_windows_shifts_and_stages(swin):
    tables = _tables(swin, 64)
    # stage 1: 16x16 grid (stride 4), 16 windows of 4x4; stage 2: 8x8 (stride 8), 4 windows
    expect = [(16, 0), (16, 2), (8, 0), (8, 2)]
    assert len(tables) == 4
    for table, (grid, shift) in zip(tables, expect):
        assert table.error is None
        assert table.grid == (grid, grid) and table.windows == (grid // 4) ** 2
        assert table.positions[0][0].stride == (64 / grid, 64 / grid)
        want = [[_swin_cell(w, t, grid, 4, shift) for t in range(16)] for w in range(table.windows)]
        assert _cells(table) == want


def test_positions_maxvit_block_and_grid():
    target = _target("maxvit_tiny_tf_224", output="pooled", img_size=64, depths=(1, 1),
                     embed_dim=(32, 64))
    tables = _tables(target, 64)
    # per stage: block attention (contiguous 2x2 windows), then grid attention (2x2 grid whose
    # cells are grid/2 apart); stage grids 16, 8 on a 64 px input (stem stride 2, stage stride 2)
    grids = [16, 16, 8, 8]
    assert len(tables) == 4
    for k, (table, g) in enumerate(zip(tables, grids)):
        assert table.error is None and table.grid == (g, g)
        n = g // 2
        if k % 2 == 0:
            want = [[_swin_cell(w, t, g, 2, 0) for t in range(4)] for w in range(n * n)]
        else:
            want = [[(i * n + a, j * n + b) for i in range(2) for j in range(2)]
                    for a in range(n) for b in range(n)]
        assert _cells(table) == want, f"attention {k}"


# ----------------------------------------------------------------------------- heatmaps
@torch.no_grad()
def _perturbation_peaks(target, size, patch, spots, layers):
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    dm = fxdecomp.decompose(target, x, granularity="tokens")
    d = dm(x)
    assert d.reconstruction_error() <= 1e-5
    for lab in d.labels:
        if lab.kind == "attn_head_token":
            assert lab.position is not None, lab.name
    for r, c in spots:
        x2 = x.clone()
        x2[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 3.0
        d2 = dm(x2)
        change = Decomposition(d2.output - d.output, d2.components - d.components, d.labels)
        for layer in layers:
            hm = token_heatmap(change, "norm", layer=layer)
            finest = max(hm.grids, key=lambda g: g[0])
            m = hm.grids[finest][0]
            assert divmod(int(m.flatten().argmax()), finest[1]) == (r, c), (layer, r, c)
            y, x_ = hm.peak()[0].tolist()        # the pixel peak lies in the patch
            assert r * patch <= y < (r + 1) * patch and c * patch <= x_ < (c + 1) * patch
    return d


def test_heatmap_peaks_on_perturbed_patch_vit(deit_distilled):
    d = _perturbation_peaks(deit_distilled, 32, 8, [(1, 2), (3, 0)], layers=[0, 1])
    # exact: cells + special tokens = the projection of the selected components' sum
    u = torch.randn(d.output.shape[-1])
    hm = token_heatmap(d, u, layer=1)
    want = d.select(kind="attn_head_token", layer=1).components.sum(0) @ u
    assert torch.allclose(hm.total(), want, rtol=1e-4, atol=1e-5)
    assert set(hm.special) == {"cls_token[0]", "dist_token[0]"}
    assert torch.allclose(hm.pixels.sum((-2, -1)), hm.grids[(4, 4)].sum((-2, -1)), rtol=1e-4, atol=1e-5)


def test_heatmap_peaks_on_perturbed_patch_swin():
    target = _target("swin_tiny_patch4_window7_224", img_size=32, window_size=4, depths=(2, 2),
                     num_heads=(2, 2), embed_dim=16)
    # block 0 (windows), block 1 (shifted windows) on the 8x8 stage-1 grid
    _perturbation_peaks(target, 32, 4, [(1, 2), (5, 6), (7, 0)], layers=[0, 1])


def test_heatmap_errors():
    from fxdecomp.run.decomposition import ComponentLabel
    d = Decomposition(torch.zeros(1, 4), torch.zeros(1, 1, 4),
                      [ComponentLabel("m.h0.t0", "m", "attn_head_token", 0, 0, 0)])
    with pytest.raises(PositionUnavailableError, match="no position"):
        token_heatmap(d, torch.ones(4))
    with pytest.raises(InputError, match="granularity='tokens'"):
        token_heatmap(d, torch.ones(4), layer=5)
    with pytest.raises(InputError, match="direction"):
        token_heatmap(d, torch.ones(3))


class _TokenMixingValues(torch.nn.Module):
    """Attention whose values are a running sum over the token dim: no key is one image token."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 4, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)                    # [B, N, 8]
        q = self.blocks[0](t).unsqueeze(1)
        v = t.cumsum(1).unsqueeze(1)
        attn = torch.nn.functional.scaled_dot_product_attention(q, q, v)
        return (t + attn.squeeze(1)).mean(1)


@torch.no_grad()
def test_positions_error_names_the_op():
    model = _TokenMixingValues().eval()
    x = torch.randn(2, 3, 16, 16)
    dm = fxdecomp.decompose(model, x, granularity="tokens")
    d = dm(x)
    assert d.reconstruction_error() <= 1e-5         # the decomposition itself is unaffected
    with pytest.raises(PositionUnavailableError, match="'cumsum' mixes tokens"):
        token_heatmap(d, "norm")
