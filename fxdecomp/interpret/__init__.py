"""Interpret decomposed components through CLIP.

- ``CompAlign``: per-component linear maps into CLIP space (trained, or a CLIP tower's own
  projection via ``CompAlign.identity_from_projection``).
- ``text_embeddings``: CLIP text embeddings of descriptions averaged over prompt templates.
- ``score_components`` / ``score_components_invariant`` / ``variance_explained``: which components
  encode a feature (``FEATURES`` presets or a user list); ``feature_fidelity``: whether the
  aligned total carries the feature at all (against CLIP's own image embeddings).
- ``describe_component``: TextSpan-style greedy text descriptions of one component.
"""
from fxdecomp.interpret.align import AlignmentMismatchError, BIAS_LABEL, CompAlign
from fxdecomp.interpret.describe import (ComponentDescription, default_text_pool,
                                         describe_component, describe_components, load_text_pool)
from fxdecomp.interpret.score import (FEATURES, feature_descriptions, feature_fidelity,
                                      orthonormal_basis, retrieval_scores, score_components,
                                      score_components_invariant, variance_explained)
from fxdecomp.interpret.text import (IMAGENET_TEMPLATES, TEMPLATE_SETS, clear_text_cache,
                                     text_cache_size, text_embeddings)

__all__ = [
    "CompAlign", "AlignmentMismatchError", "BIAS_LABEL",
    "text_embeddings", "IMAGENET_TEMPLATES", "TEMPLATE_SETS", "clear_text_cache",
    "text_cache_size",
    "FEATURES", "feature_descriptions", "orthonormal_basis", "score_components",
    "score_components_invariant", "variance_explained", "feature_fidelity", "retrieval_scores",
    "describe_component", "describe_components", "ComponentDescription", "default_text_pool",
    "load_text_pool",
]
