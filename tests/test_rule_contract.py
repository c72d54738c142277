"""The shared rule test: every registered rule joins it through its ``examples``.

Each example (a small module on tokens [B, 16, 8]) is placed three ways in one harness model:

* on the residual stream, after an attention block and an MLP block (dense terms from several
  roots);
* behind a row selection of its output (the rule sees a *demand*: only some rows are needed);
* straight on an attention output (in ``heads`` mode the rule receives *head-blocked* terms).

The examples of one rule family (one module of ``fxdecomp.rewrite.rules``) share one harness, so
one export covers a family. For ``blocks`` and ``heads`` granularity the components must sum to
the model's own output (relative error <= 1e-5), heads mode must split the attention into heads,
and every rule of the family must have planned a node on the linear path (the example really
exercises the rule). ``refuses`` examples must raise ``UnsupportedGraphError``.
"""
from __future__ import annotations

import collections
import operator

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.analyse.facts import GraphFacts
from fxdecomp.analyse.walk import walk
from fxdecomp.capture.export import capture
from fxdecomp.rewrite.rules import RULES
from fxdecomp.run.decomposed import DecomposedModel

REL_TOL = 1e-5
B, N, D, HEADS = 3, 16, 8, 2


def family(rule) -> str:
    fn = rule.plan or rule.item_plan
    return fn.__module__.rsplit(".", 1)[-1] if fn is not None else "-"


def planned_rules():
    return [r for r in RULES.rules if (r.plan or r.item_plan) and not r.shape_only]


class Harness(nn.Module):
    """x -> proj -> h + o(attn(h)) -> s + mlp(s); each tail read three ways, summed to [B, D]."""

    def __init__(self, examples):
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.qkv = nn.Linear(D, 3 * D)
        self.o = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
        self.one = nn.Parameter(torch.ones(D))
        self.tails = nn.ModuleList(ex() for ex in examples)
        self.readouts = nn.ModuleList()
        x = torch.randn(2, N, D)
        with torch.no_grad():
            for t in self.tails:
                t.eval()
                y = t(x)
                self.readouts.append(nn.ModuleList(
                    [nn.Linear(y[0].numel(), D), nn.Linear(self._rows(y)[0].numel(), D)]))

    @staticmethod
    def _rows(y):
        return y[:, 1:3] if y.dim() >= 2 and y.shape[1] > 2 else y

    def attend(self, h):
        q, k, v = self.qkv(h).unflatten(-1, (3, HEADS, D // HEADS)).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(h.shape[0], N, D)

    def forward(self, x):
        h = self.proj(x)
        a = self.attend(h)
        s = h + self.o(a)
        s = s + self.mlp(s)
        out = s[:, 0]
        for tail, (full, rows) in zip(self.tails, self.readouts):
            out = out + full(tail(s).flatten(1))                    # dense, several roots
            out = out + rows(self._rows(tail(s * self.one)).flatten(1))  # a row demand
            out = out + full(tail(a).flatten(1))                    # head-blocked input
        return out


def _harness(examples):
    torch.manual_seed(0)
    model = Harness(examples).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, torch.randn(B, N, D)


def _rel_err(d, ref) -> float:
    return float((d.components.double().sum(0) - ref.double()).abs().max() / ref.double().abs().max())


FAMILIES = sorted({family(r) for r in planned_rules()})


def test_every_rule_has_an_example():
    missing = [r.name for r in planned_rules() if not (r.examples or r.refuses)]
    assert not missing, f"rules without examples (add Rule.examples): {missing}"
    assert set(FAMILIES) == {"attention", "layout", "linear", "norms", "pointwise", "pooling"}


@pytest.mark.parametrize("fam", FAMILIES)
def test_family_exact(fam):
    rules = [r for r in planned_rules() if family(r) == fam]
    examples = [ex for r in rules for ex in r.examples]
    model, x = _harness(examples)
    with torch.no_grad():
        ref = model(x)
    captured = capture(model, x)
    gm = captured[0]
    for granularity in ("blocks", "heads"):
        # every rule of the family plans at least one node of the linear path
        w = walk(gm, GraphFacts(gm, RULES, granularity))
        used = {RULES.rule_for(n) for n in w.plans}
        used |= {RULES.rule_for(n.args[0]) for n in w.plans if n.target is operator.getitem}
        unused = [r.name for r in rules if r.examples and r not in used]
        assert not unused, f"{fam}: examples never reach rules {unused}"
        dm = DecomposedModel(model, x, granularity, _captured=captured)
        with torch.no_grad():
            d = dm(x)
        err = _rel_err(d, ref)
        if err > REL_TOL:  # name the culprit: rerun each example alone
            bad = []
            for r in rules:
                for ex in r.examples:
                    m1, x1 = _harness([ex])
                    with torch.no_grad():
                        if _rel_err(fxdecomp.decompose(m1, x1, granularity)(x1), m1(x1)) > REL_TOL:
                            bad.append(r.name)
            pytest.fail(f"{fam} {granularity}: relative error {err:.2e}; inexact rules: {bad}")
        # every function the rewritten graph calls is torch's, operator's or the runtime's
        private = {getattr(n.target, "__module__", "") for n in dm.graph_module.graph.nodes
                   if n.op == "call_function"} - {"fxdecomp.rewrite.runtime"}
        assert not [m for m in private if m.startswith("fxdecomp")], private
        kinds = collections.Counter(lab.kind for lab in d.labels)
        assert kinds["mlp"] >= 1 and kinds["embed"] >= 1
        if granularity == "heads":
            assert kinds["attn_head"] >= HEADS, dict(kinds)


@pytest.mark.parametrize("rule", [r for r in planned_rules() if r.refuses], ids=lambda r: r.name)
def test_refusals(rule):
    for ex in rule.refuses:
        model, x = _harness([ex])
        with pytest.raises(fxdecomp.UnsupportedGraphError):
            fxdecomp.decompose(model, x, granularity="blocks")
