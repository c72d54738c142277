"""Heads wherever heads exist: channel groups that stay disjoint until a linear map.

A residual branch whose root is a nonlinear op (an activation after a bilinear upsample of a
strided low-resolution attention; a grouped convolution with one group per head, a norm and an
activation) is one component, although its value is a sum over heads: if every op between the
heads' source and the root acts per channel, channel group h of the root depends on head h alone,
and the linear map after the root (the projection) is exact on any split of its input. So the
root's value is split into its channel groups, one component per head (exact: the groups sum to
the value).

Sources of heads: an attention output with a head dimension ([B, H, N, dh], H > 1) or a grouped
convolution (groups G > 1 with more than one input channel per group; depthwise convolutions are
per channel, not heads). The groups are found by probing, not by op lists: the ops from the
source to the root are re-run on the example with one head of the source perturbed at a time,
and the channels of the root that change must be exactly that head's contiguous block along one
dim. Only segments that read no other data (the residual stream does not re-enter) qualify.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg

from ..graph.ops import aten, op_key
from ..graph.plan import PlanKind
from .structure import Structure
from .walk import Walk

_CONV = (aten.conv2d, aten.conv1d, aten.convolution)
_PRODUCT = (aten.matmul, aten.bmm, aten.einsum)


def _source_heads(facts, s: Node) -> int | None:
    """Number of heads ``s`` produces along dim 1, or None."""
    val = s.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 3:
        return None
    rule = facts.rules.rule_for(s)
    key = op_key(s)
    if (rule is not None and rule.name == "sdpa") or (
            key in _PRODUCT and val.dim() == 4 and facts.is_probs(
                s.args[1][0] if key is aten.einsum else s.args[0])):
        return int(val.shape[1]) if val.dim() == 4 and int(val.shape[1]) > 1 else None
    if key in _CONV:
        groups = s.args[8] if key is aten.convolution else (s.args[6] if len(s.args) > 6 else 1)
        weight = s.args[1].meta.get("val")
        if isinstance(groups, int) and groups > 1 and weight is not None and weight.shape[1] > 1:
            return groups
    return None


def _find_source(facts, root: Node, module: str):
    """The nearest head source upstream of ``root`` inside ``module``."""
    seen, frontier = set(), [root]
    while frontier:
        n = frontier.pop(0)
        for a in n.all_input_nodes:
            if a in seen or not facts.is_data(a):
                continue
            seen.add(a)
            if module and not facts.module_path(a).startswith(module):
                continue
            heads = _source_heads(facts, a)
            if heads is not None:
                return a, heads
            frontier.append(a)
    return None


def _segment(facts, source: Node, root: Node) -> list[Node] | None:
    """Data nodes from ``source`` (excluded) to ``root`` (included), topological; None if any of
    them reads data that does not come from the source."""
    nodes = [n for n in facts.nodes[facts.index[source] + 1: facts.index[root] + 1]
             if facts.is_data(n) and facts.is_ancestor(source, n)
             and (n is root or facts.is_ancestor(n, root))]
    inside = set(nodes) | {source}
    for n in nodes:
        if any(facts.is_data(a) and a not in inside for a in n.all_input_nodes):
            return None
    return nodes


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, keep: set):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.keep:
            self.values[n] = out
        return out


def _rerun(segment: list[Node], values: dict, source: Node, start: torch.Tensor):
    new = {source: start}

    def get(a):
        return new[a] if a in new else values[a]
    for n in segment:
        args = map_arg(n.args, get)
        kwargs = map_arg(n.kwargs, get)
        new[n] = n.target(*args, **kwargs)
    return new[segment[-1]]


def _group_dim(changed: list[torch.Tensor], heads: int) -> int | None:
    """A dim along which head h changed exactly the h-th of ``heads`` contiguous blocks."""
    shape = changed[0].shape
    for d in range(1, len(shape)):
        if shape[d] % heads or shape[d] == heads and heads == 1:
            continue
        b = shape[d] // heads
        ok = True
        for h, c in enumerate(changed):
            along = c.movedim(d, 0).flatten(1).any(1)
            want = torch.zeros(shape[d], dtype=torch.bool)
            want[h * b:(h + 1) * b] = True
            if not torch.equal(along, want):
                ok = False
                break
        if ok:
            return d
    return None


def channel_heads(gm: GraphModule, w: Walk, structure: Structure, example: torch.Tensor
                  ) -> dict[Node, tuple[int, int]]:
    """Branch roots whose value splits into heads: root -> (channel dim, heads)."""
    facts = w.facts
    found: dict[Node, tuple] = {}
    for n in w.order:
        if w.plans[n].kind != PlanKind.ROOT or n not in w.branch_merge:
            continue
        site = structure.site(n)
        src = _find_source(facts, n, site.module)
        if src is None:
            continue
        segment = _segment(facts, src[0], n)
        if segment:
            found[n] = (src, segment)
    if not found:
        return {}
    keep = {src for (src, _), seg in found.values()}
    for (_, seg) in found.values():
        for m in seg:
            keep.update(a for a in m.all_input_nodes)
    rec = _Recorder(gm, keep)
    with torch.no_grad():
        rec.run(example)
        out = {}
        g = torch.Generator().manual_seed(0)
        for n, ((source, heads), segment) in found.items():
            base_in = rec.values[source]
            base = _rerun(segment, rec.values, source, base_in)
            noise = torch.randn(base_in.shape, generator=g, dtype=base_in.dtype)
            changed = []
            for h in range(heads):
                mask = torch.zeros(base_in.shape[1], dtype=base_in.dtype)
                blk = base_in.shape[1] // heads
                mask[h * blk:(h + 1) * blk] = 1
                mask = mask.view((1, -1) + (1,) * (base_in.dim() - 2))
                changed.append(_rerun(segment, rec.values, source, base_in + noise * mask) != base)
            d = _group_dim(changed, heads)
            if d is not None:
                out[n] = (d, heads)
    return out
