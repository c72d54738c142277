"""Facts about an exported graph that the rules and the walk need: which nodes carry data, which
are constants, which are attention probabilities, and which module each node came from."""
from __future__ import annotations

import re
from functools import cached_property

import torch
from torch.fx import GraphModule, Node

from ..rewrite.rules import op_name

# Ops whose value does not depend on the *values* of their inputs, only on shapes.
SHAPE_ONLY = {
    "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "zeros_like", "ones_like",
    "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full", "arange", "zeros",
    "ones", "full", "empty", "scalar_tensor", "_assert_tensor_metadata", "eye",
}

# Ops that keep "these are attention probabilities" (used to recognise P @ V).
PROBS_TRANSPARENT = {
    "dropout", "view", "reshape", "_unsafe_view", "permute", "transpose", "expand", "clone",
    "contiguous", "to", "_to_copy", "type_as", "masked_fill", "unsqueeze", "squeeze", "select",
    "slice", "flatten", "unflatten", "detach", "alias", "narrow", "index", "mul", "div", "linear",
    "add",
}
SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}

_AT_SUFFIX = re.compile(r"@\d+$")


class GraphFacts:
    def __init__(self, gm: GraphModule, granularity: str = "heads", prefix: str = ""):
        self.gm = gm
        self.granularity = granularity
        self.prefix = prefix
        self.nodes: list[Node] = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.data: set[Node] = set()
        for n in self.nodes:
            if n.op == "placeholder":
                if isinstance(n.meta.get("val"), torch.Tensor):
                    self.data.add(n)
            elif n.op == "call_function":
                if op_name(n) in SHAPE_ONLY:
                    continue
                if any(a in self.data for a in n.all_input_nodes):
                    self.data.add(n)
        self.module_class: dict[str, str] = {}
        for n in self.nodes:
            for path, cls in self._stack(n):
                self.module_class.setdefault(path, cls)

    # ----------------------------------------------------------------------------------------
    def is_data(self, n) -> bool:
        return isinstance(n, Node) and n in self.data

    def is_tensor(self, n) -> bool:
        return isinstance(n, Node) and isinstance(n.meta.get("val"), torch.Tensor)

    def is_probs(self, n, depth: int = 12) -> bool:
        """Is ``n`` attention probabilities: a softmax seen through shape ops, dropout, masks,
        scaling, renormalisation (ConViT's gated mix divided by its sum) and head mixing
        (CaiT's talking heads)?"""
        if not isinstance(n, Node) or depth <= 0 or n.op != "call_function":
            return False
        name = op_name(n)
        if name in SOFTMAX:
            return True
        if name not in PROBS_TRANSPARENT:
            return False
        if name == "linear":
            return not self.is_data(n.args[1]) and self.is_probs(n.args[0], depth - 1)
        if name in ("mul", "add"):
            return any(self.is_probs(a, depth - 1) for a in n.args[:2] if self.is_data(a))
        return self.is_probs(n.args[0], depth - 1)

    def in_attention(self, n: Node) -> bool:
        """Does ``n`` run inside a module whose name or class says attention?"""
        return any(w in (p.rsplit(".", 1)[-1] + self.module_class.get(p, "")).lower()
                   for p in self.module_stack(n) for w in ("attn", "attention"))

    # ----------------------------------------------------------------------------------------
    def strip(self, path: str) -> str:
        """Drop the target wrapper's attribute (``model.``/``visual.``) from a module path."""
        p = self.prefix
        if p and (path + ".").startswith(p):
            return path[len(p):]
        return path

    def _stack(self, n: Node) -> list[tuple[str, str]]:
        stack = n.meta.get("nn_module_stack") or {}
        out = []
        for path, cls in stack.values():
            path = _AT_SUFFIX.sub("", str(path))
            if path.startswith("L['self']"):  # older exporters
                path = path[len("L['self']"):].lstrip(".")
            path = self.strip(path)
            cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
            out.append((path, cls.rsplit(".", 1)[-1]))
        return out

    def module_stack(self, n: Node) -> list[str]:
        """Module paths from outermost to innermost ("" is the root module)."""
        return [p for p, _ in self._stack(n) if p != "_empty_nn_module_stack_from_metadata_hook"]

    def module_path(self, n: Node) -> str:
        stack = self.module_stack(n)
        return stack[-1] if stack else ""

    @cached_property
    def ancestor_bits(self) -> dict[Node, int]:
        """Bitmask of every node's ancestors (all edges, not only the linear path)."""
        bits: dict[Node, int] = {}
        for n in self.nodes:
            b = 0
            for a in n.all_input_nodes:
                b |= bits[a] | (1 << self.index[a])
            bits[n] = b
        return bits

    def is_ancestor(self, a: Node, b: Node) -> bool:
        return bool(self.ancestor_bits[b] >> self.index[a] & 1)
