"""Facts about an exported graph that the rules and the walk need: which nodes carry data, which
are constants, which are attention probabilities, and which module each node came from.

What an op *is* (shape-only, probability-transparent, ...) is a property of its rule; the facts
ask the ``RuleTable`` they are given (``fxdecomp.rewrite.rules.RULES``)."""
from __future__ import annotations

import re
from functools import cached_property

import torch
from torch.fx import GraphModule, Node

from ..graph.rule import RuleTable

_AT_SUFFIX = re.compile(r"@\d+$")


class GraphFacts:
    def __init__(self, gm: GraphModule, rules: RuleTable, granularity: str = "heads",
                 prefix: str = ""):
        self.gm = gm
        self.rules = rules
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
                if rules.has(n, "shape_only"):
                    continue
                if any(a in self.data for a in n.all_input_nodes):
                    self.data.add(n)
        self._probs: dict = {}
        # attention ops on the residual stream's path to the output (in no residual branch): the
        # walk goes through them, linear in the values with the probabilities frozen
        # (``analyse.stream``)
        self.stream_attention: set[Node] = set()
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
        if self.rules.has(n, "makes_probs"):
            return True
        if not self.rules.has(n, "prob_transparent"):
            return False
        key = (n, depth)
        if key not in self._probs:
            self._probs[key] = any(self.is_probs(a, depth - 1) for a in n.all_input_nodes
                                   if self.is_data(a))
        return self._probs[key]

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
