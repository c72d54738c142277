"""Attention: scaled_dot_product_attention, P @ V products, and the softmax that makes P.

softmax(q kᵀ·s + mask) @ v: with the probabilities P frozen, the output is linear in v, so it is
split per head (dim −3) and per source token (the key index). The attention output is a component
root: what q, k and v computed stays inside the component. The emitter expands it
(``Emitter._attention_terms``) from the ``AttentionForm`` in the plan.

An attention on the residual stream's path (in no residual branch: a learned probe pooling the
final tokens, see ``fxdecomp.analyse.stream``) is instead planned as linear in V with P frozen:
the components upstream flow through it.
"""
from __future__ import annotations

import re

import torch.nn.functional as F
from torch.fx import Node

from ...errors import UnsupportedGraphError
from ...graph.ops import aten
from ...graph.plan import AttentionForm, Plan
from .. import runtime as rt
from . import RULES
from .common import Tail, einsum_emit, ops, push_emit


@RULES.rule(aten.scaled_dot_product_attention, name="sdpa", examples=(
        lambda: Tail(lambda m, x: F.scaled_dot_product_attention(
            *(x.unflatten(-1, (2, 4)).transpose(1, 2),) * 3).transpose(1, 2).flatten(2)),))
def plan_sdpa(node, facts):
    """The attention output is a root, split per head and per source token on demand; on the
    stream's path it is linear in v: Σ_c P @ v_c with P = softmax(q kᵀ·s + mask) frozen."""
    if node in facts.stream_attention:
        return _stream_sdpa(node)
    return Plan.attend(AttentionForm("sdpa"))


def _stream_sdpa(node: Node) -> Plan:
    q, k, v = node.args[:3]
    kw = dict(zip(("attn_mask", "dropout_p", "is_causal"), node.args[3:6]))
    kw.update(node.kwargs)
    if kw.get("dropout_p", 0.0):
        raise UnsupportedGraphError("attention dropout is active (dropout_p > 0)", node)

    def emit(em, node):
        c = em.merged(v)
        probs = em.call(rt.attention_probs, em.orig(q), em.orig(k),
                        em.orig_arg(kw.get("attn_mask")), bool(kw.get("is_causal", False)),
                        kw.get("scale"), bool(kw.get("enable_gqa", False)))
        t = c.node
        if kw.get("enable_gqa"):
            t = em.call(rt.repeat_kv, t, em.orig(q))
        return [em.chunk(em.call(rt.frozen_attention_terms, t, probs), c.labels)]
    return Plan.linear([v], emit)


@RULES.rule(*ops("softmax", "_softmax", "_safe_softmax"), name="softmax", makes_probs=True,
            nonlinear=True, examples=(lambda: Tail(lambda m, x: x.softmax(-1)),))
def plan_softmax(node, facts):
    """softmax is nonlinear: its output is a root (and marks attention probabilities)."""
    return Plan.root("nonlinear op softmax")


_PV = re.compile(r"^(?P<p>(?:\.\.\.)?[a-zA-Z]*?)(?P<q>[a-zA-Z])(?P<k>[a-zA-Z]),"
                 r"(?P<p2>(?:\.\.\.)?[a-zA-Z]*?)(?P<k2>[a-zA-Z])(?P<d>[a-zA-Z])->"
                 r"(?P<p3>(?:\.\.\.)?[a-zA-Z]*?)(?P<q2>[a-zA-Z])(?P<d2>[a-zA-Z])$")


def is_pv_equation(equation: str) -> bool:
    """Is ``equation`` a batched P @ V (``...qk,...kd->...qd``, same batch letters on all three,
    q, k, d distinct and not batch letters)?"""
    m = _PV.match(equation.replace(" ", ""))
    if not m:
        return False
    p, q, k, d = m["p"], m["q"], m["k"], m["d"]
    letters = set(p.replace("...", ""))
    return (m["p2"] == p and m["p3"] == p and m["k2"] == k and m["q2"] == q and m["d2"] == d
            and len({q, k, d}) == 3 and not letters & {q, k, d}
            and len(letters) == len(p.replace("...", "")))


def product_attention(node: Node, facts, probs, values, equation: str | None = None):
    """An attention plan for a product P·V of two data values (matmul/einsum) where P is
    attention probabilities (or the product runs in an attention module); None otherwise."""
    if not (facts.is_probs(probs) or facts.in_attention(node)):
        return None
    if node in facts.stream_attention:   # on the stream's path: linear in V, P frozen
        if equation is None:
            return Plan.linear([values], push_emit(1))
        return Plan.linear([values], einsum_emit(equation, 1, node.args[1]))
    if equation is None:
        return Plan.attend(AttentionForm("matmul", probs, values))
    return Plan.attend(AttentionForm("einsum", probs, values, equation))
