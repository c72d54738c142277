"""fxdecomp: exact decomposition of vision-transformer representations into components."""
from .errors import FxDecompError, InputError, ModelLoadError, UnsupportedGraphError
from .run.decomposition import KINDS, ComponentLabel, Decomposition
from .run.decomposed import DecomposedModel, decompose

__all__ = [
    "decompose", "DecomposedModel", "Decomposition", "ComponentLabel", "KINDS",
    "FxDecompError", "UnsupportedGraphError", "InputError", "ModelLoadError",
]
__version__ = "0.1.0"
