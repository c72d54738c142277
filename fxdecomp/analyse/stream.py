"""Attention on the residual stream's path: walk through it, linear in the values.

An attention op whose output lies on the stream's path to the output rather than inside a
residual branch (a learned probe query attending over the final tokens: timm
``AttentionPoolLatent``, open_clip's attentional pooler, Hugging Face SigLIP's pooling head) would
otherwise be a root that absorbs every block upstream. With its probabilities P frozen at this
forward pass, softmax(q kᵀ) @ V is linear in V (exactly as a LayerNorm is linear with σ frozen),
so every upstream component is pushed through V-projection · P · out-projection.

Which attention ops are on the stream is read off the graph: walk, find the attention roots that
no residual merge claims as part of a branch and whose queries do not depend on the input (a
learned probe), mark them (``facts.stream_attention``; the attention rules then plan them as
linear in V) and walk again, until none is left. An attention with image-dependent queries
outside any branch (CaiT's first class-attention, whose residual stream is the constant CLS
token; LeViT's attention downsampling) stays a root of its own, split per head: the block
coverage check (``analyse.collapse``) says when such a root absorbs residual blocks.
"""
from __future__ import annotations

from torch.fx import GraphModule

from ..graph.ops import aten, op_key
from ..graph.plan import PlanKind
from .facts import GraphFacts
from .walk import Walk, walk

MAX_ROUNDS = 16   # nested stream attentions found per walk; one round per level


_PRODUCTS = (aten.matmul, aten.bmm, aten.mm, aten.baddbmm, aten.einsum)


def _score_product(facts, n, depth: int = 16):
    """The product q·kᵀ upstream of attention probabilities ``n`` (through the softmax and
    shape/scale ops), or None."""
    while depth > 0 and n is not None:
        if op_key(n) in _PRODUCTS:
            return n
        data = [a for a in n.all_input_nodes if facts.is_data(a)]
        n = data[0] if len(data) == 1 else None
        depth -= 1
    return None


def queries_fixed(facts, node) -> bool:
    """Do the queries of attention root ``node`` depend on no input data (a learned probe)?"""
    form = facts.rules.rule_for(node)
    if form is not None and form.name == "sdpa":
        return not facts.is_data(node.args[0])
    probs = node.args[1][0] if op_key(node) is aten.einsum else node.args[0]
    score = _score_product(facts, probs)
    if score is None:
        return False
    if op_key(score) is aten.einsum:
        operands = list(score.args[1])
    elif op_key(score) is aten.baddbmm:
        operands = list(score.args[1:3])
    else:
        operands = list(score.args[:2])
    return any(not facts.is_data(o) for o in operands)


def stream_attention_roots(w: Walk) -> list:
    """Attention roots of ``w`` in no residual branch whose queries are a learned probe."""
    return [n for n in w.order
            if w.plans[n].kind == PlanKind.ATTENTION and n not in w.branch_merge
            and queries_fixed(w.facts, n)]


def walk_through_stream(gm: GraphModule, facts: GraphFacts, cut: frozenset = frozenset()) -> Walk:
    """``walk`` with every attention on the stream's path planned as linear in its values."""
    w = walk(gm, facts, cut)
    for _ in range(MAX_ROUNDS):
        new = [n for n in stream_attention_roots(w) if n not in facts.stream_attention]
        if not new:
            break
        facts.stream_attention.update(new)
        w = walk(gm, facts, cut)
    return w
