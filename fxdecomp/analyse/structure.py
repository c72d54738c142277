"""Name components from the graph itself: residual blocks (the module each merge runs in), their
branches (the child module a root sits in) and kinds, using the export's module-stack metadata.

No per-architecture code: a block is wherever a residual add runs; a block with one merge is one
branch (an MBConv, a ResNet bottleneck); a block with several merges (attention + MLP) names each
branch by the child module its root lives in (``blocks.3.attn``, ``blocks.3.mlp``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch.fx import Node

from .walk import Walk

_MLP_WORDS = ("mlp", "ffn", "feedforward", "feed_forward", "fc2")
_CONV_WORDS = ("conv", "mixer", "dw", "bottleneck", "mbconv")
_ATTN_WORDS = ("attn", "attention")


@dataclass(frozen=True)
class Site:
    """Where a root (or a constant) joins the output: its branch name, module, block index."""
    name: str
    module: str
    layer: int | None
    block: str | None


class Structure:
    def __init__(self, walk: Walk, block_order: list[str] | None = None):
        self.walk = walk
        self.facts = walk.facts
        order = []
        for m in walk.merges:
            path = self.facts.module_path(m)
            if path not in order:
                order.append(path)
        self.blocks: list[str] = block_order if block_order is not None else order
        self.merge_count = Counter(self.facts.module_path(m) for m in walk.merges)
        self.first_merge = min((self.facts.index[m] for m in walk.merges), default=None)

    def layer_of(self, block: str | None) -> int | None:
        if block is None or block not in self.blocks:
            return None
        return self.blocks.index(block)

    def site(self, node: Node) -> Site:
        """Branch name, module and layer of a linear-path node."""
        merge = self.walk.branch_merge.get(node)
        if merge is None:
            path = self.facts.module_path(node)
            return Site(name=path, module=path, layer=None, block=None)
        block = self.facts.module_path(merge)
        stack = self.facts.module_stack(node)
        if self.merge_count[block] == 1:
            name = block
        elif block in stack and stack.index(block) + 1 < len(stack):
            name = stack[stack.index(block) + 1]
        elif stack and (block == "" or stack[-1].startswith(block + ".")):
            name = stack[-1]
        else:
            name = (block + "." if block else "") + node.name
        return Site(name=name or "<root>", module=name, layer=self.layer_of(block), block=block)

    def before_first_merge(self, node: Node) -> bool:
        return self.first_merge is None or self.facts.index[node] < self.first_merge

    def embed_name(self, node: Node) -> str:
        """Top-level child module of the first linear op that consumes the input."""
        for user in node.users:
            if user in self.walk.plans:
                stack = [p for p in self.facts.module_stack(user) if p]
                if stack:
                    return stack[0]
        return "embed"

    def classify(self, node: Node, site: Site) -> str:
        """Kind of a plain (non-attention) branch root, from its module names and its op."""
        stack = self.facts.module_stack(node)
        inner = [p for p in stack if site.block is None or p.startswith(site.block + ".")
                 or (site.block == "" and p)] or [site.module]
        words = " ".join(p.rsplit(".", 1)[-1] + " " + self.facts.module_class.get(p, "")
                         for p in inner).lower()
        if any(w in words for w in _MLP_WORDS):
            return "mlp"
        if any(w in words for w in _ATTN_WORDS):
            return "attn"
        if any(w in words for w in _CONV_WORDS):
            return "conv"
        branch = [n for n in self.walk.order
                  if self.walk.branch_merge.get(n) is self.walk.branch_merge.get(node)]
        if any(self.facts.rules.has(n, "conv_like") for n in branch + node.all_input_nodes):
            return "conv"
        return "other"
