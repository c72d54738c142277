"""Triton kernels for fxdecomp (import name ``fxdecomp_kernels``; source folder ``kernels/``).

Each kernel comes with a pure-torch reference in the same module; ``backend="auto"`` runs Triton
for CUDA tensors and the reference otherwise. ``backend="triton"`` on CPU tensors needs Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests run the kernels without a GPU.

- :func:`head_projection`: ``[B, H, Q, dh] x [H, dh, E] -> [H, B, Q, E]`` per-head projections,
  optionally centered per row and scaled by a frozen per-row 1/sigma.
- :func:`token_contributions`: ``A [B, H, Q, N], V [B, H, N, dh], M [H, dh, E] ->
  [B, H, Q, N, E]`` (or ``[B, H, N, E]`` summed over q) per-source-token contributions.

Both take ``out=`` (a slice of the engine's output slab). The engine calls ``head_projection``
for head-blocked terms (``fxdecomp.rewrite.runtime.blocked_linear``) and ``token_contributions``
for per-token terms carried as factors with one sub-position (``factored_linear``).
"""
from ._common import KernelInputError, resolve_backend
from .head_projection import head_projection, head_projection_reference
from .token_contributions import token_contributions, token_contributions_reference

__all__ = [
    "head_projection",
    "head_projection_reference",
    "token_contributions",
    "token_contributions_reference",
    "resolve_backend",
    "KernelInputError",
]
