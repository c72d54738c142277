"""Static sizes of graph values. The batch is exported symbolic: its size is None here."""
from __future__ import annotations

from torch.fx import Node


def sizes(node: Node) -> tuple:
    """Static sizes of a node's value, None where the size is symbolic (the batch)."""
    val = node.meta.get("val")
    return tuple(int(s) if isinstance(s, int) else None for s in val.shape)


def rank(node: Node) -> int:
    return len(node.meta["val"].shape)


def norm_dim(dim: int, n: int) -> int:
    """A possibly negative dim index into a rank-``n`` value, as 0..n-1."""
    return dim % n if n else 0


def factors(node_or_shape) -> list[tuple[int, int]]:
    """Per dim (static coefficient, number of symbolic factors): 197·s0 -> (197, 1).

    Takes a node (reads the coefficient of a symbolic size from its expression) or a sizes
    tuple (None = one symbolic factor of coefficient 1)."""
    if isinstance(node_or_shape, Node):
        out = []
        for s in node_or_shape.meta["val"].shape:
            if isinstance(s, int):
                out.append((s, 0))
            else:
                coeff, _ = s.node.expr.as_coeff_Mul()
                out.append((int(coeff) if coeff.is_Integer else 1, 1))
        return out
    return [(1, 1) if s is None else (s, 0) for s in node_or_shape]


def prefix(fs: list[tuple[int, int]], k: int) -> tuple[int, int]:
    """Product of the first k dims of ``fs`` (from ``factors``) as (static part, symbolic count):
    two dims of two layouts line up when the products before them are equal."""
    num, sym = 1, 0
    for c, n in fs[:k]:
        num, sym = num * c, sym + n
    return num, sym
