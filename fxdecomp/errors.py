"""The one exception family fxdecomp raises on purpose: every such error is an ``FxDecompError``.

Where Python users expect a built-in type the subclass is also one: ``InputError`` is a
``ValueError`` (bad input, bad arguments), ``ModelLoadError`` a ``RuntimeError``,
``ComponentNotFoundError`` a ``KeyError``, ``RuleError`` a ``TypeError``.
"""
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


class CollapseError(UnsupportedGraphError):
    """Residual blocks of the model reach the output only through one nonlinear op, which would
    absorb them into a single component (exact, and useless). The message names the op;
    ``decompose(..., allow_collapse=True)`` accepts such a decomposition."""


class InputError(FxDecompError, ValueError):
    """An input or argument the library cannot take (wrong shape, dtype or device, non-finite
    values, an unknown granularity, a layer out of range, ...)."""


class ModelLoadError(FxDecompError, RuntimeError):
    """A model could not be built or its weights could not be loaded."""


class ComponentNotFoundError(FxDecompError, KeyError):
    """No component of a decomposition has the requested name."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class RuleError(FxDecompError, TypeError):
    """A decomposition rule was registered wrongly (not an ATen op, a key taken twice, ...)."""


def one_line(err: BaseException) -> str:
    """The error as one line for a command-line tool: its type and its message's lines joined."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}"
