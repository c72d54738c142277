"""Attention: scaled_dot_product_attention, P @ V products, and the softmax that makes P.

softmax(q kᵀ·s + mask) @ v: with the probabilities P frozen, the output is linear in v, so it is
split per head (dim −3) and per source token (the key index). The attention output is a component
root: what q, k and v computed stays inside the component. The emitter expands it
(``Emitter._attention_terms``) from the ``AttentionForm`` in the plan.

An attention on the residual stream's path (in no residual branch: a learned probe pooling the
final tokens, see ``fxdecomp.analyse.stream``) is instead planned as linear in V with P frozen:
the components upstream flow through it. Where its value is a linear map of a value on the path
(timm's AttentionPoolLatent: kv = linear(x), split into heads), P is applied to the terms of x
first, as one token functional per pool head and query, and W_v after: no component is carried
through the kv linear at every token (``_pool_before_values``).
"""
from __future__ import annotations

import math
import operator
import re

import torch.nn.functional as F
from torch.fx import Node

from ...errors import UnsupportedGraphError
from ...graph.ops import aten, op_key
from ...graph.plan import AttentionForm, Plan
from ...graph.shapes import norm_dim, sizes
from .. import runtime as rt
from . import RULES
from .common import Tail, arg, einsum_emit, ops, push_emit


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
        probs = em.call(rt.attention_probs, em.orig(q), em.orig(k),
                        em.orig_arg(kw.get("attn_mask")), bool(kw.get("is_causal", False)),
                        kw.get("scale"), bool(kw.get("enable_gqa", False)))
        chain = _pooled_values(v)
        if chain is not None and not kw.get("enable_gqa") and em.layout(node) is None \
                and all(em.demand.get(n) is None for n in chain[-1]):
            return _pool_before_values(em, chain, probs)
        c = em.merged(v)
        t = c.node
        if kw.get("enable_gqa"):
            t = em.call(rt.repeat_kv, t, em.orig(q))
        return [em.chunk(em.call(rt.frozen_attention_terms, t, probs), c.labels)]
    return Plan.linear([v], emit)


def _pooled_values(v: Node):
    """The value of a learned-probe pool made as timm's AttentionPoolLatent makes it, v =
    unbind(permute(reshape(linear(x, W, b), [B, N, S, H, dh]), [2, 0, 3, 1, 4]), 0)[i]:
    (x, W, b, (S, H, dh), i, the nodes from x to v); None for any other form."""
    if op_key(v) is not operator.getitem or op_key(v.args[0]) is not aten.unbind:
        return None
    unbind, index = v.args
    if norm_dim(arg(unbind, 1, "dim", 0), len(sizes(unbind.args[0]))) != 0:
        return None
    perm = unbind.args[0]
    if op_key(perm) is not aten.permute or len(sizes(perm)) != 5 \
            or [norm_dim(d, 5) for d in perm.args[1]] != [2, 0, 3, 1, 4]:
        return None
    shaped = perm.args[0]
    if op_key(shaped) not in (aten.reshape, aten.view, aten._unsafe_view):
        return None
    lin = shaped.args[0]
    if op_key(lin) is not aten.linear or not isinstance(lin.args[0], Node):
        return None
    ins, outs, x = sizes(lin), sizes(shaped), lin.args[0]
    if len(ins) != 3 or len(sizes(x)) != 3 or None in outs[2:] or ins[1] != outs[1] \
            or ins[2] != math.prod(outs[2:]):
        return None
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    return x, lin.args[1], bias, tuple(outs[2:]), int(index), (x, lin, shaped, perm, unbind, v)


def _pool_before_values(em, chain, probs) -> list:
    """A pool's frozen P applied to the terms of its input x before its value projection: per
    pool head, one weighted sum over the N tokens of each component (P [B, H, L, N] as H·L
    token functionals), then W_v of that head (``rt.pooled_values``), so no component is
    carried through the kv linear at every token (its key half is never needed). The kv
    linear's bias is a term of its own, Σ_n P · b_v."""
    x, weight, bias, split, index, nodes = chain
    lin = nodes[1]
    w, out = em.orig(weight), []
    for c in em.terms(x, pending_ok=True, windows_ok=True):
        if c.fac is not None and c.fac[0] == "probe" and c.win[1] == 1 and c.proj is not None \
                and c.cdim is None and c.block is None:
            # per-token terms as a probe (tokens mode): P's functionals composed with the
            # attention's own P (σ per pool head, head and source token), the value rows mapped
            # once per (head, pool head); left pending (W = I) so that the out-projection and
            # the output directions fold in before anything is written at full width
            t = em.call(rt.pooled_probe_values, c.node, c.win[0], c.fac[2], c.fac[1], probs, w,
                        split, index, *c.proj)
            eye = em.call(rt.identity_weight, split[2], em.orig(nodes[-1]))
            out.append(em.pending(t, eye, 1, c.labels))
            continue
        c = em.unwindow(c)     # (em.terms already densified and unwindowed the plain ones)
        if c.proj is not None and c.cdim is not None:
            c = em.materialize(c)
        t = c.node if c.proj is not None else em.call(rt.expand_terms, c.node, em.orig(x))
        proj = (None, 1) if c.proj is None else c.proj
        out.append(em.chunk(em.call(rt.pooled_values, t, probs, w, split, index, *proj,
                                    em.backend), c.labels))
    if bias is not None:
        anchor, em.anchor = em.anchor, lin     # named and placed as the kv linear's own bias
        b = em.call(rt.pooled_bias, probs, em.orig(bias), split, index)
        out.append(em.const_chunk(b, bias, "bias"))
        em.anchor = anchor
    return out


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
