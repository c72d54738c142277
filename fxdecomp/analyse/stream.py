"""Attention on the residual stream's path: walk through it, linear in the values.

An attention op whose output lies on the stream's path to the output rather than inside a
residual branch (a learned probe query attending over the final tokens: timm
``AttentionPoolLatent``, open_clip's attentional pooler, Hugging Face SigLIP's pooling head) would
otherwise be a root that absorbs every block upstream. With its probabilities P frozen at this
forward pass, softmax(q kᵀ) @ V is linear in V (exactly as a LayerNorm is linear with σ frozen),
so every upstream component is pushed through V-projection · P · out-projection.

Which attention ops are on the stream is read off the graph: walk, find the attention roots that
no residual merge claims as part of a branch, mark them (``facts.stream_attention``; the
attention rules then plan them as linear in V) and walk again, until none is left.
"""
from __future__ import annotations

from torch.fx import GraphModule

from ..graph.plan import PlanKind
from .facts import GraphFacts
from .walk import Walk, walk

MAX_ROUNDS = 16   # nested stream attentions found per walk; one round per level


def stream_attention_roots(w: Walk) -> list:
    """Attention roots of ``w`` that lie in no residual branch (on the stream's path)."""
    return [n for n in w.order
            if w.plans[n].kind == PlanKind.ATTENTION and n not in w.branch_merge]


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
