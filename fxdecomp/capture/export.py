"""Capture: torch.export the target into an ATen-level fx GraphModule with a dynamic batch."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import FxDecompError, InputError


@contextlib.contextmanager
def export_friendly(model: nn.Module | None = None, *, fused_attn: bool | None = None) -> Iterator[None]:
    """Switch off runtime fast paths that would hide ordinary ops from ``torch.export``.

    - ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` "fast path" (the fused
      ``_native_multi_head_attention`` / ``_transformer_encoder_layer_fwd`` kernels) is disabled
      via ``torch.backends.mha.set_fastpath_enabled(False)``, so attention exports as ATen
      ``linear`` + ``scaled_dot_product_attention`` + ``linear``.
    - ``fused_attn`` (optional, needs ``model``): set the ``fused_attn`` flag of every timm-style
      attention module in ``model`` (True: ``F.scaled_dot_product_attention``; False: explicit
      ``softmax(q @ k^T) @ v``). None leaves the modules as they are.

    Everything is restored on exit.

    >>> with export_friendly():                                                  # doctest: +SKIP
    ...     ep = torch.export.export(target, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    """
    restore: list[tuple[nn.Module, bool]] = []
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        if fused_attn is not None:
            if model is None:
                raise InputError("export_friendly(fused_attn=...) needs the model whose attention "
                                 "modules to switch")
            for mod in model.modules():
                if isinstance(getattr(mod, "fused_attn", None), bool):
                    restore.append((mod, mod.fused_attn))
                    mod.fused_attn = fused_attn
        yield
    finally:
        for mod, flag in restore:
            mod.fused_attn = flag
        torch.backends.mha.set_fastpath_enabled(previous)


def model_tensor(model: nn.Module) -> torch.Tensor | None:
    """The model's first floating-point parameter or buffer (its dtype and device are what the
    model expects of its input), or None for a model without any."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t
    return None


def check_input(x, expected_shape=None, what: str = "input", *, like: torch.Tensor | None = None,
                dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
    """Refuse an input the decomposition cannot take, naming what it expects: not a tensor, no
    batch dim, another size (``expected_shape``), another dtype or device than the model's
    (``like``: a parameter of the model) or than the decomposition was built for (``dtype``,
    ``device``), non-finite values."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise InputError(f"{what} must have a batch dimension, got shape {tuple(x.shape)}")
    if expected_shape is not None and tuple(x.shape[1:]) != tuple(expected_shape):
        raise InputError(
            f"{what} has shape {tuple(x.shape)}; this decomposition was built for "
            f"[B, {', '.join(map(str, expected_shape))}] (only the batch size may change). "
            "Call fxdecomp.decompose again with an example of the new size.")
    if like is not None:
        dtype, device = like.dtype, like.device
    if dtype is not None and x.dtype != dtype:
        raise InputError(f"{what} has dtype {x.dtype}; the model expects {dtype} "
                         f"(convert it: x.to({dtype}), images scaled and normalised as the model "
                         "was trained)")
    if device is not None and x.device != torch.device(device):
        raise InputError(f"{what} is on {x.device}; the model expects it on {device} "
                         f"(x.to({str(device)!r}))")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{what} has {bad} non-finite values (NaN or inf); the decomposition of a "
                         "non-finite forward pass is meaningless")


def check_model(model: torch.nn.Module) -> None:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise InputError(
            f"the model is in training mode ({len(training)} modules, e.g. {training[:3]}): dropout "
            "and batch statistics would make the output random. Call model.eval() first.")


def capture(model: torch.nn.Module, example: torch.Tensor, dynamic_batch: bool = True
            ) -> tuple[GraphModule, bool]:
    """Export ``model`` on ``example``; returns (graph module, batch_is_dynamic).

    The batch dimension is exported as dynamic where the model allows it; where the exporter has
    to specialise it, the caller re-captures per batch size.
    """
    x = example
    if dynamic_batch and x.shape[0] == 1:  # export specialises size-1 dims; trace on 2
        x = x.expand(2, *x.shape[1:]).contiguous()
    dyn = ({0: torch.export.Dim.AUTO},) if dynamic_batch else None
    with export_friendly(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, (x,), dynamic_shapes=dyn)
        except Exception as e:
            if not dynamic_batch:
                raise FxDecompError(f"torch.export failed on {type(model).__name__}: {e}") from e
            return capture(model, example, dynamic_batch=False)
    gm = ep.module()
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    dynamic = isinstance(ph.meta["val"].shape[0], torch.SymInt)
    return gm, dynamic
