"""Adding an op by following docs/adding-an-op.md touches one rule module's worth of code.

``aten.tril`` (keep the lower triangle of the last two dims) has no rule in the library: a model
using it on the path to the output is refused, naming the op. The registration below is all a
new rule module would hold: a plan function stating the identity, an emit built from runtime
functions, a demand function. Registered, the same model decomposes exactly, with the row demand
from a CLS-style readout reaching the new rule.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.analyse import demand
from fxdecomp.analyse.facts import GraphFacts
from fxdecomp.analyse.walk import walk
from fxdecomp.capture.export import capture
from fxdecomp.graph.plan import Plan, Rows
from fxdecomp.graph.rule import Rule
from fxdecomp.graph.shapes import sizes
from fxdecomp.rewrite import runtime as rt
from fxdecomp.rewrite.rules import RULES

aten = torch.ops.aten


# ------------------------------------------------------ what would go into one rule module
def plan_tril(node, facts):
    """tril(x, k) keeps x[..., i, j] where j <= i + k and zeroes the rest: a fixed mask, so
    tril(Σ x_c) = Σ tril(x_c). Rows of the leading dims commute with it."""
    x = node.args[0]

    def emit(em, node):
        c = em.merged(x)                                     # x's terms, one [C, ...] tensor
        args = (None,) + tuple(em.orig_arg(a) for a in node.args[1:])
        out = em.call(rt.pusher(node.target, 0), c.node, args, {})
        return [em.chunk(out, c.labels)]

    def demand(node, d):
        if d is None:
            return {}
        return {x: Rows(d.dim, d.index, d.group)} if d.dim < len(sizes(node)) - 2 else None
    return Plan.linear([x], emit, demand=demand)


TRIL = Rule("tril", (aten.tril,), plan=plan_tril, doc=plan_tril.__doc__)
# --------------------------------------------------------------------------------------------


class _Model(nn.Module):
    """tokens -> proj -> h + mlp(h) -> tril over (tokens, channels) of 3 copies -> copy 1."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        h = self.proj(x)
        h = h + self.mlp(h)
        return torch.tril(h.unsqueeze(1).expand(-1, 3, -1, -1), diagonal=1)[:, 1]


def test_new_op_refused_then_exact_once_registered():
    torch.manual_seed(0)
    model, x = _Model().eval(), torch.randn(3, 16, 8)
    with pytest.raises(fxdecomp.UnsupportedGraphError, match="'tril'"):
        fxdecomp.decompose(model, x)
    with RULES.added(TRIL):
        dm = fxdecomp.decompose(model, x, granularity="blocks")
        with torch.no_grad():
            d, ref = dm(x), model(x)
        # the row demand of the readout reached the new rule: it computes copy 1 only
        gm, _ = capture(model, x)
        w = walk(gm, GraphFacts(gm, RULES, "blocks"))
        wanted, requests = demand.compute(w)
        (node,) = [n for n in w.order if n.target is aten.tril.default]
        assert wanted[node] == Rows(1, (1,), None) and node in requests
    assert TRIL not in RULES.rules                          # unregistered again
    err = float((d.components.double().sum(0) - ref.double()).abs().max() / ref.double().abs().max())
    assert err <= 1e-5
    assert {"embed", "mlp", "bias"} <= {lab.kind for lab in d.labels}
    assert "push_tril" in dm.code                           # the new rule emitted the terms
    with pytest.raises(fxdecomp.UnsupportedGraphError, match="'tril'"):
        fxdecomp.decompose(model, x)                        # and refused again


def test_registry_refuses_bad_registrations():
    with pytest.raises(fxdecomp.FxDecompError, match="already covered"):
        RULES.register(Rule("mine", (aten.linear,), plan=plan_tril))
    with pytest.raises(TypeError, match="ATen overload packets"):
        Rule("mine", (torch.tril,), plan=plan_tril)
