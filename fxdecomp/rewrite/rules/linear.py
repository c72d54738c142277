"""Linear maps with frozen weights: linear, convolution, matmul, einsum, addmm.

Each is linear in its one data-dependent operand; a bias is a constant component of its own. A
product of two data-dependent values is a root, unless one side is attention probabilities:
then it is an attention output (see ``attention.py``).
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ...graph.ops import aten, op_key
from ...graph.plan import Plan
from ...graph.shapes import sizes
from .. import runtime as rt
from . import RULES
from .attention import product_attention
from .common import Tail as _Fn, arg, bias_chunk, einsum_emit, ops, push_emit, rowwise_demand


def _weight_args(node: Node, facts):
    """(input, weight, bias, root plan if the weight is data-dependent) of linear/conv."""
    x, w = node.args[0], node.args[1]
    bias = arg(node, 2, "bias")
    if isinstance(w, Node) and facts.is_data(w):
        return x, w, bias, Plan.root(f"{node.target} with a data-dependent weight")
    return x, w, bias, None


@RULES.rule(aten.linear, prob_transparent=True, examples=(lambda: nn.Linear(8, 5),))
def plan_linear(node, facts):
    """x ↦ x Wᵀ + b: Wᵀ applies to every component; b is a constant component of its own.
    Head-blocked input (straight from an attention output) is one batched per-head projection."""
    x, w, bias, refuse = _weight_args(node, facts)
    if refuse:
        return refuse

    def emit(em, node):
        rank = len(sizes(node))
        if len(sizes(w)) == 2 and any(c.proj is not None for c in em.terms_of[x]):
            # pending projections fold this map into their W; the others are mapped one by one
            out = [em.refold(c, em.call(rt.fold_linear, c.proj[0], em.orig(w)))
                   if c.proj is not None else
                   em.chunk(em.call(rt.linear_terms, em.unwindow(c).node, em.orig(w)), c.labels)
                   for c in em.terms(x, pending_ok=True, lazy_ok=True, windows_ok=True)]
            return out + bias_chunk(em, node, bias, -1)
        c = em.merged(x, blocked_ok=True, windows_ok=True)
        if c.win is not None and not (c.block is not None and c.block[0] == rank - 1
                                      and len(sizes(w)) == 2):
            c = em.densify(c)
        if c.block is not None and c.block[0] == rank - 1 and len(sizes(w)) == 2:
            # evaluated where the terms are gathered, with later linear maps folded in; terms
            # of a window attention get their window map (rows of dim 0 modulo the windows)
            if c.win is not None and c.fac is not None and c.fac[3] == "bqc":
                # factored and probed: weights ω and rows r [1, B', Q, 1] move (not s
                # [K, B', Q, 1]), P is read at r where reduced; v [K, B', dh] the value rows
                both = em.call(rt.token_probe, c.fac[1], c.fac[2], c.fac[4])
                win = (em.call(operator.getitem, both, 1), c.win[1])
                out = em.pending(em.call(operator.getitem, both, 0), em.orig(w), c.block[1],
                                 c.labels, win=win,
                                 fac=("probe", em.call(operator.getitem, both, 2), c.fac[1]))
            else:   # (one window without the factors: nothing to carry)
                win = None if c.win is None or c.win[1] == 1 else \
                    (em.call(rt.window_map, c.node, c.win[1]), c.win[1])
                out = em.pending(c.node, em.orig(w), c.block[1], c.labels, win=win)
        elif c.block is None and len(c.labels) == 1 and len(sizes(w)) == 2:
            # one component (an MLP's hidden activation) is the whole input, so its term is
            # the forward's own output less the bias: no second matmul, and E wide instead of
            # the hidden width for every later op (a mean over tokens, a patch merging)
            out = em.chunk(em.call(rt.linear_output_terms, em.orig(node), em.orig(bias)), c.labels)
        else:
            c = em.densify(c)
            out = em.chunk(em.call(F.linear, c.node, em.orig(w)), c.labels)
        return [out] + bias_chunk(em, node, bias, -1)
    return Plan.linear([x], emit, demand=rowwise_demand(x, 1))


def _conv_example():
    return nn.Sequential(_Fn(lambda m, x: x.transpose(1, 2).reshape(x.shape[0], 8, 4, 4)),
                         nn.Conv2d(8, 6, 3, padding=1), nn.ConvTranspose2d(6, 4, 2, stride=2))


@RULES.rule(*ops("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d", "convolution"), name="conv", conv_like=True,
            examples=(_conv_example,))
def plan_conv(node, facts):
    """Convolution with a fixed kernel is linear in its input; the bias is its own component."""
    x, w, bias, refuse = _weight_args(node, facts)
    if refuse:
        return refuse

    def emit(em, node):
        if _pointwise_conv(node) and any(c.proj is not None for c in em.terms_of[x]):
            # a 1x1 convolution is a linear map of the channel dim (1): pending projections
            # with their channels there fold it into W; the other terms become pending with
            # W = I first (no convolution of every component: the map waits for the final mean)
            w2 = em.call(torch.flatten, em.orig(w), 1)
            out = []
            for c in em.terms(x, pending_ok=True, channel_ok=True, windows_ok=True):
                if c.proj is None or c.cdim != 1:
                    c = em.densify(c)
                    t = em.call(rt.expand_terms, c.node, em.orig(x))
                    c = em.pending(t, em.call(rt.identity_weight, sizes(x)[1], em.orig(x)), 1,
                                   c.labels, 1)
                # windowed inputs keep their window map and factors (the map acts on channels)
                out.append(replace(c, proj=(em.call(rt.fold_linear, c.proj[0], w2), c.proj[1])))
            return out + bias_chunk(em, node, bias, 1)
        c = em.merged(x)
        if len(c.labels) == 1:
            # one component is the whole input: the forward's own output less the bias
            out = em.call(rt.linear_output_terms, em.orig(node), em.orig_arg(bias), 1)
            return [em.chunk(out, c.labels)] + bias_chunk(em, node, bias, 1)
        args = tuple(None if i == 0 else (None if i == 2 else em.orig_arg(a))
                     for i, a in enumerate(node.args))
        out = em.call(rt.pusher(node.target, 0), c.node, args, {})
        return [em.chunk(out, c.labels)] + bias_chunk(em, node, bias, 1)
    return Plan.linear([x], emit)


# argument positions after (input, weight, bias) of aten.conv2d / aten.convolution, with the
# value each takes in a pointwise convolution
_CONV2D_ARGS = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
_CONVOLUTION_ARGS = (("stride", 1), ("padding", 0), ("dilation", 1), ("transposed", 0),
                     ("output_padding", 0), ("groups", 1))


def _pointwise_conv(node: Node) -> bool:
    """A 2D convolution with a 1x1 kernel, stride 1, no padding, no groups, not transposed, on
    a batched NCHW input: y[:, o] = Σ_i W[o, i] x[:, i] (+ b[o]), a linear map of dim 1."""
    names = {aten.conv2d: _CONV2D_ARGS, aten.convolution: _CONVOLUTION_ARGS}.get(op_key(node))
    w = node.args[1]
    if names is None or len(sizes(node.args[0])) != 4 or len(sizes(w)) != 4 \
            or tuple(sizes(w)[2:]) != (1, 1):
        return False
    for i, (name, want) in enumerate(names):
        v = arg(node, 3 + i, name, want)
        if isinstance(v, str):      # padding="valid" / "same": none for a 1x1 kernel
            continue
        if any(e != want for e in (v if isinstance(v, (list, tuple)) else [v])):
            return False
    return True


def _is_data(facts, a) -> bool:
    return isinstance(a, Node) and facts.is_data(a)


@RULES.rule(aten.matmul, aten.bmm, aten.mm, name="matmul",
            examples=(lambda: _Fn(lambda m, x: x @ m.w, w=torch.randn(8, 5)),
                      lambda: _Fn(lambda m, x: torch.bmm(m.a.expand(x.shape[0], 3, 16), x),
                                  a=torch.randn(1, 3, 16))))
def plan_matmul(node, facts):
    """a @ b with one side fixed is linear in the other. With both data-dependent, if one side is
    attention probabilities (derived from a softmax) the product is an attention output: a root
    that can be split per head and per source token (P frozen, linear in V)."""
    a, b = node.args[0], node.args[1]
    if _is_data(facts, a) and _is_data(facts, b):
        return product_attention(node, facts, a, b) or Plan.root("matmul of two data-dependent values")
    return Plan.linear([node.args[0 if _is_data(facts, a) else 1]],
                       push_emit(0 if _is_data(facts, a) else 1))


@RULES.rule(aten.einsum, examples=(
        lambda: _Fn(lambda m, x: torch.einsum("bnd,de->bne", x, m.w), w=torch.randn(8, 5)),))
def plan_einsum(node, facts):
    """einsum with exactly one data-dependent operand is linear in it."""
    eq, operands = node.args[0], node.args[1]
    data = [i for i, o in enumerate(operands) if _is_data(facts, o)]
    if len(data) != 1:
        if len(data) == 2 and len(operands) == 2:
            found = product_attention(node, facts, operands[0], operands[1], equation=eq)
            if found is not None:
                return found
        return Plan.root("einsum of several data-dependent operands")
    (k,) = data
    return Plan.linear([operands[k]], einsum_emit(eq, k, operands))


@RULES.rule(aten.addmm, aten.baddbmm, name="addmm", examples=(
        lambda: _Fn(lambda m, x: torch.addmm(m.b, x.reshape(-1, 8), m.w, beta=0.5, alpha=2.0)
                    .reshape(x.shape[0], -1, 5), b=torch.randn(5), w=torch.randn(8, 5)),))
def plan_addmm(node, facts):
    """β·bias + α·(a @ b): linear in the data operand of the product; bias is a constant term."""
    bias, a, b = node.args[0], node.args[1], node.args[2]
    if _is_data(facts, a) and _is_data(facts, b) or _is_data(facts, bias):
        return Plan.root("addmm with several data-dependent operands")
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    pos = 1 if _is_data(facts, a) else 2
    mm = aten.bmm.default if op_key(node) is aten.baddbmm else aten.mm.default

    def emit(em, node):
        c = em.merged(node.args[pos])
        args = (None, em.orig(b)) if pos == 1 else (em.orig(a), None)
        out = em.call(rt.pusher(mm, pos - 1), c.node, args, {})
        if alpha != 1:
            out = em.call(operator.mul, out, alpha)
        const = em.call(rt.addmm_bias, em.orig(bias), em.orig(node), beta)
        return [em.chunk(out, c.labels), em.const_chunk(const, bias, "bias")]
    return Plan.linear([node.args[pos]], emit)
