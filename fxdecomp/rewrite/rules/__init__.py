"""The decomposition rules: one registered ``Rule`` per op family, each stating its identity.

``RULES`` is the table the pipeline uses (``fxdecomp.run`` hands it to the analysis). The
families live in one module each:

=============  ===================================================================
``linear``     linear, convolution, matmul, einsum, addmm
``norms``      layer/RMS/group norm, eval batch norm
``layout``     views, permutations, copies, indexing, padding, cat/stack/split, getitem
``pointwise``  add/sub, products and quotients with a frozen factor, where, activations, the
               nonlinear ops
``attention``  scaled_dot_product_attention, P @ V products, softmax
``pooling``    average/adaptive pooling, mean/sum, resampling, max selections
=============  ===================================================================

An op on the linear path with no rule raises ``UnsupportedGraphError``: nothing is ever silently
approximated. ``docs/adding-an-op.md`` walks through adding one.
"""
from __future__ import annotations

from ...graph.rule import Rule, RuleTable

RULES = RuleTable()

# Each family module registers its rules into RULES on import (order does not matter).
from . import attention, layout, linear, norms, pointwise, pooling  # noqa: E402,F401

__all__ = ["RULES", "Rule", "RuleTable"]
