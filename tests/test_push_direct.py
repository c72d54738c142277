"""rt.push applies layout ops, means and pools to the component axis directly (no vmap): each
direct form agrees with the op applied to every component one by one, on several ranks and
argument forms (negative dims, defaults)."""
from __future__ import annotations

import pytest
import torch

from fxdecomp.rewrite import runtime as rt

a = torch.ops.aten
CASES = [
    (a.permute.default, ([0, 2, 3, 1],)), (a.permute.default, ([-1, 0, 1, 2],)),
    (a.reshape.default, ([2, -1, 6],)), (a.reshape.default, ([8, 36],)),
    (a.flatten.using_ints, (1,)), (a.flatten.using_ints, (1, 2)), (a.flatten.using_ints, (-3, -2)),
    (a.transpose.int, (-1, 1)), (a.roll.default, ([1, -2], [2, 3])), (a.roll.default, ([1], [-1])),
    (a.select.int, (1, 2)), (a.select.int, (-2, -1)), (a.slice.Tensor, (2, 1, 5, 2)),
    (a.slice.Tensor, (-1, None, 3)), (a.unsqueeze.default, (-1,)), (a.unsqueeze.default, (0,)),
    (a.contiguous.default, ()), (a.mean.dim, ([2, 3],)), (a.mean.dim, ([-1], True)),
    (a.sum.dim_IntList, ([1],)), (a.constant_pad_nd.default, ([1, 1, 0, 2],)),
    (a.pad.default, ([1, 1, 0, 2], "constant", 0.0)), (a.avg_pool2d.default, ([2, 2], [2, 2])),
    (a.avg_pool2d.default, ([3, 3], [1, 1], [1, 1], False, False)),
    (a.adaptive_avg_pool2d.default, ([1, 1],)), (a.avg_pool1d.default, ([2],)),
]




@pytest.mark.parametrize("op,args", CASES + [(a.avg_pool2d.default, ([2, 2],)),
                                             (a.adaptive_avg_pool2d.default, ([2, 1],)),
                                             (a.mean.dim, ([0, -1],))],
                         ids=lambda v: str(v))
def test_direct_push_equals_per_component(op, args):
    """Components of rank 4 ([2, 4, 6, 6]), and of rank 3 for the last three cases (an
    unbatched pool: the component axis alone is the batch)."""
    torch.manual_seed(0)
    rank3 = (op, args) not in CASES or op is a.avg_pool1d.default
    shape = (4, 6, 6) if rank3 else (2, 4, 6, 6)
    t = torch.randn((3,) + shape).transpose(-1, -2)   # non-contiguous terms
    ref = torch.stack([op(t[i], *args) for i in range(t.shape[0])])
    assert op in rt._DIRECT
    got = rt.push(op, t, 0, (None,) + tuple(args), {})
    assert got.shape == ref.shape
    assert torch.equal(got, ref)


@pytest.mark.parametrize("op,args,varies", [(a.contiguous.default, (), False),
                                            (a.roll.default, ([3, -2], [1, 2]), False),
                                            (a.roll.default, ([1, 2], [1, 2]), True)], ids=str)
def test_broadcast_terms_stay_broadcast(op, args, varies):
    """A bias spread over the positions (stride 0 there) through contiguous or a roll along
    the spread dims is the same values: it stays broadcast (stride 0, nothing written at
    every position), equal to the op applied to the materialised terms; a roll that also
    moves a dim the term varies along (``varies``: W) is applied to that dim only."""
    torch.manual_seed(0)
    if varies:
        t = torch.randn(2, 1, 1, 5, 6).expand(2, 4, 5, 5, 6)   # [c, B, H, W, C]
    else:
        t = torch.randn(2, 1, 1, 1, 6).expand(2, 4, 5, 5, 6)   # a bias per component
    ref = torch.stack([op(t[i].contiguous(), *args) for i in range(t.shape[0])])
    got = rt.push(op, t, 0, (None,) + tuple(args), {})
    assert torch.equal(got, ref)
    assert got.stride(1) == 0 and got.stride(2) == 0


@pytest.mark.parametrize("op,args", [(a.avg_pool2d.default, ([3, 3], [2, 2], [1, 1], False, True)),
                                     (a.avg_pool2d.default, ([3, 3], [2, 2], [1, 1], False, False)),
                                     (a.adaptive_avg_pool2d.default, ([2, 2],))], ids=str)
def test_pooled_bias_is_pooled_once(op, args):
    """A bias spread over the images and positions ([c, B, C, H, W], stride 0 but along C)
    through a pool (edges included in the count or not): equal to the pool of every
    component's materialised value, and still spread over the images (pooled once)."""
    torch.manual_seed(0)
    t = torch.randn(2, 1, 4, 1, 1).expand(2, 3, 4, 6, 6)
    ref = torch.stack([op(t[i].contiguous(), *args) for i in range(t.shape[0])])
    got = rt.push(op, t, 0, (None,) + tuple(args), {})
    assert torch.equal(got, ref)
    assert got.stride(1) == 0


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_extra_work_flushes_denormals_and_restores_the_callers_mode(caller_flushes):
    """The runtime's work on attention probabilities runs with denormals flushed (a product
    with a probability below 2^-126 is 0 there), and the caller's mode is what it was after."""
    tiny = torch.tensor(2.0 ** -130)                         # a denormal float32
    s = torch.tensor([[3.0, 1.0]]) * torch.tensor([[2.0 ** -129, 1.0]])
    v = torch.ones(1, 1, 1)
    try:
        torch.set_flush_denormal(caller_flushes)
        out = rt.unfactor(s, v, torch.zeros(1, 2, dtype=torch.long))
        assert out[0, 0] == 0 and out[0, 1] == 1
        assert bool(tiny * 1.0 == 0) == caller_flushes
    finally:
        torch.set_flush_denormal(False)
