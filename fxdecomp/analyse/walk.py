"""Walk backwards from the output and find the linear path, its roots and the residual blocks.

Every node on the linear path gets a ``Plan`` (from the rule table the facts carry). Nodes where the walk stops
are *roots*: the input, constants (parameters and what is computed from them alone), nonlinear
values and attention outputs. Residual branches fall out of the graph: an add whose two inputs
both carry data is a *merge*; the side that depends on the other (the branch reads the stream) is
the branch, and every node is assigned to the first merge it reaches on a branch side.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from ..errors import UnsupportedGraphError
from ..graph.ops import aten, op_key
from ..graph.plan import DATA_ROOT_KINDS, Plan, PlanKind
from .facts import GraphFacts

MERGE_OPS = (aten.add, aten.sub)   # an add/sub of two data values is a residual merge


@dataclass
class Walk:
    facts: GraphFacts
    output: Node                          # the tensor node the target returns
    plans: dict[Node, Plan]               # every node on the linear path (roots included)
    order: list[Node]                     # the same nodes, topological order
    merges: list[Node] = field(default_factory=list)
    branch_merge: dict[Node, Node] = field(default_factory=dict)  # node -> first branch merge
    stream_sides: dict[Node, list[Node]] = field(default_factory=dict)


def output_node(gm: GraphModule) -> Node:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    val = out.args[0]
    while isinstance(val, (tuple, list)):
        if len(val) != 1:
            raise UnsupportedGraphError(
                f"the target returns {len(val)} values; fxdecomp decomposes one tensor. Wrap the "
                "model so it returns the representation you want (see fxdecomp.capture.adapters)")
        val = val[0]
    if not isinstance(val, Node) or not isinstance(val.meta.get("val"), torch.Tensor):
        raise UnsupportedGraphError("the target's output is not a tensor", out)
    return val


def walk(gm: GraphModule, facts: GraphFacts, cut: frozenset = frozenset()) -> Walk:
    """Find the linear path from the output. ``cut`` nodes are forced roots (the ``init`` term)."""
    target = output_node(gm)
    need = {target}
    plans: dict[Node, Plan] = {}
    for n in reversed(facts.nodes):
        if n not in need:
            continue
        if n in cut:
            plans[n] = Plan(PlanKind.INIT, reason="init")
        elif not facts.is_data(n):
            plans[n] = Plan(PlanKind.CONST)
        elif n.op == "placeholder":
            plans[n] = Plan(PlanKind.INPUT)
        elif n.op == "call_function":
            plan = facts.rules.plan_for(n, facts)
            plans[n] = plan
            for i in plan.inputs:
                if not facts.is_tensor(i):
                    raise UnsupportedGraphError(f"linear input {i} is not a tensor", n)
                need.add(i)
        else:
            raise UnsupportedGraphError(f"cannot decompose through a {n.op} node", n)
    order = [n for n in facts.nodes if n in plans]
    w = Walk(facts, target, plans, order)
    _find_merges(w)
    return w


def _find_merges(w: Walk) -> None:
    """Assign each linear-path node to the first residual merge it reaches on a branch side."""
    facts = w.facts
    idx = {n: i for i, n in enumerate(w.order)}
    reach: dict[Node, int] = {}
    for n in w.order:
        b = 1 << idx[n]
        for i in w.plans[n].inputs:
            b |= reach[i]
        reach[n] = b
    assigned = 0
    data_roots = 0
    for n in w.order:
        if w.plans[n].kind in DATA_ROOT_KINDS:
            data_roots |= 1 << idx[n]
    for n in w.order:
        plan = w.plans[n]
        if plan.kind != PlanKind.LINEAR or op_key(n) not in MERGE_OPS:
            continue
        sides = [i for i in plan.inputs if facts.is_data(i)]
        if len(sides) != 2 or sides[0] is sides[1]:
            continue
        a, b = sides
        if facts.is_ancestor(a, b):
            branches, streams = [b], [a]
        elif facts.is_ancestor(b, a):
            branches, streams = [a], [b]
        else:
            branches, streams = [a, b], []
        stream_reach = 0
        for s in streams:
            stream_reach |= reach[s]
        fresh = 0
        for s in branches:
            fresh |= reach[s] & ~assigned & ~stream_reach
        if not fresh & data_roots:
            continue  # a linear branch (a conv position encoding): not a block of its own
        w.merges.append(n)
        w.stream_sides[n] = streams
        assigned |= fresh
        while fresh:
            low = fresh & -fresh
            w.branch_merge[w.order[low.bit_length() - 1]] = n
            fresh ^= low
