"""Demand analysis: which rows of each linear-path value does the output actually read?

A representation usually reads one token (CLS) or a slice of tokens. Per-token ops commute with
taking rows, so terms only need computing for those rows: a ViT's attention heads then cost one
query row each instead of N, and per-token contributions are formed for the needed rows only.

A demand is ``None`` (every element) or ``Rows(dim, index, group)``. It is propagated backwards
from the output through the rules' ``Plan.demand`` functions; a rule without one asks for
everything from its inputs and its own output is narrowed afterwards. The union of the demands of
a node's consumers is what it computes. The protocol is written down in ``fxdecomp.graph.plan``.
"""
from __future__ import annotations

from torch.fx import Node

from ..errors import FxDecompError
from ..graph.plan import Demand, PlanKind, Rows
from ..graph.shapes import sizes
from .walk import Walk


def union(demands: list[Demand]) -> Demand:
    if not demands or any(d is None for d in demands):
        return None
    keys = {(d[0], d[2]) for d in demands}
    if len(keys) != 1:
        return None
    (dim, group), = keys
    return Rows(dim, tuple(sorted(set(i for d in demands for i in d[1]))), group)


def compute(w: Walk) -> tuple[dict[Node, Demand], dict[Node, dict]]:
    """Returns (demand of every linear-path node, requested demands per propagating node)."""
    contributions: dict[Node, list[Demand]] = {n: [] for n in w.order}
    demand: dict[Node, Demand] = {}
    requests: dict[Node, dict] = {}
    for n in reversed(w.order):
        d = None if n is w.output else union(contributions[n])
        if d is not None and d[2] is None and (sizes(n)[d[0]] is None
                                               or len(d[1]) == sizes(n)[d[0]]):
            d = None  # never narrow a symbolic dim (the batch); all rows = no narrowing
        elif d is not None and d[2] is not None and len(d[1]) == d[2]:
            d = None
        demand[n] = d
        plan = w.plans[n]
        if plan.kind != PlanKind.LINEAR:
            continue
        req = plan.demand(n, d) if plan.demand is not None else None
        if req is None:
            for i in plan.inputs:
                contributions[i].append(None)
            continue
        requests[n] = req
        for i in plan.inputs:
            contributions[i].append(req.get(i))
    return demand, requests


def positions(have: Demand, want: Demand):
    """Indices to take from a value laid out as ``have`` to get layout ``want`` (None: as is)."""
    if want == have:
        return None
    if want is None:
        raise FxDecompError(f"internal: cannot widen a value narrowed to {have}")
    dim, idx, group = want
    if have is None:
        return Rows(*want)
    if have[0] != dim or have[2] != group:
        raise FxDecompError(f"internal: layout mismatch {have} -> {want}")
    where = {j: k for k, j in enumerate(have[1])}
    return Rows(dim, tuple(where[i] for i in idx), None if group is None else len(have[1]))
