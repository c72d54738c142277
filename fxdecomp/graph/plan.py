"""What a rule decides for one node of the linear path: a ``Plan``; and the demand protocol.

Plan kinds (``PlanKind``):

* ``LINEAR``: the node's terms are a linear function of the terms of ``inputs`` (every other
  argument frozen at the forward pass's value); ``emit`` builds that function in the new graph,
  ``demand`` (optional) says which rows of the inputs a given set of output rows needs.
* ``ROOT``: the walk stops; the node's value is itself one component (an activation, a product of
  two data-dependent values, ...). ``reason`` says why.
* ``ATTENTION``: a root that can be expanded per head and per (head, source token); ``attention``
  says where the frozen probabilities and the values are.
* ``CONST``: a value that depends on no input data (a parameter, a constant): one constant term.
* ``INPUT``: the model's input: the embedding component.
* ``INIT``: a forced root (``layers=``): everything upstream of it becomes one ``init`` term.

The demand protocol
-------------------
A *demand* on a value is ``None`` (every element is needed) or ``Rows(dim, index, group)``: only
positions ``index`` along ``dim`` are (with ``group`` = g: ``dim`` is g outer rows times an inner
symbolic size, and the outer rows ``index`` are needed with all their inner elements). The demand
of a node is the union of what its consumers ask of it; the output's demand is ``None``.

A rule's ``DemandFn`` is called as ``demand(node, d)`` with ``d`` the demand on the node's own
output, and returns

* ``None``: "I cannot compute only those rows": the inputs are computed in full, ``emit`` builds
  the full terms and the pass narrows them to ``d`` afterwards; or
* a ``Requests`` dict ``{input: Demand}`` for the node's plan inputs (an input left out is
  needed in full). ``emit`` then runs on inputs narrowed to what was requested and must return
  the terms of exactly the rows ``d`` of the node's output (``em.layout(node)``); ``em.orig(a)``
  gives the frozen value of argument ``a`` narrowed the same way as its terms.

A rule without a ``DemandFn`` behaves as if it returned ``None``. Returning ``{}`` for ``d is None``
(nothing narrowed) is always correct. A future token-functional demand (a weighted sum over rows
instead of a subset) extends ``Demand``; rules that do not understand it return ``None``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple, Optional

from torch.fx import Node

if TYPE_CHECKING:  # the emitter lives in rewrite; rules receive it, this layer only names it
    Emitter = Any
    Chunk = Any


class PlanKind(str, Enum):
    LINEAR = "linear"
    ROOT = "root"
    ATTENTION = "attention"
    CONST = "const"
    INPUT = "input"
    INIT = "init"


ROOT_KINDS = frozenset({PlanKind.ROOT, PlanKind.ATTENTION, PlanKind.CONST, PlanKind.INPUT,
                        PlanKind.INIT})
# roots that carry data (a residual branch that reaches one of them is a block of its own)
DATA_ROOT_KINDS = frozenset({PlanKind.ROOT, PlanKind.ATTENTION, PlanKind.INPUT, PlanKind.INIT})


class Rows(NamedTuple):
    """Positions ``index`` along ``dim`` (``group``: see the demand protocol above)."""
    dim: int
    index: tuple
    group: Optional[int] = None


Demand = Optional[Rows]
Requests = dict  # {input node: Demand}
DemandFn = Callable[[Node, Demand], Optional[Requests]]
EmitFn = Callable[["Emitter", Node], list]   # -> list[Chunk]


@dataclass(frozen=True)
class AttentionForm:
    """Where an attention root's frozen probabilities P and values V are, so it can be split
    per (head, source token): O = P @ V. ``sdpa``: the node is scaled_dot_product_attention (P
    is recomputed from q, k); ``matmul``: the node is P @ V; ``einsum``: an einsum of P and V
    with ``equation`` of the form ``...qk,...kd->...qd``."""
    form: Literal["sdpa", "matmul", "einsum"]
    probs: Node | None = None
    values: Node | None = None
    equation: str | None = None


@dataclass(frozen=True)
class Plan:
    kind: PlanKind
    inputs: tuple = ()                      # nodes whose terms flow into this node (LINEAR)
    emit: EmitFn | None = None              # LINEAR: builds the terms in the new graph
    demand: DemandFn | None = None          # LINEAR: rows of the inputs the output rows need
    reason: str = ""                        # ROOT: why the walk stops here
    attention: AttentionForm | None = None  # ATTENTION: where P and V are

    @staticmethod
    def linear(inputs, emit: EmitFn, demand: DemandFn | None = None) -> "Plan":
        return Plan(PlanKind.LINEAR, tuple(inputs), emit, demand)

    @staticmethod
    def root(reason: str) -> "Plan":
        return Plan(PlanKind.ROOT, reason=reason)

    @staticmethod
    def attend(form: AttentionForm) -> "Plan":
        return Plan(PlanKind.ATTENTION, reason=f"attention ({form.form})", attention=form)

    @property
    def is_root(self) -> bool:
        return self.kind in ROOT_KINDS
