"""The decomposition rules: one per ATen op, each stating the identity it relies on.

A rule looks at a node of the exported graph that lies on the *linear path* (the output depends on
it only through ops that are linear once nonlinear side values are frozen) and returns a ``Plan``:

* ``Plan.linear(inputs, emit)``: the node's terms are a linear function of the terms of
  ``inputs`` (other arguments are frozen at the forward pass's values); ``emit`` builds that
  function in the rewritten graph.
* ``Plan.root(...)``: the walk stops; the node's value is itself a component (an activation, the
  attention op, a product of two data-dependent values ...). Attention roots can be *expanded*
  into heads and source tokens.

Ops matched by overload packet name (``aten.view`` covers ``view.default`` ...). An op on the linear
path with no rule raises ``UnsupportedGraphError``; nothing is ever silently approximated.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import Node

from ..errors import UnsupportedGraphError
from . import runtime as rt

aten = torch.ops.aten


@dataclass
class Plan:
    kind: str                                   # "linear" | "root" | "attention"
    inputs: tuple = ()                          # nodes whose terms flow into this node
    emit: Callable | None = None                # emit(em, node) -> list[Chunk]
    info: dict = field(default_factory=dict)

    @staticmethod
    def linear(inputs, emit, **info) -> "Plan":
        return Plan("linear", tuple(inputs), emit, info)

    @staticmethod
    def root(reason: str, **info) -> "Plan":
        return Plan("root", (), None, dict(reason=reason, **info))


RULES: dict[str, Callable] = {}


def rule(*names: str):
    """Register ``plan(node, facts) -> Plan`` for the given ATen overload-packet names."""
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def op_name(node: Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(t, "__name__", str(t))


# --------------------------------------------------------------------------------------------
# demand (which rows are needed): transfer functions used by fxdecomp.analyse.demand

def sizes(node: Node) -> tuple:
    """Static sizes of a node's value, None where the size is symbolic (the batch)."""
    val = node.meta.get("val")
    return tuple(int(s) if isinstance(s, int) else None for s in val.shape)


def _tensor_args(node: Node) -> list[Node]:
    out = []
    torch.fx.node.map_arg((node.args, node.kwargs),
                          lambda a: out.append(a) if isinstance(a.meta.get("val"), torch.Tensor) else None)
    return out


def pointwise_demand(node: Node, d):
    """Elementwise ops (with broadcasting) commute with taking rows: every tensor argument is
    narrowed along the aligned dim, unless it broadcasts there (size 1)."""
    if d is None:
        return {}
    dim = d[0]
    rank = len(sizes(node))
    req = {}
    for a in _tensor_args(node):
        s = sizes(a)
        da = dim - (rank - len(s))
        if da >= 0 and s[da] != 1:
            req[a] = (da,) + tuple(d[1:])
    return req


def _only(x: Node, d):
    return {} if d is None else {x: d}


def _mapped(x: Node, d, dim_in):
    """Narrow input ``x`` along ``dim_in`` with the output's indices (None: cannot)."""
    if d is None:
        return {}
    if dim_in is None:
        return None
    return {x: (dim_in,) + tuple(d[1:])}


def _prefix(factors, k):
    """Product of the first k dims as (static part, number of symbolic factors); ``factors``
    holds per dim (static coefficient, number of symbolic factors)."""
    num, sym = 1, 0
    for c, n in factors[:k]:
        num, sym = num * c, sym + n
    return num, sym


def _factors(shape):
    """Sizes (None = symbolic) as per-dim (static coefficient, symbolic count)."""
    return [(1, 1) if s is None else (s, 0) for s in shape]


def _reshape_demand(x: Node, node: Node, d):
    """Demand through a reshape. The narrowed output dim either comes from one input dim
    unchanged, or is the outer factor of a merged input dim (then the input demand is *grouped*:
    rows ``i·inner + j``), or is a merged dim whose outer factor is narrowed (grouped demand on
    the output: MultiheadAttention's [N, B, ...] -> [N·B, D] layout)."""
    if d is None:
        return {}
    dim, idx, group = d
    ins, outs = sizes(x), sizes(node)
    target = _prefix(_factors(outs), dim)
    for k in range(len(ins)):
        if _prefix(_factors(ins), k) != target:
            continue
        if group is None and ins[k] == outs[dim] and ins[k] is not None:
            return {x: (k, idx, None)}
        if group is None and outs[dim] is not None and ins[k] is None:
            return {x: (k, idx, outs[dim])}          # output dim = outer factor of input dim k
        if group is not None and ins[k] == group:
            return {x: (k, idx, None)}               # merged output dim: narrow its outer factor
        if group is not None and ins[k] is None:
            return {x: (k, idx, group)}              # same grouped dim, unchanged
    return None


def _norm_dim(dim, rank):
    return dim % rank if rank else 0


# --------------------------------------------------------------------------------------------
# pushers: named callables so the rewritten graph's code reads ``push_linear(t, ...)``.

_PUSHERS: dict = {}


def pusher(op, pos: int = 0):
    """A function f(t, args, kwargs) applying ``op`` to every component of ``t`` at arg ``pos``."""
    key = (op, pos)
    if key not in _PUSHERS:
        def f(t, args, kwargs):
            return rt.push(op, t, pos, args, kwargs)
        name = "push_" + str(getattr(op, "__name__", op)).replace(".", "_")
        f.__name__ = f.__qualname__ = name if pos == 0 else f"{name}_arg{pos}"
        _PUSHERS[key] = f
    return _PUSHERS[key]


def multi_pusher(op, index: int):
    key = (op, "multi", index)
    if key not in _PUSHERS:
        def f(t, args, kwargs):
            return rt.push_multi(op, index, t, args, kwargs)
        f.__name__ = f.__qualname__ = "push_" + str(getattr(op, "__name__", op)).replace(".", "_") + f"_out{index}"
        _PUSHERS[key] = f
    return _PUSHERS[key]


def _push_emit(pos: int = 0, target=None):
    """Emit: apply the node's own op (or ``target``) to every component of arg ``pos``."""
    def emit(em, node):
        op = target or node.target
        (chunk,) = [em.merged(node.args[pos])]
        args = tuple(None if i == pos else em.orig_arg(a) for i, a in enumerate(node.args))
        kwargs = {k: em.orig_arg(v) for k, v in node.kwargs.items()}
        out = em.call(pusher(op, pos), chunk.node, args, kwargs)
        return [em.chunk(out, chunk.labels)]
    return emit


def _identity_emit(pos: int = 0):
    def emit(em, node):
        return list(em.terms(node.args[pos], blocked_ok=True))
    return emit


# --------------------------------------------------------------------------------------------
# structural ops: linear in their first argument, nothing else is a tensor of data.

STRUCTURAL = (
    "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "flatten", "unflatten",
    "squeeze", "unsqueeze", "contiguous", "clone", "narrow", "index_select",
    "roll", "flip", "repeat", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "movedim",
    "swapaxes", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "mean", "sum", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
    "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "im2col", "col2im", "unfold", "diagonal",
    "cumsum", "expand_as", "view_as", "reshape_as", "gather", "repeat_interleave", "tile",
    "as_strided", "alias", "lift_fresh_copy", "_to_copy", "to", "type_as",
)


def _structural_demand(node, d):
    """Row demand through layout ops: transpose/permute/unsqueeze/flatten/reductions map the
    dim; elementwise-like ops keep it; other structural ops ask for everything."""
    name = op_name(node)
    x = node.args[0]
    if d is None:
        return {}
    dim = d[0]
    rank_in = len(sizes(x))
    if name in ("contiguous", "clone", "alias", "lift_fresh_copy", "_to_copy", "to", "type_as"):
        return {x: d}
    if name == "transpose":
        d0, d1 = (_norm_dim(a, rank_in) for a in node.args[1:3])
        return _mapped(x, d, d1 if dim == d0 else d0 if dim == d1 else dim)
    if name == "permute":
        return _mapped(x, d, _norm_dim(node.args[1][dim], rank_in))
    if name == "unsqueeze":
        k = _norm_dim(node.args[1], rank_in + 1)
        return None if dim == k else _mapped(x, d, dim if dim < k else dim - 1)
    if name == "flatten":
        start = _norm_dim(node.args[1] if len(node.args) > 1 else 0, rank_in)
        end = _norm_dim(node.args[2] if len(node.args) > 2 else -1, rank_in)
        if dim < start:
            return _mapped(x, d, dim)
        if dim > start:
            return _mapped(x, d, dim + (end - start))
        return _mapped(x, d, dim) if start == end else None
    if name in ("mean", "sum"):
        dims = node.args[1] if len(node.args) > 1 else None
        if dims is None or dims == []:
            return None
        dims = sorted(_norm_dim(k, rank_in) for k in ([dims] if isinstance(dims, int) else dims))
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        kept = [k for k in range(rank_in) if keep or k not in dims]
        src = kept[dim]
        return None if src in dims else _mapped(x, d, src)
    if name in ("reshape", "_unsafe_view", "view"):
        return _reshape_demand(x, node, d)
    if name == "expand":
        rank_out = len(sizes(node))
        k = dim - (rank_out - rank_in)
        if k < 0 or sizes(x)[k] == 1:
            return {}
        return {x: (k,) + tuple(d[1:])}
    return None


def _static_factors(node: Node) -> list:
    """Per dim (static coefficient, number of symbolic factors): 197·s0 -> (197, 1)."""
    out = []
    for s in node.meta["val"].shape:
        if isinstance(s, int):
            out.append((s, 0))
        else:
            coeff, _ = s.node.expr.as_coeff_Mul()
            out.append((int(coeff) if coeff.is_Integer else 1, 1))
    return out


def _moved_block(node: Node, block, shape_arg):
    """Where the head blocks of the input go through a layout op, or None (densify).
    Returns (new block, shape argument rewritten for the blocked tensor)."""
    name = op_name(node)
    dim, heads, per = block
    rank_in = len(node.args[0].meta["val"].shape)
    if name in ("contiguous", "clone", "alias", "_to_copy", "to", "type_as", "dropout"):
        return block, shape_arg
    if name == "transpose":
        d0, d1 = (_norm_dim(a, rank_in) for a in node.args[1:3])
        return (d1 if dim == d0 else d0 if dim == d1 else dim, heads, per), shape_arg
    if name == "permute":
        perm = [_norm_dim(p, rank_in) for p in node.args[1]]
        return (perm.index(dim), heads, per), shape_arg
    if name in ("reshape", "view", "_unsafe_view"):
        ins, outs = _static_factors(node.args[0]), _static_factors(node)
        if ins[dim][1]:
            return None
        for j in range(len(outs)):
            if _prefix(outs, j) != _prefix(ins, dim) or outs[j][1]:
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
    return None


def _structural_emit(em, node):
    """Apply the op to every component; under a row demand, sizes in shape arguments at the
    narrowed dim become the number of rows kept. Head-blocked terms stay blocked through
    layout ops (transpose, permute, reshape that keeps the heads as an outer factor)."""
    name = op_name(node)
    layout = em.layout(node)
    target = aten.reshape.default if name in ("view", "_unsafe_view") else node.target
    args = [None] + [em.orig_arg(a) for a in node.args[1:]]
    if layout is not None and name in ("reshape", "view", "_unsafe_view", "expand"):
        shape = list(args[1])
        if shape[layout[0]] != -1:
            if layout[2] is None:
                shape[layout[0]] = len(layout[1])
            else:  # grouped rows: the kept outer factors times the (symbolic) inner size
                shape[layout[0]] = -1
        args[1] = shape
    c = em.merged(node.args[0], blocked_ok=True)
    block = None
    if c.block is not None:
        moved = _moved_block(node, c.block, args[1] if len(args) > 1 else None)
        if moved is None:
            c = em.densify(c)
        else:
            block, shape = moved
            if name in ("reshape", "view", "_unsafe_view"):
                args[1] = shape
    out = em.call(pusher(target, 0), c.node, tuple(args),
                  {k: em.orig_arg(v) for k, v in node.kwargs.items()})
    return [em.chunk(out, c.labels, block)]


@rule(*STRUCTURAL, "view")
def plan_structural(node, facts):
    """Shape, indexing, pooling and reduction ops are linear in their input:
    op(Σ x_i) = Σ op(x_i). Index tensors and sizes are frozen. (view runs as reshape:
    components need not be contiguous.)"""
    return Plan.linear([node.args[0]], _structural_emit, demand=_structural_demand)


@rule("select")
def plan_select(node, facts):
    """x.select(d, k) is linear; only row k of x is needed (the CLS token)."""
    x, dim = node.args[0], _norm_dim(node.args[1], len(sizes(node.args[0])))

    def demand(node, d):
        if d is not None:
            return None
        k = node.args[2] % sizes(x)[dim] if sizes(x)[dim] else node.args[2]
        return {x: (dim, (k,), None)} if sizes(x)[dim] is not None else None

    def emit(em, node):
        c = em.merged(x)
        k = 0 if em.layout(x) is not None else node.args[2]
        return [em.chunk(em.call(pusher(node.target, 0), c.node, (None, dim, k), {}), c.labels)]
    return Plan.linear([x], emit, demand=demand)


@rule("slice")
def plan_slice(node, facts):
    """x[a:b:s] along d is linear; only those rows of x are needed."""
    x = node.args[0]
    rank = len(sizes(x))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, rank)
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
            return _mapped(x, d, d[0]) if d is not None else {}
        r = rows()
        if r is None:
            return None
        if d is None:
            return {x: (dim, r, None)}
        if d[0] == dim:
            return {x: (dim, tuple(r[i] for i in d[1]), None)} if d[2] is None else None
        return {x: d}

    def emit(em, node):
        if em.layout(x) is not None and em.layout(x)[0] == dim:
            return list(em.terms(x))  # the narrowed input already is the slice
        return _structural_emit(em, node)
    return Plan.linear([x], emit, demand=demand)


@rule("dropout", "feature_dropout", "alpha_dropout", "native_dropout", "detach")
def plan_dropout(node, facts):
    """Dropout in eval mode is the identity (training mode is refused before export)."""
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
    if train:
        raise UnsupportedGraphError("dropout in training mode: call model.eval() first", node)
    return Plan.linear([node.args[0]], _identity_emit(0), demand=lambda n, d: _only(n.args[0], d))


@rule("index")
def plan_index(node, facts):
    """Advanced indexing x[idx] with frozen indices is linear in x (a gather)."""
    return Plan.linear([node.args[0]], _push_emit(0))


@rule("constant_pad_nd", "pad")
def plan_pad(node, facts):
    """Zero padding is linear; padding with a constant c ≠ 0 adds c on the padded border, a
    constant component of its own."""
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0.0)
    if op_name(node) == "constant_pad_nd":
        mode, value = "constant", (node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0))
    value = value or 0.0
    if mode not in ("constant", "reflect", "replicate", "circular"):
        raise UnsupportedGraphError(f"padding mode {mode!r}", node)
    if mode != "constant" or value == 0.0:
        return Plan.linear([node.args[0]], _push_emit(0))

    def emit(em, node):
        chunk = em.merged(node.args[0])
        pad = em.orig_arg(node.args[1])
        zero_args = (None, pad, 0.0) if op_name(node) == "constant_pad_nd" else (None, pad, "constant", 0.0)
        out = em.call(pusher(node.target, 0), chunk.node, zero_args, {})
        border = em.call(_pad_border, em.orig(node.args[0]), pad, float(value))
        return [em.chunk(out, chunk.labels), em.const_chunk(border, node, "pad")]
    return Plan.linear([node.args[0]], emit)


def _pad_border(x, pad, value):
    """The constant the border of a constant pad adds: pad(0, value) as one component."""
    return torch.nn.functional.pad(torch.zeros_like(x), pad, value=value).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# sums and products

@rule("add", "sub")
def plan_add(node, facts):
    """a ± α·b: the terms of a and (±α·) the terms of b, side by side; a scalar is a constant."""
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    sign = -1 if op_name(node) == "sub" else 1
    inputs = [x for x in (a, b) if isinstance(x, Node)]

    def emit(em, node):
        chunks = []
        for side, x in enumerate((a, b)):
            factor = 1 if side == 0 else sign * alpha
            if isinstance(x, Node):
                for c in em.terms(x):
                    out = c.node if factor == 1 else em.call(operator.mul, c.node, factor)
                    chunks.append(em.chunk(out, c.labels))
            elif x != 0:
                const = em.call(_scalar_terms, em.orig(node), float(x) * factor)
                chunks.append(em.const_chunk(const, node, "const"))
        return chunks
    return Plan.linear(inputs, emit, demand=pointwise_demand)


def _scalar_terms(ref, value):
    return torch.full_like(ref, value).unsqueeze(0)


@rule("rsub")
def plan_rsub(node, facts):
    """rsub(a, b, α) = b − α·a: linear in a, b is a constant component."""
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)

    def emit(em, node):
        chunks = [em.chunk(em.call(operator.mul, c.node, -alpha), c.labels) for c in em.terms(a)]
        if isinstance(b, Node):
            chunks += list(em.terms(b))
        elif b != 0:
            chunks.append(em.const_chunk(em.call(_scalar_terms, em.orig(node), float(b)), node, "const"))
        return chunks
    return Plan.linear([x for x in (a, b) if isinstance(x, Node)], emit, demand=pointwise_demand)


@rule("neg")
def plan_neg(node, facts):
    """−x is linear."""
    def emit(em, node):
        return [em.chunk(em.call(operator.neg, c.node), c.labels) for c in em.terms(node.args[0])]
    return Plan.linear([node.args[0]], emit, demand=pointwise_demand)


def _numel_ratio(small: Node, big: Node) -> bool:
    """True if ``small`` broadcasts to ``big`` with at least one broadcast (size-1) axis."""
    s, b = small.meta.get("val"), big.meta.get("val")
    if s is None or b is None:
        return False
    ss, bs = list(s.shape), list(b.shape)
    ss = [1] * (len(bs) - len(ss)) + ss
    return any(x == 1 and y != 1 for x, y in zip(ss, bs))


@rule("mul")
def plan_mul(node, facts):
    """a·b with one factor frozen is linear in the other. Frozen: a parameter-only value (layer
    scale), a scalar, or a data-dependent value that broadcasts (a per-row norm scale, a
    squeeze-excitation gate). A product of two full-shape data values (gating) is a root."""
    a, b = node.args[0], node.args[1]
    a_data = isinstance(a, Node) and facts.is_data(a)
    b_data = isinstance(b, Node) and facts.is_data(b)
    if a_data and b_data:
        if _numel_ratio(b, node) and not _numel_ratio(a, node):
            lin, frozen = 0, 1
        elif _numel_ratio(a, node) and not _numel_ratio(b, node):
            lin, frozen = 1, 0
        else:
            return Plan.root("product of two data-dependent values")
    elif a_data:
        lin, frozen = 0, 1
    elif b_data:
        lin, frozen = 1, 0
    else:
        lin, frozen = 0, 1  # constant × constant: a constant node, handled by the caller

    def emit(em, node):
        other = em.orig_arg(node.args[frozen])
        return [em.chunk(em.call(operator.mul, c.node, other), c.labels)
                for c in em.terms(node.args[lin])]
    return Plan.linear([node.args[lin]], emit, demand=pointwise_demand)


@rule("div")
def plan_div(node, facts):
    """a / b with b frozen is linear in a (normalisers: x / ‖x‖, x / σ)."""
    a, b = node.args[0], node.args[1]
    if isinstance(b, Node) and facts.is_data(b) and not (isinstance(a, Node) and facts.is_data(a)):
        return Plan.root("division by a data-dependent value")
    rounding = node.kwargs.get("rounding_mode")
    if rounding is not None:
        return Plan.root(f"div with rounding_mode={rounding!r}")

    def emit(em, node):
        other = em.orig_arg(b)
        return [em.chunk(em.call(operator.truediv, c.node, other), c.labels) for c in em.terms(a)]
    return Plan.linear([a], emit, demand=pointwise_demand)


@rule("where")
def plan_where(node, facts):
    """where(cond, a, b) with cond frozen is linear in a and b (disjoint supports)."""
    if len(node.args) < 3:
        return Plan.root("where(cond) without values")
    cond, a, b = node.args[0], node.args[1], node.args[2]

    def emit(em, node):
        cnd = em.orig(cond)
        out = []
        for keep, x in ((True, a), (False, b)):
            if isinstance(x, Node):
                for c in em.terms(x):
                    out.append(em.chunk(em.call(rt.where_terms, c.node, cnd, keep), c.labels))
            elif x != 0:
                const = em.call(_where_scalar, cnd, em.orig(node), float(x), keep)
                out.append(em.const_chunk(const, node, "const"))
        return out
    return Plan.linear([x for x in (a, b) if isinstance(x, Node)], emit, demand=pointwise_demand)


def _where_scalar(cond, ref, value, keep):
    full = torch.full_like(ref, value)
    zero = torch.zeros_like(ref)
    return (torch.where(cond, full, zero) if keep else torch.where(cond, zero, full)).unsqueeze(0)


@rule("masked_fill")
def plan_masked_fill(node, facts):
    """masked_fill(x, m, v) = where(m, v, x): linear in x; v ≠ 0 is a constant component."""
    x, mask, value = node.args[0], node.args[1], node.args[2]

    def emit(em, node):
        m = em.orig(mask)
        out = [em.chunk(em.call(rt.where_terms, c.node, m, False), c.labels) for c in em.terms(x)]
        if isinstance(value, Node) or value != 0:
            const = em.call(_masked_value, m, em.orig(node), em.orig_arg(value))
            out.append(em.const_chunk(const, node, "const"))
        return out
    return Plan.linear([x], emit, demand=pointwise_demand)


def _masked_value(mask, ref, value):
    return torch.where(mask, torch.as_tensor(value, dtype=ref.dtype, device=ref.device),
                       torch.zeros((), dtype=ref.dtype, device=ref.device)).expand(ref.shape).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# linear maps with weights

def _bias_chunk(em, node, bias, channel_dim):
    """A bias argument as a constant component (kind ``bias``), broadcast to the output."""
    if bias is None:
        return []
    t = em.call(rt.bias_terms, em.orig(bias), em.orig(node), channel_dim)
    return [em.const_chunk(t, bias, "bias")]


def _weight_args(node, facts):
    """(input, weight, bias, root plan if the weight is data-dependent) of linear/conv."""
    x, w = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if isinstance(w, Node) and facts.is_data(w):
        return x, w, bias, Plan.root(f"{op_name(node)} with a data-dependent weight")
    return x, w, bias, None


@rule("linear")
def plan_linear(node, facts):
    """x ↦ x Wᵀ + b: Wᵀ applies to every component; b is a constant component of its own."""
    x, w, bias, refuse = _weight_args(node, facts)
    if refuse:
        return refuse

    def emit(em, node):
        c = em.merged(x, blocked_ok=True)
        rank = len(sizes(node))
        if c.block is not None and c.block[0] == rank - 1 and len(sizes(w)) == 2:
            # head-blocked input: one batched per-head projection (fused kernel on CUDA)
            out = em.call(rt.blocked_linear, c.node, em.orig(w), c.block[1], em.backend)
        else:
            c = em.densify(c)
            out = em.call(torch.nn.functional.linear, c.node, em.orig(w))
        return [em.chunk(out, c.labels)] + _bias_chunk(em, node, bias, -1)

    def demand(node, d):
        return _only(x, d) if d is None or d[0] < len(sizes(node)) - 1 else None
    return Plan.linear([x], emit, demand=demand)


@rule("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def plan_conv(node, facts):
    """Convolution with a fixed kernel is linear in its input; the bias is its own component."""
    x, w, bias, refuse = _weight_args(node, facts)
    if refuse:
        return refuse

    def emit(em, node):
        c = em.merged(x)
        args = tuple(None if i == 0 else (None if i == 2 else em.orig_arg(a))
                     for i, a in enumerate(node.args))
        out = em.call(pusher(node.target, 0), c.node, args, {})
        return [em.chunk(out, c.labels)] + _bias_chunk(em, node, bias, 1)
    return Plan.linear([x], emit)


@rule("convolution")
def plan_convolution(node, facts):
    """aten.convolution: same identity as conv2d."""
    return plan_conv(node, facts)


def _two_operand(node, facts, a, b):
    a_data = isinstance(a, Node) and facts.is_data(a)
    b_data = isinstance(b, Node) and facts.is_data(b)
    return a_data, b_data


@rule("matmul", "bmm", "mm")
def plan_matmul(node, facts):
    """a @ b with one side fixed is linear in the other. With both data-dependent, if one side is
    attention probabilities (derived from a softmax) the product is an attention output: a root
    that can be split per head and per source token (P frozen, linear in V)."""
    a, b = node.args[0], node.args[1]
    a_data, b_data = _two_operand(node, facts, a, b)
    if a_data and b_data:
        if facts.is_probs(a) or facts.in_attention(node):
            return Plan("attention", (), None, dict(probs=a, values=b, form="matmul"))
        return Plan.root("matmul of two data-dependent values")
    pos = 0 if a_data else 1
    return Plan.linear([node.args[pos]], _push_emit(pos))


@rule("einsum")
def plan_einsum(node, facts):
    """einsum with exactly one data-dependent operand is linear in it."""
    eq, operands = node.args[0], node.args[1]
    data = [i for i, o in enumerate(operands) if isinstance(o, Node) and facts.is_data(o)]
    if len(data) != 1:
        if len(data) == 2 and len(operands) == 2 and (facts.is_probs(operands[0])
                                                       or facts.in_attention(node)):
            return Plan("attention", (), None, dict(probs=operands[0], values=operands[1],
                                                    form="einsum", equation=eq))
        return Plan.root("einsum of several data-dependent operands")
    (k,) = data

    def emit(em, node):
        c = em.merged(operands[k])
        out = em.call(_einsum_pusher(eq, k), c.node, [em.orig_arg(o) for o in operands])
        return [em.chunk(out, c.labels)]
    return Plan.linear([operands[k]], emit)


def _einsum_pusher(eq, k):
    key = ("einsum", eq, k)
    if key not in _PUSHERS:
        def push_einsum(t, operands):
            ops = list(operands)

            def one(x):
                ops[k] = x
                return torch.einsum(eq, *ops)
            return torch.vmap(one)(t)
        _PUSHERS[key] = push_einsum
    return _PUSHERS[key]


@rule("addmm", "baddbmm")
def plan_addmm(node, facts):
    """β·bias + α·(a @ b): linear in the data operand of the product; bias is a constant term."""
    bias, a, b = node.args[0], node.args[1], node.args[2]
    a_data, b_data = _two_operand(node, facts, a, b)
    if a_data and b_data or (isinstance(bias, Node) and facts.is_data(bias)):
        return Plan.root("addmm with several data-dependent operands")
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    pos = 1 if a_data else 2
    mm = aten.bmm.default if op_name(node) == "baddbmm" else aten.mm.default

    def emit(em, node):
        c = em.merged(node.args[pos])
        args = (None, em.orig(b)) if pos == 1 else (em.orig(a), None)
        out = em.call(pusher(mm, pos - 1), c.node, args, {})
        if alpha != 1:
            out = em.call(operator.mul, out, alpha)
        const = em.call(_addmm_bias, em.orig(bias), em.orig(node), beta)
        return [em.chunk(out, c.labels), em.const_chunk(const, bias, "bias")]
    return Plan.linear([node.args[pos]], emit)


def _addmm_bias(bias, ref, beta):
    return (bias * beta).expand(ref.shape).unsqueeze(0)


# --------------------------------------------------------------------------------------------
# normalisation: the scale is frozen, centring is linear, the shift is a constant component

@rule("layer_norm")
def plan_layer_norm(node, facts):
    """LayerNorm with frozen σ: γ ⊙ (x − mean x)/σ is linear in x (centre each component);
    β is a constant component."""
    x, shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)

    def emit(em, node):
        c = em.merged(x)
        out = em.call(rt.layer_norm_terms, c.node, em.orig(x), shape, em.orig_arg(weight), eps)
        return [em.chunk(out, c.labels)] + _bias_chunk(em, node, bias, -1)
    return Plan.linear([x], emit, demand=_rowwise_demand(x, len(shape)))


def _rowwise_demand(x, n_norm):
    """A norm over the last ``n_norm`` dims commutes with taking rows of the other dims."""
    def demand(node, d):
        return _only(x, d) if d is None or d[0] < len(sizes(node)) - n_norm else None
    return demand


@rule("rms_norm")
def plan_rms_norm(node, facts):
    """RMSNorm with frozen rms: γ ⊙ x / rms(x) is linear in x."""
    x, shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")

    def emit(em, node):
        c = em.merged(x)
        out = em.call(rt.rms_norm_terms, c.node, em.orig(x), shape, em.orig_arg(weight), eps)
        return [em.chunk(out, c.labels)]
    return Plan.linear([x], emit, demand=_rowwise_demand(x, len(shape)))


@rule("group_norm")
def plan_group_norm(node, facts):
    """GroupNorm with frozen per-group σ: centring within a group is linear; β is constant."""
    x, groups = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)

    def emit(em, node):
        c = em.merged(x)
        out = em.call(rt.group_norm_terms, c.node, em.orig(x), groups, em.orig_arg(weight), eps)
        return [em.chunk(out, c.labels)] + _bias_chunk(em, node, bias, 1)
    return Plan.linear([x], emit)


def _batch_norm_plan(node, x, weight, bias, mean, var, training, eps):
    if training:
        raise UnsupportedGraphError("batch_norm in training mode: call model.eval() first", node)

    def emit(em, node):
        c = em.merged(x)
        w, rm, rv = em.orig_arg(weight), em.orig(mean), em.orig(var)
        out = em.call(rt.batch_norm_terms, c.node, w, rm, rv, eps)
        shift = em.call(rt.batch_norm_shift, em.orig(x), w, em.orig_arg(bias), rm, rv, eps)
        return [em.chunk(out, c.labels), em.const_chunk(shift, bias if isinstance(bias, Node) else node, "bias")]
    return Plan.linear([x], emit)


@rule("batch_norm")
def plan_batch_norm(node, facts):
    """Eval BatchNorm is a per-channel affine map: scale (linear) + shift (constant)."""
    x, w, b, rm, rv, training, _momentum, eps = node.args[:8]
    return _batch_norm_plan(node, x, w, b, rm, rv, training, eps)


# --------------------------------------------------------------------------------------------
# cat / stack / multi-output ops

@rule("cat", "concat", "concatenate")
def plan_cat(node, facts):
    """cat is linear; each input fills its own slice of the output (zeros elsewhere)."""
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)

    def emit(em, node):
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
        cdim = _norm_dim(dim, len(sizes(node)))
        if d[0] != cdim:
            return {p: d for p in parts}
        if d[2] is not None:
            return None
        req, offset = {}, 0
        for p in parts:
            n = sizes(p)[cdim]
            if n is None:
                return None
            req[p] = (cdim, tuple(i - offset for i in d[1] if offset <= i < offset + n), None)
            offset += n
        return req
    return Plan.linear(list(parts), emit, demand=demand)


@rule("stack")
def plan_stack(node, facts):
    """stack(xs, d) = cat([x.unsqueeze(d) for x in xs], d): linear, disjoint slices."""
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)

    def emit(em, node):
        ref = em.orig(node)
        origs = [em.call(torch.unsqueeze, em.orig(p), dim) for p in parts]
        out = []
        for i, p in enumerate(parts):
            for c in em.terms(p):
                t = em.call(_unsqueeze_terms, c.node, dim, em.orig(p))
                out.append(em.chunk(em.call(rt.place_in_cat, t, origs, i, dim, ref), c.labels))
        return out
    return Plan.linear(list(parts), emit)


def _unsqueeze_terms(t, dim, ref):
    t = rt.expand_terms(t, ref)
    return t.unsqueeze(1 + dim % (ref.dim() + 1))


MULTI_OUTPUT = ("split", "split_with_sizes", "unbind", "chunk", "tensor_split", "unsafe_split",
                "unsafe_chunk", "unsafe_split_with_sizes")


@rule("getitem")
def plan_getitem(node, facts):
    """An output of split/unbind/chunk is linear in their input; output 0 of eval batch norm is
    its affine map. Other multi-output ops (max, sort, ...) make the item a root."""
    src, index = node.args
    if not isinstance(src, Node) or src.op != "call_function":
        return Plan.root("getitem of a non-op value")
    name = op_name(src)
    if name in MULTI_OUTPUT:
        def emit(em, node):
            c = em.merged(src.args[0])
            args = tuple(None if i == 0 else em.orig_arg(a) for i, a in enumerate(src.args))
            kwargs = {k: em.orig_arg(v) for k, v in src.kwargs.items()}
            out = em.call(multi_pusher(src.target, index), c.node, args, kwargs)
            return [em.chunk(out, c.labels)]
        return Plan.linear([src.args[0]], emit)
    if name == "_native_batch_norm_legit_no_training" and index == 0:
        x, w, b, rm, rv, _momentum, eps = src.args[:7]
        return _batch_norm_plan(node, x, w, b, rm, rv, False, eps)
    if name == "max" and index == 0 and len(src.args) > 1 and isinstance(src.args[1], int):
        return _plan_max_dim(node, src, facts)
    if name in ("_native_batch_norm_legit", "_native_batch_norm_legit_functional"):
        raise UnsupportedGraphError("batch_norm in training mode: call model.eval() first", src)
    return Plan.root(f"output {index} of {name}")


# --------------------------------------------------------------------------------------------
# attention

@rule("scaled_dot_product_attention")
def plan_sdpa(node, facts):
    """softmax(q kᵀ·s + mask) @ v: with the probabilities frozen the output is linear in v, so it
    is split per head (dim −3) and per source token (the key index). The attention output is a
    component root: what q, k and v computed stays inside the component."""
    return Plan("attention", (), None, dict(form="sdpa"))


# --------------------------------------------------------------------------------------------
# max selections: with the argmax frozen, taking the maximum is a selection (a gather)

@rule("max_pool2d")
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


def _plan_max_dim(node, src, facts):
    """max(x, dim).values = gather(x, dim, argmax): linear with the argmax frozen."""
    x, dim = src.args[0], src.args[1]
    keepdim = src.args[2] if len(src.args) > 2 else src.kwargs.get("keepdim", False)

    def emit(em, node):
        c = em.merged(x)
        out = em.call(rt.max_dim_terms, c.node, em.orig(x), dim, keepdim)
        return [em.chunk(out, c.labels)]
    return Plan.linear([x], emit)


@rule("amax")
def plan_amax(node, facts):
    """amax over one dim is max(x, dim).values: a frozen selection."""
    x = node.args[0]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(dims) != 1:
        return Plan.root("amax over several dims")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)

    def emit(em, node):
        c = em.merged(x)
        return [em.chunk(em.call(rt.max_dim_terms, c.node, em.orig(x), dims[0], keepdim), c.labels)]
    return Plan.linear([x], emit)


# --------------------------------------------------------------------------------------------
# nonlinear ops: their output is a root (the walk stops there)

NONLINEAR = (
    "gelu", "silu", "relu", "relu6", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "elu", "selu", "celu", "leaky_relu", "mish", "softplus", "softmax", "_softmax",
    "_safe_softmax", "log_softmax", "exp", "log", "sqrt", "rsqrt", "pow", "abs", "sin", "cos",
    "erf", "clamp", "clamp_min", "clamp_max", "max", "min", "amin", "sort", "topk",
    "reciprocal", "square", "linalg_vector_norm", "norm", "var", "std", "var_mean", "prelu",
    "glu", "maximum", "minimum", "sign", "floor", "ceil", "round", "max_pool1d",
    "max_pool3d", "max_pool2d_with_indices", "logsumexp", "atan", "atan2", "log1p", "expm1",
    "threshold", "addcmul", "lerp", "logit", "softsign", "tanhshrink",
    "native_layer_norm", "_native_batch_norm_legit_no_training",
)


def _nonlinear(node, facts):
    return Plan.root(f"nonlinear op {op_name(node)}")


# Elementwise activations with f(0) = 0. On terms with disjoint supports (the heads of one
# attention output: each head owns its own channels) f(Σ_h t_h) = Σ_h f(t_h) exactly.
ZERO_PRESERVING = ("gelu", "relu", "relu6", "silu", "tanh", "hardswish", "hardtanh", "elu",
                   "leaky_relu", "mish", "selu", "celu")
HEAD_LAYOUT_OPS = {"reshape", "view", "_unsafe_view", "permute", "transpose", "flatten",
                   "contiguous", "clone", "dropout", "unflatten", "_to_copy", "to"}


def _is_attention_output(src, facts, depth: int = 8) -> bool:
    """Is ``src`` an attention output, or a concatenation of per-head attention outputs
    (EfficientViT's cascaded heads), seen through layout ops?"""
    while isinstance(src, Node) and src.op == "call_function" and op_name(src) in HEAD_LAYOUT_OPS:
        src = src.args[0]
    if not (isinstance(src, Node) and src.op == "call_function") or depth <= 0:
        return False
    name = op_name(src)
    if name in ("cat", "concat"):
        return all(_is_attention_output(p, facts, depth - 1) for p in src.args[0])
    return name == "scaled_dot_product_attention" or (
        name in ("matmul", "bmm") and all(facts.is_data(a) for a in src.args[:2])
        and (facts.is_probs(src.args[0]) or facts.in_attention(src)))


@rule(*ZERO_PRESERVING)
def plan_activation(node, facts):
    """A zero-preserving activation applied straight to an attention output (LeViT's
    hardswish before the projection) keeps the heads apart: f acts on each head's channels
    alone, so with per-head components f(Σ_h t_h) = Σ_h f(t_h). Anywhere else (or in
    per-token mode, where the terms of one head overlap) its output is a root."""
    if facts.granularity == "tokens":
        return _nonlinear(node, facts)
    x = node.args[0]
    src = x
    if not _is_attention_output(src, facts):
        return _nonlinear(node, facts)
    fn = node.target

    def emit(em, node):
        c = em.merged(x)
        if len(c.labels) > 1:
            out = em.call(pusher(fn, 0), c.node, (None,) + tuple(em.orig_arg(a) for a in node.args[1:]),
                          {k: em.orig_arg(v) for k, v in node.kwargs.items()})
        else:
            out = em.call(rt.as_terms, em.orig(node))
        return [em.chunk(out, c.labels)]
    return Plan.linear([x], emit, disjoint=True)


for _n in NONLINEAR:
    if _n not in ZERO_PRESERVING:
        RULES.setdefault(_n, _nonlinear)
_nonlinear.__doc__ = "A nonlinear op: its output value is a component (frozen at this forward)."


def _check_inplace(node: Node) -> None:
    """An in-place op (x.add_(y)) follows the rule of its functional form, provided nothing reads
    the mutated tensor afterwards (its later readers would otherwise see stale terms)."""
    mutated = node.args[0]
    if not isinstance(mutated, Node):
        return
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    later = [u for u in mutated.users if u is not node and order[u] > order[node]]
    if later:
        raise UnsupportedGraphError(
            f"in-place {op_name(node)} mutates a tensor that {later[0].name} reads afterwards", node)


def plan_for(node: Node, facts) -> Plan:
    """The plan for a data-dependent node on the linear path, or UnsupportedGraphError."""
    name = op_name(node)
    fn = RULES.get(name)
    if fn is None and name.endswith("_") and not name.startswith("_") and name[:-1] in RULES:
        _check_inplace(node)
        fn = RULES[name[:-1]]
    if fn is None:
        raise UnsupportedGraphError(
            f"no decomposition rule for ATen op {name!r} on the path to the output "
            "(the output depends on it, and fxdecomp cannot tell whether it is linear)", node)
    try:
        return fn(node, facts)
    except UnsupportedGraphError:
        raise
    except Exception as e:  # a rule crashed on an unexpected signature: say where
        raise UnsupportedGraphError(f"rule for {name!r} failed: {e}", node) from e
