"""``Rule``: one registered object per op family; ``RuleTable``: the registry the stages share.

A rule names the ATen ops it covers (overload packets, namespace checked), how a node of one of
them plans (``plan(node, facts) -> Plan``: linear / root / attention, with the demand and emit
functions inside the plan), how an item of a multi-output op plans (``item_plan``), and the
properties other stages ask about, as attributes:

=================  ==============================================================================
shape_only         the value depends on the input's shape only (``sym_size``, ``zeros_like``)
moves_layout       a pure layout op (view, permute, copy): an attention output seen through it
                   is still one, and head blocks are tracked through it
prob_transparent   attention probabilities seen through it are still probabilities (P @ V)
makes_probs        it makes attention probabilities (softmax)
conv_like          a branch containing it is a ``conv`` component when module names say nothing
nonlinear          its output is a root (the walk stops)
zero_preserving    elementwise with f(0) = 0: exact on terms with disjoint supports (heads)
=================  ==============================================================================

``examples`` are small module factories (input [B, 16, 8] tokens) that the shared rule test
(``tests/test_rule_contract.py``) runs for every registered rule, exactness checked;
``refuses`` are examples the rule must refuse with ``UnsupportedGraphError``. See
``docs/adding-an-op.md``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from torch.fx import Node

from ..errors import RuleError, UnsupportedGraphError
from .ops import OpKey, check_key, functional_of, op_key, op_name, packet_of
from .plan import Plan

PlanFn = Callable[[Node, Any], Plan]                       # (node, GraphFacts) -> Plan
ItemPlanFn = Callable[[Node, Node, int, Any], Plan]        # (getitem, source, index, facts)
PROPERTIES = ("shape_only", "moves_layout", "prob_transparent", "makes_probs", "conv_like",
              "nonlinear", "zero_preserving")


@dataclass(frozen=True, eq=False)
class Rule:
    name: str
    ops: tuple
    plan: PlanFn | None = None
    item_plan: ItemPlanFn | None = None
    shape_only: bool = False
    moves_layout: bool = False
    prob_transparent: bool = False
    makes_probs: bool = False
    conv_like: bool = False
    nonlinear: bool = False
    zero_preserving: bool = False
    examples: tuple = field(default=(), repr=False)   # () -> nn.Module on [B, 16, 8] tokens
    refuses: tuple = field(default=(), repr=False)    # examples it must refuse (with a reason)
    doc: str = field(default="", repr=False)

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(check_key(k) for k in self.ops))
        if not self.ops:
            raise RuleError(f"rule {self.name!r} covers no op")


class RuleTable:
    """Rules by op. ``plan_for(node, facts)`` is what the analysis calls for every node on the
    linear path; ``rule_for(node)`` gives the rule (and its properties) of any node."""

    def __init__(self) -> None:
        self._by_key: dict = {}
        self._rules: list[Rule] = []

    # ------------------------------------------------------------------------------ registry
    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(self._rules)

    def register(self, rule: Rule) -> Rule:
        taken = [k for k in rule.ops if k in self._by_key]
        if taken:
            raise RuleError(f"rule {rule.name!r}: {[str(k) for k in taken]} already covered by "
                            f"{self._by_key[taken[0]].name!r}")
        for k in rule.ops:
            self._by_key[k] = rule
        self._rules.append(rule)
        return rule

    def unregister(self, rule: Rule) -> None:
        for k in rule.ops:
            if self._by_key.get(k) is rule:
                del self._by_key[k]
        self._rules.remove(rule)

    @contextlib.contextmanager
    def added(self, rule: Rule) -> Iterator[Rule]:
        """Register ``rule`` for the duration of a ``with`` block (tests, experiments)."""
        self.register(rule)
        try:
            yield rule
        finally:
            self.unregister(rule)

    def rule(self, *ops: OpKey, name: str | None = None, **props) -> Callable[[PlanFn], PlanFn]:
        """Decorator: register ``plan(node, facts) -> Plan`` as the rule for ``ops``."""
        def deco(fn: PlanFn) -> PlanFn:
            self.register(Rule(name or fn.__name__.removeprefix("plan_"), ops, plan=fn,
                               doc=fn.__doc__ or "", **props))
            return fn
        return deco

    # ------------------------------------------------------------------------------ lookup
    def rule_for(self, node) -> Rule | None:
        if not isinstance(node, Node):
            return None
        key = op_key(node)
        return None if key is None else self._by_key.get(key)

    def has(self, node, prop: str) -> bool:
        """Does ``node``'s op have property ``prop`` (one of ``PROPERTIES``)?"""
        rule = self.rule_for(node)
        return rule is not None and getattr(rule, prop)

    def plan_for(self, node: Node, facts) -> Plan:
        """The plan for a data-dependent node on the linear path, or UnsupportedGraphError."""
        rule = self.rule_for(node)
        if rule is None:
            functional = functional_of(packet_of(node.target)) if packet_of(node.target) else None
            if functional is not None and functional in self._by_key:
                _check_inplace(node)
                rule = self._by_key[functional]
        if rule is None or rule.plan is None:
            raise UnsupportedGraphError(
                f"no decomposition rule for ATen op {op_name(node)!r} on the path to the output "
                "(the output depends on it, and fxdecomp cannot tell whether it is linear)", node)
        try:
            return rule.plan(node, facts)
        except UnsupportedGraphError:
            raise
        except Exception as e:  # a rule crashed on an unexpected signature: say where
            raise UnsupportedGraphError(f"rule {rule.name!r} for {op_name(node)!r} failed: {e}",
                                        node) from e


def _check_inplace(node: Node) -> None:
    """An in-place op (x.add_(y)) follows the rule of its functional form, provided nothing reads
    the mutated tensor afterwards (its later readers would otherwise see stale terms)."""
    mutated = node.args[0]
    if not isinstance(mutated, Node):
        return
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    later = [u for u in mutated.users if u is not node and order[u] > order[node]]
    if later:
        raise UnsupportedGraphError(
            f"in-place {op_name(node)} mutates a tensor that {later[0].name} reads afterwards", node)
