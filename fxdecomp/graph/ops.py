"""Op identity: which ATen op a graph node calls.

Rules are keyed by ``OpOverloadPacket`` (``aten.view`` covers ``view.default``, ``view.dtype``
...), never by a bare name, so a custom op that happens to be called ``cumsum`` in another
namespace never matches ``aten.cumsum``'s rule.
"""
from __future__ import annotations

import operator
from typing import Union

import torch
from torch._ops import OpOverload, OpOverloadPacket
from torch.fx import Node

from ..errors import RuleError

aten = torch.ops.aten

# What a rule is registered for: an ATen overload packet, or operator.getitem (the items of a
# multi-output op).
OpKey = Union[OpOverloadPacket, type(operator.getitem)]
NAMESPACES = ("aten",)


def packet_of(target) -> OpOverloadPacket | None:
    """The overload packet of a call_function target (None for Python callables)."""
    if isinstance(target, OpOverloadPacket):
        return target
    if isinstance(target, OpOverload):
        return target.overloadpacket
    return None


def op_key(node: Node):
    """The registry key of a call_function node: its ATen packet, ``operator.getitem``, or None
    (another namespace or a Python callable: no rule can match it)."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        return operator.getitem
    packet = packet_of(node.target)
    if packet is None or namespace(packet) not in NAMESPACES:
        return None
    return packet


def namespace(packet: OpOverloadPacket) -> str:
    """``aten`` for ``aten.view``: the part of the qualified name before ``::``."""
    return packet._qualified_op_name.split("::", 1)[0]


def check_key(key) -> OpKey:
    """A key a rule may be registered for: an ATen packet (namespace checked) or getitem."""
    if key is operator.getitem:
        return key
    packet = packet_of(key)
    if packet is None:
        raise RuleError(f"rules are registered for ATen overload packets (torch.ops.aten.X), "
                        f"got {key!r}")
    if namespace(packet) not in NAMESPACES:
        raise RuleError(f"rules are registered for ops in {NAMESPACES}, got "
                        f"{packet._qualified_op_name}")
    return packet


def op_name(node: Node) -> str:
    """A readable name of the op a node calls (``view``, ``getitem``, ``mylib::op``)."""
    t = node.target
    if t is operator.getitem:
        return "getitem"
    packet = packet_of(t)
    if packet is not None:
        ns = namespace(packet)
        return packet.__name__ if ns == "aten" else f"{ns}::{packet.__name__}"
    return getattr(t, "__name__", str(t))


def functional_of(packet: OpOverloadPacket) -> OpOverloadPacket | None:
    """``aten.add`` for the in-place ``aten.add_`` (None if ``packet`` is not in-place)."""
    name = packet.__name__
    if not name.endswith("_") or name.startswith("_"):
        return None
    return getattr(getattr(torch.ops, namespace(packet)), name[:-1], None)
