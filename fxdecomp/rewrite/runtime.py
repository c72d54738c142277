"""Functions the rewritten graph calls on *terms*: tensors with a leading component axis [c, ...].

Each function takes a terms tensor ``t`` whose slices t[0], t[1], ... are the contributions of
individual components to some value of the original graph, plus *frozen* values (taken from the
original forward, which runs alongside), and returns the terms of the op's output. They are plain
torch code so the rewritten GraphModule prints readably, runs eagerly and compiles with
torch.compile. The identity each relies on is stated in its docstring.

Every function the rewritten graph calls lives here (besides torch's own ops and ``operator``):
rules build graphs only out of these, so ``print(dm.code)`` names nothing private.
"""
from __future__ import annotations

import functools
import math
import threading
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "as_terms", "take", "expand_terms", "cat_chunks", "push", "push_multi", "place_in_cat",
    "layer_norm_terms", "rms_norm_terms", "group_norm_terms", "batch_norm_terms",
    "batch_norm_shift", "bias_terms", "head_blocks", "densify_heads", "blocked_linear",
    "attention_probs", "pooled_values", "pooled_bias", "pooled_probe_values", "split_heads_tokens",
    "where_terms", "max_pool2d_terms", "max_dim_terms", "group_components", "pusher",
    "multi_pusher", "einsum_pusher", "addmm_bias", "scalar_terms", "where_scalar", "masked_value",
    "pad_border", "unsqueeze_terms", "index_tensor", "repeat_kv", "split_windows",
    "fold_centering", "fold_rows", "fold_linear", "fold_projection", "inv_std", "project_terms",
    "write_terms", "reshape_rest", "block_diagonal_heads", "linear_output_terms",
    "normalize_terms", "layer_norm_with_inv", "identity_weight", "home_positions",
    "scale_positions", "gather_positions", "reduce_positions", "cat_last", "linear_terms",
    "window_map", "split_by_map", "window_reduce", "unfactor", "window_reduce_factored",
    "outer_terms", "factored_linear", "window_rows", "dense_window_weights", "token_probe",
    "probe_factors", "window_reduce_probe", "pool_gather", "pooled_heads", "reshape_reduced",
    "scale_reduced",
]


_FLUSH = threading.local()


def _denormals_flushed(fn):
    """Runs fn with denormal floats flushed to zero (CPU), then restores the caller's mode.
    Masked or peaked softmaxes leave probabilities below 1e-38 (a shifted window's −100 mask
    gives e^-100), and every product over them then takes a slow path of the CPU: several
    times the time of the same product over normal numbers. Flushing them changes each term by
    less than 1e-38 of its scale, far below fp32 rounding. The model's own ops never run
    inside: only the extra work on P does."""
    @functools.wraps(fn)
    def flushed(*args, **kwargs):
        if getattr(_FLUSH, "on", False) or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        before = bool(_TINY * _HALF == 0)     # the caller's mode (no getter exists)
        if not before and not torch.set_flush_denormal(True):
            return fn(*args, **kwargs)
        _FLUSH.on = True
        try:
            return fn(*args, **kwargs)
        finally:
            _FLUSH.on = False
            if not before:
                torch.set_flush_denormal(False)
    return flushed


# the smallest normal double (half of it is denormal), as Python floats (names: not folded):
# their product runs on the CPU's float unit under the same flush mode as torch's (one mode
# for float and double), with no dispatch and no floating-point error checks
_TINY, _HALF = 2.0 ** -1022, 0.5


def as_terms(value: torch.Tensor) -> torch.Tensor:
    """One component holding the whole value: [1, *value.shape]."""
    return value.unsqueeze(0)


def expand_terms(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Broadcast terms [c, *s] to the shape of ``ref`` (numpy broadcasting on the value axes)."""
    extra = ref.dim() - (t.dim() - 1)
    if extra > 0:
        t = t.reshape((t.shape[0],) + (1,) * extra + tuple(t.shape[1:]))
    return t.expand((t.shape[0],) + tuple(ref.shape))


def cat_chunks(chunks: Sequence[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    """Concatenate several chunks of terms of the same value into one [Σc, *ref.shape]."""
    return torch.cat([expand_terms(c, ref) for c in chunks], 0)


def push(op, t: torch.Tensor, pos: int, args: tuple, kwargs: dict) -> torch.Tensor:
    """Apply ``op`` to every component: ``op(*args)`` with ``args[pos]`` replaced by the
    component. Valid for any op linear in that argument with the others frozen:
    op(Σ_i x_i) = Σ_i op(x_i). Layout ops, means and pools with a direct form on the
    component axis (``_DIRECT``) skip vmap (whose dispatch costs ~0.2 ms a call on CPU)."""
    direct = _DIRECT.get(op) if pos == 0 else None
    if direct is not None:
        out = direct(t, t.dim() - 1, *args[1:], **kwargs)
        if out is not None:
            return out
    args = list(args)

    def one(x):
        args[pos] = x
        return op(*args, **kwargs)

    return torch.vmap(one)(t)


def _dims(dims, rank: int) -> list[int]:
    """Value dims (of a component, rank ``rank``) -> dims of the terms tensor."""
    return [d % rank + 1 for d in ([dims] if isinstance(dims, int) else dims)]


def _spread_dims(t: torch.Tensor, dims) -> list[int]:
    """Those of ``dims`` that t broadcasts (stride 0, more than one index)."""
    return [d for d in dims if t.stride(d) == 0 and t.shape[d] > 1]


def _first_along(t: torch.Tensor, dims) -> torch.Tensor:
    """t with size 1 along ``dims`` (its first index there): one copy of what a broadcast
    (stride 0) repeats along them."""
    return t[tuple(slice(0, 1) if d in dims else slice(None) for d in range(t.dim()))]


def _once_where_spread(fn, t: torch.Tensor, free: int) -> torch.Tensor:
    """fn(t) for an fn that maps each index of t's first ``free`` dims on its own (a pool's
    batch and channel dims): where t is spread along one of them (stride 0, a bias
    broadcast over the images), fn runs on one slice and the result is spread again."""
    spread = _spread_dims(t, range(free))
    if not spread:
        return fn(t)
    out = fn(_first_along(t, spread))
    return out.expand(tuple(t.shape[:free]) + tuple(out.shape[free:]))


def _leading_batch(spatial: int):
    """An op over the last ``spatial`` dims that takes one optional batch dim (pools): the
    component axis becomes (part of) that batch dim."""
    def apply(op):
        def direct(t, rank, *args, **kwargs):
            if rank == spatial + 1:
                return _once_where_spread(lambda u: op(u, *args, **kwargs), t, 2)
            if rank == spatial + 2:
                return _once_where_spread(lambda u: op(u.flatten(0, 1), *args, **kwargs)
                                          .unflatten(0, tuple(u.shape[:2])), t, 3)
            return None
        return direct
    return apply


def _roll(t: torch.Tensor, shifts, dims: list[int]) -> torch.Tensor:
    """t.roll(shifts, dims) on the dims t varies along; the dims it broadcasts (stride 0: a
    bias spread over the positions) are kept broadcast, where a roll moves nothing."""
    shifts = [shifts] * len(dims) if isinstance(shifts, int) else list(shifts)
    spread = _spread_dims(t, range(t.dim()))
    keep = [(s, d) for s, d in zip(shifts, dims) if d not in spread and t.shape[d] > 1]
    if not keep:
        return t
    return _first_along(t, spread).roll([s for s, _ in keep], [d for _, d in keep]).expand(t.shape)


def _reduce(op):
    def direct(t, rank, dims=None, keepdim=False, **kwargs):
        if kwargs or not dims:
            return None
        return op(t, _dims(dims, rank), keepdim)
    return direct


def _direct_ops() -> dict:
    """op -> f(t, rank of a component, *args without the data one, **kwargs): the op applied to
    every component of t at once (None: not covered, vmap it)."""
    a = torch.ops.aten
    out = {
        a.permute.default: lambda t, r, dims: t.permute([0] + _dims(dims, r)),
        a.reshape.default: lambda t, r, shape: t.reshape((t.shape[0],) + tuple(shape)),
        a.view.default: lambda t, r, shape: t.reshape((t.shape[0],) + tuple(shape)),
        a._unsafe_view.default: lambda t, r, shape: t.reshape((t.shape[0],) + tuple(shape)),
        a.flatten.using_ints: lambda t, r, start=0, end=-1: t.flatten(*_dims((start, end), r)),
        a.transpose.int: lambda t, r, d0, d1: t.transpose(*_dims((d0, d1), r)),
        # a broadcast term (a bias: stride 0 on the spread dims) stays broadcast: contiguous
        # changes no value, and a roll along a broadcast dim moves nothing
        a.contiguous.default: lambda t, r, **kw: None if kw else (
            t if 0 in t.stride() else t.contiguous()),
        a.roll.default: lambda t, r, shifts, dims=():
            _roll(t, shifts, _dims(dims, r)) if dims else None,
        a.select.int: lambda t, r, dim, index: t.select(_dims(dim, r)[0], index),
        a.slice.Tensor: lambda t, r, dim=0, start=None, end=None, step=1:
            a.slice.Tensor(t, _dims(dim, r)[0], start, end, step),
        a.unsqueeze.default: lambda t, r, dim: t.unsqueeze(dim % (r + 1) + 1),
        a.mean.dim: _reduce(torch.mean),
        a.sum.dim_IntList: _reduce(torch.sum),
        a.constant_pad_nd.default: lambda t, r, pad, value=0: a.constant_pad_nd.default(t, pad, value)
            if len(pad) // 2 <= r else None,
        a.pad.default: lambda t, r, pad, mode="constant", value=None: a.pad.default(t, pad, mode, value)
            if mode == "constant" and len(pad) // 2 <= r else None,
    }
    for k in (1, 2, 3):
        for name in (f"avg_pool{k}d", f"adaptive_avg_pool{k}d"):
            op = getattr(a, name, None)
            if op is not None:
                out[op.default] = _leading_batch(k)(op.default)
    return out


def push_multi(op, index: int, t: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Like ``push`` for a multi-output op (split, unbind, chunk): the ``index``-th output."""
    args = list(args)

    def one(x):
        args[0] = x
        return op(*args, **kwargs)[index]

    return torch.vmap(one)(t)


def place_in_cat(t: torch.Tensor, parts: Sequence[torch.Tensor], index: int, dim: int,
                 ref: torch.Tensor) -> torch.Tensor:
    """Terms of input ``index`` of cat(parts, dim), zero-padded to the output: cat is linear and
    its inputs occupy disjoint slices of the output."""
    dim = dim % ref.dim()
    t = expand_terms(t, parts[index])
    before = sum(int(p.shape[dim]) for p in parts[:index])
    after = sum(int(p.shape[dim]) for p in parts[index + 1:])
    pad = [0, 0] * (ref.dim() - 1 - dim) + [before, after]
    return F.pad(t, pad)


def cat_last(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Terms (or their pending inputs, window maps, positions maps) concatenated along the last
    dim: part k becomes sub-block k (``rules.layout._cat_pending``)."""
    return torch.cat(list(parts), -1)


def layer_norm_terms(t: torch.Tensor, x: torch.Tensor, normalized_shape, weight, eps: float):
    """LayerNorm with its scale frozen: LN(x) = γ ⊙ (x − mean(x)) / σ(x) + β. With σ from the
    forward pass, x ↦ γ ⊙ (x − mean(x)) / σ is linear, so each component is centred on its own
    (never spread evenly) and scaled by the same 1/σ; β is a separate constant term."""
    dims = tuple(range(-len(normalized_shape), 0))
    inv = inv_std(x, len(normalized_shape), eps).float()
    tf = t.float()
    out = _times(tf - tf.mean(dim=dims, keepdim=True), inv)
    if weight is not None:
        out = _times(out, weight.float())
    return out.to(t.dtype)


def _times(out: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """out · factor, in place when out (a fresh tensor) already has the broadcast shape."""
    if tuple(torch.broadcast_shapes(out.shape, factor.shape)) == tuple(out.shape):
        return out.mul_(factor)
    return out * factor


def rms_norm_terms(t: torch.Tensor, x: torch.Tensor, normalized_shape, weight, eps):
    """RMSNorm with its scale frozen: x ↦ γ ⊙ x / rms(x) is linear once rms(x) is fixed."""
    dims = tuple(range(-len(normalized_shape), 0))
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    inv = torch.rsqrt(x.float().pow(2).mean(dim=dims, keepdim=True) + eps)
    out = t.float() * inv
    if weight is not None:
        out = out * weight.float()
    return out.to(t.dtype)


def group_norm_terms(t: torch.Tensor, x: torch.Tensor, num_groups: int, weight, eps: float):
    """GroupNorm with frozen per-(sample, group) σ: centring within each group is linear."""
    c, n, ch = t.shape[0], t.shape[1], t.shape[2]
    tg = t.float().reshape(c, n, num_groups, -1)
    xg = x.float().reshape(n, num_groups, -1)
    inv = torch.rsqrt(xg.var(dim=-1, unbiased=False, keepdim=True) + eps)
    out = ((tg - tg.mean(dim=-1, keepdim=True)) * inv).reshape(t.shape)
    if weight is not None:
        out = out * weight.float().reshape((ch,) + (1,) * (t.dim() - 3))
    return out.to(t.dtype)


def _bn_scale(weight, running_var, eps):
    scale = torch.rsqrt(running_var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    return scale


def batch_norm_terms(t: torch.Tensor, weight, running_mean, running_var, eps: float):
    """Eval BatchNorm is affine per channel: x ↦ (x − μ)·γ/√(v+ε) + β. Linear part: x·γ/√(v+ε)."""
    scale = _bn_scale(weight, running_var, eps)
    shape = (t.shape[2],) + (1,) * (t.dim() - 3)
    return (t.float() * scale.reshape(shape)).to(t.dtype)


def batch_norm_shift(x: torch.Tensor, weight, bias, running_mean, running_var, eps: float):
    """The constant part of eval BatchNorm, β − μ·γ/√(v+ε), as one component [1, *x.shape]."""
    scale = _bn_scale(weight, running_var, eps)
    shift = -running_mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    return shift.reshape(shape).to(x.dtype).expand(x.shape).unsqueeze(0)


def bias_terms(bias: torch.Tensor, ref: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """A bias added along ``channel_dim`` of ``ref`` (last dim for linear, dim 1 for conv), as one
    component broadcast to ref's shape."""
    channel_dim = channel_dim % ref.dim()
    if bias.dtype != ref.dtype:
        bias = bias.to(ref.dtype)
    if bias.dim() == 1 and bias.shape[0] == ref.shape[channel_dim]:   # one view, one dispatch
        strides = [0] * (ref.dim() + 1)
        strides[1 + channel_dim] = bias.stride(0)
        return bias.as_strided((1,) + tuple(ref.shape), strides)
    shape = [1] * ref.dim()
    shape[channel_dim] = bias.shape[0]
    return bias.reshape(shape).expand(ref.shape).unsqueeze(0)


def attention_probs(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The attention probabilities scaled_dot_product_attention uses internally."""
    dh = q.shape[-1]
    scale = (1.0 / dh ** 0.5) if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    if is_causal:
        nq, nk = q.shape[-2], k.shape[-2]
        causal = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.float()
    return torch.softmax(s, dim=-1)


def frozen_attention_terms(t: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Attention with its probabilities P frozen is linear in the values:
    P @ Σ_c v_c = Σ_c P @ v_c. t: value terms [C, *batch, N, dh], probs [*batch, L, N]
    -> [C, *batch, L, dh]."""
    return torch.matmul(probs.to(t.dtype), t)


@_denormals_flushed
def pooled_values(t: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, split, index: int,
                  pending: torch.Tensor | None = None, heads: int = 1,
                  backend: str = "auto") -> torch.Tensor:
    """Terms of a pool's output P @ v, v = part ``index`` of linear(x, W) viewed as [B, N, S, H,
    dh] (``split`` = (S, H, dh)), from the terms of x: t [c, B, N, E] (or a pending projection's
    input [c, B, N, b] with its W ``pending``, ``heads``), P [B, H, L, N] frozen. Each
    component is first summed over the N tokens with the weights of each pool head and query
    (H·L rows instead of N), then mapped by W_v of its head -> [c, B, H, L, dh]."""
    s, h, dh = split
    b, _, n_q, n = probs.shape
    red = torch.matmul(probs.to(t.dtype).reshape(1, b, h * n_q, n), t)       # [c, B, H·L, .]
    if pending is not None:
        red = blocked_linear(red, pending, heads, backend)                    # [c, B, H·L, E]
    wv = weight.reshape(s, h, dh, -1)[index].to(red.dtype)                    # [H, dh, E]
    red = red.view(red.shape[0], b, h, n_q, -1)
    return torch.einsum("cbhle,hde->cbhld", red, wv)


def pooled_bias(probs: torch.Tensor, bias: torch.Tensor, split, index: int) -> torch.Tensor:
    """The term of the value projection's bias through a pool (``pooled_values``): Σ_n P · b_v
    per head and query, [1, B, H, L, dh]."""
    s, h, dh = split
    bv = bias.reshape(s, h, dh)[index].to(probs.dtype)
    return (probs.sum(-1, keepdim=True) * bv.view(1, h, 1, dh)).unsqueeze(0)


def head_blocks(value: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per-head components in head-blocked form: [..., H, ...] -> [H, ..., 1, ...] (component h
    holds head h's slice; the other heads' zeros are implicit)."""
    return value.movedim(head_dim, 0).unsqueeze(1 + head_dim)


def channel_head_blocks(value: torch.Tensor, dim: int, heads: int) -> torch.Tensor:
    """Per-head components of a value whose ``dim`` holds ``heads`` contiguous channel groups,
    head-blocked: [..., H·b, ...] -> [H, ..., b, ...] (the groups sum to the value)."""
    return value.unflatten(dim, (heads, -1)).movedim(dim, 0)


def densify_heads(t: torch.Tensor, dim: int, heads: int, per_head: int) -> torch.Tensor:
    """Head-blocked terms [C, ..., b, ...] -> plain terms [C, ..., H·b, ...]: component c's block
    goes to position c // per_head along ``dim``, zeros elsewhere (H outer, b inner)."""
    onehot = torch.eye(heads, dtype=t.dtype, device=t.device).repeat_interleave(per_head, 0)
    shape = [t.shape[0]] + [1] * (t.dim() - 1)
    shape.insert(dim + 1, heads)
    full = t.unsqueeze(dim + 1) * onehot.reshape(shape)
    return full.flatten(dim + 1, dim + 2)


def blocked_linear(t: torch.Tensor, weight: torch.Tensor, heads: int, backend: str = "auto",
                   out: torch.Tensor | None = None):
    """F.linear on head-blocked terms (blocks along the last dim): component c only meets
    columns of its own head, so y_c = x_c · W[:, h_c·b:(h_c+1)·b]ᵀ — one batched per-head
    contraction (Triton ``head_projection`` on CUDA) instead of H zero-padded projections.
    ``out``: a contiguous [c, *rest, E] tensor (a slice of a slab) the result is written into."""
    from fxdecomp_kernels import head_projection
    c, b = t.shape[0], t.shape[-1]
    rest = tuple(t.shape[1:-1])
    e = weight.shape[0]
    o = t.reshape(1, heads, -1, b)                           # [1, H, (per_head·rest), b]
    m = weight.reshape(e, heads, b).permute(1, 2, 0)         # [H, b, E]
    if out is not None:
        head_projection(o, m, backend=backend, out=out.view(heads, 1, -1, e))
        return out
    y = head_projection(o, m, backend=backend)               # [H, 1, (per_head·rest), E]
    return y.reshape((c,) + rest + (e,))


def blocked_linear_at(t: torch.Tensor, weight: torch.Tensor, heads: int, cdim: int,
                      backend: str = "auto") -> torch.Tensor:
    """``blocked_linear`` for a pending input whose channels (b per head) are in value dim
    ``cdim`` (NCHW: [c, B, b, H, W]) instead of the last: the value [c, B, E, H, W], E in the
    same dim."""
    y = blocked_linear(t.movedim(cdim + 1, -1).contiguous(), weight, heads, backend)
    return y.movedim(-1, cdim + 1)


# -------------------------------------------------------------------------------- folded weights
# A fold (``fold_*``, ``block_diagonal_heads``, ``identity_weight``) depends on weights only, not
# on the image: its result is kept between calls, keyed on the identity and version counter of
# each tensor argument (an in-place update bumps the version: the fold is recomputed; the entry
# goes when any of its tensors is freed). Not kept while autograd records through a weight, nor
# under torch.compile (which traces the fold itself).
_FOLDED: dict = {}


def _version(t: torch.Tensor) -> int:
    """The in-place version counter (inference tensors keep none: -1; the folds this module
    keeps are never written to, and a weight created in inference mode cannot be updated
    outside it)."""
    return -1 if t.is_inference() else t._version


def _folded(fn):
    @functools.wraps(fn)
    def cached(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(a.requires_grad for a in tensors)):
            return fn(*args)
        key = (fn.__name__,) + tuple((id(a), _version(a)) if isinstance(a, torch.Tensor) else a
                                     for a in args)
        out = _FOLDED.get(key)
        if out is None:
            out = _FOLDED[key] = fn(*args)
            for a in tensors:
                weakref.finalize(a, _FOLDED.pop, key, None)
        return out
    return cached


def linear_terms(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(t, W) on terms; dims that t stores broadcast (stride 0: a constant such as a bias
    spread over every position) are mapped once and broadcast again."""
    dims = [d for d in range(t.dim() - 1) if t.stride(d) == 0 and t.shape[d] > 1]
    if not dims:
        return F.linear(t, weight)
    one = _first_along(t, dims)
    return F.linear(one, weight).expand(tuple(t.shape[:-1]) + (weight.shape[0],))


def linear_output_terms(out: torch.Tensor, bias: torch.Tensor | None,
                        channel_dim: int = -1) -> torch.Tensor:
    """The terms of a linear map's (or convolution's) output when its input is one component
    (the whole input value x): A(x) = (A(x) + b) − b, the forward's own output less the bias
    (a component of its own; added along ``channel_dim``): [1, *out.shape]."""
    if bias is None:
        return out.unsqueeze(0)
    shape = [1] * out.dim()
    shape[channel_dim % out.dim()] = -1
    return (out - bias.reshape(shape)).unsqueeze(0)


@_folded
def fold_centering(weight: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """A LayerNorm's centring and γ folded into the linear map W [E, d] before it:
    γ ⊙ (xWᵀ − mean_E(xWᵀ)) = x (γ ⊙ (W − mean_E W))ᵀ (the mean over output rows is linear)."""
    w = weight - weight.mean(dim=0, keepdim=True)
    return w if gamma is None else w * gamma.reshape(-1, 1).to(w.dtype)


@_folded
def fold_rows(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """A per-output-feature scale (RMSNorm's γ, a layer scale) folded into W [E, d]:
    γ ⊙ (xWᵀ) = x (γ ⊙ W)ᵀ."""
    return weight * gamma.reshape(-1, 1).to(weight.dtype)


@_folded
def fold_linear(weight: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """A later linear map A [E', E] folded into W [E, d]: (xWᵀ)Aᵀ = x (A W)ᵀ."""
    return after.to(weight.dtype) @ weight


@_folded
def fold_projection(weight: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
    """Output directions D [E, k] folded into W [E, d]: (xWᵀ) D = x (Dᵀ W)ᵀ."""
    return project.to(weight.dtype).t() @ weight


@_folded
def pool_head_maps(weight: torch.Tensor, pending: torch.Tensor, heads: int, split,
                   index: int) -> torch.Tensor:
    """G [H', H, dh, b]: W_v of pool head p (part ``index`` of W [S·H·dh, E]) after the
    pending map of head k (W' [E, H'·b]), G[k, p] = W_v[p] W'_k."""
    s, h, dh = split
    wv = weight.reshape(s, h, dh, -1)[index]                                 # [H, dh, E]
    wp = pending.reshape(pending.shape[0], heads, -1).to(wv.dtype)          # [E, H', b]
    return torch.einsum("poe,ekd->kpod", wv, wp)


@_denormals_flushed
def pooled_probe_values(w: torch.Tensor, rmap: torch.Tensor, probs_l: torch.Tensor,
                        v_l: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, split,
                        index: int, pending: torch.Tensor, heads: int) -> torch.Tensor:
    """``pooled_values`` of per-token terms held as a probe (ω [1, B, N, 1] and rows r [1, B, N,
    1] of an attention's P_l [B', H', Q, N'], its V [B', H', N', b], pending W' [E, H'·b]):
    term (k, t) at token n of image i is ω·P_l[r, k, t] · V[i, k, t] W'_kᵀ. Through the pool
    (P [B, H, L, N], W_v) it is σ[i, (p, l), (k, t)] · V[i, k, t] G[k, p]ᵀ, with σ = P · (ω
    P_l at r) one [H·L, N] x [N, H'·N'] product per image and G the per-(head, pool head) map
    (``pool_head_maps``): nothing at every token. -> [H'·N', B, H, L, dh] (head outer)."""
    s, h, dh = split
    b, _, n_q, n = probs.shape
    q_len = probs_l.shape[2]
    r = rmap.reshape(b, n) if rmap.numel() == b * n else None
    if r is None or heads != probs_l.shape[1] or pending.shape[1] != heads * v_l.shape[-1] \
            or not bool((r // q_len == torch.arange(b, device=r.device).view(b, 1)).all()):
        # another layout (sub-blocks, rows of other images): the terms at every token
        sw, wmap, vv = probe_factors(w, rmap, probs_l, v_l)
        t = unfactor(sw, vv, wmap)
        return pooled_values(t, probs, weight, split, index, pending, heads)
    got = probs_l[r.reshape(-1) // q_len, :, r.reshape(-1) % q_len, :]       # [B·N, H', N']
    sw = got.reshape(b, n, -1).to(w.dtype) * w.reshape(b, n, 1)
    sigma = torch.bmm(probs.to(sw.dtype).reshape(b, h * n_q, n), sw)         # [B, H·L, H'·N']
    g = pool_head_maps(weight, pending, heads, split, index).to(v_l.dtype)   # [H', H, dh, b]
    z = torch.einsum("ikte,kpoe->ktipo", v_l[:b], g)                          # [H', N', B, H, dh]
    sg = sigma.view(b, h, n_q, heads, -1).permute(3, 4, 0, 1, 2)              # [H', N', B, H, L]
    t = sg.unsqueeze(-1) * z.unsqueeze(-2)                           # [H', N', B, H, L, dh]
    return t.reshape((-1, b, h, n_q, dh))


@_folded
def block_diagonal_heads(weight: torch.Tensor, heads: int, merged: int) -> torch.Tensor:
    """A pending projection's W [E, H·b] after K = ``merged`` positions are merged into the
    value's last dim (a patch merging's gather: [..., K, E] -> [..., K·E]): the input becomes
    [..., K·b] and W' [K·E, H·K·b] is block diagonal, W'[k·E + e, h·K·b + k·b + j] =
    W[e, h·b + j] (position k of the merged input only reaches block k of the value)."""
    e, hb = weight.shape
    w = weight.reshape(1, e, heads, 1, hb // heads)
    eye = torch.eye(merged, dtype=weight.dtype, device=weight.device)
    return (eye.reshape(merged, 1, 1, merged, 1) * w).reshape(merged * e, heads * merged * (hb // heads))


@_folded
def pooled_heads(weight: torch.Tensor, heads: int, merged: int) -> torch.Tensor:
    """A pending projection's W [E, H·b] after an average pool whose K = ``merged`` pooled
    positions were gathered into the input's channel slot (``pool_gather``: [..., K·b]): the
    pooled value keeps E channels, the mean of the K sub-blocks: W' [E, H·K·b],
    W'[e, h·K·b + k·b + j] = W[e, h·b + j] / K."""
    e = weight.shape[0]
    return block_diagonal_heads(weight, heads, merged).view(merged, e, -1).sum(0) / merged


def pool_gather(t: torch.Tensor, cdim: int, kernel: Sequence[int]) -> torch.Tensor:
    """The positions an average pool with stride = kernel (no padding) averages, gathered into
    the channel slot: t [c, ..., X (value dim ``cdim``), ..., S_1, ..., S_n] (the pool's n
    spatial dims last) -> [c, ..., K·X, ..., S_1/k_1, ..., S_n/k_n], sub-position k (row-major
    over the kernel) becoming sub-block k. For windowed pending inputs, their window maps and
    factors: each pooled position keeps the window of every position it averages."""
    n, ch = len(kernel), cdim + 1
    lead, spatial = tuple(t.shape[:-n]), tuple(t.shape[-n:])
    x = t.reshape(lead + sum(((s // k, k) for s, k in zip(spatial, kernel)), ()))
    nl = len(lead)
    x = x.permute(list(range(ch)) + [nl + 2 * i + 1 for i in range(n)] + list(range(ch, nl))
                  + [nl + 2 * i for i in range(n)])
    return x.reshape(lead[:ch] + (math.prod(kernel) * lead[ch],) + lead[ch + 1:]
                     + tuple(s // k for s, k in zip(spatial, kernel)))


_IDENTITY: dict = {}


def identity_weight(n: int, like: torch.Tensor) -> torch.Tensor:
    """I [n, n] (``like``'s dtype and device; one tensor per kind, so folds into it are kept):
    terms t made pending as blocked_linear(t, I, 1) = t."""
    if torch.compiler.is_compiling():
        return torch.eye(n, dtype=like.dtype, device=like.device)
    key = (n, like.dtype, like.device)
    if key not in _IDENTITY:
        _IDENTITY[key] = torch.eye(n, dtype=like.dtype, device=like.device)
    return _IDENTITY[key]


def reshape_rest(t: torch.Tensor, shape, merged: int = 1) -> torch.Tensor:
    """A pending projection's input [c, *rest, b] through reshape(value, shape), where the
    value's new last dim is ``merged`` trailing positions times its old last dim (1: the last
    dim is unchanged): [c, *shape[:-1], merged·b]. A row-major reshape that keeps the last dim
    E moves whole rows, so the input moves the same rows."""
    return t.reshape((t.shape[0],) + tuple(shape[:-1]) + (merged * t.shape[-1],))


def inv_std(x: torch.Tensor, n_dims: int, eps, centered: bool = True) -> torch.Tensor:
    """The frozen 1/σ of a LayerNorm (``centered``) or 1/rms of an RMSNorm over the last
    ``n_dims`` dims of x, keepdim: [*x.shape[:-n], 1, ...]."""
    dims = tuple(range(-n_dims, 0))
    xf = x.float()
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if centered and not (torch.is_grad_enabled() and x.requires_grad):
        # the fused kernel's own 1/σ (a separate var() is several times slower on CPU; its
        # 1/σ output has no gradient, so not while autograd records through x)
        inv = torch.ops.aten.native_layer_norm(xf, list(xf.shape[-n_dims:]), None, None, eps)[2]
        return inv.reshape(tuple(x.shape[:-n_dims]) + (1,) * n_dims).to(x.dtype)
    var = xf.var(dim=dims, unbiased=False, keepdim=True) if centered else \
        xf.pow(2).mean(dim=dims, keepdim=True)
    return torch.rsqrt(var + eps).to(x.dtype)


def layer_norm_with_inv(x: torch.Tensor, normalized_shape, weight, bias, eps: float):
    """The forward's LayerNorm and its frozen 1/σ (as ``inv_std``) from one pass over x: the
    fused kernel's own 1/σ output (while autograd records through x, ``F.layer_norm`` and a
    differentiable 1/σ instead). The output is the model's own, bit for bit."""
    n = len(normalized_shape)
    if torch.is_grad_enabled() and x.requires_grad:
        return F.layer_norm(x, normalized_shape, weight, bias, eps), inv_std(x, n, eps)
    out, _, inv = torch.ops.aten.native_layer_norm(x, list(normalized_shape), weight, bias, eps)
    return out, inv.reshape(tuple(x.shape[:-n]) + (1,) * n).to(x.dtype)


def normalize_terms(t: torch.Tensor, inv: torch.Tensor, weight, centered: bool) -> torch.Tensor:
    """A LayerNorm (``centered``) or RMSNorm over the last dim on terms, with its frozen 1/σ
    ``inv`` (from ``inv_std``) given: γ ⊙ (t − mean t)·inv, or γ ⊙ t·inv (see
    ``layer_norm_terms``; one σ for every chunk of the value)."""
    tf = t.float()
    out = _times(tf - tf.mean(dim=-1, keepdim=True), inv.float()) if centered else tf * inv.float()
    if weight is not None:
        out = _times(out, weight.float())
    return out.to(t.dtype)


def project_terms(t: torch.Tensor, ref: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
    """Terms of a value [c, *ref.shape] mapped through output directions D [E, k]: [c, ..., k]."""
    return expand_terms(t, ref) @ project.to(t.dtype)


@_denormals_flushed
def write_terms(parts: Sequence, ref: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """All terms of one value, each written once into one preallocated [Σc, *ref.shape] slab.

    A part is a terms tensor (broadcast to ref's shape and copied in), or a pending per-head
    projection ``(t, W, heads)`` whose value is ``blocked_linear(t, W, heads)`` (or a factored
    one ``(σ, W, heads, v)``: ``factored_linear``): the projection
    writes straight into its slice of the slab (no per-layer piece is concatenated later). When
    autograd records (``out=`` ops are not differentiable) the same values are concatenated."""
    def materialize(p):
        if isinstance(p, (tuple, list)) and len(p) == 4:
            return factored_linear(p[0], p[3], p[1], p[2], backend)
        return blocked_linear(p[0], p[1], p[2], backend) if isinstance(p, (tuple, list)) else p

    if len(parts) == 1 and not isinstance(parts[0], (tuple, list)) \
            and tuple(parts[0].shape[1:]) == tuple(ref.shape) and 0 not in parts[0].stride() \
            and parts[0].untyped_storage().data_ptr() != ref.untyped_storage().data_ptr():
        return parts[0]   # already one tensor of its own (not a view of the value): no copy
    tensors = [x for p in parts for x in (p if isinstance(p, (tuple, list)) else (p,))
               if isinstance(x, torch.Tensor)]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return torch.cat([expand_terms(materialize(p), ref) for p in parts], 0)
    sizes = [_part_size(p) for p in parts]
    starts = [sum(sizes[:i]) for i in range(len(parts))]
    out = ref.new_empty((sum(sizes),) + tuple(ref.shape))
    fits = [isinstance(p, (tuple, list)) and len(p) == 3
            and tuple(p[0].shape[1:-1]) == tuple(ref.shape[:-1]) for p in parts]
    for group in _shared_weight_groups(parts, fits):
        # one W for all their components (H = 1; e.g. terms made pending with W = I at the
        # same patch merging, then folded alike): read it once, for their concatenated inputs
        y = blocked_linear(torch.cat([parts[i][0] for i in group]), parts[group[0]][1], 1, backend)
        offset = 0
        for i in group:
            out[starts[i]:starts[i] + sizes[i]].copy_(y[offset:offset + sizes[i]])
            offset += sizes[i]
            fits[i] = None
    for p, n, start, fit in zip(parts, sizes, starts, fits):
        dst = out[start:start + n]
        if isinstance(p, (tuple, list)) and len(p) == 4:     # factored (σ, W, heads, v)
            factored_linear(p[0], p[3], p[1], p[2], backend, out=dst)
        elif fit:
            blocked_linear(p[0], p[1], p[2], backend, out=dst)
        elif fit is not None:
            dst.copy_(materialize(p))
    return out


def _part_size(p) -> int:
    """Components in one part of ``write_terms`` (per-window-row weights in P's order,
    [W, H, Q, K, N]: H·N·W)."""
    if not isinstance(p, (tuple, list)):
        return int(p.shape[0])
    if len(p) == 4 and _p_order(p[3]):
        windows, heads, _, _, n_tok = p[0].shape
        return int(windows * heads * n_tok)
    if len(p) == 4 and _kept_rows(p[3]):
        _, windows, heads, _, n_tok = p[0].shape
        return int(windows * heads * n_tok)
    return int(p[0].shape[0])


def _shared_weight_groups(parts: Sequence, fits: list) -> list[list[int]]:
    """Indices of pending parts (t, W, 1) that share one W tensor and t's shape (after the first
    dim), in groups of two or more (none under torch.compile, where folds are traced, not
    kept: no two parts hold one W tensor)."""
    if torch.compiler.is_compiling():
        return []
    groups: dict = {}
    for i, (p, fit) in enumerate(zip(parts, fits)):
        if fit and p[2] == 1:
            groups.setdefault((id(p[1]), tuple(p[0].shape[1:]), p[0].dtype), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


# -------------------------------------------------------------------------------- deferred moves
# A pending projection's input t [c, *rest, b] moved by ops that only move rows (window reverse,
# roll, zero pad, reshapes and permutes that keep the last dim, a patch merging's gather of K
# rows into one) and scaled per row (a norm's frozen 1/σ) is, after all of them,
#     V[c, r, k·b + j] = w[r, k] · t[c, i[r, k], j]      (i: flat index over t's rest dims)
# for one integer map i and one weight w per (output row r, merged sub-row k). ``positions``
# [2, *rest', K] float64 holds them (row 0: i, exact up to 2^53; row 1: w): the ops apply to it
# (as 2 components) instead of to t, which is read once, where V is needed (``gather_positions``).
def home_positions(ref: torch.Tensor) -> torch.Tensor:
    """The positions of a value ``ref`` [*rest, E] before any move: i = the flat row index, w = 1
    ([2, *rest, 1], float64)."""
    rest = tuple(ref.shape[:-1])
    index = torch.arange(math.prod(rest), dtype=torch.float64, device=ref.device).reshape(rest + (1,))
    return torch.stack([index, torch.ones_like(index)])


def scale_positions(positions: torch.Tensor, factor) -> torch.Tensor:
    """Rows scaled by a frozen factor (a scalar, or [*rest', 1]: one per row, e.g. 1/σ): the
    weights w take it, the indices stay."""
    if not isinstance(factor, torch.Tensor):
        factor = torch.tensor(factor, dtype=torch.float64)
    return torch.cat([positions[:1], positions[1:] * factor.to(positions.device, torch.float64)])


def gather_positions(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The moved and scaled input V (see above) from t [c, *rest, b] and its ``positions``
    [2, *rest', K]: [c, *rest', K·b], one gather and one multiply."""
    c, b = t.shape[0], t.shape[-1]
    rest, k = tuple(positions.shape[1:-1]), positions.shape[-1]
    flat = t.reshape(c, -1, b)
    home = torch.arange(flat.shape[1], dtype=positions.dtype) if positions.device.type == "cpu" \
        and positions[0].numel() == flat.shape[1] else None
    if home is not None and bool((positions[0].reshape(-1) == home).all()) \
            and bool((positions[1] == 1).all()):
        # moves that kept every row where it was in memory (a transpose of a size-1 dim, a
        # reshape), nothing scaled: the input as it is (a view; checked on the CPU only, where
        # it costs no device sync)
        return flat.reshape((c,) + rest + (k * b,))
    index = positions[0].reshape(-1).to(torch.long)
    out = flat.index_select(1, index).view(c, -1, k, b)
    out.mul_(positions[1].reshape(1, -1, k, 1).to(out.dtype))
    return out.reshape((c,) + rest + (k * b,))


def reduce_positions(t: torch.Tensor, positions: torch.Tensor, dims: tuple, keepdim: bool,
                     mean: bool) -> torch.Tensor:
    """sum (``mean``: mean) over value dims ``dims`` (not the last) of the moved and scaled
    input V of t [c, *rest, b] (see ``gather_positions``), without gathering V: each output row
    (kept dims, sub-row k) is one weighted sum of n rows of t, Σ_r w[r, k]·t[i[r, k]] (divided
    by n for a mean), one ``embedding_bag`` per component that reads each row of t once.
    -> [c, *kept, K·b] (keepdim: size 1 at ``dims``)."""
    rank = positions.dim() - 1                              # the value's rank
    kept = [d for d in range(rank - 1) if d not in dims]
    order = [0] + [1 + d for d in kept] + [rank] + [1 + d for d in dims]
    p = positions.permute(order)                            # [2, *kept, K, *reduced]
    kept_shape, k = tuple(p.shape[1:1 + len(kept)]), p.shape[1 + len(kept)]
    n = math.prod(p.shape[2 + len(kept):])
    c, b = t.shape[0], t.shape[-1]
    if math.prod(t.shape[1:-1]) > 1 and not any(t.stride()[1:-1]):   # one row broadcast (a bias)
        wsum = p[1].reshape(-1, n).sum(1)
        out = (wsum / n if mean else wsum).to(t.dtype).view(1, -1, 1) * t.reshape(c, -1, b)[:, :1]
        out = out.reshape((c,) + kept_shape + (k * b,))
        return _unsqueeze_at(out, dims) if keepdim else out
    index = p[0].reshape(-1, n).to(torch.long)
    weight = (p[1].reshape(-1, n) / n if mean else p[1].reshape(-1, n)).to(t.dtype)
    flat, rowmap = _memory_rows(t)
    if rowmap is not None:
        index = rowmap[index]
    if c <= 64:
        out = torch.stack([F.embedding_bag(index, flat[i], per_sample_weights=weight, mode="sum")
                           for i in range(c)])
    else:   # many components (tokens mode): one gather, one multiply, one sum
        out = (flat.index_select(1, index.reshape(-1)).view(c, -1, n, b)
               * weight.view(1, -1, n, 1)).sum(2)
    out = out.reshape((c,) + kept_shape + (k * b,))
    return _unsqueeze_at(out, dims) if keepdim else out


def _unsqueeze_at(out: torch.Tensor, dims) -> torch.Tensor:
    """Reduced terms [c, *kept, ...] with size 1 put back at the value dims ``dims``."""
    for d in sorted(dims):
        out = out.unsqueeze(1 + d)
    return out


def _memory_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """t [c, *rest, b] as rows [c, R, b] without a copy where its rows are whole rows of its
    memory (last dim contiguous, every rest stride a multiple of b: e.g. a permuted or
    sliced view of a channels-last value) -> (rows, rowmap [Π rest]: the memory row of each
    logical row); (t.reshape(c, -1, b), None) where a reshape is a view or a copy is needed."""
    c, b = t.shape[0], t.shape[-1]
    rest, strides = t.shape[1:-1], t.stride()[1:-1]
    try:
        return t.view(c, -1, b), None
    except RuntimeError:
        pass
    if 0 in t.shape or t.stride(-1) != 1 or any(s % b for s in strides):
        return t.reshape(c, -1, b), None
    rowmap = torch.zeros((), dtype=torch.long, device=t.device)
    for size, stride in zip(rest, strides):
        rowmap = rowmap.unsqueeze(-1) + torch.arange(size, device=t.device) * (stride // b)
    n_rows = int(rowmap.max()) + 1
    rows = t.as_strided((c, n_rows, b), (t.stride(0), b, 1), t.storage_offset())
    return rows, rowmap.reshape(-1)


@_denormals_flushed
def split_heads_tokens(probs: torch.Tensor, v: torch.Tensor, head_dim: int | None,
                       out: torch.Tensor) -> torch.Tensor:
    """Attention output O = P @ V split per head and per source token t:
    O = Σ_h Σ_t P[..., h, :, t, None] · V[..., h, t, None, :], component index h·N + t, in
    head-blocked form [H·N, ..., 1, Q, dh] (plain [N, *O.shape] without a head dim). With P
    frozen this is exact: the sum over t is the matmul."""
    probs = probs.to(v.dtype)
    # contrib[t] = P[..., :, t, None] * V[..., t, None, :]   -> [N, ..., Q, dh]
    contrib = torch.einsum("...qt,...td->t...qd", probs, v.expand(probs.shape[:-2] + v.shape[-2:]))
    contrib = contrib.expand((contrib.shape[0],) + tuple(out.shape))
    if head_dim is None:
        return contrib
    blocked = contrib.movedim(1 + head_dim, 0)                 # [H, N, ..., Q, dh]
    return blocked.reshape((-1,) + tuple(blocked.shape[2:])).unsqueeze(1 + head_dim)


def where_terms(t: torch.Tensor, cond: torch.Tensor, keep_where_true: bool) -> torch.Tensor:
    """where(cond, a, b) is linear in (a, b) with cond frozen: a's terms survive where cond."""
    zero = torch.zeros((), dtype=t.dtype, device=t.device)
    return torch.where(cond, t, zero) if keep_where_true else torch.where(cond, zero, t)


def max_pool2d_terms(t: torch.Tensor, x: torch.Tensor, args: tuple) -> torch.Tensor:
    """Max pooling with the argmax frozen: each output takes the component values at the
    position that held the maximum in this forward pass (a gather, linear in the terms)."""
    kernel = args[0]
    stride = args[1] if len(args) > 1 and args[1] else kernel
    padding = args[2] if len(args) > 2 else 0
    dilation = args[3] if len(args) > 3 else 1
    ceil_mode = args[4] if len(args) > 4 else False
    out, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    flat = t.flatten(-2)
    gathered = flat.gather(-1, idx.flatten(-2).unsqueeze(0).expand(t.shape[0], -1, -1, -1))
    return gathered.reshape((t.shape[0],) + tuple(out.shape))


def max_dim_terms(t: torch.Tensor, x: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
    """max(x, dim).values with the argmax frozen: a gather along ``dim``."""
    dim = dim % x.dim()
    idx = x.argmax(dim=dim, keepdim=True)
    out = t.gather(1 + dim, idx.unsqueeze(0).expand((t.shape[0],) + tuple(idx.shape)))
    return out if keepdim else out.squeeze(1 + dim)


def take(t: torch.Tensor, dim: int, index, group: int | None = None) -> torch.Tensor:
    """Rows ``index`` along ``dim`` (a view when they are contiguous or evenly spaced): what a
    demand keeps.
    With ``group``: ``dim`` holds ``group`` outer rows × an inner size; keep outer rows
    ``index`` with all their inner elements."""
    if group is not None:
        dim = dim % t.dim()
        inner = t.unflatten(dim, (group, -1))
        return take(inner, dim, index).flatten(dim, dim + 1)
    index = tuple(index)
    if index and index == tuple(range(index[0], index[0] + len(index))):
        return t.narrow(dim, index[0], len(index))
    step = index[1] - index[0] if len(index) > 1 else 0
    if step > 1 and index == tuple(range(index[0], index[-1] + 1, step)):
        # every step-th row (a strided slice, e.g. a patch merging's x[0::2]): a view
        return t[(slice(None),) * (dim % t.dim()) + (slice(index[0], index[-1] + 1, step),)]
    return t.index_select(dim, torch.tensor(index, dtype=torch.long, device=t.device))


def group_components(terms: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum raw terms that share a final label: out[g] = Σ_{i: index[i]=g} terms[i]."""
    out = terms.new_zeros((n_groups,) + tuple(terms.shape[1:]))
    return out.index_add_(0, index.to(terms.device), terms)


_DIRECT = _direct_ops()


# -------------------------------------------------------------------------------- pushers
# Named per op so the rewritten graph reads ``push_linear(t, ...)``; cached so one op gets one
# function object.
_PUSHERS: dict = {}


def _op_label(op) -> str:
    return str(getattr(op, "__name__", op)).replace(".", "_")


def pusher(op, pos: int = 0):
    """A function f(t, args, kwargs) applying ``op`` to every component of ``t`` at arg ``pos``
    (see ``push``)."""
    key = (op, pos)
    if key not in _PUSHERS:
        def f(t, args, kwargs):
            return push(op, t, pos, args, kwargs)
        name = "push_" + _op_label(op)
        f.__name__ = f.__qualname__ = name if pos == 0 else f"{name}_arg{pos}"
        _PUSHERS[key] = f
    return _PUSHERS[key]


def multi_pusher(op, index: int):
    """Like ``pusher`` for output ``index`` of a multi-output op (see ``push_multi``)."""
    key = (op, "multi", index)
    if key not in _PUSHERS:
        def f(t, args, kwargs):
            return push_multi(op, index, t, args, kwargs)
        f.__name__ = f.__qualname__ = f"push_{_op_label(op)}_out{index}"
        _PUSHERS[key] = f
    return _PUSHERS[key]


def einsum_pusher(equation: str, k: int):
    """f(t, operands): einsum(equation, *operands) with operand ``k`` replaced by every component
    of ``t`` (einsum is linear in each operand)."""
    key = ("einsum", equation, k)
    if key not in _PUSHERS:
        def push_einsum(t, operands):
            ops = list(operands)

            def one(x):
                ops[k] = x
                return torch.einsum(equation, *ops)
            return torch.vmap(one)(t)
        _PUSHERS[key] = push_einsum
    return _PUSHERS[key]


# -------------------------------------------------------------------------------- constants
def addmm_bias(bias: torch.Tensor, ref: torch.Tensor, beta) -> torch.Tensor:
    """The β·bias term of addmm/baddbmm as one component broadcast to the output."""
    return (bias * beta).expand(ref.shape).unsqueeze(0)


def scalar_terms(ref: torch.Tensor, value: float) -> torch.Tensor:
    """A scalar added to a value (x + c) as one constant component."""
    return torch.full_like(ref, value).unsqueeze(0)


def where_scalar(cond: torch.Tensor, ref: torch.Tensor, value: float, keep: bool) -> torch.Tensor:
    """A scalar branch of where(cond, a, b) as one constant component (value where it is taken)."""
    full = torch.full_like(ref, value)
    zero = torch.zeros_like(ref)
    return (torch.where(cond, full, zero) if keep else torch.where(cond, zero, full)).unsqueeze(0)


def masked_value(mask: torch.Tensor, ref: torch.Tensor, value) -> torch.Tensor:
    """The fill value of masked_fill(x, mask, v) as one constant component (v where mask)."""
    return torch.where(mask, torch.as_tensor(value, dtype=ref.dtype, device=ref.device),
                       torch.zeros((), dtype=ref.dtype, device=ref.device)).expand(ref.shape).unsqueeze(0)


def pad_border(x: torch.Tensor, pad, value: float) -> torch.Tensor:
    """The constant the border of a constant pad adds: pad(0, value) as one component."""
    return F.pad(torch.zeros_like(x), pad, value=value).unsqueeze(0)


def unsqueeze_terms(t: torch.Tensor, dim: int, ref: torch.Tensor) -> torch.Tensor:
    """Terms of x -> terms of x.unsqueeze(dim) (what stack does to each input)."""
    t = expand_terms(t, ref)
    return t.unsqueeze(1 + dim % (ref.dim() + 1))


def index_tensor(index, like: torch.Tensor) -> torch.Tensor:
    """A static index list as a long tensor on ``like``'s device."""
    return torch.tensor(index, dtype=torch.long, device=like.device)


def repeat_kv(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention: repeat the key/value heads to the number of query heads."""
    return v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)


def split_windows(t, windows: int):
    """Terms [K, B·windows, ...] (batch row b' = image b'//windows, window b' % windows) ->
    [K·windows, B·windows, ...]: term k·windows + w keeps only the rows of window w. Exact: the
    sum over w is the input."""
    rows = t.shape[1]
    win = torch.arange(rows, device=t.device) % windows
    mask = (win.view(1, rows) == torch.arange(windows, device=t.device).view(windows, 1))
    mask = mask.to(t.dtype).view((1, windows, rows) + (1,) * (t.dim() - 2))
    return (t.unsqueeze(1) * mask).reshape((t.shape[0] * windows,) + tuple(t.shape[1:]))


# -------------------------------------------------------------------------------- windowed terms
# Window attention folds windows into the batch ([B·windows, ...], row b' = image b'//windows,
# window b' % windows). Per-source-token terms t [K, B·windows, ...] then stand for K·windows
# components: component k·windows + w is t[k] on the rows of window w only. Instead of splitting
# them at the attention (``split_windows``: K·windows terms, each as wide as all rows, mostly
# zeros), a pending chunk carries t and a *window map* m [1, *rest, S] next to its input
# [c, *rest, S·b]: the window of each position and sub-position block (S = 1, then times K at
# each patch merging), moved by the same layout ops as t. The components are separated where the
# positions are reduced (``window_reduce``) or, for any other op, by ``split_by_map``. The map
# holds the attention's row b' (the window is b' % windows, the image b' // windows).
def window_map(t: torch.Tensor, windows: int) -> torch.Tensor:
    """The window map of terms t [c, B·windows, *rest, b] (the value's dim 0 folds the windows
    into the batch): [1, B·windows, *rest, 1], int64, entry b' (the attention's row)."""
    rows = t.shape[1]
    win = torch.arange(rows, device=t.device)
    shape = (1, rows) + (1,) * (t.dim() - 2)
    return win.view(shape).expand((1,) + tuple(t.shape[1:-1]) + (1,)).contiguous()


def split_by_map(t: torch.Tensor, wmap: torch.Tensor, windows: int) -> torch.Tensor:
    """Terms t [c, *rest, S·b] whose positions and sub-blocks belong to windows ``wmap``
    [1, *rest, S] -> [c·windows, *rest, S·b]: term k·windows + w is t[k] where the map is w,
    zero elsewhere. Exact: every element is in exactly one window, so the sum over w is t."""
    s = wmap.shape[-1]
    m = (wmap % windows).repeat_interleave(t.shape[-1] // s, dim=-1)    # [1, *rest, S·b]
    sel = torch.arange(windows, device=t.device).view((windows,) + (1,) * (t.dim() - 1))
    out = t.unsqueeze(1) * (m == sel).to(t.dtype)                       # [c, W, *rest, S·b]
    return out.reshape((t.shape[0] * windows,) + tuple(t.shape[1:]))


def window_reduce(t: torch.Tensor, wmap: torch.Tensor, windows: int, dims, keepdim: bool,
                  mean: bool) -> torch.Tensor:
    """A sum (``mean``: a mean) over value dims ``dims`` of terms t [c, *rest, S·b] with window
    map ``wmap`` [1, *rest, S], kept per window: [c·windows, *kept, S·b] (reduced dims kept as 1
    with ``keepdim``), term k·windows + w summing only the elements of window w. The positions
    reduced are segment-summed by window id (index_add_ along one flattened axis), so only
    ``windows`` sums are written per kept row, not a copy of t per window."""
    c, rest, s = t.shape[0], tuple(t.shape[1:-1]), wmap.shape[-1]
    b = t.shape[-1] // s
    nd = len(rest)
    red = sorted({d % nd for d in dims})
    kept = [d for d in range(nd) if d not in red]
    n_kept = math.prod(rest[d] for d in kept)
    n_red = math.prod(rest[d] for d in red)
    perm = kept + red
    src = t.unflatten(-1, (s, b)).permute([0] + [1 + d for d in perm] + [nd + 1, nd + 2])
    src = src.reshape(c, n_kept, n_red * s, b)
    wm = (wmap % windows).expand((1,) + rest + (s,))[0].permute(perm + [nd]).reshape(n_kept, n_red * s)
    sub = torch.arange(s, device=t.device).repeat(n_red)
    same = bool((wm == wm[:1]).all())
    if same and b < 8:   # one index for every kept row (the batch), and
        # narrow rows (a factored scale, b = 1): add whole rows along dim 0 (contiguous)
        src0 = src.reshape(c * n_kept, n_red * s, b).transpose(0, 1).contiguous()
        out0 = t.new_zeros((windows * s, c * n_kept, b)).index_add_(0, wm[0] * s + sub, src0)
        out = out0.transpose(0, 1).reshape(c, n_kept, windows * s, b)
    elif same:
        out = t.new_zeros((c, n_kept, windows * s, b))
        out.view(c * n_kept, windows * s, b).index_add_(
            1, wm[0] * s + sub, src.reshape(c * n_kept, n_red * s, b))
    else:
        out = t.new_zeros((c, n_kept, windows * s, b))
        idx = (wm * s + sub).view(1, n_kept, n_red * s, 1).expand(src.shape)
        out.scatter_add_(2, idx, src)
    if mean:
        out /= n_red
    shape = [1 if d in red else rest[d] for d in range(nd)] if keepdim else [rest[d] for d in kept]
    out = out.view(c, n_kept, windows, s * b).movedim(2, 1)
    return out.reshape([c * windows] + shape + [s * b])


# Factored per-token terms. A term of one source token is rank one in (query position, channel):
# t[k, b', q, :] = P[b', h, q, tok] · V[b', h, tok, :] (k = h·N + tok). Through the ops a
# pending chunk meets (moves of positions, patch mergings, per-position scales, linear maps of
# the channels folded into W) it stays s[k, *rest, S] ⊗ V[k, row, :]: a scalar per position and
# sub-block (the window map's shape, b times smaller than t) times the value row of the
# attention row b' the window map names. Reduced per window, s becomes σ [k·windows, B, S] and
# each component is Σ_j σ_j · (v W_j): no term is ever b wide per position.
# Probed per-token terms. s = P (per head and source token) is as large as the attention's
# probabilities, and every layout op would copy it. Instead the chunk carries a probe: weights
# ω [1, *rest, S] (ones at the attention, scaled by the same frozen per-row factors s would be)
# and a row map r [1, *rest, S] (the attention's flat output row b'·Q + q, moved by the same
# ops; the window map is r // Q): s = ω · P[b', h, q, t] is read from P once, where the terms
# are reduced (``window_reduce_probe``) or needed (``probe_factors``).
def token_probe(probs: torch.Tensor, v: torch.Tensor, q_shape: Sequence[int] | None = None):
    """The probe of the per-token terms of P [B', H, Q, N] and V [B', H, N, dh] in the layout
    [B', Q, H·dh] (or [B', *q_shape, H·dh], the queries viewed as a window, e.g. 7 x 7):
    (ω [1, B', Q, 1] ones, r [1, B', Q, 1] = b'·Q + q (Q as q_shape), V [B', H, N, dh])."""
    rows, q = probs.shape[0], probs.shape[2]
    key = (rows, q, tuple(q_shape or (q,)), v.dtype, probs.device)
    compiling = torch.compiler.is_compiling()
    hit = None if compiling else _PROBES.get(key)
    if hit is None:
        # the same two constants for every call at this shape: made once (nothing writes into
        # them: every op on a chunk's tensors returns a new one)
        r = torch.arange(rows * q, device=probs.device).view((1, rows) + key[2] + (1,))
        hit = (torch.ones(r.shape, dtype=v.dtype, device=v.device), r)
        if not compiling:
            if len(_PROBES) > 64:
                _PROBES.clear()
            _PROBES[key] = hit
    return hit[0], hit[1], v.expand(probs.shape[:2] + v.shape[-2:])


_PROBES: dict = {}


def _value_rows(v: torch.Tensor) -> torch.Tensor:
    """V [B', H, N, dh] -> the value rows of the factored terms [H·N, B', dh]."""
    return v.permute(1, 2, 0, 3).reshape(v.shape[1] * v.shape[2], v.shape[0], -1)


def _probs_rows(probs: torch.Tensor, dtype) -> torch.Tensor:
    """P [B', H, Q, N] as rows [B'·Q, H·N] (column h·N + t: the component of head h, token t)."""
    return probs.to(dtype).permute(0, 2, 1, 3).reshape(probs.shape[0] * probs.shape[2], -1)


@_denormals_flushed
def probe_factors(w: torch.Tensor, rmap: torch.Tensor, probs: torch.Tensor, v: torch.Tensor):
    """A probe (ω, r) of P and V -> the factored terms: the scalar factor s [H·N, *rest, S]
    (s[h·N + t] = ω · P[:, h, :, t] at the rows r), the window map r // Q and the value rows
    [H·N, B', dh]."""
    q_len = probs.shape[2]
    r = rmap.reshape(-1)
    got = probs[r // q_len, :, r % q_len, :].to(w.dtype)     # [n, H, N]: only the rows read
    s = got.reshape(r.shape[0], -1).t()
    s = s.reshape((got.shape[1] * got.shape[2],) + tuple(rmap.shape[1:]))
    return s * w, rmap // q_len, _value_rows(v)


@_denormals_flushed
def window_reduce_probe(w: torch.Tensor, rmap: torch.Tensor, probs: torch.Tensor,
                        v: torch.Tensor, windows: int, dims, keepdim: bool, mean: bool):
    """``window_reduce_factored`` of probed terms (ω, r; P; V [B', H, N, dh]): the weights of each
    window's rows read from P at r, times ω (no s at every position). Whole windows (each of
    the Q rows of every window once, the same places for every kept row) read P in its own
    order: σ [c·W, *kept, S] when Q >= S, else P [W, H, Q, K, N] (a view) with rows (v
    [W, H, K, N, b], slot, S, kept shape, ω [W, 1, Q, K, 1]), the weights P·ω left unmultiplied
    (``factored_linear`` reads them as they are; see ``_p_order``, ``_window_rows_std``); other
    layouts list each window's rows (``window_rows``)."""
    q_len = probs.shape[2]
    rest, sub = tuple(w.shape[1:-1]), w.shape[-1]
    nd = len(rest)
    red = sorted({d % nd for d in dims})
    kept = [d for d in range(nd) if d not in red]
    perm = kept + red
    n_kept = math.prod(rest[d] for d in kept)
    def flat(m):     # [1, *rest, S] -> [n_kept, reduced·S]
        return m.expand((1,) + rest + (sub,))[0].permute(perm + [nd]).reshape(n_kept, -1)

    r = flat(rmap)
    b = r // q_len
    img, wm = b // windows, b % windows
    if not (bool((img == img[:, :1]).all()) and bool((wm == wm[:1]).all())):
        s, bmap, vv = probe_factors(w, rmap, probs, v)
        return window_reduce_factored(s, vv, bmap, windows, dims, keepdim, mean)
    shape = [1 if d in red else rest[d] for d in range(nd)] if keepdim else [rest[d] for d in kept]
    c = v.shape[1] * v.shape[2]
    rows = (img[:, 0].view(1, n_kept) * windows
            + torch.arange(windows, device=w.device).view(windows, 1))     # [W, n_kept]
    g = lambda: _value_rows(v).index_select(1, rows.reshape(-1)).view(  # noqa: E731
        [c * windows] + shape + [v.shape[-1]])
    ww = flat(w)
    if mean:
        ww = ww / math.prod(rest[d] for d in red)
    whole = _whole_windows(r, wm, img, windows, q_len)
    if whole is not None:      # every window's Q rows, once each: P read in its own order
        index = whole
        slot = index % sub
        order = img[:, 0] * windows
        p = probs.to(w.dtype)
        if not bool((order == torch.arange(n_kept, device=w.device) * windows).all()):
            p = p.view(-1, windows, *p.shape[1:]).index_select(0, img[:, 0]).flatten(0, 1)
            v = v.view(-1, windows, *v.shape[1:]).index_select(0, img[:, 0]).flatten(0, 1)
        om = ww[:, index].transpose(0, 1)                                 # [W, K, Q]
        if q_len >= sub:   # σ per sub-block: P·ω summed over each slot's rows, per window
            # one [S, Q] x [Q, N] product per (image, window, head), P read where it lies:
            # L[k, w, s, q] = ω[k, w, q] if slot[w, q] = s else 0
            hot = F.one_hot(slot, sub).to(w.dtype).transpose(1, 2)            # [W, S, Q]
            lhs = (hot.unsqueeze(0) * om.transpose(0, 1).unsqueeze(2)).unsqueeze(2)
            pk = p.view(n_kept, windows, *p.shape[1:])                         # [K, W, H, Q, N]
            # σ [K, W, H, S, N] and V [K, W, H, N, b] stay as they are (no copy into the
            # component order; ``factored_linear`` reads them per head, ``_kept_rows_std``)
            sigma = torch.matmul(lhs, pk)
            return sigma, ("kwh", v.view(n_kept, windows, *v.shape[1:]), shape)
        # fewer rows than sub-blocks: the weights P·ω in P's order, [W, H, Q, K, N], left
        # unmultiplied (P a view where it lies, ω [W, 1, Q, K, 1] beside the value rows, a view
        # [W, H, K, N, b]): ``factored_linear`` multiplies them where it reads them, in one pass
        pv = p.view(n_kept, windows, *p.shape[1:]).permute(1, 2, 3, 0, 4)
        omb = om.permute(0, 2, 1).unsqueeze(1).unsqueeze(-1)              # [W, 1, Q, K, 1]
        vp = v.view(n_kept, windows, *v.shape[1:]).permute(1, 2, 0, 3, 4)
        return pv, (vp, slot, sub, shape, omb)
    index, slot = window_rows(wm[0], windows, sub)                         # [W, Q'] each
    q = index.shape[1]
    if int(index.max()) == r.shape[-1]:              # windows of fewer rows: padded (ω = 0)
        r, ww = F.pad(r, (0, 1)), F.pad(ww, (0, 1))
    rw, ww = r[:, index].transpose(0, 1), ww[:, index].transpose(0, 1)     # [W, n_kept, Q']
    got = _probs_rows(probs, w.dtype).index_select(0, rw.reshape(-1))    # [W·n_kept·Q', c]
    got = got.t().view(c, windows, n_kept, q)
    weights = _product(got, ww.unsqueeze(0), w.dtype)      # the transpose and product in one pass
    weights = weights.view([c * windows] + shape + [q])
    if q >= sub:     # no fewer rows per window than sub-blocks: σ per sub-block is narrower
        return dense_window_weights(weights, slot, sub), g()
    return weights, (g(), slot, sub)


@_denormals_flushed
def unfactor(s: torch.Tensor, v: torch.Tensor, wmap: torch.Tensor) -> torch.Tensor:
    """Factored terms -> the terms [c, *rest, S·b]: t[..., j·b + d] = s[..., j] · v[:, map[..., j], d]."""
    rows = wmap.expand((1,) + tuple(s.shape[1:])).reshape(-1)
    g = v.index_select(1, rows).view(tuple(s.shape) + (v.shape[-1],))
    return (s.unsqueeze(-1) * g).flatten(-2)


@_denormals_flushed
def window_reduce_factored(s: torch.Tensor, v: torch.Tensor, wmap: torch.Tensor, windows: int,
                           dims, keepdim: bool, mean: bool):
    """``window_reduce`` of factored terms: (weights, rows). Where every kept position sees the
    same windows at the same reduced positions (a mean over the tokens of each image), the
    reduced elements of each window are listed once (``window_rows``: Q' rows of window w, each
    with its sub-block j) and the weights are s gathered at them, [c·windows, *kept, Q'] (times
    1/n for a mean): component k·windows + w sums Σ_q weights[q] · (v W_{slot[w, q]}), with
    rows = (v rows, slot [windows, Q'], S) (``factored_linear``; ``outer_terms`` densifies).
    Otherwise σ [c·windows, *kept, S] (s summed per window and sub-block) and rows = v rows.
    The v rows [c·windows, *kept, b]: v at row image·windows + w, the image read from the map
    (b' // windows). If a kept position mixes images (never for a mean over positions within
    each image) the terms are unfactored and reduced as they are: (reduced terms, None)."""
    c, rest, sub = s.shape[0], tuple(s.shape[1:-1]), s.shape[-1]
    nd = len(rest)
    red = sorted({d % nd for d in dims})
    kept = [d for d in range(nd) if d not in red]
    perm = kept + red
    n_kept = math.prod(rest[d] for d in kept)
    img = (wmap // windows).expand((1,) + rest + (sub,))[0]
    img = img.permute(perm + [nd]).reshape(n_kept, -1)
    if not bool((img == img[:, :1]).all()):
        return window_reduce(unfactor(s, v, wmap), wmap, windows, dims, keepdim, mean), None
    shape = [1 if d in red else rest[d] for d in range(nd)] if keepdim else [rest[d] for d in kept]
    rows = (img[:, 0].view(1, n_kept) * windows
            + torch.arange(windows, device=s.device).view(windows, 1))     # [W, n_kept]
    g = v.index_select(1, rows.reshape(-1)).view([c * windows] + shape + [v.shape[-1]])
    wm = (wmap % windows).expand((1,) + rest + (sub,))[0].permute(perm + [nd]).reshape(n_kept, -1)
    if not bool((wm == wm[:1]).all()):
        return window_reduce(s, wmap, windows, dims, keepdim, mean), g
    index, slot = window_rows(wm[0], windows, sub)                         # [W, Q'] each
    q = index.shape[1]
    if q >= sub:     # no fewer rows per window than sub-blocks: σ per sub-block is narrower
        return window_reduce(s, wmap, windows, dims, keepdim, mean), g
    src = s.permute([0] + [1 + d for d in perm] + [nd + 1]).reshape(c, 1, n_kept, -1)
    if int(index.max()) == src.shape[-1]:            # windows of fewer rows: padded with a zero
        src = F.pad(src, (0, 1))
    weights = torch.gather(src.expand(c, windows, n_kept, src.shape[-1]), 3,
                           index.view(1, windows, 1, q).expand(c, windows, n_kept, q))
    if mean:
        weights /= math.prod(rest[d] for d in red)
    return weights.view([c * windows] + shape + [q]), (g, slot, sub)


def _product(a: torch.Tensor, b: torch.Tensor, dtype) -> torch.Tensor:
    """a · b (broadcast) as a new contiguous tensor, written in one pass (``out=``) unless
    autograd records through either."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return (a * b).contiguous()
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype, device=a.device)
    return torch.mul(a, b, out=out)


def _whole_windows(r: torch.Tensor, wm: torch.Tensor, img: torch.Tensor, windows: int,
                   q_len: int) -> torch.Tensor | None:
    """For rows r [n_kept, n] (b'·Q + q) of windows wm and images img (the same windows at the
    same places for every kept row): the element holding query q of window w, [W, Q], if every
    window has each of its Q rows exactly once and every kept row the same queries there; else
    None."""
    n = r.shape[1]
    if n != windows * q_len:
        return None
    qq = r % q_len
    if not bool((qq == qq[:1]).all()):
        return None
    index = torch.full((windows * q_len,), -1, dtype=torch.long, device=r.device)
    index[wm[0] * q_len + qq[0]] = torch.arange(n, device=r.device)
    if bool((index < 0).any()):
        return None
    return index.view(windows, q_len)


def window_rows(wm: torch.Tensor, windows: int, sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The elements of each window: ``wm`` [n·S] the window of each reduced (position, sub-block)
    element (flat, sub-block inner) -> (index [windows, Q'] into them, slot [windows, Q'] their
    sub-block), Q' the most elements of one window; a window with fewer is padded with index n·S
    (read as a zero) and slot 0."""
    n = wm.shape[0]
    order = torch.argsort(wm, stable=True)
    counts = torch.bincount(wm, minlength=windows)
    start = torch.cumsum(counts, 0) - counts
    ids = wm[order]
    rank = torch.arange(n, device=wm.device) - start[ids]
    q = int(counts.max())
    index = torch.full((windows, q), n, dtype=torch.long, device=wm.device)
    index[ids, rank] = order
    slot = torch.where(index < n, index % sub, torch.zeros_like(index))
    return index, slot


def _p_order(rows) -> bool:
    """Whether reduced factors are per-window-row weights in P's order: P [W, H, Q, K, N] with
    rows (v [W, H, K, N, b], slot [W, Q], S, kept shape, ω [W, 1, Q, K, 1]), the weights P·ω
    (``window_reduce_probe``)."""
    return isinstance(rows, tuple) and len(rows) == 5


def _window_rows_std(probs: torch.Tensor, rows: tuple) -> tuple:
    """Per-window-row weights and rows in P's order (``_p_order``) -> the component order:
    ([c·W, *kept, Q], (v [c·W, *kept, b], slot, S)), c = H·N (head outer)."""
    if not _p_order(rows):
        return probs, rows
    vp, slot, sub, shape, omega = rows
    weights = probs * omega
    windows, heads, q, kept, n_tok = weights.shape
    c = heads * n_tok
    w = weights.permute(1, 4, 0, 3, 2).reshape([c * windows] + list(shape) + [q])
    g = vp.permute(1, 3, 0, 2, 4).reshape([c * windows] + list(shape) + [vp.shape[-1]])
    return w, (g, slot, sub)


def _kept_rows(rows) -> bool:
    """Whether reduced factors are σ [K, W, H, S, N] with rows ("kwh", V [K, W, H, N, b], kept
    shape): the kept rows K outer, as the attention holds them (``window_reduce_probe``)."""
    return isinstance(rows, tuple) and len(rows) == 3 and isinstance(rows[0], str)


def _kept_rows_std(sigma: torch.Tensor, rows: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and V of the ("kwh", ...) form -> the component order: σ [c·W, *kept, S] and v rows
    [c·W, *kept, b], c = H·N (head outer)."""
    _, v, shape = rows
    _, windows, heads, sub, n_tok = sigma.shape
    c = heads * n_tok
    return (sigma.permute(2, 4, 1, 0, 3).reshape([c * windows] + list(shape) + [sub]),
            v.permute(2, 3, 1, 0, 4).reshape([c * windows] + list(shape) + [v.shape[-1]]))


def _kept_rows_linear(sigma: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                      out: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """``factored_linear`` of σ [K, W, H, S, N] and V [K, W, H, N, b] (W [E, H·S·b]), read where
    they lie: per head h, zᵀ = W_h V_hᵀ ([S·E, b] x [b, rows]: the rows (k, w, n) of one head
    are one strided matrix when V is a view of the attention's qkv, so nothing is copied) and
    yᵀ = Σ_s σ_s zᵀ_s (s outer: the sum runs over whole rows of zᵀ), ``rows`` rows at a time,
    written into the component order (h, n, w) x k of ``out``."""
    kk, windows, heads, sub, n_tok = sigma.shape
    e, b = weight.shape[0], v.shape[-1]
    wt = weight.reshape(e, heads, sub, b).permute(1, 2, 0, 3).reshape(heads, sub * e, b)
    o = out.view(heads, n_tok, windows, kk, e)
    n = kk * windows * n_tok
    yt = out.new_empty(e, n)
    for h in range(heads):
        vh = v[:, :, h].reshape(n, b)                                       # [(k, w, n), b]
        st = sigma[:, :, h].permute(2, 0, 1, 3).reshape(sub, 1, n)          # [S, 1, (k, w, n)]
        for i in range(0, n, rows):
            j = min(i + rows, n)
            zt = torch.mm(wt[h], vh[i:j].t()).view(sub, e, j - i)
            torch.sum(zt.mul_(st[:, :, i:j]), 0, out=yt[:, i:j])
        o[h].copy_(yt.view(e, kk, windows, n_tok).permute(3, 2, 1, 0))
    return out


def dense_window_weights(weights: torch.Tensor, slot: torch.Tensor, sub: int) -> torch.Tensor:
    """Per-window-row weights [c·W, *kept, Q'] (``window_reduce_factored``) -> σ [c·W, *kept, S]:
    σ[.., j] = Σ_{q: slot[w, q] = j} weights[.., q] (the window w of a term: its index mod W)."""
    windows, q = slot.shape
    w = weights.reshape(-1, windows, math.prod(weights.shape[1:-1]), q)
    out = weights.new_zeros(w.shape[:-1] + (sub,))
    out.scatter_add_(3, slot.view(1, windows, 1, q).expand(w.shape), w)
    return out.view(tuple(weights.shape[:-1]) + (sub,))


def outer_terms(sigma: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """Reduced factored terms as plain pending inputs: [c, *rest, S·b] = σ[..., j] · v[..., d]
    (``v`` None: σ already holds the terms)."""
    if v is None:
        return sigma
    if _kept_rows(v):
        sigma, v = _kept_rows_std(sigma, v)
    if isinstance(v, tuple):                     # per-window-row weights (window_reduce_factored)
        sigma, v = _window_rows_std(sigma, v)
        sigma, v = dense_window_weights(sigma, v[1], v[2]), v[0]
    return (sigma.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)


def reshape_reduced(sigma: torch.Tensor, v, ref: torch.Tensor, channel_dim: int):
    """Reduced factored terms (the forms ``window_reduce_probe``/``window_reduce_factored``
    return) with their kept dims viewed as those of the value ``ref`` without its channel dim
    (as many rows: singleton dims dropped, added or moved, e.g. [B, 1, 1] -> [B]): (σ', v')."""
    shape = [s for i, s in enumerate(ref.shape) if i != channel_dim % ref.dim()]

    def view(t):
        return t.reshape([t.shape[0], *shape, t.shape[-1]])
    if _p_order(v):                              # weights in P's order: the shape is recorded
        return sigma, v[:3] + (list(shape),) + v[4:]
    if _kept_rows(v):                            # σ, V as the attention holds them: likewise
        return sigma, v[:2] + (list(shape),)
    if isinstance(v, tuple):                     # per-window-row weights, (v rows, slot, S)
        return view(sigma), (view(v[0]),) + tuple(v[1:])
    return view(sigma), None if v is None else view(v)


def scale_reduced(sigma: torch.Tensor, v, factor) -> torch.Tensor:
    """Reduced factored terms (σ and v as in ``reshape_reduced``) times a frozen per-row factor
    of the value ([*kept, 1]): σ' (P in P's order holds the kept rows in dim -2)."""
    if _p_order(v) and isinstance(factor, torch.Tensor):
        return sigma * factor.reshape(-1, 1)
    if _kept_rows(v) and isinstance(factor, torch.Tensor):    # the kept rows in dim 0
        return sigma * factor.reshape(-1, 1, 1, 1, 1)
    return sigma * factor


@_denormals_flushed
def factored_linear(sigma: torch.Tensor, v: torch.Tensor | None, weight: torch.Tensor,
                    heads: int, backend: str = "auto", out: torch.Tensor | None = None,
                    rows: int = 4096) -> torch.Tensor:
    """blocked_linear(outer_terms(σ, v), W, heads) without the outer product at full size:
    y[n] = Σ_j σ[n, j] Σ_d v[n, d] W_h[:, j·b + d] for the components of each head h, in
    blocks of ``rows`` (v W_j first when E <= b, else σ ⊗ v first: the narrower one)."""
    tensors = (sigma, weight) + (v if isinstance(v, tuple) else (v,))
    if _kept_rows(v):
        # read in place where there are many sub-blocks (the copies into the component order
        # cost more than the strided reads); a few: the batched all-heads path below
        _, _, n_heads, sub, _ = sigma.shape
        if sub > 4 and heads == n_heads and weight.shape[1] == heads * sub * v[1].shape[-1] \
                and weight.shape[0] <= v[1].shape[-1] and not (torch.is_grad_enabled() and any(
                    x.requires_grad for x in (sigma, weight, v[1]))):
            if out is None:
                out = sigma.new_empty([sigma.shape[2] * sigma.shape[4] * sigma.shape[1]]
                                      + list(v[2]) + [weight.shape[0]])
            return _kept_rows_linear(sigma, v[1], weight, out, rows)
        sigma, v = _kept_rows_std(sigma, v)
        tensors = (sigma, weight, v)
    if v is None or torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in tensors):
        y = blocked_linear(outer_terms(sigma, v), weight, heads, backend)
        return y if out is None else out.copy_(y)
    e = weight.shape[0]
    if _p_order(v) and e <= v[0].shape[-1]:
        # per-window-row weights in P's order: [W, H, Q, K, N] -> [H·N·W, *kept, E]
        if out is None:
            windows, h, _, _, n_tok = sigma.shape
            out = sigma.new_empty([h * n_tok * windows] + list(v[3]) + [e])
        return _window_rows_linear(sigma, v[4], v[0], v[1], v[2], weight, heads, out)
    if isinstance(v, tuple):
        sigma, v = _window_rows_std(sigma, v)
    if out is None:
        out = sigma.new_empty((sigma.shape[0],) + tuple(sigma.shape[1:-1]) + (e,))
    if isinstance(v, tuple):    # per-window-row weights: fewer rows than sub-blocks, E narrow
        g, slot, sub = v
        sigma, v = dense_window_weights(sigma, slot, sub), g
    sub, b = sigma.shape[-1], v.shape[-1]
    w = weight.reshape(e, heads, sub, b)
    o = out.view(heads, -1, e)
    sg = sigma.reshape(heads, -1, sub)
    vv = v.reshape(heads, -1, b)
    if sub == 1 and _kernel_backend(backend, sigma) == "triton":
        return _token_rows_kernel(sg, vv, w, o, backend, out)
    if e <= b and sg.shape[1] * heads * e * sub <= rows * 256:   # small: all heads at once
        if sub <= 4:    # a few sub-blocks: Σ_s σ_s · z_s in place (no reduction over a tiny dim)
            z = torch.bmm(vv, w.permute(1, 3, 2, 0).reshape(heads, b, sub * e)).view(
                heads, -1, sub, e)                                               # [H, n, S, E]
            torch.mul(z[:, :, 0], sg[:, :, :1], out=o)
            for s in range(1, sub):
                o.addcmul_(z[:, :, s], sg[:, :, s:s + 1])
            return out
        z = torch.bmm(vv, w.permute(1, 3, 0, 2).reshape(heads, b, e * sub)).view(
            heads, -1, e, sub)                                                   # [H, n, E, S]
        torch.sum(z.mul_(sg.unsqueeze(2)), 3, out=o)
        return out
    for h in range(heads):
        narrow = e <= b
        wh = w[:, h].permute(2, 0, 1).reshape(b, e * sub) if narrow else \
            w[:, h].reshape(e, sub * b).t()
        for i in range(0, sg.shape[1], rows):
            s_i, v_i = sg[h, i:i + rows], vv[h, i:i + rows]
            if narrow:
                z = (v_i @ wh).view(-1, e, sub)                                  # [n, E, S]
                torch.sum(z.mul_(s_i.unsqueeze(1)), 2, out=o[h, i:i + rows])
            else:
                torch.mm((s_i.unsqueeze(-1) * v_i.unsqueeze(-2)).flatten(1), wh, out=o[h, i:i + rows])
    return out


def _kernel_backend(backend: str, t: torch.Tensor) -> str:
    from fxdecomp_kernels import resolve_backend
    return resolve_backend(backend, t)


def _token_rows_kernel(sg: torch.Tensor, vv: torch.Tensor, w: torch.Tensor, o: torch.Tensor,
                       backend: str, out: torch.Tensor) -> torch.Tensor:
    """``factored_linear`` of one sub-position through the fused per-token kernel: per head h
    and term n, o[h, n] = σ[h, n] · (v[h, n] W_hᵀ), i.e. ``token_contributions`` with A = σ
    [1, H, 1, n] (the query functional already applied), V = v [1, H, n, b], M = W_hᵀ
    [H, b, E] and ``reduce_q``, written straight into the output slab."""
    from fxdecomp_kernels import token_contributions
    heads, n, b = vv.shape
    token_contributions(sg.reshape(1, heads, 1, n), vv.unsqueeze(0), w[:, :, 0].permute(1, 2, 0),
                        reduce_q=True, backend=backend, out=o.unsqueeze(0))
    return out


_SLOT_WEIGHTS: dict = {}


def _slot_weights(weight: torch.Tensor, heads: int, sub: int, slot: torch.Tensor) -> torch.Tensor:
    """The blocks of a pending W [E, H·S·b] that each window's rows meet, transposed:
    [H, W, b·E, Q], entry [h, w, d·E + e, q] = W[e, (h·S + slot[w, q])·b + d]. Depends on W and
    the layout only, so it is kept between calls like a fold (``_folded``), keyed on W's identity
    and version and on slot's values."""
    e, b = weight.shape[0], weight.shape[1] // (heads * sub)
    windows, q = slot.shape

    def make():
        wh = weight.reshape(e, heads, sub, b).permute(1, 2, 3, 0)     # [H, S, b, E]
        wg = wh.index_select(1, slot.reshape(-1)).view(heads, windows, q, b * e)
        return wg.transpose(2, 3).contiguous()

    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and weight.requires_grad):
        return make()
    key = (id(weight), _version(weight), heads, sub, tuple(slot.shape),
           hash(slot.cpu().numpy().tobytes()))
    hit = _SLOT_WEIGHTS.get(key)
    if hit is None or not torch.equal(hit[0], slot):
        hit = _SLOT_WEIGHTS[key] = (slot.clone(), make())
        weakref.finalize(weight, _SLOT_WEIGHTS.pop, key, None)
    return hit[1]


def _window_rows_linear(probs: torch.Tensor, omega: torch.Tensor, v: torch.Tensor,
                        slot: torch.Tensor, sub: int, weight: torch.Tensor, heads: int,
                        out: torch.Tensor, block: int = 1 << 18) -> torch.Tensor:
    """``factored_linear`` of per-window-row weights in P's order (``window_reduce_probe``:
    P [W, H, Q, K, N] and ω [W, 1, Q, K, 1], value rows v [W, H, K, N, b], views where the
    attention left them): per head h and window w, y[k, t] = Σ_q ω[q, k] P[q, k, t] ·
    (v[k, t] W_h[slot[w, q]]) = Σ_d v[k, t, d] · A[d, :, k, t], Aᵀ = W_h[slot[w]]ᵀ (P·ω)
    ([b·E, Q] x [Q, K·N]: one matmul per window over all of its terms, its rows' blocks of W
    gathered once; d outer, so the sum over d runs over whole rows of A), a few windows at a
    time (A of about ``block`` elements stays in cache between the matmul and the product;
    E <= b: A is no wider than the outer product of the weights and v). P·ω and v's rows
    transposed ([W, H, b, K, N]) are each written once, in one pass. Written in the
    component order (h, t, w) x kept."""
    windows, _, q, kept, n_tok = probs.shape
    e, b = weight.shape[0], v.shape[-1]
    chunk = min(windows, max(1, block // (e * b * kept * n_tok)))
    o5 = out.view(heads, n_tok, windows, kept, e)
    wgt = _slot_weights(weight, heads, sub, slot)                    # [H, W, b·E, Q]
    pw = _product(probs, omega, probs.dtype).view(windows, heads, q, kept * n_tok)
    vt = v.permute(0, 1, 4, 2, 3).contiguous().view(windows, heads, b, 1, kept * n_tok)
    a = probs.new_empty(chunk, b * e, kept * n_tok)
    for h in range(heads):
        for w0 in range(0, windows, chunk):
            w1 = min(w0 + chunk, windows)
            c = w1 - w0
            torch.bmm(wgt[h, w0:w1], pw[w0:w1, h], out=a[:c])
            y = a[:c].view(c, b, e, kept * n_tok).mul_(vt[w0:w1, h]).sum(1)      # [c, E, K·N]
            o5[h, :, w0:w1].copy_(y.view(c, e, kept, n_tok).permute(3, 0, 2, 1))
    return out
