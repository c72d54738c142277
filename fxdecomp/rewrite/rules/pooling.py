"""Pooling, reductions and selections.

Average pooling, means and sums are linear. Max pooling, ``amax`` and ``max(x, dim)`` select one
element per output: with the argmax frozen at the forward pass they are a gather, linear too.
"""
from __future__ import annotations

import re

import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ...graph.ops import aten, op_key
from ...graph.plan import Demand, Plan, Requests
from ...graph.rule import Rule
from ...graph.shapes import norm_dim, sizes
from .. import runtime as rt
from . import RULES
from .common import Tail, arg, as_image, mapped, ops
from .layout import keep_pending, layout_emit, pending_in, reduce_deferred


def _plan_in_first(node, facts):
    """op(Σ x_i) = Σ op(x_i): linear in the first argument, the rest frozen."""
    return Plan.linear([node.args[0]], layout_emit())


def _plan_pool(node, facts):
    """Average pooling over the last 1/2/3 dims (by the op's name) is linear; it acts on a
    pending projection's input when its channels are elsewhere (NCHW: [c, B, b, H, W])."""
    x = node.args[0]
    spatial = int(re.search(r"pool(\d)d", str(node.target)).group(1))
    plain = layout_emit()
    rank = len(sizes(x))
    # an adaptive pool to one position is a mean over the spatial dims: windowed terms are
    # reduced per window there (``keep_pending``), not split
    size = arg(node, 1, "output_size") if "adaptive" in str(node.target) else None
    windows = ("reduce", list(range(rank - spatial, rank)), True, True) \
        if size is not None and all(s == 1 for s in size) else _tiling_pool(node, spatial)

    def emit(em, node):
        if not pending_in(em, x):
            return plain(em, node)
        args = (None,) + tuple(em.orig_arg(a) for a in node.args[1:])
        kwargs = {k: em.orig_arg(v) for k, v in node.kwargs.items()}
        # a pool to one position of chunks with deferred moves: their mean, read in place
        deferred = (lambda c: reduce_deferred(em, c, windows[1], True, True, rank)) \
            if isinstance(windows, tuple) and windows[0] == "reduce" else None
        return keep_pending(em, x, lambda t: em.call(rt.pusher(node.target, 0), t, args, kwargs),
                            moves=lambda ch: ch if ch < rank - spatial else None, rank_out=rank,
                            windows=windows, deferred=deferred)
    return Plan.linear([x], emit)


def _tiling_pool(node: Node, spatial: int):
    """("pool", kernel) for an average pool whose windows tile the input (stride = kernel, no
    padding, sizes divisible, no divisor override): windowed terms pass it as sub-blocks
    (``keep_pending``); else "split"."""
    if "adaptive" in str(node.target):
        return "split"

    def tup(v):
        return tuple(v) * (spatial if len(v) == 1 else 1) if isinstance(v, (list, tuple)) \
            else (v,) * spatial
    kernel = tup(arg(node, 1, "kernel_size"))
    stride = tup(arg(node, 2, "stride", []) or kernel)
    padding = tup(arg(node, 3, "padding", 0))
    shape = sizes(node.args[0])[-spatial:]
    if stride != kernel or any(padding) or arg(node, 6, "divisor_override") is not None \
            or any(not isinstance(s, int) or s % k for s, k in zip(shape, kernel)):
        return "split"
    return ("pool", kernel)


RULES.register(Rule(
    "avg_pool", ops("avg_pool1d", "avg_pool2d", "avg_pool3d"), plan=_plan_pool,
    conv_like=True, doc="Average pooling is linear.",
    examples=(lambda: Tail(lambda m, x: F.avg_pool2d(as_image(x), 2)),)))
RULES.register(Rule(
    "adaptive_avg_pool", ops("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"),
    plan=_plan_pool, doc="Adaptive average pooling is linear.",
    examples=(lambda: nn.Sequential(Tail(lambda m, x: as_image(x)), nn.AdaptiveAvgPool2d(1)),)))
RULES.register(Rule(
    "resample", ops("upsample_nearest1d", "upsample_nearest2d", "upsample_bilinear2d",
                    "upsample_bicubic2d", "upsample_linear1d", "_upsample_bilinear2d_aa",
                    "_upsample_bicubic2d_aa"),
    plan=_plan_in_first, doc="Resampling with fixed interpolation weights is linear.",
    examples=(lambda: Tail(lambda m, x: F.interpolate(as_image(x), scale_factor=2,
                                                      mode="bilinear")),)))


def _reduce_demand(node: Node, d: Demand) -> Requests | None:
    """Rows of a kept dim of mean/sum are the same rows of the input; a reduced dim cannot be
    narrowed."""
    x = node.args[0]
    if d is None:
        return {}
    rank_in = len(sizes(x))
    dims = arg(node, 1, "dim")
    if dims is None or dims == []:
        return None
    dims = sorted(norm_dim(k, rank_in) for k in ([dims] if isinstance(dims, int) else dims))
    keep = arg(node, 2, "keepdim", False)
    kept = [k for k in range(rank_in) if keep or k not in dims]
    src = kept[d.dim]
    return None if src in dims else mapped(x, d, src)


@RULES.rule(aten.mean, aten.sum, name="reduce",
            examples=(lambda: Tail(lambda m, x: x.mean(1, keepdim=True) - 3.0 * x.sum(-1, keepdim=True)),))
def plan_reduce(node, facts):
    """Means and sums are linear: mean(Σ x_i) = Σ mean(x_i). A reduction over dims other than
    the last one applies to a pending projection's input (a mean over tokens before the
    per-head projection: b values per token reduced instead of E)."""
    x = node.args[0]
    rank = len(sizes(x))
    dims = arg(node, 1, "dim")
    dims = [] if dims is None or dims == [] else [norm_dim(k, rank) for k in
                                                  ([dims] if isinstance(dims, int) else dims)]
    plain = layout_emit()
    if not dims or any(isinstance(v, Node) for v in node.kwargs.values()):
        return Plan.linear([x], plain, demand=_reduce_demand)
    keep = arg(node, 2, "keepdim", False)

    def moves(ch: int) -> int | None:
        """The channel dim after the reduction (None: it is reduced)."""
        return None if ch in dims else ch - (0 if keep else sum(d < ch for d in dims))

    def emit(em, node):
        if not pending_in(em, x):
            return plain(em, node)
        args = (None,) + tuple(em.orig_arg(a) for a in node.args[1:])
        kwargs = dict(node.kwargs)

        def deferred(c):
            """Rows with deferred moves are reduced straight from the unmoved input
            (``reduce_deferred``)."""
            return None if kwargs else \
                reduce_deferred(em, c, dims, bool(keep), op_key(node) is aten.mean, rank)
        windows = ("reduce", dims, keep, op_key(node) is aten.mean) if not kwargs \
            else "split"
        return keep_pending(em, x, lambda t: em.call(rt.pusher(node.target, 0), t, args, kwargs),
                            moves=moves, rank_out=len(sizes(node)), deferred=deferred,
                            windows=windows)
    return Plan.linear([x], emit, demand=_reduce_demand)


@RULES.rule(aten.max_pool2d, conv_like=True,
            examples=(lambda: Tail(lambda m, x: F.max_pool2d(as_image(x), 2)),))
def plan_max_pool(node, facts):
    """max_pool2d(x) = gather(x, argmax): with the argmax frozen at this forward pass the pool
    selects one input element per output element, which is linear in x."""
    x = node.args[0]
    if len(x.meta["val"].shape) != 4:
        return Plan.root("max_pool2d on a non-4D input")

    def emit(em, node):
        c = em.merged(x)
        args = tuple(em.orig_arg(a) for a in node.args[1:])
        out = em.call(rt.max_pool2d_terms, c.node, em.orig(x), args)
        return [em.chunk(out, c.labels)]
    return Plan.linear([x], emit)


def _max_dim_plan(x, dim: int, keepdim: bool) -> Plan:
    """max(x, dim).values = gather(x, dim, argmax): linear with the argmax frozen."""
    def emit(em, node):
        c = em.merged(x)
        return [em.chunk(em.call(rt.max_dim_terms, c.node, em.orig(x), dim, keepdim), c.labels)]
    return Plan.linear([x], emit)


@RULES.rule(aten.amax, examples=(lambda: Tail(lambda m, x: x.amax(dim=1)),))
def plan_amax(node, facts):
    """amax over one dim is max(x, dim).values: a frozen selection."""
    x = node.args[0]
    dims = arg(node, 1, "dim", ())
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(dims) != 1:
        return Plan.root("amax over several dims")
    return _max_dim_plan(x, dims[0], arg(node, 2, "keepdim", False))


def _max_item(node: Node, src: Node, index: int, facts) -> Plan:
    """Output 0 of max(x, dim) (the values) is a frozen selection; the indices are a root."""
    if index == 0 and len(src.args) > 1 and isinstance(src.args[1], int):
        return _max_dim_plan(src.args[0], src.args[1], arg(src, 2, "keepdim", False))
    return Plan.root(f"output {index} of max")


RULES.register(Rule(
    "max", (aten.max,), plan=lambda node, facts: Plan.root("nonlinear op max"),
    item_plan=_max_item, nonlinear=True,
    doc="max(x) is nonlinear; max(x, dim).values is a frozen selection.",
    examples=(lambda: Tail(lambda m, x: x.max(dim=1).values + x.max()),)))
