"""fxdecomp: exact decomposition of vision-transformer representations into components."""
from .errors import CollapseError, FxDecompError, InputError, ModelLoadError, UnsupportedGraphError
from .run.decomposition import KINDS, ComponentLabel, Decomposition
from .run.decomposed import DecomposedModel, WindowSplitWarning, decompose, decompose_in_groups
from .run.memory import keep_freed_memory
from .interpret import (FEATURES, AlignmentMismatchError, CompAlign, describe_component,
                        score_components, score_components_invariant, text_embeddings,
                        variance_explained)
from .store import ComponentStore, open_store
from . import world as _world  # noqa: F401  (registers the world's models as model sources)

__all__ = [
    "decompose", "decompose_in_groups", "DecomposedModel", "Decomposition", "ComponentLabel", "KINDS",
    "FxDecompError", "UnsupportedGraphError", "InputError", "ModelLoadError", "CollapseError",
    "CompAlign", "AlignmentMismatchError", "text_embeddings", "score_components",
    "score_components_invariant", "variance_explained", "describe_component", "FEATURES",
    "open_store", "ComponentStore", "WindowSplitWarning", "keep_freed_memory",
]
__version__ = "0.1.0"
