"""Did the decomposition expand the residual blocks the model has, or did one op absorb them?

A nonlinear op on the residual stream's path to the output (an activation on the whole stream, an
unsupported readout) is a root: everything upstream of it, every block included, becomes one
component. That is exact and useless, so it is judged from the module structure in the graph:

* the model's residual blocks: every add/sub of two data values in the whole graph where one
  side is upstream of the other (x + f(x)) and the branch side holds a nonlinear op (a linear
  branch such as a conv position encoding is not a block), grouped by the module it runs in,
  counting only those upstream of the output;
* the expanded blocks: those the walk found on the linear path (``Structure.blocks``);
* absorbed: the model's blocks that were not expanded, reach the output through a root on the
  stream's path, and do not sit inside an expanded block's module (a residual inside an
  expanded branch is part of that branch by design).

``BlockCoverage.absorber`` is the root on the linear path downstream of the most absorbed blocks:
the op that swallows the stream.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

from ..graph.ops import op_key, op_name
from ..graph.plan import PlanKind
from .structure import Structure
from .walk import MERGE_OPS, Walk


@dataclass(frozen=True)
class BlockCoverage:
    """How many of the model's residual blocks the decomposition expanded."""
    total: int                      # residual blocks the model has (upstream of the output)
    expanded: int                   # of those, expanded into components
    absorbed: tuple[str, ...]       # module paths of the blocks that were not
    absorber: Node | None = None    # the root they reach the output through
    absorber_module: str = ""

    @property
    def collapsed(self) -> bool:
        return bool(self.absorbed)

    def describe(self) -> str:
        if not self.absorbed:
            return f"{self.expanded}/{self.total} residual blocks expanded"
        shown = ", ".join(self.absorbed[:4]) + (", ..." if len(self.absorbed) > 4 else "")
        op = op_name(self.absorber) if self.absorber is not None else "?"
        return (f"only {self.expanded} of the model's {self.total} residual blocks are expanded: "
                f"{len(self.absorbed)} ({shown}) reach the output only through the op {op!r} at "
                f"module {self.absorber_module or '<root>'}, which absorbs them into one component")


def _is_block_body(facts, n: Node) -> bool:
    """Does ``n`` make a residual branch a block (a nonlinear op, attention, an unknown op)?"""
    if n.op != "call_function" or not facts.is_data(n):
        return False
    rule = facts.rules.rule_for(n)
    return rule is None or rule.nonlinear or rule.makes_probs or rule.name == "sdpa"


def model_merges(facts, output: Node) -> list[Node]:
    """The model's residual merges upstream of ``output`` (x + f(x), f holding a nonlinear op)."""
    bits = facts.ancestor_bits
    out_bits = bits[output] | (1 << facts.index[output])
    merges = []
    for n in facts.nodes:
        if n.op != "call_function" or op_key(n) not in MERGE_OPS or not out_bits >> facts.index[n] & 1:
            continue
        sides = [a for a in n.args[:2] if facts.is_data(a)]
        if len(sides) != 2 or sides[0] is sides[1]:
            continue
        a, b = sides
        if facts.is_ancestor(b, a):
            a, b = b, a
        elif not facts.is_ancestor(a, b):
            continue
        body = (bits[b] | 1 << facts.index[b]) & ~(bits[a] | 1 << facts.index[a])
        while body:
            low = body & -body
            if _is_block_body(facts, facts.nodes[low.bit_length() - 1]):
                merges.append(n)
                break
            body ^= low
    return merges


def _block_name(facts, merge: Node, shared: bool) -> str:
    """The module a residual block runs in; for adds in a shared module (a loop in the parent's
    forward) the child module its branch comes from."""
    path = facts.module_path(merge)
    if not shared:
        return path
    for side in merge.args[:2]:
        if facts.is_data(side):
            stack = [p for p in facts.module_stack(side) if p]
            deeper = [p for p in stack if p.startswith(path + ".") or (path == "" and p)]
            if deeper and not facts.is_ancestor(side, merge.args[0] if side is merge.args[1]
                                                 else merge.args[1]):
                return deeper[0]
    return f"{path or '<root>'}:{merge.name}"


def block_coverage(w: Walk, structure: Structure) -> BlockCoverage:
    """Residual merges of the model that are not expanded and reach the output through a root on
    the stream's path (a nonlinear op in no residual branch) are absorbed; the root downstream of most of
    them is the absorber. Residuals inside an expanded branch belong to that branch."""
    facts = w.facts
    expanded = set(w.merges)
    # roots on the stream: in no branch, or claimed by a merge of parallel branches with no
    # stream side (FastViT's un-reparameterised mixer: x's BN identity + conv(x)); residuals in
    # the module of an expanded block are that block's own (CoaT's factor attention + conv
    # position encoding)
    def on_stream(n):
        m = w.branch_merge.get(n)
        return m is None or not w.stream_sides.get(m)
    stream_roots = [n for n in w.order if w.plans[n].kind in (PlanKind.ROOT, PlanKind.ATTENTION)
                    and on_stream(n)]
    inside = [b for b in structure.blocks if b]
    merges = [m for m in model_merges(facts, w.output) if m not in expanded
              and not any(facts.module_path(m) == b or facts.module_path(m).startswith(b + ".")
                          for b in inside)
              and any(facts.is_ancestor(m, r) for r in stream_roots)]
    total = len(structure.blocks)
    if not merges:
        return BlockCoverage(total, total, ())
    paths = [facts.module_path(m) for m in merges] + [facts.module_path(m) for m in w.merges]
    names = list(dict.fromkeys(_block_name(facts, m, paths.count(facts.module_path(m)) > 1)
                               for m in merges))
    absorber = max(stream_roots, key=lambda r: (sum(facts.is_ancestor(m, r) for m in merges),
                                                -facts.index[r]))
    return BlockCoverage(total + len(names), total, tuple(names), absorber,
                         facts.module_path(absorber))
