"""Normalisation: the scale is frozen at the forward pass, centring is linear, the shift is a
constant component of its own (kind ``bias``). Eval BatchNorm is a per-channel affine map."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from ...errors import UnsupportedGraphError
from ...graph.ops import aten
from ...graph.plan import Plan
from ...graph.shapes import sizes
from ...graph.rule import Rule
from .. import runtime as rt
from . import RULES
from .common import Tail, arg, as_image, bias_chunk, ops, rowwise_demand


@RULES.rule(aten.layer_norm, examples=(lambda: nn.LayerNorm(8),))
def plan_layer_norm(node, facts):
    """LayerNorm with frozen σ: γ ⊙ (x − mean x)/σ is linear in x (centre each component);
    β is a constant component."""
    x, shape = node.args[0], node.args[1]
    weight, bias, eps = arg(node, 2, "weight"), arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5)

    def emit(em, node):
        folded = _fold_norm(em, x, shape, weight, eps, centered=True,
                            inv=lambda: _forward_inv(em, node, x, shape, weight, bias, eps))
        if folded is not None:
            return folded + bias_chunk(em, node, bias, -1)
        c = em.merged(x)
        out = em.call(rt.layer_norm_terms, c.node, em.orig(x), shape, em.orig_arg(weight), eps)
        return [em.chunk(out, c.labels)] + bias_chunk(em, node, bias, -1)
    return Plan.linear([x], emit, demand=rowwise_demand(x, len(shape)))


def _forward_inv(em, node: Node, x: Node, shape, weight, bias, eps) -> Node:
    """The frozen 1/σ of the LayerNorm ``node``: where it runs on all rows, its copy in the new
    graph becomes ``rt.layer_norm_with_inv``, so the forward's own pass over x gives it;
    otherwise (the rule works on some rows) ``rt.inv_std`` of those rows."""
    if em.layout(x) is not None or em.layout(node) is not None or em.env[node].users:
        return em.call(rt.inv_std, em.orig(x), len(shape), eps, True)
    stale = em.env[node]
    both = em.call(rt.layer_norm_with_inv, em.env[x], list(shape), em.orig_arg(weight),
                   em.orig_arg(bias), eps)
    em.env[node] = em.call(operator.getitem, both, 0)
    em.graph.erase_node(stale)
    return em.call(operator.getitem, both, 1)


def _fold_norm(em, x: Node, shape, weight, eps, centered: bool, inv=None) -> list | None:
    """A LayerNorm/RMSNorm over the last dim applied to pending projections without evaluating
    them: centring and γ fold into W (``rt.fold_centering``/``rt.fold_rows``), the frozen
    per-row 1/σ scales the head-blocked input (b values per row instead of E). The other
    chunks are normalised one by one, in order. None: nothing pending (or a norm over several
    dims)."""
    if len(shape) != 1:
        return None
    if not any(c.proj is not None for c in em.terms_of[x]):
        if not em.project:
            return None
        # output directions given (``project=``): the norm's centring, γ and every later
        # linear map fold into a [k, E] map, and its 1/σ and every later move or mean of
        # positions apply to a positions map, so the terms are read once, where they are
        # reduced, instead of normalised at full width here (W = I first: e.g. the patch
        # embedding's norm of a hierarchical model)
        chunks = [em.as_pending(c, em.orig(x), sizes(x)[-1]) for c in em.terms(x)]
    else:
        chunks = em.terms(x, pending_ok=True, lazy_ok=True, windows_ok=True)
    inv = inv() if inv is not None else em.call(rt.inv_std, em.orig(x), 1, eps, centered)
    gamma = em.orig_arg(weight)
    out = []
    for c in chunks:   # in order: the components keep their order
        if c.proj is None:   # the same frozen 1/σ, computed once for all chunks
            out.append(em.chunk(em.call(rt.normalize_terms, c.node, inv, gamma, centered), c.labels))
            continue
        w = em.call(rt.fold_centering, c.proj[0], gamma) if centered else \
            (em.call(rt.fold_rows, c.proj[0], gamma) if gamma is not None else c.proj[0])
        out.append(em.scaled(em.refold(c, w), inv))
    return out


@RULES.rule(aten.rms_norm, examples=(lambda: nn.RMSNorm(8),))
def plan_rms_norm(node, facts):
    """RMSNorm with frozen rms: γ ⊙ x / rms(x) is linear in x."""
    x, shape = node.args[0], node.args[1]
    weight, eps = arg(node, 2, "weight"), arg(node, 3, "eps")

    def emit(em, node):
        folded = _fold_norm(em, x, shape, weight, eps, centered=False)
        if folded is not None:
            return folded
        c = em.merged(x)
        out = em.call(rt.rms_norm_terms, c.node, em.orig(x), shape, em.orig_arg(weight), eps)
        return [em.chunk(out, c.labels)]
    return Plan.linear([x], emit, demand=rowwise_demand(x, len(shape)))


@RULES.rule(aten.group_norm,
            examples=(lambda: nn.Sequential(Tail(lambda m, x: as_image(x)), nn.GroupNorm(2, 8)),))
def plan_group_norm(node, facts):
    """GroupNorm with frozen per-group σ: centring within a group is linear; β is constant."""
    x, groups = node.args[0], node.args[1]
    weight, bias, eps = arg(node, 2, "weight"), arg(node, 3, "bias"), arg(node, 4, "eps", 1e-5)

    def emit(em, node):
        c = em.merged(x)
        out = em.call(rt.group_norm_terms, c.node, em.orig(x), groups, em.orig_arg(weight), eps)
        return [em.chunk(out, c.labels)] + bias_chunk(em, node, bias, 1)
    return Plan.linear([x], emit)


def _batch_norm_plan(node: Node, x, weight, bias, mean, var, training, eps) -> Plan:
    """Eval BatchNorm: x·γ/√(v+ε) (linear) + (β − μ·γ/√(v+ε)) (a constant component)."""
    if training:
        raise UnsupportedGraphError("batch_norm in training mode: call model.eval() first", node)

    def emit(em, node):
        c = em.merged(x)
        w, rm, rv = em.orig_arg(weight), em.orig(mean), em.orig(var)
        out = em.call(rt.batch_norm_terms, c.node, w, rm, rv, eps)
        shift = em.call(rt.batch_norm_shift, em.orig(x), w, em.orig_arg(bias), rm, rv, eps)
        return [em.chunk(out, c.labels),
                em.const_chunk(shift, bias if isinstance(bias, Node) else node, "bias")]
    return Plan.linear([x], emit)


def _bn_example():
    bn = nn.BatchNorm2d(8)
    bn.running_mean.normal_(0, 0.3)
    bn.running_var.uniform_(0.5, 1.5)
    return nn.Sequential(Tail(lambda m, x: as_image(x)), bn)


@RULES.rule(aten.batch_norm, conv_like=True, examples=(_bn_example,))
def plan_batch_norm(node, facts):
    """Eval BatchNorm is a per-channel affine map: scale (linear) + shift (constant)."""
    x, w, b, rm, rv, training, _momentum, eps = node.args[:8]
    return _batch_norm_plan(node, x, w, b, rm, rv, training, eps)


def _bn_item(node: Node, src: Node, index: int, facts) -> Plan:
    """Output 0 of the exported eval batch norm is its affine map; the saved statistics are
    roots."""
    if index != 0:
        return Plan.root(f"output {index} of {src.target}")
    x, w, b, rm, rv, _momentum, eps = src.args[:7]
    return _batch_norm_plan(node, x, w, b, rm, rv, False, eps)


RULES.register(Rule(
    "batch_norm_eval", ops("_native_batch_norm_legit_no_training"), item_plan=_bn_item,
    plan=lambda node, facts: Plan.root("the tuple of an eval batch norm"),
    nonlinear=True, conv_like=True, doc=_bn_item.__doc__,
    examples=(lambda: Tail(lambda m, x: torch.ops.aten._native_batch_norm_legit_no_training(
        as_image(x), m.w, m.b, m.mean.detach(), m.var.detach().abs() + 0.5, 0.1, 1e-5)[0],
        w=torch.randn(8), b=torch.randn(8), mean=torch.randn(8), var=torch.randn(8)),)))


def _training(node: Node, *_):
    raise UnsupportedGraphError("batch_norm in training mode: call model.eval() first", node)


RULES.register(Rule(
    "batch_norm_training", ops("_native_batch_norm_legit", "_native_batch_norm_legit_functional"),
    plan=_training, item_plan=lambda node, src, index, facts: _training(src),
    doc="Training-mode batch norm: refused (its statistics depend on the batch).",
    refuses=(lambda: Tail(lambda m, x: F.batch_norm(as_image(x), None, None, training=True)),)))
