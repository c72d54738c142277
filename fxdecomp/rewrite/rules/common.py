"""Pieces the rule families share: demand transfer functions and emit builders.

Emit builders return ``emit(em, node) -> list[Chunk]`` (``em`` is the ``Emitter``): they read
the input's terms (``em.merged``/``em.terms``), frozen values (``em.orig``/``em.orig_arg``) and
add ops to the new graph with ``em.call(runtime_function, ...)``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import Node

from ...graph.ops import aten
from ...graph.plan import Demand, DemandFn, EmitFn, Requests, Rows
from ...graph.shapes import sizes
from .. import runtime as rt


def ops(*names: str) -> tuple:
    """The ATen packets of ``names`` that this torch has (``aten.X``)."""
    return tuple(getattr(aten, n) for n in names if hasattr(aten, n))


def arg(node: Node, i: int, name: str, default=None):
    """Argument ``i`` of ``node`` (positional, else keyword ``name``, else ``default``)."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# ------------------------------------------------------------------------------ demand
def tensor_args(node: Node) -> list[Node]:
    out = []
    torch.fx.node.map_arg((node.args, node.kwargs),
                          lambda a: out.append(a) if isinstance(a.meta.get("val"), torch.Tensor) else None)
    return out


def pointwise_demand(node: Node, d: Demand) -> Requests | None:
    """Elementwise ops (with broadcasting) commute with taking rows: every tensor argument is
    narrowed along the aligned dim, unless it broadcasts there (size 1)."""
    if d is None:
        return {}
    dim = d.dim
    rank = len(sizes(node))
    req = {}
    for a in tensor_args(node):
        s = sizes(a)
        da = dim - (rank - len(s))
        if da >= 0 and s[da] != 1:
            req[a] = Rows(da, d.index, d.group)
    return req


def same_rows(x: Node, d: Demand) -> Requests:
    """The input's rows are the output's rows (an identity, a copy)."""
    return {} if d is None else {x: d}


def mapped(x: Node, d: Demand, dim_in: int | None) -> Requests | None:
    """Narrow input ``x`` along ``dim_in`` with the output's indices (None: cannot)."""
    if d is None:
        return {}
    if dim_in is None:
        return None
    return {x: Rows(dim_in, d.index, d.group)}


def rowwise_demand(x: Node, n_trailing: int) -> DemandFn:
    """An op acting on the last ``n_trailing`` dims of ``x`` alone (a norm, a linear map)
    commutes with taking rows of the other dims."""
    def demand(node: Node, d: Demand) -> Requests | None:
        return same_rows(x, d) if d is None or d.dim < len(sizes(node)) - n_trailing else None
    return demand


# ------------------------------------------------------------------------------ emit
def push_emit(pos: int = 0, target=None) -> EmitFn:
    """Emit: apply the node's own op (or ``target``) to every component of arg ``pos``."""
    def emit(em, node):
        op = target or node.target
        chunk = em.merged(node.args[pos])
        args = tuple(None if i == pos else em.orig_arg(a) for i, a in enumerate(node.args))
        kwargs = {k: em.orig_arg(v) for k, v in node.kwargs.items()}
        out = em.call(rt.pusher(op, pos), chunk.node, args, kwargs)
        return [em.chunk(out, chunk.labels)]
    return emit


def einsum_emit(equation: str, k: int, operands) -> EmitFn:
    """Emit: einsum(equation, *operands) applied to every component of operand ``k`` (the
    others frozen)."""
    def emit(em, node):
        c = em.merged(operands[k])
        out = em.call(rt.einsum_pusher(equation, k), c.node, [em.orig_arg(o) for o in operands])
        return [em.chunk(out, c.labels)]
    return emit


def identity_emit(pos: int = 0) -> EmitFn:
    """Emit: the output's terms are the terms of arg ``pos`` (head blocks kept)."""
    def emit(em, node):
        return list(em.terms(node.args[pos], blocked_ok=True, pending_ok=True, lazy_ok=True,
                             windows_ok=True))
    return emit


def bias_chunk(em, node: Node, bias, channel_dim: int) -> list:
    """A bias argument as a constant component (kind ``bias``), broadcast to the output."""
    if bias is None:
        return []
    t = em.call(rt.bias_terms, em.orig(bias), em.orig(node), channel_dim)
    return [em.const_chunk(t, bias, "bias")]


# ------------------------------------------------------------------------------ examples
class Tail(nn.Module):
    """A rule's example (``Rule.examples``): ``fn(self, x)`` on tokens x [B, 16, 8], with its
    own parameters, run by the shared rule test behind residual and attention blocks."""

    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v))

    def forward(self, x):
        return self.fn(self, x)


def as_image(x: torch.Tensor) -> torch.Tensor:
    """Example helper: tokens [B, 16, 8] as an image [B, 8, 4, 4]."""
    return x.transpose(1, 2).reshape(x.shape[0], 8, 4, 4)
