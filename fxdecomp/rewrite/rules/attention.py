"""Attention: scaled_dot_product_attention, P @ V products, and the softmax that makes P.

softmax(q kᵀ·s + mask) @ v: with the probabilities P frozen, the output is linear in v, so it is
split per head (dim −3) and per source token (the key index). The attention output is a component
root: what q, k and v computed stays inside the component. The emitter expands it
(``Emitter._attention_terms``) from the ``AttentionForm`` in the plan.
"""
from __future__ import annotations

import re

import torch.nn.functional as F
from torch.fx import Node

from ...graph.ops import aten
from ...graph.plan import AttentionForm, Plan
from . import RULES
from .common import Tail, ops


@RULES.rule(aten.scaled_dot_product_attention, name="sdpa", examples=(
        lambda: Tail(lambda m, x: F.scaled_dot_product_attention(
            *(x.unflatten(-1, (2, 4)).transpose(1, 2),) * 3).transpose(1, 2).flatten(2)),))
def plan_sdpa(node, facts):
    """The attention output is a root, split per head and per source token on demand."""
    return Plan.attend(AttentionForm("sdpa"))


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
    if equation is None:
        return Plan.attend(AttentionForm("matmul", probs, values))
    return Plan.attend(AttentionForm("einsum", probs, values, equation))
