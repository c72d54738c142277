"""A bias carried through ops that only move rows (issue 13): the residual stream of a windowed
model passes every bias added so far through each window partition, reverse, roll and reshape.
Such a bias is one row broadcast over every position, and any op whose output rows are input
rows with the last dim kept leaves it that same row: the rewrite broadcasts the bias to the
op's output again (``rt.bias_terms``) instead of pushing it through the op, so no push is left
on a bias's way through rows-only moves, while a zero pad (rows of zeros) and a merge of rows
into the last dim (a tiled row) still go through the op. Checked on a tiny model against its own
output (components sum to it) and the bias component against a float64 reference written out
here: the bias rows as the model's moves leave them (zero where a pad brought a row in),
through the frozen norm (its 1/σ per row) and the final mean."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxdecomp.rewrite import runtime as rt

from .pending_checks import decompose_exactly
from .reference_heads import TinyAttention


class Mixer(nn.Module):
    """tokens [B, 16, 8] -> an attention (its output projection has a bias; its heads are
    pending projections through the moves) -> window partition of the 4x4 grid (2x2
    windows), roll, an identity slice, reverse (``pad``: a zero pad of the grid to 6x6 before
    the partition, cropped back to the middle 4x4 after: the roll brings padded zero rows in)."""

    def __init__(self, pad: bool):
        super().__init__()
        self.attn = TinyAttention(8, 2)
        self.pad = pad

    def forward(self, x):
        return _moves(self.attn(x), self.pad)


class Block(nn.Module):
    def __init__(self, pad: bool):
        super().__init__()
        self.mixer = Mixer(pad)

    def forward(self, x):
        return x + self.mixer(x)


class Moves(nn.Module):
    """A residual block of the moves above -> LayerNorm -> mean over tokens -> a head linear."""

    def __init__(self, pad: bool):
        super().__init__()
        self.block = Block(pad)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.norm(self.block(x)).mean(1))


def _moves(y, pad: bool):
    """[B, 16, 8] -> the same rows moved (the model's ops, also the reference's)."""
    b = y.shape[0]
    g = y.reshape(b, 4, 4, 8)
    if pad:
        g = nn.functional.pad(g, (0, 0, 1, 1, 1, 1))                 # [B, 6, 6, 8]
    n = g.shape[1]
    w = g.reshape(b, n // 2, 2, n // 2, 2, 8).permute(0, 1, 3, 2, 4, 5).contiguous()
    w = w.reshape(-1, 4, 8).roll(1, 1)[:, 0:]                        # windows [B·n²/4, 4, 8]
    g = w.reshape(b, n // 2, n // 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(b, n, n, 8)
    k = 1 if pad else 0
    return g[:, k:k + 4, k:k + 4].reshape(b, 16, 8)


MOVES = ("push_reshape", "push_permute", "push_transpose", "push_roll", "push_contiguous",
         "push_slice", "push_flatten", "push_select", "push_unsqueeze")


def _bias_pushes(gm) -> list:
    """Pushes of a layout op (not the final mean) whose input comes from a ``rt.bias_terms``
    node through pushes and broadcasts only."""
    def from_bias(n):
        while n.op == "call_function" and (n.target is rt.expand_terms
                                           or n.target.__name__.startswith("push_")):
            n = n.args[0]
        return n.op == "call_function" and n.target is rt.bias_terms
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "__name__", "").startswith(MOVES) and from_bias(n.args[0])]


@pytest.mark.parametrize("pad", [False, True], ids=["moves", "zero_pad"])
@pytest.mark.parametrize("granularity", ["heads", "tokens"])
def test_a_bias_moves_as_itself_through_rows_only_ops(pad, granularity):
    torch.manual_seed(0)
    model = Moves(pad).eval()
    attn = model.block.mixer.attn
    with torch.no_grad():
        attn.proj.bias.normal_()
    x = torch.randn(3, 16, 8)
    dm, d = decompose_exactly(model, x, granularity)
    if not pad:
        pushes = _bias_pushes(dm.graph_module)
        assert not pushes, [n.name for n in pushes]
    # the reference: the bias rows as the moves leave them (zero where a padded row came in),
    # through the norm (centring, γ, the frozen 1/σ of x + y per row), the mean over tokens and
    # the head
    with torch.no_grad():
        xd = x.double()
        z = xd + _moves(attn(x).double(), pad)
        inv = 1 / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + model.norm.eps)
        rows = _moves(attn.proj.bias.double().expand(x.shape), pad)
        if pad:
            assert bool((rows == 0).all(-1).any())   # some kept rows are padded zeros
        normed = (rows - rows.mean(-1, keepdim=True)) * model.norm.weight.double() * inv
        want = normed.mean(1) @ model.head.weight.double().t()                     # [B, 5]
    name = next(i for i, lab in enumerate(d.labels) if lab.name.endswith("proj.bias"))
    got = d.components[name].double()
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
