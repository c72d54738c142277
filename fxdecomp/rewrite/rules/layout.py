"""Layout, indexing and joining ops: linear in their data argument, everything else frozen.

``op(Σ x_i) = Σ op(x_i)`` for views, permutations, copies, indexing, padding, concatenation and
splitting. Under a row demand the rows map through the op (``transpose`` moves the dim,
``reshape`` may merge it with its neighbours, ``select`` asks for one row); head-blocked terms
(per-head components stored without zero padding) stay blocked through the pure layout ops.

Pending projections and token functionals (issue 13, Swin). A pending chunk is terms
blocked_linear(t, W, H): t [c, *rest, b] the head-blocked input, W [E, H·b]. An op that only
moves positions of the dims before the last (window reverse, roll, zero pad, a reshape that
keeps E) moves whole rows, so it applies to t and W is untouched (``PendingMove`` = 1). A patch
merging's gather ([..., 2, 2, E] -> [..., 4E]) moves K = 4 sub-positions into the last dim: t
becomes [..., K·b] (same size) and W block diagonal [K·E, H·K·b] (``rt.block_diagonal_heads``);
the merging's LayerNorm (centring, γ into W; frozen 1/σ scales t) and its linear map fold in.
Through three mergings a first-stage head carries 64 sub-position blocks: the final mean over
tokens (with the final norm's per-token 1/σ, a weight per token known only at run time) then
reduces t to [c, B, 64·b] before W [E, H·64·b] applies: one token functional per sub-position
path, each followed by its slice of the composed reductions, which is what a demand of linear
functionals over tokens computes, obtained here by carrying the input forward instead of
propagating functionals backward (the rewrite emits in forward order; W is folded from the
weights only and kept between calls, ``rt._folded``).

Deferred moves (``Chunk.at``). Applying those moves to t itself copies it at every op (window
reverse, roll, each reshape/permute/flatten of a merging) and every per-token 1/σ multiplies it
again, once per chunk and stage. Instead a pending chunk with its channels last keeps t where
it was computed and carries a positions map [2, *rest, K] (``rt.home_positions``: row index
into t, weight 1): the moves apply to the map (``Emitter.moved``; chunks that took the same
moves share one map, so each op runs once per map, on B·N·K numbers), a per-row scale
multiplies its weights (``Emitter.scaled``), and a merging's gather moves K rows into its last
dim as it does for t. The final mean over tokens reads t once, one weighted sum per output row
and sub-position (``rt.reduce_positions``, the token functionals of issue 13 evaluated from
the forward side); any other consumer gathers the moved input first (``rt.gather_positions``).
Windowed per-token terms (``Chunk.win``/``fac``, tokens mode through window attention) are
never deferred: their input (or scalar factor) and window map move eagerly, together, and the
final mean reduces them per window (``rt.window_reduce``); the two never meet on one chunk
(``Emitter.moved`` asserts it). Straight from a window attention they move as a probe
(``fac`` "probe", ``rt.token_probe``): one weight and one attention row per position and
sub-block, not P's column for every (head, source token); P is read at the moved rows where
the final mean reduces them (``rt.window_reduce_probe``: per window, and for whole windows in
P's own order) or where another op needs the terms (``rt.probe_factors``).
Rebuild a chunk with ``em.refold``/``dataclasses.replace``,
never ``em.pending(c.node, ...)``, which drops ``at`` (and ``win``/``fac`` unless passed).

Channels not last (NCHW stages, MaxViT): a pending chunk records the value dim holding its
channels (``Chunk.cdim``) and its input keeps the value's layout with b channels there
([c, B, b, H, W]). A permute moves that dim (``_permute_emit``), average pools, means and zero
pads of the other dims apply to the input as is (``keep_pending`` with ``moves``), and a 1x1
convolution folds into W (``linear.plan_conv``); rules that do not pass ``channel_ok`` get
such chunks evaluated (``rt.blocked_linear_at``). An attention over a pending value is
covered for a learned-probe pool made as timm's AttentionPoolLatent makes it (its P applied
before the kv linear, ``rules.attention._pool_before_values``), not in general.
Windowed chunks pass the same way (MaxViT's NCHW blocks between its window attentions,
torchvision Swin's NCHW head): the window map and the probe's maps have S in the channel slot,
so a permute moves them with the input; an average pool whose cells tile the input gathers the
K pooled positions into sub-blocks (``rt.pool_gather``: each keeps its window) and W averages
them (``rt.pooled_heads``); a pool to one position reduces per window (the per-window
functions run on a channels-last view, ``Emitter.channels_last``). The reduced factors keep
their channels last in memory; where the value has only singleton dims after its channels
([B, C, 1, 1]) that is the same memory, and permutes and reshapes of those singleton dims only
re-view them (``_reduced_moved``, ``rt.reshape_reduced``).
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

from ...errors import UnsupportedGraphError
from ...graph.ops import aten, op_key, op_name
from ...graph.plan import Demand, Plan, Requests, Rows
from ...graph.rule import Rule
from ...graph.shapes import factors, norm_dim, prefix, sizes
from .. import runtime as rt
from . import RULES
from .common import Tail, arg, identity_emit, mapped, ops, push_emit, same_rows

# (node, block, shape argument) -> (block after the op, rewritten shape argument or None) or
# None: the op cannot keep the blocks (the terms are densified first).
BlockMove = Callable[[Node, tuple, object], Optional[tuple]]

RULES.register(Rule(
    "shape_only", ops("sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "zeros_like",
                      "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty",
                      "new_full", "arange", "zeros", "ones", "full", "empty", "scalar_tensor",
                      "_assert_tensor_metadata", "eye"),
    shape_only=True, doc="Values that depend on their inputs' shapes only: never data."))


# (node) -> how the op moves a pending projection's input [c, *rest, b] (``Chunk.proj``): 1 (it
# moves only positions of the dims before the last one, which stays: the input takes the op as
# is), K > 1 (it also merges trailing dims of K positions into the last one: a patch merging's
# gather; W becomes block diagonal, ``rt.block_diagonal_heads``), or None (evaluate first).
PendingMove = Callable[[Node], Optional[int]]


def _reshape_pending(node: Node) -> int | None:
    """A reshape keeps the last dim (1), or merges trailing static dims into it (K)."""
    ins, outs = sizes(node.args[0]), sizes(node)
    if not ins or not outs or ins[-1] is None or outs[-1] is None or outs[-1] % ins[-1]:
        return None
    merged, k = outs[-1] // ins[-1], len(ins) - 1
    got = 1
    while got < merged and k > 0 and ins[k - 1] is not None:
        k -= 1
        got *= ins[k]
    return merged if got == merged else None


def _flatten_pending(node: Node) -> int | None:
    rank_in = len(sizes(node.args[0]))
    start = norm_dim(arg(node, 1, "start_dim", 0), rank_in)
    end = norm_dim(arg(node, 2, "end_dim", -1), rank_in)
    if end < rank_in - 1:
        return 1
    inner = sizes(node.args[0])[start:end]
    return None if any(s is None for s in inner) else math.prod(inner)


def _last_kept(dims_of) -> PendingMove:
    """The op moves positions along ``dims_of(node)`` (normalised) only: 1 if the last is not
    among them."""
    def how(node: Node) -> int | None:
        rank_in = len(sizes(node.args[0]))
        dims = dims_of(node)
        return None if dims is None or rank_in - 1 in [norm_dim(d, rank_in) for d in dims] else 1
    return how


def _pending_layout(em, node: Node, target, args: list, kwargs: dict, merged: int,
                    shape_arg: bool) -> list:
    """The op applied to pending projections' inputs, chunk by chunk (see ``PendingMove``);
    with ``merged`` > 1, the other chunks become pending too (W = I), so that everything
    downstream (a norm's centring and γ, the merge's linear map) folds into W instead of
    running on E-wide terms at every position."""
    x = node.args[0]

    def apply(t: Node) -> Node:
        if shape_arg:
            return em.call(rt.reshape_rest, t, args[1], merged)
        return em.call(rt.pusher(target, 0), t, tuple(args), kwargs)

    out = []
    ins, outs = sizes(x), sizes(node)
    for c in em.terms(x, pending_ok=True, channel_ok=True, lazy_ok=True, windows_ok=True):
        if _is_reduced(c) and outs:
            # a reshape of singleton dims: the channels end up in the last dim that is not 1
            last = max([i for i, s in enumerate(outs) if s != 1], default=len(outs) - 1)
            moved = _reduced_moved(em, c, ins, outs, last)
            if moved is not None:
                out.append(moved)
                continue
        if c.cdim is not None and all(s == 1 for s in ins[c.cdim + 1:]) \
                and list(outs) == list(ins[:c.cdim + 1]):
            # [B, C, 1, 1] -> [B, C] (a flatten after pooling to one position): the channels
            # become last; the input (factor, window map) drops the same ones, nothing evaluated
            flat = lambda t: em.call(torch.flatten, t, c.cdim + 1)   # noqa: E731
            if c.at is not None:   # deferred: the map drops them, the input is channels-last
                out.append(replace(c, at=flat(c.at), cdim=None))
                continue
            out.append(replace(c, node=flat(c.node), cdim=None, win=c.win if c.win is None
                               else (flat(c.win[0]), c.win[1])))
            continue
        if c.cdim is not None and op_key(node) in _COPIES:
            out.append(c)   # a copy: the chunk as it is
            continue
        if c.cdim is not None:
            c = em.materialize(c)
        if c.fac is not None and c.fac[0] not in ("rows", "probe") or c.proj is None:
            c = em.unwindow(c)   # (unfactored; a plain chunk is split by window, if any)
        moved = _moved_bias(em, c, node) if merged == 1 else None
        if moved is not None:
            out.append(moved)
            continue
        if c.proj is None:   # a constant may be stored unbroadcast ([1, 1, N, E] for [B, N, E])
            c = em.chunk(em.call(rt.expand_terms, c.node, em.orig(x)), c.labels)
        if c.proj is None and merged == 1:
            out.append(em.chunk(em.call(rt.pusher(target, 0), c.node, tuple(args), kwargs), c.labels))
            continue
        if c.proj is None:
            c = em.pending(c.node, em.call(rt.identity_weight, sizes(x)[-1], em.orig(x)), 1, c.labels)
        if c.win is not None:
            # windowed (tokens mode, window attention): the input and its window map [1, *rest,
            # S] move now, together (merged positions become sub-blocks); no deferral
            w = c.proj[0] if merged == 1 else \
                em.call(rt.block_diagonal_heads, c.proj[0], c.proj[1], merged)
            out.append(em.pending(apply(c.node), w, c.proj[1], c.labels,
                                  win=(apply(c.win[0]), c.win[1]), fac=c.fac))
            continue
        c = em.moved(c, em.orig(x), apply, node)   # the input moves once, where it is read
        if merged > 1:
            c = em.refold(c, em.call(rt.block_diagonal_heads, c.proj[0], c.proj[1], merged))
        out.append(c)
    return out


def _attention_layout(node: Node, fac: tuple | None) -> tuple | None:
    """The factors of per-token terms (``Chunk.fac`` "attn") through the usual moves from the
    attention's [B', H, Q, dh] to [B', Q, H·dh]: a transpose of dims 1, 2, then a reshape that
    merges the last two (None: any other op, the terms are used as they are)."""
    if fac is None or fac[0] != "attn":
        return None
    key, state = op_key(node), fac[3]
    ins, outs = sizes(node.args[0]), sizes(node)
    if key in _COPIES:
        return fac
    if state == "bhqd" and len(ins) == 4 and (
            key is aten.transpose and sorted(_transpose_dims(node)) == [1, 2]
            or key is aten.permute and _perm(node) == [0, 2, 1, 3]):
        return fac[:3] + ("bqhd",)
    if state == "bqhd" and key in (aten.reshape, aten.view, aten._unsafe_view, aten.flatten) \
            and len(outs) >= 3 and ins[1:] and None not in ins[1:] and None not in outs[1:] \
            and math.prod(outs[1:-1]) == ins[1] and outs[-1] == ins[2] * ins[3]:
        # [B', Q, H·dh], or the queries viewed as a window ([B', 7, 7, H·dh], MaxViT)
        return fac[:3] + ("bqc", tuple(outs[1:-1]))
    return None


_COPIES = ops("contiguous", "clone", "alias", "lift_fresh_copy", "_to_copy", "to", "type_as")


def _keeps_dim0(node: Node) -> bool:
    """Whether every element keeps its index along dim 0 (where window attention folds the
    windows into the batch): a reshape that keeps dim 0's size (row-major), a transpose or
    permute that leaves dim 0 in place, a copy."""
    key = op_key(node)
    if key in (aten.reshape, aten.view, aten._unsafe_view, aten.flatten):
        return bool(sizes(node)) and factors(node.args[0])[0] == factors(node)[0]
    if key is aten.transpose:
        return 0 not in _transpose_dims(node)
    if key is aten.permute:
        return _perm(node)[0] == 0
    return key in _COPIES


def layout_emit(move_block: BlockMove | None = None, shape_arg: bool = False,
                pending: PendingMove | None = None):
    """Emit: apply the op to every component. ``shape_arg``: argument 1 is a size list whose
    entry at the narrowed dim becomes the number of rows kept under a row demand. Head-blocked
    terms stay blocked where ``move_block`` says where the blocks go; otherwise they are
    densified. Pending projections stay pending where ``pending`` says how the op moves their
    input. (view runs as reshape: components need not be contiguous.)"""
    def emit(em, node):
        layout = em.layout(node)
        target = aten.reshape.default if op_key(node) in (aten.view, aten._unsafe_view) else node.target
        args = [None] + [em.orig_arg(a) for a in node.args[1:]]
        if layout is not None and shape_arg:
            shape = list(args[1])
            if shape[layout.dim] != -1:
                # grouped rows: the kept outer factors times the (symbolic) inner size
                shape[layout.dim] = len(layout.index) if layout.group is None else -1
            args[1] = shape
        merged = pending(node) if pending is not None and pending_in(em, node.args[0]) else None
        if merged is not None and (layout is None or layout.dim < len(sizes(node)) - 1):
            kwargs = {k: em.orig_arg(v) for k, v in node.kwargs.items()}
            return _pending_layout(em, node, target, args, kwargs, merged, shape_arg)
        x = node.args[0]
        if op_key(node) in (aten.permute, aten.transpose) and 1 < len(em.terms_of[x]) <= 8 \
                and all(c.proj is None and c.block is None and c.win is None and c.fac is None
                        for c in em.terms_of[x]):
            # dims reordered on a few plain chunks: a view of each (merging them first would
            # write every component, a broadcast bias at full size)
            kwargs = {k: em.orig_arg(v) for k, v in node.kwargs.items()}
            push = rt.pusher(target, 0)
            last = len(sizes(x)) - 1
            keeps_last = (_perm(node)[-1] if op_key(node) is aten.permute
                          else last not in _transpose_dims(node)) == last
            return [(_moved_bias(em, c, node) if keeps_last else None)
                    or em.chunk(em.call(push, em.call(rt.expand_terms, c.node, em.orig(x)),
                                        tuple(args), kwargs), c.labels) for c in em.terms(x)]
        # windowed terms straight from a window attention (``Chunk.win``, no map yet) stay
        # windowed through ops that keep the batch·windows dim 0 in place
        c = em.merged(node.args[0], blocked_ok=True, windows_ok=_keeps_dim0(node))
        if c.win is not None and c.win[0] is not None:
            c = em.densify(c)
        fac = _attention_layout(node, c.fac)
        block = None
        if c.block is not None:
            moved = move_block(node, c.block, args[1] if len(args) > 1 else None) if move_block else None
            if moved is None:
                c = em.densify(c)
            else:
                block, new_shape = moved
                if new_shape is not None:
                    args[1] = new_shape
        out = em.call(rt.pusher(target, 0), c.node, tuple(args),
                      {k: em.orig_arg(v) for k, v in node.kwargs.items()})
        # one window (a global attention) is only worth carrying for the factors
        win = c.win if c.win is not None and (c.win[1] > 1 or fac is not None) else None
        return [em.chunk(out, c.labels, block, win=win, fac=fac if win is not None else None)]
    return emit


# ------------------------------------------------------------------------------ views
def _reshape_demand(node: Node, d: Demand) -> Requests | None:
    """Demand through a reshape. The narrowed output dim either comes from one input dim
    unchanged, or is the outer factor of a merged input dim (then the input demand is *grouped*:
    rows ``i·inner + j``), or is a merged dim whose outer factor is narrowed (grouped demand on
    the output: MultiheadAttention's [N, B, ...] -> [N·B, D] layout)."""
    if d is None:
        return {}
    x = node.args[0]
    dim, idx, group = d
    ins, outs = sizes(x), sizes(node)
    target = prefix(factors(outs), dim)
    for k in range(len(ins)):
        if prefix(factors(ins), k) != target:
            continue
        if group is None and ins[k] == outs[dim] and ins[k] is not None:
            return {x: Rows(k, idx, None)}
        if group is None and outs[dim] is not None and ins[k] is None:
            return {x: Rows(k, idx, outs[dim])}      # output dim = outer factor of input dim k
        if group is not None and ins[k] == group:
            return {x: Rows(k, idx, None)}           # merged output dim: narrow its outer factor
        if group is not None and ins[k] is None:
            return {x: Rows(k, idx, group)}          # same grouped dim, unchanged
    return None


def _reshape_blocks(node: Node, block, shape_arg):
    """Head blocks through a reshape that keeps the heads as an outer factor of one dim."""
    dim, heads, per = block
    ins, outs = factors(node.args[0]), factors(node)
    if ins[dim][1]:
        return None
    for j in range(len(outs)):
        if prefix(outs, j) != prefix(ins, dim) or outs[j][1]:
            continue
        o, i = outs[j][0], ins[dim][0]
        if o % i == 0 or (i % o == 0 and o % heads == 0):
            shape = list(shape_arg)
            if not isinstance(shape[j], int):
                return None
            if shape[j] != -1:
                shape[j] = shape[j] // heads
            return (j, heads, per), shape
    return None


@RULES.rule(aten.reshape, aten.view, aten._unsafe_view, name="view", moves_layout=True,
            prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x.reshape(x.shape[0], 4, 32).view(-1, 16, 2, 4)),))
def plan_view(node, facts):
    """A reshape is linear: reshape(Σ x_i) = Σ reshape(x_i)."""
    return Plan.linear([node.args[0]], layout_emit(_reshape_blocks, shape_arg=True, pending=_reshape_pending),
                       demand=_reshape_demand)


def _flatten_demand(node: Node, d: Demand) -> Requests | None:
    x = node.args[0]
    if d is None:
        return {}
    rank_in = len(sizes(x))
    start = norm_dim(arg(node, 1, "start_dim", 0), rank_in)
    end = norm_dim(arg(node, 2, "end_dim", -1), rank_in)
    if d.dim < start:
        return mapped(x, d, d.dim)
    if d.dim > start:
        return mapped(x, d, d.dim + (end - start))
    return mapped(x, d, d.dim) if start == end else None


@RULES.rule(aten.flatten, moves_layout=True, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x.flatten(1)),))
def plan_flatten(node, facts):
    """flatten is a reshape: linear; rows of the dims it keeps map through."""
    return Plan.linear([node.args[0]], layout_emit(pending=_flatten_pending), demand=_flatten_demand)


@RULES.rule(aten.unflatten, moves_layout=True, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x.unflatten(-1, (2, 4))),))
def plan_unflatten(node, facts):
    """unflatten is a reshape: linear."""
    return Plan.linear([node.args[0]], layout_emit())


# ------------------------------------------------------------------------------ permutations
def _transpose_dims(node: Node) -> tuple[int, int]:
    rank_in = len(sizes(node.args[0]))
    return tuple(norm_dim(a, rank_in) for a in node.args[1:3])


def _transpose_demand(node: Node, d: Demand) -> Requests | None:
    d0, d1 = _transpose_dims(node)
    return mapped(node.args[0], d, None if d is None else
                  d1 if d.dim == d0 else d0 if d.dim == d1 else d.dim)


def _transpose_blocks(node: Node, block, shape_arg):
    d0, d1 = _transpose_dims(node)
    dim, heads, per = block
    return (d1 if dim == d0 else d0 if dim == d1 else dim, heads, per), None


@RULES.rule(aten.transpose, moves_layout=True, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x.transpose(1, 2)),))
def plan_transpose(node, facts):
    """transpose is a permutation of positions: linear; rows follow the swapped dims."""
    return Plan.linear([node.args[0]], layout_emit(_transpose_blocks, pending=_last_kept(_transpose_dims)),
                       demand=_transpose_demand)


def _perm(node: Node) -> list[int]:
    rank_in = len(sizes(node.args[0]))
    return [norm_dim(p, rank_in) for p in node.args[1]]


@RULES.rule(aten.permute, moves_layout=True, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x.permute(0, 2, 1)),))
def plan_permute(node, facts):
    """permute is a permutation of positions: linear; rows follow their dim."""
    return Plan.linear(
        [node.args[0]],
        _permute_emit,
        demand=lambda node, d: mapped(node.args[0], d, None if d is None else _perm(node)[d.dim]))


_permute_plain = layout_emit(lambda node, block, shape: ((_perm(node).index(block[0]),) + block[1:], None))


def _permute_emit(em, node):
    """A permute moves a pending projection's channel dim (``Chunk.cdim``) with it: NHWC <->
    NCHW keeps the terms pending, only their input is permuted."""
    if not pending_in(em, node.args[0]):
        return _permute_plain(em, node)
    perm = _perm(node)
    return keep_pending(em, node.args[0],
                        lambda t: em.call(rt.pusher(node.target, 0), t, (None, perm), {}),
                        moves=perm.index, rank_out=len(perm), move=True)


RULES.register(Rule(
    "copy", ops("contiguous", "clone", "alias", "lift_fresh_copy", "_to_copy", "to", "type_as"),
    plan=lambda node, facts: Plan.linear(
        [node.args[0]], layout_emit(lambda node, block, shape: (block, None), pending=lambda node: 1),
        demand=lambda node, d: same_rows(node.args[0], d)),
    moves_layout=True, prob_transparent=True,
    doc="Copies and dtype casts keep every value where it is: linear, rows and blocks unchanged.",
    examples=(lambda: Tail(lambda m, x: x.clone().contiguous().to(torch.float32)),)))


# ------------------------------------------------------------------------------ dims
def _unsqueeze_demand(node: Node, d: Demand) -> Requests | None:
    if d is None:
        return {}
    k = norm_dim(node.args[1], len(sizes(node.args[0])) + 1)
    return None if d.dim == k else mapped(node.args[0], d, d.dim if d.dim < k else d.dim - 1)


@RULES.rule(aten.unsqueeze, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x.unsqueeze(1)),))
def plan_unsqueeze(node, facts):
    """unsqueeze adds a size-1 dim: linear; rows of the other dims map through."""
    return Plan.linear([node.args[0]], layout_emit(), demand=_unsqueeze_demand)


@RULES.rule(aten.squeeze, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x[:, :, None].squeeze(2)),))
def plan_squeeze(node, facts):
    """squeeze drops size-1 dims: linear."""
    return Plan.linear([node.args[0]], layout_emit())


def _expand_demand(node: Node, d: Demand) -> Requests | None:
    if d is None:
        return {}
    x = node.args[0]
    k = d.dim - (len(sizes(node)) - len(sizes(x)))
    if k < 0 or sizes(x)[k] == 1:
        return {}
    return {x: Rows(k, d.index, d.group)}


@RULES.rule(aten.expand, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x[:, :1].expand(-1, 4, -1)),))
def plan_expand(node, facts):
    """expand repeats size-1 dims: linear; a broadcast dim needs its one row."""
    return Plan.linear([node.args[0]], layout_emit(shape_arg=True), demand=_expand_demand)


@RULES.rule(aten.narrow, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x.narrow(1, 2, 5)),))
def plan_narrow(node, facts):
    """narrow takes a range of rows: linear."""
    return Plan.linear([node.args[0]], layout_emit())


def _plan_in_first(node, facts):
    """op(Σ x_i) = Σ op(x_i): linear in the first argument, the rest frozen. A roll along
    dims other than the last keeps pending projections pending (it moves whole rows)."""
    if op_key(node) is aten.roll:
        dims = arg(node, 2, "dims", [])
        how = _last_kept(lambda n: list(dims) if isinstance(dims, (list, tuple)) and dims else None)
        return Plan.linear([node.args[0]], layout_emit(pending=how))
    return Plan.linear([node.args[0]], layout_emit())


RULES.register(Rule(
    "rearrange", ops("t", "index_select", "roll", "flip", "repeat", "pixel_shuffle",
                     "pixel_unshuffle", "channel_shuffle", "movedim", "swapaxes", "diagonal",
                     "expand_as", "view_as", "reshape_as", "gather", "repeat_interleave", "tile",
                     "as_strided", "im2col", "col2im", "unfold", "cumsum"),
    plan=_plan_in_first,
    doc="Rearranging, repeating, gathering and scanning ops are linear in their data argument "
        "(indices frozen).",
    examples=(lambda: Tail(lambda m, x: torch.flip(x, [1]).roll(2, 1).repeat(1, 2, 1)
                           .cumsum(-1)[:, :, :, None].movedim(-1, 1)),
              lambda: Tail(lambda m, x: x.gather(1, (torch.arange(16) % 5)[None, :, None]
                                                 .expand(x.shape[0], 16, 8))),)))


# ------------------------------------------------------------------------------ selection
@RULES.rule(aten.select, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x[:, 3]),))
def plan_select(node, facts):
    """x.select(d, k) is linear; only row k of x is needed (the CLS token)."""
    x, dim = node.args[0], norm_dim(node.args[1], len(sizes(node.args[0])))

    def demand(node, d):
        if d is not None:
            return None
        n = sizes(x)[dim]
        return {x: Rows(dim, (node.args[2] % n,), None)} if n is not None else None

    def emit(em, node):
        k = 0 if em.layout(x) is not None else node.args[2]
        if dim < len(sizes(x)) - 1 and pending_in(em, x):
            return keep_pending(em, x, lambda t: em.call(rt.pusher(node.target, 0), t, (None, dim, k), {}),
                                move=True)
        c = em.merged(x)
        return [em.chunk(em.call(rt.pusher(node.target, 0), c.node, (None, dim, k), {}), c.labels)]
    return Plan.linear([x], emit, demand=demand)


def pending_in(em, x: Node) -> bool:
    """Whether the terms of ``x`` hold pending projections (``Chunk.proj``)."""
    return any(c.proj is not None for c in em.terms_of[x])


def _reduced_moved(em, c, ins, outs, new: int | None):
    """A chunk of factors reduced per window (``Chunk.fac`` "reduced": the value's rows with the
    channels last in memory, singleton dims where the value has them) through an op that only
    adds, drops or moves singleton dims and puts the channels in output dim ``new`` ([B, C, 1, 1]
    <-> [B, 1, 1, C] <-> [B, C]): the same factors viewed with the output's dims
    (``rt.reshape_reduced``). None: the op does more (the caller unfactors them)."""
    old = len(ins) - 1 if c.cdim is None else c.cdim
    if new is None or not outs or ins[old] is None or ins[old] != outs[new] \
            or any(s != 1 for s in outs[new + 1:]):
        return None
    kin = [s for i, s in enumerate(ins) if i != old]
    kout = [s for i, s in enumerate(outs) if i != new]
    if [s for s in kin if s != 1] != [s for s in kout if s != 1]:
        return None
    cdim = None if new == len(outs) - 1 else new
    if kin == kout:
        return replace(c, cdim=cdim)
    both = em.call(rt.reshape_reduced, c.node, c.fac[1], em.orig(em.anchor), new)
    return replace(c, node=em.call(operator.getitem, both, 0), cdim=cdim,
                   fac=("reduced", em.call(operator.getitem, both, 1)))


def reduce_deferred(em, c, dims, keepdim: bool, mean: bool, rank: int):
    """A sum (``mean``) over value dims ``dims`` of a chunk with deferred moves, straight from
    its unmoved input: one weighted sum per output row (``rt.reduce_positions``), nothing
    gathered; a map with K at the channel dim (``Chunk.cdim``) is read channels-last and the
    result moved back. None: no deferred moves, or the channels are reduced."""
    ch = rank - 1 if c.cdim is None else c.cdim
    if c.at is None or ch in dims:
        return None
    at = c.at if c.cdim is None else em.call(torch.movedim, c.at, ch + 1, -1)
    red = em.call(rt.reduce_positions, c.node, at, tuple(d - (d > ch) for d in dims),
                  bool(keepdim), mean)
    new = ch if keepdim else ch - sum(d < ch for d in dims)
    cdim = None if new == (rank if keepdim else rank - len(dims)) - 1 else new
    if cdim is not None:
        red = em.call(torch.movedim, red, -1, cdim + 1)
    return replace(c, node=red, at=None, cdim=cdim)


def _is_reduced(c) -> bool:
    return c.fac is not None and c.fac[0] == "reduced" and c.proj is not None


def keep_pending(em, x: Node, apply, moves: Callable[[int], Optional[int]] | None = None,
                 rank_out: int | None = None, move: bool = False,
                 deferred: Callable | None = None, windows: str | tuple | None = None) -> list:
    """An op acting on dims other than the channel one, chunk by chunk: ``apply(terms node)``.
    A pending projection's head-blocked input has the same dims as its value but b channels,
    so the op applies to it and the projection stays pending (the op commutes with it).
    Without ``moves`` the channels are last and stay last (ops on the leading dims only);
    with it, ``moves(channel dim) -> its dim in the output`` (None: the op acts on it, the
    terms are evaluated first) and channels in any dim are kept (``Chunk.cdim``), with
    ``rank_out`` the output's rank. ``move``: the op only moves rows (a pad, a slice, a permute
    of the other dims), so on channels-last inputs it is deferred (``Emitter.moved``);
    ``deferred(chunk) -> chunk or None``: how the op acts on channels-last chunks with deferred
    moves without gathering them first (None: gather).
    Windowed pending chunks (``Chunk.win``; never deferred; channels in any dim): ``windows=
    "move"`` (the default with ``move``: ``apply`` moves the window map too), ``("reduce", dims,
    keepdim, mean)`` (a sum or mean over value dims ``dims``: reduced per window,
    ``rt.window_reduce``, which ends the windowing), ``("pool", kernel)`` (an average pool with
    stride = kernel and no padding over the last dims, channels before them: the pooled
    positions become sub-blocks, ``rt.pool_gather``, and W averages them, ``rt.pooled_heads``),
    ``"split"`` (the default: split first)."""
    rank = len(sizes(x))
    # every output row is an input row, the last dim kept (no zero fill): a bias moves as itself
    rows_only = move and op_key(em.anchor) not in (aten.pad, aten.constant_pad_nd) \
        and (moves is None or moves(rank - 1) == (rank_out or rank) - 1)
    if move:
        deferred = lambda c: em.moved(c, em.orig(x), apply, em.anchor)  # noqa: E731
    if windows is None:
        windows = "move" if move else "split"
    out = []
    for c in em.terms(x, pending_ok=True, channel_ok=moves is not None,
                      lazy_ok=deferred is not None, windows_ok=True):
        if _is_reduced(c) and windows == "move" and moves is not None:
            moved = _reduced_moved(em, c, sizes(x), sizes(em.anchor),
                                   moves(rank - 1 if c.cdim is None else c.cdim))
            if moved is not None:
                out.append(moved)
                continue
        if c.fac is not None and c.fac[0] not in ("rows", "probe") or c.proj is None:
            c = em.unwindow(c)   # (unfactored; a plain chunk is split by window, if any)
        if c.proj is not None:
            new = None if moves is None else moves(rank - 1 if c.cdim is None else c.cdim)
            cdim = None if moves is None or new is None or new == rank_out - 1 else new
            if c.win is not None and (windows == "split" or new is None and moves is not None):
                c = em.unwindow(c)
            if c.win is not None and isinstance(windows, tuple) and windows[0] == "pool":
                # the pooled positions gathered into the channel slot (each keeps its window),
                # W averages the sub-blocks: the windows stay separate through the pool
                kernel = windows[1]
                gather = lambda n: em.call(rt.pool_gather, n, c.cdim, kernel)  # noqa: E731
                w = em.call(rt.pooled_heads, c.proj[0], c.proj[1], math.prod(kernel))
                out.append(em.pending(gather(c.node), w, c.proj[1], c.labels, cdim,
                                      (gather(c.win[0]), c.win[1]), c.fac))
                continue
            if c.win is not None and isinstance(windows, tuple):
                _, dims, keepdim, mean = windows
                if c.cdim is not None:   # reduced channels-last, the result's channels moved
                    dims = [d - (d > c.cdim) for d in dims]
                    c = em.channels_last(c)
                if c.fac is not None:   # σ per window and the value row of each component
                    both = em.call(rt.window_reduce_probe, c.node, c.win[0], c.fac[2], c.fac[1],
                                   c.win[1], dims, keepdim, mean) if c.fac[0] == "probe" else \
                        em.call(rt.window_reduce_factored, c.node, c.fac[1], c.win[0],
                                c.win[1], dims, keepdim, mean)
                    red = em.pending(em.call(operator.getitem, both, 0), c.proj[0], c.proj[1],
                                     c.labels, fac=("reduced", em.call(operator.getitem, both, 1)))
                    if cdim is not None and keepdim and all(s == 1 for s in sizes(em.anchor)[cdim + 1:]):
                        red = replace(red, cdim=cdim)   # [B, C, 1, 1]: the same memory (Chunk.fac)
                    elif cdim is not None:   # the channels elsewhere: the input, moved there
                        red = em.channels_at(em.unfactor(red), cdim)
                    out.append(red)
                    continue
                t = em.call(rt.window_reduce, c.node, c.win[0], c.win[1], dims, keepdim, mean)
                out.append(em.channels_at(em.pending(t, c.proj[0], c.proj[1], c.labels), cdim))
                continue
            if moves is None or new is not None:
                # deferred: channels-last chunks, and those whose map a permute already moved
                lazy = deferred is not None and c.win is None and c.fac is None \
                    and (c.cdim is None or c.at is not None)
                done = deferred(c) if lazy else None
                if done is not None:
                    out.append(replace(done, cdim=cdim) if move else done)
                    continue
                c = em.settle(c)
                win = None if c.win is None else (apply(c.win[0]), c.win[1])
                out.append(em.pending(apply(c.node), c.proj[0], c.proj[1], c.labels, cdim, win,
                                      c.fac))
                continue
            c = em.materialize(c)
        moved = _moved_bias(em, c, em.anchor) if rows_only else None
        if moved is not None:
            out.append(moved)
            continue
        # a constant may be stored unbroadcast: broadcast it first
        out.append(em.chunk(apply(em.call(rt.expand_terms, c.node, em.orig(x))), c.labels))
    return out


def _moved_bias(em, c, node: Node):
    """A bias broadcast along the last dim of its value (``rt.bias_terms``, nothing applied to
    it since) through an op that only moves rows and keeps the last dim (the caller knows): the
    same bias broadcast to the op's output, one node instead of a broadcast and a push at every
    such op (the bias_terms node it replaces is left unused, and dead-code elimination drops
    it), so a residual stream's biases cost nothing through window partitions, rolls and
    reshapes. None for any other chunk, and where rows are narrowed (a demand)."""
    t, x = c.node, node.args[0]
    while t.op == "call_function" and t.target is rt.expand_terms:   # broadcast further: the same
        t = t.args[0]
    if t.op != "call_function" or t.target is not rt.bias_terms or c.proj is not None \
            or c.block is not None or c.win is not None or c.fac is not None or c.at is not None \
            or em.layout(x) is not None or em.layout(node) is not None:
        return None
    ins, outs = sizes(x), sizes(node)
    if not ins or not outs or ins[-1] is None or ins[-1] != outs[-1]:
        return None
    if t.args[2] != -1:      # a channel dim counted from the front: the last of its value's?
        val = t.args[1].meta.get("val") if isinstance(t.args[1], Node) else None
        if not isinstance(val, torch.Tensor) or norm_dim(t.args[2], val.dim()) != val.dim() - 1:
            return None
    return em.chunk(em.call(rt.bias_terms, t.args[0], em.orig(node), -1), c.labels)


@RULES.rule(aten.slice, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x[:, 1:9:2]),))
def plan_slice(node, facts):
    """x[a:b:s] along d is linear; only those rows of x are needed."""
    x = node.args[0]
    dim = norm_dim(arg(node, 1, "dim", 0), len(sizes(x)))
    n = sizes(x)[dim]

    def rows():
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else n
        step = node.args[4] if len(node.args) > 4 else 1
        if not all(isinstance(v, int) for v in (start, end, step)):
            return None
        return tuple(range(n))[slice(start, end, step)]

    def demand(node, d):
        if n is None:
            return mapped(x, d, d.dim) if d is not None else {}
        r = rows()
        if r is None:
            return None
        if d is None:
            return {x: Rows(dim, r, None)}
        if d.dim == dim:
            return {x: Rows(dim, tuple(r[i] for i in d.index), None)} if d.group is None else None
        return {x: d}

    def emit(em, node):
        if em.layout(x) is not None and em.layout(x).dim == dim:
            # the narrowed input already is the slice
            return list(em.terms(x, pending_ok=True, lazy_ok=True, windows_ok=True))
        if n is not None and rows() == tuple(range(n)):     # every row ([:, 0:]): the identity
            return identity_emit(0)(em, node)
        if dim < len(sizes(x)) - 1 and pending_in(em, x):
            args = (None,) + tuple(node.args[1:])
            return keep_pending(em, x, lambda t: em.call(rt.pusher(node.target, 0), t, args, {}),
                                move=True)
        return layout_emit()(em, node)
    return Plan.linear([x], emit, demand=demand)


@RULES.rule(*ops("dropout", "feature_dropout", "alpha_dropout", "native_dropout", "detach"),
            name="dropout", moves_layout=True, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: torch.ops.aten.dropout(x, 0.5, False)),))
def plan_dropout(node, facts):
    """Dropout in eval mode is the identity (training mode is refused before export)."""
    if arg(node, 2, "train", False):
        raise UnsupportedGraphError("dropout in training mode: call model.eval() first", node)
    return Plan.linear([node.args[0]], identity_emit(0),
                       demand=lambda n, d: same_rows(n.args[0], d))


@RULES.rule(aten.index, prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: x[:, torch.tensor([3, 1, 3])]),))
def plan_index(node, facts):
    """Advanced indexing x[idx] with frozen indices is linear in x (a gather)."""
    return Plan.linear([node.args[0]], push_emit(0))


@RULES.rule(aten.constant_pad_nd, aten.pad, name="pad",
            examples=(lambda: Tail(lambda m, x: F.pad(x, (1, 2), value=0.5)),
                      lambda: Tail(lambda m, x: F.pad(x, (0, 0, 2, 1)))))
def plan_pad(node, facts):
    """Zero padding is linear; padding with a constant c ≠ 0 adds c on the padded border, a
    constant component of its own."""
    constant_pad = op_key(node) is aten.constant_pad_nd
    if constant_pad:
        mode, value = "constant", arg(node, 2, "value", 0.0)
    else:
        mode, value = arg(node, 2, "mode", "constant"), arg(node, 3, "value", 0.0)
    value = value or 0.0
    if mode not in ("constant", "reflect", "replicate", "circular"):
        raise UnsupportedGraphError(f"padding mode {mode!r}", node)
    if mode != "constant" or value == 0.0:
        plain = push_emit(0)
        pad = node.args[1]

        def emit_rows(em, node):
            """A pad of dims other than the channel one (F.pad lists the last dim first) moves
            whole rows: pending projections take it on their input."""
            if isinstance(pad, (list, tuple)) and all(p == 0 for p in pad):
                return list(em.terms(node.args[0], blocked_ok=True, pending_ok=True,
                                     channel_ok=True, lazy_ok=True, windows_ok=True))  # no-op
            if not (pending_in(em, node.args[0]) and isinstance(pad, (list, tuple))
                    and all(isinstance(p, int) for p in pad)):
                return plain(em, node)
            rank = len(sizes(node.args[0]))
            padded = {rank - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
            args = (None,) + tuple(em.orig_arg(a) for a in node.args[1:])
            kwargs = {k: em.orig_arg(v) for k, v in node.kwargs.items()}
            return keep_pending(em, node.args[0],
                                lambda t: em.call(rt.pusher(node.target, 0), t, args, kwargs),
                                moves=lambda ch: None if ch in padded else ch, rank_out=rank,
                                move=True)
        return Plan.linear([node.args[0]], emit_rows)

    def emit(em, node):
        chunk = em.merged(node.args[0])
        pad = em.orig_arg(node.args[1])
        zero_args = (None, pad, 0.0) if constant_pad else (None, pad, "constant", 0.0)
        out = em.call(rt.pusher(node.target, 0), chunk.node, zero_args, {})
        border = em.call(rt.pad_border, em.orig(node.args[0]), pad, float(value))
        return [em.chunk(out, chunk.labels), em.const_chunk(border, node, "pad")]
    return Plan.linear([node.args[0]], emit)


# ------------------------------------------------------------------------------ joining
@RULES.rule(*ops("cat", "concat", "concatenate"), name="cat", examples=(
        lambda: Tail(lambda m, x: torch.cat([x, 2 * x[:, :3]], 1)[:, 2:6]),))
def plan_cat(node, facts):
    """cat is linear; each input fills its own slice of the output (zeros elsewhere)."""
    parts = node.args[0]
    dim = arg(node, 1, "dim", 0)

    def emit(em, node):
        rank = len(sizes(node))
        if norm_dim(dim, rank) == rank - 1 and len(parts) > 1 \
                and any(pending_in(em, p) for p in parts):
            merged = _cat_pending(em, parts)
            if merged is not None:
                return merged
        origs = [em.orig(p) for p in parts]
        ref = em.orig(node)
        out = []
        for i, p in enumerate(parts):
            for c in em.terms(p):
                out.append(em.chunk(em.call(rt.place_in_cat, c.node, origs, i, dim, ref), c.labels))
        return out

    def demand(node, d):
        """Rows of a cat come from the input that holds them (possibly none of an input's)."""
        if d is None:
            return {}
        cdim = norm_dim(dim, len(sizes(node)))
        if d.dim != cdim:
            return {p: d for p in parts}
        if d.group is not None:
            return None
        req, offset = {}, 0
        for p in parts:
            n = sizes(p)[cdim]
            if n is None:
                return None
            req[p] = Rows(cdim, tuple(i - offset for i in d.index if offset <= i < offset + n), None)
            offset += n
        return req
    return Plan.linear(list(parts), emit, demand=demand)


def _cat_pending(em, parts) -> list | None:
    """cat along the channel dim of K equally shaped values whose terms correspond chunk by
    chunk (the same components: e.g. the 2x2 strided slices of one value in a patch merging
    written as ``cat([x[0::2, 0::2], x[1::2, 0::2], ...], -1)``, torchvision's Swin): the
    merging's gather in another form. Pending projections stay pending: their inputs (or the
    windowed factors and window maps, or the deferred positions maps) are concatenated along
    the last dim, part k becoming sub-block k, and W becomes block diagonal
    (``rt.block_diagonal_heads``); plain terms are concatenated and become pending with W = I.
    None: the parts do not correspond (the caller places each part in its slice instead)."""
    shapes = [sizes(p) for p in parts]
    if not shapes[0] or shapes[0][-1] is None or any(sh != shapes[0] for sh in shapes):
        return None
    lists = [em.terms(p, pending_ok=True, lazy_ok=True, windows_ok=True) for p in parts]
    if len({len(chunks) for chunks in lists}) != 1:
        return None
    k, out = len(parts), []
    for group in zip(*lists):
        first = group[0]
        if any(c.labels != first.labels for c in group):
            return None
        if all(c.proj is None for c in group):
            # plain terms become pending (W = I), as at a reshape-form merging: the merging's
            # norm and linear map then fold into W instead of running at every position
            nodes = [em.call(rt.expand_terms, em.densify(c).node, em.orig(p))
                     for c, p in zip(group, parts)]
            eye = em.call(rt.identity_weight, k * shapes[0][-1], em.orig(parts[0]))
            out.append(em.pending(em.call(rt.cat_last, nodes), eye, 1, first.labels))
            continue
        win, fac = first.win, first.fac
        if any(c.proj is None or c.proj != first.proj or c.cdim is not None or c.block is not None
               or (c.win is None) != (win is None) or (c.fac is None) != (fac is None)
               for c in group) \
                or win is not None and any(c.win[1] != win[1] for c in group) \
                or fac is not None and (fac[0] not in ("rows", "probe")
                                        or any(c.fac != fac for c in group)):
            return None
        weight = em.call(rt.block_diagonal_heads, first.proj[0], first.proj[1], k)
        if all(c.at is not None and c.node is first.node for c in group):
            # deferred moves (one input, K positions maps): the maps merge, the input stays
            at = em.call(rt.cat_last, [c.at for c in group])
            out.append(replace(first, proj=(weight, first.proj[1]), at=at))
            continue
        group = [em.settle(c) for c in group]
        wmap = None if win is None else (em.call(rt.cat_last, [c.win[0] for c in group]), win[1])
        out.append(em.pending(em.call(rt.cat_last, [c.node for c in group]), weight,
                              first.proj[1], first.labels, win=wmap, fac=fac))
    return out


@RULES.rule(aten.stack, examples=(
        lambda: Tail(lambda m, x: torch.stack([torch.cat([x, 2 * x], -1), torch.cat([x, x], -1)], 1)),))
def plan_stack(node, facts):
    """stack(xs, d) = cat([x.unsqueeze(d) for x in xs], d): linear, disjoint slices."""
    parts = node.args[0]
    dim = arg(node, 1, "dim", 0)

    def emit(em, node):
        ref = em.orig(node)
        origs = [em.call(torch.unsqueeze, em.orig(p), dim) for p in parts]
        out = []
        for i, p in enumerate(parts):
            for c in em.terms(p):
                t = em.call(rt.unsqueeze_terms, c.node, dim, em.orig(p))
                out.append(em.chunk(em.call(rt.place_in_cat, t, origs, i, dim, ref), c.labels))
        return out
    return Plan.linear(list(parts), emit)


def _split_item(node: Node, src: Node, index: int, facts) -> Plan:
    """Output ``index`` of split/unbind/chunk is linear in their input."""
    def emit(em, node):
        c = em.merged(src.args[0])
        args = tuple(None if i == 0 else em.orig_arg(a) for i, a in enumerate(src.args))
        kwargs = {k: em.orig_arg(v) for k, v in src.kwargs.items()}
        out = em.call(rt.multi_pusher(src.target, index), c.node, args, kwargs)
        return [em.chunk(out, c.labels)]
    return Plan.linear([src.args[0]], emit)


RULES.register(Rule(
    "split", ops("split", "split_with_sizes", "unbind", "chunk", "tensor_split", "unsafe_split",
                 "unsafe_chunk", "unsafe_split_with_sizes"),
    item_plan=_split_item, doc=_split_item.__doc__,
    examples=(lambda: Tail(lambda m, x: torch.cat(x.split(4, dim=-1)[::-1], -1)
                           + x.unbind(1)[3].unsqueeze(1)),)))


@RULES.rule(operator.getitem, examples=(lambda: Tail(lambda m, x: x.chunk(2, 1)[1]),))
def plan_getitem(node, facts):
    """An item of a multi-output op plans by that op's rule (``Rule.item_plan``): split's
    outputs are linear, eval batch norm's output 0 is its affine map; others are roots."""
    src, index = node.args
    if not isinstance(src, Node) or src.op != "call_function":
        return Plan.root("getitem of a non-op value")
    rule = facts.rules.rule_for(src)
    if rule is None or rule.item_plan is None:
        return Plan.root(f"output {index} of {op_name(src)}")
    return rule.item_plan(node, src, index, facts)
