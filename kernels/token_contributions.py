"""Per-source-token contributions of attention heads, projected through folded matrices.

    out[b, h, q, n, :] = scale[b, q] * A[b, h, q, n] * (V[b, h, n, :] @ M[h])   -> [B, H, Q, N, E]
    reduce_q=True:   sum over q of the above                                    -> [B, H, N, E]

With the attention probabilities ``A`` [B, H, Q, N] frozen, a head's output ``A @ V`` is linear in
the values, so it splits exactly over source tokens n. Summing ``out`` over n gives
``head_projection(A @ V, M, scale)`` (permuted to [B, H, Q, E]); ``reduce_q`` sums over query
rows, e.g. to decompose a mean-pooled representation (pass scale = frozen 1/sigma / Q for a
mean, or fold 1/Q into M).

The kernel never materialises [B, H, Q, N, dh] (nor [B, H, Q, N, E] when ``reduce_q``): each
program projects a tile of values once, ``P = V[b, h, n-tile] @ M[h][:, e-tile]`` (fp32), then
for each query row writes ``P * (scale[b, q] * A[b, h, q, n])`` -- or, with ``reduce_q``, writes
``P * sum_q scale[b, q] * A[b, h, q, n]`` once.

Memory traffic (what the benchmark counts): read A (B*H*Q*N, once per E tile), V (B*H*N*dh),
M (H*dh*E), scale (B*Q); write B*H*Q*N*E (or B*H*N*E). The write dominates; for a CLS target
(Q = 1) at ViT-B/16 batch 64 that is 64*12*197*768 elements.

Dtypes: A, V and M share one of float32 / bfloat16 / float16; ``scale`` may be any of those.
fp32 accumulation (fp32 inputs use IEEE fp32, never TF32); output in the input dtype unless
``out_dtype`` is given.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import (HAS_TRITON, KernelInputError, check_out_dtype, check_same_dtype_and_device,
                      check_scale, check_tensor, describe, dot_precision, dot_upcast,
                      interpreter_block, interpreting, launchable, resolve_backend)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _token_contributions_kernel(
        A_ptr,  # attention probabilities, [B, H, Q, N], any strides
        V_ptr,  # values, [B, H, N, DH], any strides
        M_ptr,  # per-head folded matrices, [H, DH, E], any strides
        S_ptr,  # per-row scale (frozen 1/sigma), [B, Q], any strides; read only if HAS_SCALE
        OUT_ptr,  # result, [B, H, Q, N, E]; [B, H, N, E] if REDUCE_Q (then stride_yq unused)
        H, Q, N, DH, E,
        stride_ab, stride_ah, stride_aq, stride_an,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_mh, stride_md, stride_me,
        stride_sb, stride_sq,
        stride_yb, stride_yh, stride_yq, stride_yn, stride_ye,
        HAS_SCALE: tl.constexpr,
        REDUCE_Q: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 dot operands (no TF32), else None
        DOT_UPCAST: tl.constexpr,  # cast dot operands to fp32 (bf16 under the interpreter only)
        BLOCK_N: tl.constexpr,  # source tokens per program
        BLOCK_E: tl.constexpr,  # output columns per program
        BLOCK_K: tl.constexpr,  # reduction (dh) step
        Q_PER_PROGRAM: tl.constexpr,  # query rows written per program (not REDUCE_Q)
        BLOCK_Q: tl.constexpr,  # query rows summed per step (REDUCE_Q)
    ):
        pid_bh = tl.program_id(0)
        pid_q = tl.program_id(1)
        pid_ne = tl.program_id(2)
        num_e_tiles = tl.cdiv(E, BLOCK_E)
        pid_n = pid_ne // num_e_tiles
        pid_e = pid_ne % num_e_tiles
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)

        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        n_mask = ns < N
        col_mask = cols < E
        tile_mask = n_mask[:, None] & col_mask[None, :]

        # -- phase 1: P = V[b, h, ns, :] @ M[h][:, cols], once per program (fp32)
        v_rows = V_ptr + b * stride_vb + h * stride_vh + ns * stride_vn  # [BLOCK_N] pointers
        m_head = M_ptr + h * stride_mh
        p = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
        for k0 in range(0, DH, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < DH
            v = tl.load(v_rows[:, None] + ks[None, :] * stride_vd,
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            m = tl.load(m_head + ks[:, None] * stride_md + cols[None, :] * stride_me,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if DOT_UPCAST:
                v = v.to(tl.float32)
                m = m.to(tl.float32)
            p = tl.dot(v, m, p, input_precision=INPUT_PRECISION)

        a_head = A_ptr + b * stride_ab + h * stride_ah
        out_tile = OUT_ptr + b * stride_yb + h * stride_yh + ns[:, None] * stride_yn \
            + cols[None, :] * stride_ye
        if REDUCE_Q:
            # -- phase 2a: w[n] = sum_q scale[b, q] * A[b, h, q, n]; write P * w once
            w = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for q0 in range(0, Q, BLOCK_Q):
                qs = q0 + tl.arange(0, BLOCK_Q)
                q_mask = qs < Q
                a = tl.load(a_head + qs[:, None] * stride_aq + ns[None, :] * stride_an,
                            mask=q_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
                if HAS_SCALE:
                    s = tl.load(S_ptr + b * stride_sb + qs * stride_sq, mask=q_mask, other=0.0)
                    a = a * s.to(tl.float32)[:, None]
                w += tl.sum(a, axis=0)
            tl.store(out_tile, (p * w[:, None]).to(OUT_ptr.dtype.element_ty), mask=tile_mask)
        else:
            # -- phase 2b: for each of this program's query rows, write P * scale * A[q, ns]
            q_start = pid_q.to(tl.int64) * Q_PER_PROGRAM
            for qi in range(0, Q_PER_PROGRAM):
                q = q_start + qi
                q_ok = q < Q
                a = tl.load(a_head + q * stride_aq + ns * stride_an,
                            mask=n_mask & q_ok, other=0.0).to(tl.float32)
                if HAS_SCALE:
                    s = tl.load(S_ptr + b * stride_sb + q * stride_sq, mask=q_ok, other=0.0)
                    a = a * s.to(tl.float32)
                tl.store(out_tile + q * stride_yq, (p * a[:, None]).to(OUT_ptr.dtype.element_ty),
                         mask=tile_mask & q_ok)

    # GPU configs; autotuned per (N, E, DH, Q, REDUCE_Q) and dtype. The launcher fixes BLOCK_Q.
    _CONFIGS = [
        triton.Config({"BLOCK_N": 64, "BLOCK_E": 128, "BLOCK_K": 32, "Q_PER_PROGRAM": 1},
                      num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_E": 64, "BLOCK_K": 64, "Q_PER_PROGRAM": 1},
                      num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_E": 128, "BLOCK_K": 64, "Q_PER_PROGRAM": 4},
                      num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_E": 128, "BLOCK_K": 32, "Q_PER_PROGRAM": 8},
                      num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64, "BLOCK_E": 256, "BLOCK_K": 32, "Q_PER_PROGRAM": 8},
                      num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 128, "BLOCK_E": 128, "BLOCK_K": 32, "Q_PER_PROGRAM": 16},
                      num_warps=8, num_stages=2),
    ]
    _KEY = ["N", "E", "DH", "Q", "REDUCE_Q"]

    def _prune_configs(configs, named_args, **kwargs):
        """REDUCE_Q ignores Q_PER_PROGRAM (keep one config per tile shape); otherwise drop
        configs whose Q_PER_PROGRAM exceeds Q (e.g. Q = 1 for a CLS target)."""
        if kwargs.get("REDUCE_Q"):
            seen, kept = set(), []
            for c in configs:
                tile = (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_E"], c.kwargs["BLOCK_K"], c.num_warps)
                if tile not in seen:
                    seen.add(tile)
                    kept.append(c)
            return kept
        q = max(int(named_args["Q"]), 1)
        return [c for c in configs if c.kwargs["Q_PER_PROGRAM"] <= q] or configs[:1]
    _GPU_BLOCK_Q = 16


# ---------------------------------------------------------------------------------------------
# validation, reference, launcher, public function
# ---------------------------------------------------------------------------------------------
def _validate(A, V, M, scale, out_dtype):
    check_tensor("A", A, 4, "[B, H, Q, N]")
    check_tensor("V", V, 4, "[B, H, N, dh]")
    check_tensor("M", M, 3, "[H, dh, E]")
    B, H, Q, N = A.shape
    if V.shape[0] != B or V.shape[1] != H or V.shape[2] != N:
        raise KernelInputError(
            f"A [B, H, Q, N] = {tuple(A.shape)} and V [B, H, N, dh] = {tuple(V.shape)} disagree "
            f"on B, H or N")
    dh = V.shape[3]
    if M.shape[0] != H or M.shape[1] != dh:
        raise KernelInputError(
            f"V [B, H, N, dh] = {tuple(V.shape)} and M [H, dh, E] = {tuple(M.shape)} disagree on "
            f"H ({H} vs {M.shape[0]}) or dh ({dh} vs {M.shape[1]})")
    check_same_dtype_and_device([("A", A), ("V", V), ("M", M)])
    check_scale(scale, B, Q, A, "A [B, H, Q, N]")
    return check_out_dtype(out_dtype, A.dtype)


def _check_out(out, A, M, reduce_q, dtype):
    """``out`` is None or a tensor of the result's shape and dtype on A's device."""
    if out is None:
        return
    B, H, Q, N = A.shape
    want = (B, H, N, M.shape[2]) if reduce_q else (B, H, Q, N, M.shape[2])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != dtype \
            or out.device != A.device:
        raise KernelInputError(f"out must be a {dtype} tensor of shape {want} on {A.device}; got "
                               f"{describe('out', out)}")


def token_contributions_reference(A: torch.Tensor, V: torch.Tensor, M: torch.Tensor,
                                  scale: Optional[torch.Tensor] = None, reduce_q: bool = False,
                                  *, out_dtype: Optional[torch.dtype] = None,
                                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-torch ``token_contributions``: project V once ([B, H, N, E], fp32), then weight it.

    Also never forms [B, H, Q, N, dh]; it does hold fp32 temporaries the size of the output.
    """
    dtype = _validate(A, V, M, scale, out_dtype)
    _check_out(out, A, M, reduce_q, dtype)
    P = torch.einsum("bhnd,hde->bhne", V.float(), M.float())
    a = A.float()
    if scale is not None:
        a = a * scale.float()[:, None, :, None]
    y = P * a.sum(dim=2)[..., None] if reduce_q else a[..., None] * P[:, :, None]
    return y.to(dtype) if out is None else out.copy_(y)


def _token_contributions_triton(A, V, M, scale, reduce_q, out_dtype, out=None):
    B, H, Q, N = A.shape
    dh, E = M.shape[1], M.shape[2]
    shape = (B, H, N, E) if reduce_q else (B, H, Q, N, E)
    if out is None:
        out = torch.empty(shape, device=A.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    if dh == 0 or Q == 0:
        return out.zero_()
    y_strides = out.stride()
    if reduce_q:  # same argument list either way: stride_yq is unused
        y_strides = (y_strides[0], y_strides[1], 0, y_strides[2], y_strides[3])
    s = scale if scale is not None else out  # placeholder pointer, never read
    s_strides = (scale.stride(0), scale.stride(1)) if scale is not None else (0, 0)
    args = (A, V, M, s, out, H, Q, N, dh, E,
            *A.stride(), *V.stride(), *M.stride(), *s_strides, *y_strides)
    flags = dict(HAS_SCALE=scale is not None, REDUCE_Q=bool(reduce_q),
                 INPUT_PRECISION=dot_precision(A.dtype), DOT_UPCAST=dot_upcast(A.dtype))
    kernel = launchable(_token_contributions_kernel, _CONFIGS, _KEY, _prune_configs)
    if interpreting():
        # one program per (b, h) when shapes allow: the interpreter runs programs one by one
        blocks = dict(BLOCK_N=interpreter_block(N), BLOCK_E=interpreter_block(E),
                      BLOCK_K=interpreter_block(dh, hi=128),
                      Q_PER_PROGRAM=1 if reduce_q else Q, BLOCK_Q=interpreter_block(Q, lo=1))
        grid = (B * H, 1, triton.cdiv(N, blocks["BLOCK_N"]) * triton.cdiv(E, blocks["BLOCK_E"]))
        kernel[grid](*args, **flags, **blocks)
    else:
        def grid(meta):
            q_programs = 1 if reduce_q else triton.cdiv(Q, meta["Q_PER_PROGRAM"])
            return (B * H, q_programs,
                    triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(E, meta["BLOCK_E"]))

        kernel[grid](*args, **flags, BLOCK_Q=_GPU_BLOCK_Q)
    return out


def token_contributions(A: torch.Tensor, V: torch.Tensor, M: torch.Tensor,
                        scale: Optional[torch.Tensor] = None, reduce_q: bool = False,
                        backend: str = "auto", *,
                        out_dtype: Optional[torch.dtype] = None,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Split each head's projected output over its source tokens.

    Args:
        A: attention probabilities [B, H, Q, N] (only the query rows you need, e.g. Q = 1 for
            CLS), any strides.
        V: values [B, H, N, dh], same dtype and device as A.
        M: per-head folded matrices [H, dh, E].
        scale: optional per-row multiplier [B, Q] (a LayerNorm's frozen 1/sigma).
        reduce_q: sum over query rows (mean-pooled targets) instead of keeping them.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "triton" or "torch".
        out_dtype: output dtype; defaults to A's dtype. Accumulation is always fp32.
        out: optional preallocated result (the shape below, any strides, e.g. a slice of the
            engine's output slab): written in place and returned. No autograd (as for any
            ``out=`` op).

    Returns:
        [B, H, Q, N, E] with
        ``out[b, h, q, n] = scale[b, q] * A[b, h, q, n] * (V[b, h, n] @ M[h])``,
        or [B, H, N, E] (summed over q) when ``reduce_q``. For a LayerNorm's mean subtraction
        pass ``M - M.mean(-1, keepdim=True)``: centering over E is linear, so it folds into M.

    >>> A = torch.softmax(torch.randn(2, 3, 1, 10), -1)
    >>> V, M = torch.randn(2, 3, 10, 8), torch.randn(3, 8, 16)
    >>> token_contributions(A, V, M).shape
    torch.Size([2, 3, 1, 10, 16])
    """
    dtype = _validate(A, V, M, scale, out_dtype)
    _check_out(out, A, M, reduce_q, dtype)
    if resolve_backend(backend, A) == "torch":
        return token_contributions_reference(A, V, M, scale, reduce_q, out_dtype=dtype, out=out)
    return _token_contributions_triton(A, V, M, scale, reduce_q, dtype, out)
