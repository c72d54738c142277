"""Per-head projection of attention outputs through folded matrices.

    out[h, b, q, :] = scale[b, q] * center( O[b, h, q, :] @ M[h] )          -> [H, B, Q, E]

``O`` [B, H, Q, dh] is each head's attention output (before W_O), ``M`` [H, dh, E] each head's
folded linear tail (e.g. its slice of W_O, times whatever linear maps follow), ``scale`` [B, Q]
a frozen per-row multiplier (the 1/sigma of a LayerNorm), and ``center`` subtracts each output
row's mean over E (a LayerNorm's mean subtraction applied per component; it commutes with the
per-row scale). Summing ``out`` over h gives the projected sum of the heads.

Memory traffic (what the benchmark counts): read O (B*H*Q*dh) + M (H*dh*E) + scale (B*Q),
write H*B*Q*E, all in the input dtype. The output dominates unless Q is tiny.

Centering without a second pass: the mean over E of ``x @ M[h]`` is ``x @ mbar[h]`` with
``mbar[h] = M[h].mean(-1)`` ([H, dh], fp32, computed once by the launcher), so the kernel
accumulates that dot product next to the tile and never needs a whole row of E at once.

Dtypes: O and M share one of float32 / bfloat16 / float16; ``scale`` may be any of those.
Products accumulate in fp32 (fp32 inputs use IEEE fp32, never TF32). The output has the input
dtype unless ``out_dtype`` asks otherwise (e.g. ``out_dtype=torch.float32`` for bf16 inputs when
many components will be summed).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import (HAS_TRITON, KernelInputError, check_out_dtype, check_same_dtype_and_device,
                      check_scale, check_tensor, describe, dot_precision, dot_upcast, interpreter_block,
                      interpreting, launchable, resolve_backend)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _head_projection_kernel(
        O_ptr,  # per-head attention outputs, [B, H, Q, DH], any strides
        M_ptr,  # per-head folded matrices, [H, DH, E], any strides
        MBAR_ptr,  # mean of M over E, fp32 [H, DH] contiguous; read only if CENTER
        S_ptr,  # per-row scale (frozen 1/sigma), [B, Q], any strides; read only if HAS_SCALE
        OUT_ptr,  # result, [H, B, Q, E]
        Q, R, DH, E,  # R = B * Q rows per head
        stride_ob, stride_oh, stride_oq, stride_od,
        stride_mh, stride_md, stride_me,
        stride_sb, stride_sq,
        stride_yh, stride_yb, stride_yq, stride_ye,
        HAS_SCALE: tl.constexpr,
        CENTER: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 dot operands (no TF32), else None
        DOT_UPCAST: tl.constexpr,  # cast dot operands to fp32 (bf16 under the interpreter only)
        BLOCK_R: tl.constexpr,  # rows (b, q) per program
        BLOCK_E: tl.constexpr,  # output columns per program
        BLOCK_K: tl.constexpr,  # reduction (dh) step
    ):
        pid_r = tl.program_id(0)
        pid_e = tl.program_id(1)
        h = tl.program_id(2).to(tl.int64)

        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        row_mask = rows < R
        col_mask = cols < E
        b = (rows // Q).to(tl.int64)
        q = (rows % Q).to(tl.int64)

        o_rows = O_ptr + b * stride_ob + h * stride_oh + q * stride_oq  # [BLOCK_R] pointers
        m_head = M_ptr + h * stride_mh

        # -- phase 1: acc = O[b, h, q, :] @ M[h][:, cols]; mean = O[b, h, q, :] @ mbar[h]
        acc = tl.zeros((BLOCK_R, BLOCK_E), dtype=tl.float32)
        mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, DH, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < DH
            o = tl.load(o_rows[:, None] + ks[None, :] * stride_od,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            m = tl.load(m_head + ks[:, None] * stride_md + cols[None, :] * stride_me,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if DOT_UPCAST:
                o = o.to(tl.float32)
                m = m.to(tl.float32)
            acc = tl.dot(o, m, acc, input_precision=INPUT_PRECISION)
            if CENTER:
                mbar = tl.load(MBAR_ptr + h * DH + ks, mask=k_mask, other=0.0)
                mean += tl.sum(o.to(tl.float32) * mbar[None, :], axis=1)

        # -- phase 2: center, scale, store in the output dtype
        if CENTER:
            acc = acc - mean[:, None]
        if HAS_SCALE:
            s = tl.load(S_ptr + b * stride_sb + q * stride_sq, mask=row_mask, other=0.0)
            acc = acc * s.to(tl.float32)[:, None]
        out = OUT_ptr + h * stride_yh + b[:, None] * stride_yb + q[:, None] * stride_yq \
            + cols[None, :] * stride_ye
        tl.store(out, acc.to(OUT_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])

    # GPU configs; autotuned per (R, E, DH) and dtype. Q = 1 (CLS rows) makes R = B small.
    _CONFIGS = [
        triton.Config({"BLOCK_R": 32, "BLOCK_E": 128, "BLOCK_K": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_R": 64, "BLOCK_E": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_E": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_E": 128, "BLOCK_K": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_R": 128, "BLOCK_E": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_E": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_E": 128, "BLOCK_K": 64}, num_warps=8, num_stages=2),
    ]
    _KEY = ["R", "E", "DH"]


# ---------------------------------------------------------------------------------------------
# validation, reference, launcher, public function
# ---------------------------------------------------------------------------------------------
def _validate(O, M, scale, out_dtype):
    check_tensor("O", O, 4, "[B, H, Q, dh]")
    check_tensor("M", M, 3, "[H, dh, E]")
    B, H, Q, dh = O.shape
    if M.shape[0] != H or M.shape[1] != dh:
        raise KernelInputError(
            f"O [B, H, Q, dh] = {tuple(O.shape)} and M [H, dh, E] = {tuple(M.shape)} disagree on "
            f"H ({H} vs {M.shape[0]}) or dh ({dh} vs {M.shape[1]})")
    check_same_dtype_and_device([("O", O), ("M", M)])
    check_scale(scale, B, Q, O, "O [B, H, Q, dh]")
    return check_out_dtype(out_dtype, O.dtype)


def head_projection_reference(O: torch.Tensor, M: torch.Tensor,
                              scale: Optional[torch.Tensor] = None, center: bool = False, *,
                              out_dtype: Optional[torch.dtype] = None,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch ``head_projection`` (einsum in fp32, result cast to the output dtype).

    Reads O and M and writes [H, B, Q, E] like the kernel, plus fp32 temporaries of the same
    size as the output (up-casts, the centered and the scaled copies). With ``out`` (fp32, no
    centering, no scale) the batched matmul writes straight into it: one write of the output.
    """
    dtype = _validate(O, M, scale, out_dtype)
    _check_out(out, O, M, dtype)
    if out is not None and not center and scale is None and dtype == torch.float32 \
            and O.dtype == torch.float32:
        torch.matmul(O.transpose(0, 1), M.unsqueeze(1), out=out)
        return out
    if out is not None:
        return out.copy_(head_projection_reference(O, M, scale, center, out_dtype=dtype))
    y = torch.einsum("bhqd,hde->hbqe", O.float(), M.float())
    if center:
        y = y - y.mean(dim=-1, keepdim=True)
    if scale is not None:
        y = y * scale.float()[None, :, :, None]
    return y.to(dtype)


def _check_out(out, O, M, dtype):
    """``out`` is None or an [H, B, Q, E] tensor of the output dtype on O's device."""
    if out is None:
        return
    B, H, Q, _ = O.shape
    want = (H, B, Q, M.shape[2])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != dtype \
            or out.device != O.device:
        raise KernelInputError(f"out must be a {dtype} tensor of shape [H, B, Q, E] = {want} on "
                               f"{O.device}; got {describe('out', out)}")


def _head_projection_triton(O, M, scale, center, out_dtype, out=None):
    B, H, Q, dh = O.shape
    E = M.shape[2]
    R = B * Q
    if out is None:
        out = torch.empty((H, B, Q, E), device=O.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    if dh == 0:
        return out.zero_()
    mbar = M.float().mean(dim=-1).contiguous() if center else out  # placeholder when unused
    s = scale if scale is not None else out  # placeholder pointer, never read
    s_strides = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
    args = (O, M, mbar, s, out, Q, R, dh, E,
            *O.stride(), *M.stride(), *s_strides, *out.stride())
    flags = dict(HAS_SCALE=scale is not None, CENTER=bool(center),
                 INPUT_PRECISION=dot_precision(O.dtype), DOT_UPCAST=dot_upcast(O.dtype))
    kernel = launchable(_head_projection_kernel, _CONFIGS, _KEY)
    if interpreting():
        blocks = dict(BLOCK_R=interpreter_block(R), BLOCK_E=interpreter_block(E),
                      BLOCK_K=interpreter_block(dh, hi=128))
        grid = (triton.cdiv(R, blocks["BLOCK_R"]), triton.cdiv(E, blocks["BLOCK_E"]), H)
        kernel[grid](*args, **flags, **blocks)
    else:
        def grid(meta):
            return (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(E, meta["BLOCK_E"]), H)

        kernel[grid](*args, **flags)
    return out


def head_projection(O: torch.Tensor, M: torch.Tensor, scale: Optional[torch.Tensor] = None,
                    center: bool = False, backend: str = "auto", *,
                    out_dtype: Optional[torch.dtype] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project each head's attention output through its folded matrix.

    Args:
        O: per-head attention outputs [B, H, Q, dh], any strides (e.g. a view of the attention
            output before the heads are merged).
        M: per-head folded matrices [H, dh, E], same dtype and device as O.
        scale: optional per-row multiplier [B, Q] (a LayerNorm's frozen 1/sigma).
        center: subtract each output row's mean over E (per component), before ``scale``.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "triton" or "torch".
        out_dtype: output dtype; defaults to O's dtype. Accumulation is always fp32.
        out: optional preallocated [H, B, Q, E] result (any strides, e.g. a slice of a larger
            slab of components); written in place and returned. Not differentiable (like any
            ``out=`` op): callers that need gradients leave it None.

    Returns:
        [H, B, Q, E]: ``out[h, b, q] = scale[b, q] * center(O[b, h, q] @ M[h])``; summing over
        h gives the projection of the merged heads.

    >>> O, M = torch.randn(2, 3, 5, 8), torch.randn(3, 8, 16)
    >>> head_projection(O, M, center=True).shape
    torch.Size([3, 2, 5, 16])
    """
    dtype = _validate(O, M, scale, out_dtype)
    _check_out(out, O, M, dtype)
    if resolve_backend(backend, O) == "torch":
        return head_projection_reference(O, M, scale, center, out_dtype=dtype, out=out)
    tensors = (O, M) if scale is None else (O, M, scale)
    if out is None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _HeadProjectionTriton.apply(O, M, scale, bool(center), dtype)
    return _head_projection_triton(O, M, scale, center, dtype, out)


class _HeadProjectionTriton(torch.autograd.Function):
    """The Triton forward with a torch backward, so gradients match the reference's.

    With Mc = M − mean_E(M) (or M without centring) the forward is y = s ⊙ (O @ Mc):
    dO = (s ⊙ dy) @ Mcᵀ; dMc = Oᵀ (s ⊙ dy) and dM = dMc − mean_E(dMc) (centring is its own
    adjoint); ds = Σ_{h,e} dy ⊙ (O @ Mc)."""

    @staticmethod
    def forward(ctx, O, M, scale, center, dtype):
        ctx.save_for_backward(O, M, scale)
        ctx.center = center
        return _head_projection_triton(O, M, scale, center, dtype)

    @staticmethod
    def backward(ctx, dy):
        O, M, scale = ctx.saved_tensors
        Mc = M.float() - M.float().mean(-1, keepdim=True) if ctx.center else M.float()
        g = dy.float()                                            # [H, B, Q, E]
        gs = g if scale is None else g * scale.float()[None, :, :, None]
        dO = dM = ds = None
        if ctx.needs_input_grad[0]:
            dO = torch.einsum("hbqe,hde->bhqd", gs, Mc).to(O.dtype)
        if ctx.needs_input_grad[1]:
            dMc = torch.einsum("bhqd,hbqe->hde", O.float(), gs)
            dM = (dMc - dMc.mean(-1, keepdim=True) if ctx.center else dMc).to(M.dtype)
        if scale is not None and ctx.needs_input_grad[2]:
            y = torch.einsum("bhqd,hde->hbqe", O.float(), Mc)
            ds = (g * y).sum(dim=(0, 3)).to(scale.dtype)
        return dO, dM, ds, None, None
