"""Applications on top of the engine and its interpretation layer.

- ``select_components``: the top-k components for a feature (by default score for the feature
  minus the max over the other features, the paper's selection for property retrieval;
  ``rule="score"``: by the feature's own score).
- ``property_retrieval``: rank images by cosine similarity to query images of the sum of some
  components (the paper's image-based retrieval with respect to a property), in model space.
- ``text_retrieval``: rank images by the projection of the sum of some aligned components on a
  text embedding.
- ``precision_at_k`` / ``chance_precision``: how often the retrieved images share the query's
  label, and what a random ranking would get.
"""
from fxdecomp.apply.retrieval import (SELECTION_RULES, chance_precision, precision_at_k,
                                      property_retrieval, select_components, text_retrieval)

__all__ = ["select_components", "SELECTION_RULES", "property_retrieval", "text_retrieval", "precision_at_k",
           "chance_precision"]
