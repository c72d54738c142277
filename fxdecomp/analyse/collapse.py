"""Did the decomposition expand the residual blocks the model has, or did one op absorb them?

A nonlinear op on the residual stream's path to the output (an activation on the whole stream, an
unsupported readout) is a root: everything upstream of it, every block included, becomes one
component. That is exact and useless, so it is judged from the module structure in the graph:

* the model's residual blocks: every add/sub of two data values in the whole graph where one
  side is upstream of the other (x + f(x)) and the branch side holds a nonlinear op (a linear
  branch such as a conv position encoding is not a block), grouped by the module it runs in,
  counting only those upstream of the output;
* the expanded blocks: those the walk found on the linear path (``Structure.blocks``);
* absorbed: the model's blocks that were not expanded and do not sit inside an expanded one
  (a residual inside an expanded branch is part of that branch by design).

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


def model_blocks(facts, output: Node) -> dict[str, list[Node]]:
    """The model's residual blocks upstream of ``output``: module path -> its merges."""
    bits = facts.ancestor_bits
    out_bits = bits[output] | (1 << facts.index[output])
    blocks: dict[str, list[Node]] = {}
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
                blocks.setdefault(facts.module_path(n), []).append(n)
                break
            body ^= low
    return blocks


def block_coverage(w: Walk, structure: Structure) -> BlockCoverage:
    facts = w.facts
    have = model_blocks(facts, w.output)
    inside = [b for b in structure.blocks if b]
    absorbed = [p for p in have if p not in structure.blocks
                and not any(p.startswith(b + ".") for b in inside)]
    total = len(set(have) | set(structure.blocks))
    if not absorbed:
        return BlockCoverage(total, len(structure.blocks), ())
    merges = [m for p in absorbed for m in have[p]]
    roots = [n for n in w.order if w.plans[n].kind in (PlanKind.ROOT, PlanKind.ATTENTION)]
    absorber = max(roots, key=lambda r: (sum(facts.is_ancestor(m, r) for m in merges),
                                         -facts.index[r]), default=None)
    return BlockCoverage(total, len(structure.blocks), tuple(absorbed), absorber,
                         facts.module_path(absorber) if absorber is not None else "")
