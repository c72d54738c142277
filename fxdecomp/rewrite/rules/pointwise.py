"""Elementwise ops: sums, products with a frozen factor, selections by a frozen condition, and
the nonlinear ops where the walk stops."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import Node

from ...graph.ops import aten, op_key, op_name
from ...graph.plan import Plan
from ...graph.rule import Rule
from .. import runtime as rt
from . import RULES
from .common import Tail, arg, ops, pointwise_demand


def _is_data(facts, a) -> bool:
    return isinstance(a, Node) and facts.is_data(a)


@RULES.rule(aten.add, aten.sub, name="add", prob_transparent=True,
            examples=(lambda: Tail(lambda m, x: (x + 1.5) - 0.5 * x.flip(1)),
                      lambda: Tail(lambda m, x: torch.sub(x, x[:, :1], alpha=2.0))))
def plan_add(node, facts):
    """a ± α·b: the terms of a and (±α·) the terms of b, side by side; a scalar is a constant."""
    a, b = node.args[0], node.args[1]
    alpha = arg(node, 2, "alpha", 1)   # add.Scalar takes it positionally, add.Tensor by keyword
    sign = -1 if op_key(node) is aten.sub else 1

    def emit(em, node):
        chunks = []
        for side, x in enumerate((a, b)):
            factor = 1 if side == 0 else sign * alpha
            if isinstance(x, Node):
                for c in em.terms(x, pending_ok=True, channel_ok=True,   # stay pending
                                  lazy_ok=True, windows_ok=True):
                    chunks.append(c if factor == 1 else em.scaled(c, factor))
            elif x != 0:
                const = em.call(rt.scalar_terms, em.orig(node), float(x) * factor)
                chunks.append(em.const_chunk(const, node, "const"))
        return chunks
    return Plan.linear([x for x in (a, b) if isinstance(x, Node)], emit, demand=pointwise_demand)


@RULES.rule(aten.rsub, examples=(lambda: Tail(lambda m, x: torch.rsub(x, 1.0, alpha=2.0)),))
def plan_rsub(node, facts):
    """rsub(a, b, α) = b − α·a: linear in a, b is a constant component."""
    a, b = node.args[0], node.args[1]
    alpha = arg(node, 2, "alpha", 1)   # rsub.Scalar takes it positionally

    def emit(em, node):
        chunks = [em.chunk(em.call(operator.mul, c.node, -alpha), c.labels) for c in em.terms(a)]
        if isinstance(b, Node):
            chunks += list(em.terms(b))
        elif b != 0:
            chunks.append(em.const_chunk(em.call(rt.scalar_terms, em.orig(node), float(b)), node, "const"))
        return chunks
    return Plan.linear([x for x in (a, b) if isinstance(x, Node)], emit, demand=pointwise_demand)


@RULES.rule(aten.neg, examples=(lambda: Tail(lambda m, x: -x),))
def plan_neg(node, facts):
    """−x is linear."""
    def emit(em, node):
        return [em.chunk(em.call(operator.neg, c.node), c.labels) for c in em.terms(node.args[0])]
    return Plan.linear([node.args[0]], emit, demand=pointwise_demand)


def _broadcasts(small: Node, big: Node) -> bool:
    """True if ``small`` broadcasts to ``big`` with at least one broadcast (size-1) axis."""
    s, b = small.meta.get("val"), big.meta.get("val")
    if s is None or b is None:
        return False
    ss, bs = list(s.shape), list(b.shape)
    ss = [1] * (len(bs) - len(ss)) + ss
    return any(x == 1 and y != 1 for x, y in zip(ss, bs))


@RULES.rule(aten.mul, prob_transparent=True, examples=(
        lambda: Tail(lambda m, x: x * m.g, g=torch.randn(8)),
        lambda: Tail(lambda m, x: x * x.detach().norm(dim=-1, keepdim=True))))
def plan_mul(node, facts):
    """a·b with one factor frozen is linear in the other. Frozen: a parameter-only value (layer
    scale), a scalar, or a data-dependent value that broadcasts (a per-row norm scale, a
    squeeze-excitation gate). A product of two full-shape data values (gating) is a root."""
    a, b = node.args[0], node.args[1]
    a_data, b_data = _is_data(facts, a), _is_data(facts, b)
    if a_data and b_data:
        if _broadcasts(b, node) and not _broadcasts(a, node):
            lin, frozen = 0, 1
        elif _broadcasts(a, node) and not _broadcasts(b, node):
            lin, frozen = 1, 0
        else:
            return Plan.root("product of two data-dependent values")
    elif b_data:
        lin, frozen = 1, 0
    else:
        lin, frozen = 0, 1

    fold = _last_dim_factor(node.args[frozen], node)

    def emit(em, node):
        other = em.orig_arg(node.args[frozen])
        out = []
        for c in em.terms(node.args[lin], pending_ok=fold is not None, lazy_ok=fold is not None,
                          windows_ok=fold is not None):
            if c.proj is None:
                out.append(em.chunk(em.call(operator.mul, em.unwindow(c).node, other), c.labels))
            elif fold == "rows":        # a layer scale γ [E]: folds into the pending W
                out.append(em.refold(c, em.call(rt.fold_rows, c.proj[0], other)))
            else:                       # a scalar or a per-row factor: scales the input
                out.append(em.scaled(c, other))
        return out
    return Plan.linear([node.args[lin]], emit, demand=pointwise_demand)


def _last_dim_factor(f, node: Node) -> str | None:
    """How a frozen factor of a product can act on a pending projection: ``"scalar"`` (a
    number, or size 1 along the last dim: scales each row), ``"rows"`` (a vector along the last
    dim only, e.g. a layer scale: folds into W), or None (evaluate first)."""
    if not isinstance(f, Node):
        return "scalar" if isinstance(f, (int, float)) else None
    s, out = f.meta.get("val"), node.meta.get("val")
    if not isinstance(s, torch.Tensor) or not isinstance(out, torch.Tensor) or s.dim() > out.dim():
        return None
    shape = list(s.shape)
    if not shape or shape[-1] == 1:
        return "scalar"
    return "rows" if all(k == 1 for k in shape[:-1]) and shape[-1] == out.shape[-1] else None


@RULES.rule(aten.div, prob_transparent=True, examples=(
        lambda: Tail(lambda m, x: F.normalize(x, dim=-1) / 3.0),))
def plan_div(node, facts):
    """a / b with b frozen is linear in a (normalisers: x / ‖x‖, x / σ)."""
    a, b = node.args[0], node.args[1]
    if _is_data(facts, b) and not _is_data(facts, a):
        return Plan.root("division by a data-dependent value")
    rounding = node.kwargs.get("rounding_mode")
    if rounding is not None:
        return Plan.root(f"div with rounding_mode={rounding!r}")

    def emit(em, node):
        other = em.orig_arg(b)
        return [em.chunk(em.call(operator.truediv, c.node, other), c.labels) for c in em.terms(a)]
    return Plan.linear([a], emit, demand=pointwise_demand)


@RULES.rule(aten.where, examples=(
        lambda: Tail(lambda m, x: torch.where(x.detach() > 0, x, 2 * x)),
        lambda: Tail(lambda m, x: torch.where(x.detach() > 0, x, 0.5))))
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
                const = em.call(rt.where_scalar, cnd, em.orig(node), float(x), keep)
                out.append(em.const_chunk(const, node, "const"))
        return out
    return Plan.linear([x for x in (a, b) if isinstance(x, Node)], emit, demand=pointwise_demand)


@RULES.rule(aten.masked_fill, prob_transparent=True, examples=(
        lambda: Tail(lambda m, x: x.masked_fill(x.detach() < -0.5, 0.25)),))
def plan_masked_fill(node, facts):
    """masked_fill(x, m, v) = where(m, v, x): linear in x; v ≠ 0 is a constant component."""
    x, mask, value = node.args[0], node.args[1], node.args[2]

    def emit(em, node):
        m = em.orig(mask)
        out = [em.chunk(em.call(rt.where_terms, c.node, m, False), c.labels) for c in em.terms(x)]
        if isinstance(value, Node) or value != 0:
            const = em.call(rt.masked_value, m, em.orig(node), em.orig_arg(value))
            out.append(em.const_chunk(const, node, "const"))
        return out
    return Plan.linear([x], emit, demand=pointwise_demand)


# ------------------------------------------------------------------------------ nonlinear
def _nonlinear(node, facts) -> Plan:
    return Plan.root(f"nonlinear op {op_name(node)}")


def is_attention_output(src, facts, depth: int = 8) -> bool:
    """Is ``src`` an attention output, or a concatenation of per-head attention outputs
    (EfficientViT's cascaded heads), seen through layout ops?"""
    while isinstance(src, Node) and facts.rules.has(src, "moves_layout"):
        src = src.args[0]
    if not (isinstance(src, Node) and src.op == "call_function") or depth <= 0:
        return False
    key = op_key(src)
    if key in (aten.cat, aten.concat):
        return all(is_attention_output(p, facts, depth - 1) for p in src.args[0])
    return key is aten.scaled_dot_product_attention or (
        key in (aten.matmul, aten.bmm) and all(facts.is_data(a) for a in src.args[:2])
        and (facts.is_probs(src.args[0]) or facts.in_attention(src)))


@RULES.rule(*ops("gelu", "relu", "relu6", "silu", "tanh", "hardswish", "hardtanh", "elu",
                 "leaky_relu", "mish", "selu", "celu"),
            name="activation", nonlinear=True, zero_preserving=True,
            examples=(lambda: Tail(lambda m, x: F.gelu(x) + F.hardswish(x)),))
def plan_activation(node, facts):
    """A zero-preserving activation applied straight to an attention output (LeViT's
    hardswish before the projection) keeps the heads apart: f acts on each head's channels
    alone, so with per-head components f(Σ_h t_h) = Σ_h f(t_h). Anywhere else (or in
    per-token mode, where the terms of one head overlap) its output is a root."""
    x = node.args[0]
    if facts.granularity == "tokens" or not is_attention_output(x, facts):
        return _nonlinear(node, facts)
    fn = node.target

    def emit(em, node):
        c = em.merged(x)
        if len(c.labels) > 1:
            out = em.call(rt.pusher(fn, 0), c.node, (None,) + tuple(em.orig_arg(a) for a in node.args[1:]),
                          {k: em.orig_arg(v) for k, v in node.kwargs.items()})
        else:
            out = em.call(rt.as_terms, em.orig(node))
        return [em.chunk(out, c.labels)]
    return Plan.linear([x], emit)


RULES.register(Rule(
    "nonlinear", ops(
        "hardsigmoid", "sigmoid", "softplus", "log_softmax", "exp", "log", "sqrt", "rsqrt", "pow",
        "abs", "sin", "cos", "erf", "clamp", "clamp_min", "clamp_max", "min", "amin", "sort",
        "topk", "reciprocal", "square", "linalg_vector_norm", "norm", "var", "std", "var_mean",
        "prelu", "glu", "maximum", "minimum", "sign", "floor", "ceil", "round", "max_pool1d",
        "max_pool3d", "max_pool2d_with_indices", "logsumexp", "atan", "atan2", "log1p", "expm1",
        "threshold", "addcmul", "lerp", "logit", "softsign", "tanhshrink", "native_layer_norm"),
    plan=_nonlinear, nonlinear=True,
    doc="A nonlinear op: its output value is a component (frozen at this forward).",
    examples=(lambda: Tail(lambda m, x: torch.exp(x) + x.pow(2) + x.sigmoid()),)))
