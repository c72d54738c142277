"""Shared plumbing of the kernels: backend choice, interpreter handling, input checks.

Nothing here is a kernel. The two kernel modules (``head_projection``, ``token_contributions``)
each hold a private ``@triton.jit`` kernel, a launcher and a pure-torch reference; this module
holds what both launchers need.

Triton's interpreter (``TRITON_INTERPRET=1``), as triton 3.8 reads it: ``triton.jit`` checks the
knob *when a function is decorated*. Triton's own library functions (``tl.zeros``, ``tl.sum``,
``tl.cdiv``, ...) are decorated when ``triton`` is imported, so the interpreter is a process-wide
mode fixed at ``import triton`` (and note ``import timm`` imports triton): set the variable in the
environment before the process starts. Setting it later does not work (an interpreted kernel then
calls a compiled ``tl.zeros`` and fails); :func:`resolve_backend` detects that and says so.
:func:`launchable` re-wraps a kernel's Python function for the process's mode, so it does not
matter whether the kernel modules were imported before or after the variable was read.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

try:  # Triton is an optional dependency (extra "triton"); the torch references never need it.
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for the kernel modules)

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

#: Input dtypes the kernels accept; accumulation is always fp32.
SUPPORTED_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

BACKENDS = ("auto", "triton", "torch")


class KernelInputError(ValueError):
    """An input a kernel cannot take: wrong rank, mismatched H or dh, dtype, device, scale shape.

    A ``ValueError``, so callers that catch ``ValueError`` catch it too.
    """


# ---------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------
def interpreting() -> bool:
    """True when this process runs Triton kernels in Triton's interpreter.

    That is decided when ``triton`` is imported (``TRITON_INTERPRET=1`` in the environment at
    that time): we check whether triton's own ``tl.zeros`` was built as an interpreted function.
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.zeros, InterpretedFunction)


def interpreter_requested() -> bool:
    """True when the interpreter knob is on now (env ``TRITON_INTERPRET=1`` or set in Python)."""
    return HAS_TRITON and bool(triton.knobs.runtime.interpret)


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Map ``backend`` ("auto" | "triton" | "torch") to the one that will run for ``tensor``.

    - ``"torch"``: always the pure-torch reference.
    - ``"auto"``: Triton for CUDA tensors when Triton is installed, the torch reference otherwise
      (also on CPU under the interpreter: the interpreter is for testing, never a default).
    - ``"triton"``: the kernel. On CPU tensors this needs Triton's interpreter
      (``TRITON_INTERPRET=1``); without it a ``RuntimeError`` says so.

    >>> resolve_backend("auto", torch.zeros(1))
    'torch'
    """
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if (HAS_TRITON and tensor.is_cuda) else "torch"
    # backend == "triton"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' but triton is not installed "
                           "(pip install 'fxdecomp[triton]'), use backend='torch' or 'auto'")
    if not tensor.is_cuda and not interpreting():
        if interpreter_requested():
            raise RuntimeError(
                f"backend='triton' on a tensor on {tensor.device}: TRITON_INTERPRET=1 is set, but "
                "triton was imported before it was (directly or through e.g. timm), so triton's "
                "own functions were compiled for the GPU and the interpreter cannot run. Set "
                "TRITON_INTERPRET=1 in the environment before starting Python; otherwise use "
                "backend='torch' or 'auto'.")
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got a tensor on {tensor.device}. To run the "
            "kernel on CPU, start Python with TRITON_INTERPRET=1 in the environment (Triton's "
            "interpreter; it must be set before triton is imported); otherwise use "
            "backend='torch' or 'auto'.")
    return "triton"


# ---------------------------------------------------------------------------------------------
# kernel wrapping: interpreter vs compiled + autotuned
# ---------------------------------------------------------------------------------------------
_LAUNCHABLE: Dict[Tuple[Callable, bool], Any] = {}


def launchable(kernel: Any, configs: Sequence[Any], key: List[str],
               prune: Optional[Callable] = None) -> Any:
    """The kernel to launch in the current mode.

    Under the interpreter: an ``InterpretedFunction`` of the kernel's Python function, launched
    with explicit block sizes (no autotuning: it would only multiply the interpreter's run time).
    Otherwise: ``triton.autotune(configs, key)`` over a compiled ``JITFunction`` (``prune``, if
    given, is the autotuner's ``early_config_prune(configs, named_args, **kwargs)``). Cached per
    (function, mode), so switching the interpreter on and off in one process is safe.
    """
    fn = kernel.fn
    mode = interpreting()
    cached = _LAUNCHABLE.get((fn, mode))
    if cached is not None:
        return cached
    if mode:
        from triton.runtime.interpreter import InterpretedFunction

        wrapped = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(fn)
    else:
        from triton.runtime.jit import JITFunction

        jit = kernel if isinstance(kernel, JITFunction) else triton.jit(fn)
        prune_by = {"early_config_prune": prune} if prune is not None else None
        wrapped = triton.autotune(configs=list(configs), key=key, prune_configs_by=prune_by)(jit)
    _LAUNCHABLE[(fn, mode)] = wrapped
    return wrapped


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def interpreter_block(n: int, lo: int = 16, hi: int = 1024) -> int:
    """One power-of-two block covering ``n`` (clamped to [lo, hi]): under the interpreter, few
    large programs are much faster than many small ones (each program is a Python call)."""
    return max(lo, min(hi, next_power_of_2(n)))


# ---------------------------------------------------------------------------------------------
# input checks (messages name the argument, its shape, dtype and device)
# ---------------------------------------------------------------------------------------------
def describe(name: str, t: torch.Tensor) -> str:
    return f"{name}: shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t: Any, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.ndim != ndim:
        raise KernelInputError(f"{name} must have rank {ndim} {layout}; got {describe(name, t)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{name} dtype must be one of float32/bfloat16/float16; "
                               f"got {describe(name, t)}")


def check_same_dtype_and_device(named: Sequence[Tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise KernelInputError(
                "all tensors must be on one device; got "
                + "; ".join(describe(n, x) for n, x in named))
        if t.dtype != first.dtype:
            raise KernelInputError(
                f"{first_name} and {name} must share a dtype (the kernel's dot product takes one "
                "input type; cast one of them); got "
                + "; ".join(describe(n, x) for n, x in named))


def check_scale(scale: Optional[torch.Tensor], B: int, Q: int, like: torch.Tensor,
                rows_from: str) -> None:
    """``scale`` is None or a [B, Q] float tensor on ``like``'s device (any supported dtype)."""
    if scale is None:
        return
    if not isinstance(scale, torch.Tensor):
        raise KernelInputError(f"scale must be None or a [B, Q] tensor, got {type(scale).__name__}")
    if tuple(scale.shape) != (B, Q):
        raise KernelInputError(f"scale must have shape [B, Q] = {(B, Q)} (from {rows_from}); got "
                               f"{describe('scale', scale)}")
    if scale.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"scale dtype must be one of float32/bfloat16/float16; got "
                               f"{describe('scale', scale)}")
    if scale.device != like.device:
        raise KernelInputError(f"scale must be on {like.device}; got {describe('scale', scale)}")


def check_out_dtype(out_dtype: Optional[torch.dtype], default: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return default
    if out_dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"out_dtype must be one of float32/bfloat16/float16 or None; "
                               f"got {out_dtype}")
    return out_dtype


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether to cast dot operands to fp32 inside the kernel.

    Only under the interpreter with bf16 inputs: triton 3.8's interpreter stores bf16 as uint16
    and its ``create_dot`` multiplies those raw bits as integers. bf16 products are exact in
    fp32, so casting first computes the same thing. On the GPU bf16 goes to the tensor cores.
    """
    return dtype == torch.bfloat16 and interpreting()


def dot_precision(dtype: torch.dtype) -> Optional[str]:
    """``"ieee"`` when the dot operands are fp32: exact fp32 products, never TF32, since the
    decomposition promises sums equal to fp32 rounding. ``None`` (Triton's default) for half
    types, whose products are exact in fp32 anyway."""
    return "ieee" if dtype == torch.float32 or dot_upcast(dtype) else None
