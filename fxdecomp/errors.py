"""The one exception family fxdecomp raises for bad models and bad inputs."""
from __future__ import annotations


class FxDecompError(Exception):
    """Base class of every error fxdecomp raises on purpose."""


class UnsupportedGraphError(FxDecompError):
    """The exported graph holds something the decomposition pass has no exact rule for.

    The message names the ATen op, the graph node and the module path it came from, so the
    user can see which part of the model is the problem.
    """

    def __init__(self, reason: str, node=None):
        self.reason = reason
        self.node = node
        if node is not None:
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else "<top level>"
            shape = getattr(node.meta.get("val"), "shape", None)
            msg = (f"{reason}\n  op: {node.target}\n  node: {node.format_node()}\n"
                   f"  module: {path or '<root>'}\n  shape: {tuple(shape) if shape is not None else '?'}")
        else:
            msg = reason
        super().__init__(msg)


class InputError(FxDecompError, ValueError):
    """An input the decomposed model cannot take (wrong shape, non-finite values, ...)."""


class ModelLoadError(FxDecompError, RuntimeError):
    """A model could not be built or its weights could not be loaded."""
