"""An independent, hook-based reference for per-head contributions (no torch.export, no fx).

This module exists to check the decomposition engine against something written separately from
it, so the two cannot share a bug. It knows two model families by hand:

- timm ``VisionTransformer`` (ViT / DeiT / DINOv2 style: ``blocks[i].attn`` with ``qkv``/``proj``,
  optional layer scale ``ls1``/``ls2``, register tokens, ``global_pool`` "token" or "avg", or
  "map": SigLIP's learned-probe attention pool ``AttentionPoolLatent``; ``norm`` and
  ``fc_norm``), target = pre-logits;
- open_clip ``VisionTransformer`` image tower (``transformer.resblocks[i]`` with
  ``nn.MultiheadAttention``; ``ln_post``; pool_type "tok" or "avg"; no attentional pooler),
  target = ``encode_image`` (with ``proj``, unnormalised).

Forward hooks record, during one ordinary forward pass, the stream entering the first block, the
normalised input of every attention module, every MLP output, and the inputs of the final norms.
Everything else is hand-written float64 math with the attention probabilities, the LayerNorm
scales and the activations frozen at their forward values:

    stream_L = embed + Σ_l [ ls1_l ⊙ (Σ_h o_{l,h} W_O[:, h] + b_O) + ls2_l ⊙ (mlp_l − b_2 + b_2) ]
    o_{l,h}  = softmax(q_h k_hᵀ · scale) v_h        (recomputed by hand from the recorded input)

and the *tail* is linear in each term once the LayerNorm 1/σ is frozen: for a term c,
``LN(c) = (c − mean(c)) · (1/σ) · γ`` (centring is linear, so every term is centred on its own;
β is a constant term of its own), then pooling (CLS row, or the mean over the non-prefix tokens),
then ``fc_norm`` (again frozen 1/σ, centring, γ) or the CLIP projection.

>>> ref = reference_timm_vit(model, x)                        # doctest: +SKIP
>>> ref.heads[(11, 2)].shape                                  # [B, E]
>>> ref.relative_error() <= 1e-5                              # the terms sum to the output
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReferenceDecomposition", "reference_timm_vit", "reference_open_clip_vit"]


@dataclass
class ReferenceDecomposition:
    """Every term of the output, float64, each [B, E].

    output:    the model's own output (its dtype), [B, E]
    heads:     {(layer, head): contribution of that attention head (no bias)}
    mlp:       {layer: contribution of that block's MLP, without its output bias}
    embed:     the stream entering the first block (patch + position + class/register tokens, and
               whatever norm_pre / ln_pre did to them), taken through the tail
    constants: {name: bias / LayerNorm β terms}: "<block>.attn.bias", "<block>.mlp.bias",
               "<norm>.bias"; with an attention pool also its biases and "attn_pool.mlp", the
               pool's MLP output (nonlinear in everything, one term)
    checks:    relative errors of the reference's internal consistency checks (per-layer
               attention recomputation; the rebuilt stream before the final norm)
    """

    output: torch.Tensor
    heads: dict[tuple[int, int], torch.Tensor]
    mlp: dict[int, torch.Tensor]
    embed: torch.Tensor
    constants: dict[str, torch.Tensor]
    checks: dict[str, float] = field(default_factory=dict)

    def terms(self) -> list[torch.Tensor]:
        return [self.embed, *self.heads.values(), *self.mlp.values(), *self.constants.values()]

    def total(self) -> torch.Tensor:
        return torch.stack(self.terms()).sum(0)

    def relative_error(self) -> float:
        """max |Σ terms − output| / max |output|."""
        out = self.output.double()
        return float((self.total() - out).abs().max() / out.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Hand-written pieces
# ---------------------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _attention_heads(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None,
                     num_heads: int, scale: float) -> torch.Tensor:
    """Per-head attention output o = softmax(q kᵀ · scale) v for self-attention over x [B, N, D]
    with a fused qkv weight [3·H·dh, D] laid out (q | k | v), each head-major.
    Returns o [B, H, N, dh], float64."""
    x, w = x.double(), w_qkv.double()
    qkv = x @ w.T
    if b_qkv is not None:
        qkv = qkv + b_qkv.double()
    B, N, _ = x.shape
    dh = w.shape[0] // (3 * num_heads)
    q, k, v = qkv.reshape(B, N, 3, num_heads, dh).permute(2, 0, 3, 1, 4)   # each [B, H, N, dh]
    logits = (q * scale) @ k.transpose(-1, -2)
    probs = torch.softmax(logits, dim=-1)
    return probs @ v


class _FrozenLayerNorm:
    """A LayerNorm over the last dim with 1/σ frozen at the recorded input. Linear in a term c:
    (c − mean(c)) · (1/σ) · γ; β becomes a constant term."""

    def __init__(self, module: nn.Module, name: str):
        if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
            raise NotImplementedError(f"{name}: the reference handles nn.LayerNorm over the last "
                                      f"dim only, got {module}")
        self.module, self.name = module, name
        self.inv_sigma = None
        self.shape = None

    def record(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        self.inv_sigma = (var + self.module.eps).rsqrt()
        self.shape = x.shape

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        c = (c - c.mean(dim=-1, keepdim=True)) * self.inv_sigma
        if self.module.weight is not None:
            c = c * self.module.weight.detach().double()
        return c

    def constant(self) -> torch.Tensor | None:
        if self.module.bias is None:
            return None
        return self.module.bias.detach().double().expand(self.shape)


class _Pool:
    def __init__(self, kind: str, num_prefix_tokens: int):
        if kind not in ("token", "avg"):
            raise NotImplementedError(f"pooling {kind!r}: the reference handles token and avg")
        self.kind, self.prefix = kind, num_prefix_tokens

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return c[:, 0] if self.kind == "token" else c[:, self.prefix:].mean(dim=1)


class _ProbePool:
    """timm ``AttentionPoolLatent`` (a learned probe attending over the tokens, then
    x + mlp(norm(x)), then latent 0) with the probabilities frozen at the recorded input: linear
    in a term c: proj(P @ (c W_vᵀ)) at latent 0. Its value and output biases are constant terms
    (P's rows sum to 1, so P @ 1b_v = b_v); its MLP output is one term of its own."""

    def __init__(self, pool: nn.Module):
        if (pool.pos_embed is not None or not isinstance(pool.q_norm, nn.Identity)
                or not isinstance(pool.k_norm, nn.Identity) or pool.pool != "token"):
            raise NotImplementedError("attn_pool: pos_embed / qk norm / pool other than 'token'")
        self.pool, self.name = pool, "attn_pool"
        self.probs = None
        self.mlp_out = None

    def record(self, x: torch.Tensor) -> None:
        p, x = self.pool, x.detach().double()
        B, N, D = x.shape
        H, dh = p.num_heads, p.head_dim
        q = p.latent.detach().double() @ p.q.weight.detach().double().T
        if p.q.bias is not None:
            q = q + p.q.bias.detach().double()
        w_k = p.kv.weight.detach().double()[:D]
        k = x @ w_k.T
        if p.kv.bias is not None:
            k = k + p.kv.bias.detach().double()[:D]
        q = q.reshape(1, -1, H, dh).transpose(1, 2)                       # [1, H, L, dh]
        k = k.reshape(B, N, H, dh).transpose(1, 2)                        # [B, H, N, dh]
        self.probs = torch.softmax((q * dh ** -0.5) @ k.transpose(-1, -2), dim=-1)

    def heads(self, c: torch.Tensor) -> torch.Tensor:
        """Per probe head: [B, H, D] at latent 0."""
        p = self.pool
        B, N, D = c.shape
        H, dh = p.num_heads, p.head_dim
        v = (c @ p.kv.weight.detach().double()[D:].T).reshape(B, N, H, dh).transpose(1, 2)
        o = (self.probs @ v)[:, :, 0]                                     # [B, H, dh]
        w = p.proj.weight.detach().double().reshape(D, H, dh)
        return torch.einsum("bhd,ehd->bhe", o, w)

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return self.heads(c).sum(1)

    def constants(self) -> dict[str, torch.Tensor]:
        p, out = self.pool, {}
        B, D = self.probs.shape[0], p.proj.weight.shape[0]
        if p.kv.bias is not None:
            b_v = p.kv.bias.detach().double()[D:]
            out["attn_pool.kv.bias"] = (b_v @ p.proj.weight.detach().double().T).expand(B, D)
        if p.proj.bias is not None:
            out["attn_pool.proj.bias"] = p.proj.bias.detach().double().expand(B, D)
        out["attn_pool.mlp"] = self.mlp_out[:, 0].double()
        return out


class _Project:
    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix.detach().double()

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return c @ self.matrix


class _Tail:
    """The linear map from a residual-stream term [B, N, D] to the output [B, E]: a list of
    steps (frozen LayerNorms, a pooling, a projection). Constants (LayerNorm β) enter after
    their own step and go through the remaining ones."""

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, c: torch.Tensor, start: int = 0) -> torch.Tensor:
        for step in self.steps[start:]:
            c = step(c)
        return c

    def constants(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, step in enumerate(self.steps):
            if isinstance(step, _FrozenLayerNorm) and step.constant() is not None:
                out[f"{step.name}.bias"] = self(step.constant(), start=i + 1)
            elif isinstance(step, _ProbePool):
                out.update({k: self(v, start=i + 1) for k, v in step.constants().items()})
        return out


@dataclass
class _BlockSpec:
    """What the reference needs from one pre-norm residual block."""

    name: str
    attn: nn.Module                 # called with the normalised stream as its first argument
    w_qkv: torch.Tensor             # [3·H·dh, D], (q | k | v)
    b_qkv: torch.Tensor | None
    w_out: torch.Tensor             # [D, H·dh]
    b_out: torch.Tensor | None
    num_heads: int
    scale: float
    ls1: torch.Tensor | None        # layer scale of the attention branch
    mlp: nn.Module                  # its output is the MLP branch (before layer scale)
    b_mlp: torch.Tensor | None      # the bias of the MLP's last linear
    ls2: torch.Tensor | None


def _layer_scale(module: nn.Module, name: str) -> torch.Tensor | None:
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if isinstance(gamma, torch.Tensor):
        return gamma.detach().double()
    raise NotImplementedError(f"{name}: unknown layer scale {type(module).__name__}")


def _run(model_call, first_block: nn.Module, blocks: list[_BlockSpec], tail: _Tail,
         tail_records: list[tuple[nn.Module, _FrozenLayerNorm]], x: torch.Tensor,
         ) -> ReferenceDecomposition:
    """Run the model once with hooks, then build every term by hand."""
    rec: dict[str, torch.Tensor] = {}
    handles = []

    def pre(key):
        def hook(_module, args):
            rec[key] = args[0].detach().clone()
        return hook

    def post(key):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            rec[key] = out.detach().clone()
        return hook

    def record_norm(ln):
        def hook(_module, args):
            ln.record(args[0])
            rec[f"{ln.name}.in"] = args[0].detach().clone()
        return hook

    try:
        handles.append(first_block.register_forward_pre_hook(pre("embed")))
        for i, blk in enumerate(blocks):
            handles.append(blk.attn.register_forward_pre_hook(pre(f"{i}.attn_in")))
            handles.append(blk.attn.register_forward_hook(post(f"{i}.attn_out")))
            handles.append(blk.mlp.register_forward_hook(post(f"{i}.mlp_out")))
        for module, ln in tail_records:
            if isinstance(ln, tuple):           # (attribute, owner): keep the module's output
                handles.append(module.register_forward_hook(
                    lambda _m, _a, out, ln=ln: setattr(ln[1], ln[0], out.detach().clone())))
            else:
                handles.append(module.register_forward_pre_hook(record_norm(ln)))
        with torch.no_grad():
            output = model_call(x)
    finally:
        for h in handles:
            h.remove()

    checks: dict[str, float] = {}
    stream = rec["embed"].double()
    embed = tail(stream)
    heads, mlp, constants = {}, {}, {}
    for i, blk in enumerate(blocks):
        o = _attention_heads(rec[f"{i}.attn_in"], blk.w_qkv, blk.b_qkv, blk.num_heads, blk.scale)
        dh = o.shape[-1]
        w_out = blk.w_out.double()
        branch = torch.zeros_like(stream)
        for h in range(blk.num_heads):
            c = o[:, h] @ w_out[:, h * dh:(h + 1) * dh].T                 # [B, N, D]
            branch = branch + c
            if blk.ls1 is not None:
                c = c * blk.ls1
            heads[(i, h)] = tail(c)
        b_out = blk.b_out.double() if blk.b_out is not None else torch.zeros(stream.shape[-1], dtype=torch.float64)
        checks[f"{blk.name}.attn"] = _rel(branch + b_out, rec[f"{i}.attn_out"])
        ls1 = blk.ls1 if blk.ls1 is not None else 1.0
        ls2 = blk.ls2 if blk.ls2 is not None else 1.0
        stream = stream + (branch + b_out) * ls1
        if blk.b_out is not None:
            constants[f"{blk.name}.attn.bias"] = tail((b_out * ls1).expand(stream.shape))
        m = rec[f"{i}.mlp_out"].double()
        b_mlp = blk.b_mlp.double() if blk.b_mlp is not None else torch.zeros(m.shape[-1], dtype=torch.float64)
        mlp[i] = tail((m - b_mlp) * ls2)
        if blk.b_mlp is not None:
            constants[f"{blk.name}.mlp.bias"] = tail((b_mlp * ls2).expand(stream.shape))
        stream = stream + m * ls2
    first_norm = tail_records[0][1].name if tail_records else None
    if first_norm is not None and isinstance(tail.steps[0], _FrozenLayerNorm):
        checks["stream"] = _rel(stream, rec[f"{first_norm}.in"])
    constants.update(tail.constants())
    return ReferenceDecomposition(output=output.detach(), heads=heads, mlp=mlp, embed=embed,
                                  constants=constants, checks=checks)


# ---------------------------------------------------------------------------------------------
# timm VisionTransformer
# ---------------------------------------------------------------------------------------------

def reference_timm_vit(model: nn.Module, x: torch.Tensor) -> ReferenceDecomposition:
    """Terms of ``model.forward_head(model.forward_features(x), pre_logits=True)`` for a timm
    ``VisionTransformer`` made of standard ``Block``s."""
    from timm.layers import Mlp
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block, VisionTransformer
    if not isinstance(model, VisionTransformer):
        raise NotImplementedError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    if model.training:
        raise ValueError("put the model in eval mode first")
    if getattr(model, "pool_include_prefix", False):
        raise NotImplementedError("prefix-inclusive pooling")
    blocks = []
    for i, blk in enumerate(model.blocks):
        name = f"blocks.{i}"
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise NotImplementedError(f"{name}: {type(blk).__name__}/{type(blk.attn).__name__}")
        a = blk.attn
        if not (isinstance(a.q_norm, nn.Identity) and isinstance(a.k_norm, nn.Identity)
                and isinstance(a.norm, nn.Identity) and a.gate is None):
            raise NotImplementedError(f"{name}.attn: qk_norm / scale_norm / gate")
        if not isinstance(blk.mlp, Mlp) or not isinstance(blk.mlp.norm, nn.Identity):
            raise NotImplementedError(f"{name}.mlp: {type(blk.mlp).__name__}")
        blocks.append(_BlockSpec(
            name=name, attn=a, w_qkv=a.qkv.weight.detach(),
            b_qkv=None if a.qkv.bias is None else a.qkv.bias.detach(),
            w_out=a.proj.weight.detach(), b_out=None if a.proj.bias is None else a.proj.bias.detach(),
            num_heads=a.num_heads, scale=a.scale, ls1=_layer_scale(blk.ls1, f"{name}.ls1"),
            mlp=blk.mlp, b_mlp=None if blk.mlp.fc2.bias is None else blk.mlp.fc2.bias.detach(),
            ls2=_layer_scale(blk.ls2, f"{name}.ls2")))
    steps, records = [], []
    if not isinstance(model.norm, nn.Identity):
        ln = _FrozenLayerNorm(model.norm, "norm")
        steps.append(ln)
        records.append((model.norm, ln))
    if model.attn_pool is not None:
        pool = _ProbePool(model.attn_pool)
        steps.append(pool)
        records.append((model.attn_pool, pool))
        records.append((model.attn_pool.mlp, ("mlp_out", pool)))
    else:
        steps.append(_Pool(model.global_pool, model.num_prefix_tokens))
    if not isinstance(model.fc_norm, nn.Identity):
        ln = _FrozenLayerNorm(model.fc_norm, "fc_norm")
        steps.append(ln)
        records.append((model.fc_norm, ln))

    def call(inp):
        return model.forward_head(model.forward_features(inp), pre_logits=True)

    return _run(call, model.blocks[0], blocks, _Tail(steps), records, x)


# ---------------------------------------------------------------------------------------------
# open_clip VisionTransformer
# ---------------------------------------------------------------------------------------------

def reference_open_clip_vit(clip_or_visual: nn.Module, x: torch.Tensor) -> ReferenceDecomposition:
    """Terms of ``clip.encode_image(x)`` (= ``visual(x)``, projected, unnormalised) for an
    open_clip ``VisionTransformer`` tower of standard ``ResidualAttentionBlock``s."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    visual = getattr(clip_or_visual, "visual", clip_or_visual)
    if not isinstance(visual, VisionTransformer):
        raise NotImplementedError(f"expected an open_clip VisionTransformer, got {type(visual).__name__}")
    if visual.training:
        raise ValueError("put the model in eval mode first")
    if visual.attn_pool is not None or visual.output_tokens:
        raise NotImplementedError("attentional pooler / output_tokens")
    if not visual.transformer.batch_first:
        raise NotImplementedError("sequence-first open_clip transformer")
    blocks = []
    for i, blk in enumerate(visual.transformer.resblocks):
        name = f"transformer.resblocks.{i}"
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
            raise NotImplementedError(f"{name}: {type(blk).__name__}")
        a = blk.attn
        if not (isinstance(a, nn.MultiheadAttention) and a._qkv_same_embed_dim and a.batch_first
                and a.bias_k is None and a.bias_v is None and not a.add_zero_attn):
            raise NotImplementedError(f"{name}.attn: {a}")
        c_proj = blk.mlp.c_proj
        blocks.append(_BlockSpec(
            name=name, attn=a, w_qkv=a.in_proj_weight.detach(),
            b_qkv=None if a.in_proj_bias is None else a.in_proj_bias.detach(),
            w_out=a.out_proj.weight.detach(),
            b_out=None if a.out_proj.bias is None else a.out_proj.bias.detach(),
            num_heads=a.num_heads, scale=a.head_dim ** -0.5, ls1=_layer_scale(blk.ls_1, f"{name}.ls_1"),
            mlp=blk.mlp, b_mlp=None if c_proj.bias is None else c_proj.bias.detach(),
            ls2=_layer_scale(blk.ls_2, f"{name}.ls_2")))
    pool = _Pool({"tok": "token", "avg": "avg"}.get(visual.pool_type, visual.pool_type), 1)
    ln = _FrozenLayerNorm(visual.ln_post, "ln_post")
    steps = [pool, ln] if visual.final_ln_after_pool else [ln, pool]
    if visual.proj is not None:
        steps.append(_Project(visual.proj))
    return _run(visual, visual.transformer.resblocks[0], blocks, _Tail(steps),
                [(visual.ln_post, ln)], x)


class TinyAttention(nn.Module):
    """A hand-written multi-head self-attention [B, N, d] -> [B, N, d] (qkv, SDPA, proj) for the
    tests' tiny models; ``probs_values`` recomputes its P and V for a float64 reference."""
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        b, n, d = x.shape
        return self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def probs_values(self, x):
        q, k, v = self._qkv(x)
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1), v

    def forward(self, x):
        b, n, d = x.shape
        o = F.scaled_dot_product_attention(*self._qkv(x))
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


def merge_gather(x: torch.Tensor) -> torch.Tensor:
    """A patch merging's 2x2 gather: [B, H, W, C] -> [B, H/2, W/2, 4C] (timm Swin's order)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)


class TwoStageLayers(nn.Module):
    """The layers of the tests' tiny hierarchical models (their ``forward`` is their own): a
    4x4 patch conv, stage 1 (norm, attention, norm, MLP), a patch merging (norm over 4C, linear
    to 2C), stage 2 (norm, attention) and a final norm; every LayerNorm with non-trivial γ, β."""
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, 4)
        self.n1, self.attn1 = nn.LayerNorm(c), TinyAttention(c, heads)
        self.n2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.merge_norm, self.reduction = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False)
        self.n3, self.attn2 = nn.LayerNorm(2 * c), TinyAttention(2 * c, heads)
        self.norm = nn.LayerNorm(2 * c)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.normal_(m.weight, 1.0, 0.3)
                nn.init.normal_(m.bias, 0.0, 0.3)
