"""The hook-based reference (tests/reference_heads.py) on its own, then the engine against it.

Random weights are perturbed (LayerNorm γ/β, biases, layer scales) so that every constant term
and every layer scale is non-trivial; otherwise timm's zero biases and 1e-5 layer scales would
make parts of the comparison vacuous.
"""
from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn

try:                                   # tests/ as a package (tests/__init__.py) or as rootdir
    from .reference_heads import reference_open_clip_vit, reference_timm_vit
except ImportError:
    from reference_heads import reference_open_clip_vit, reference_timm_vit

logging.getLogger().setLevel(logging.ERROR)

TOL = 1e-5
BATCH = 2


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norms, biases and layer scales random non-trivial values (in place, seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim != 1:
                continue
            if leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif leaf in ("weight", "gamma"):       # LayerNorm γ, layer scale γ
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


@functools.lru_cache(maxsize=None)          # built once, shared by the reference and engine tests
def timm_model(name: str, **kwargs) -> nn.Module:
    import timm
    torch.manual_seed(0)
    return perturb_(timm.create_model(name, **kwargs))


@functools.lru_cache(maxsize=None)
def open_clip_visual(name: str) -> nn.Module:
    import open_clip
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None)
    return perturb_(clip.visual)


def image(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))


# name -> (builder, input size, expected layers, heads). Sizes are reduced where the model lets
# the image size change, to keep the suite fast on CPU.
TIMM_CASES = {
    "deit_tiny_patch16_224": (lambda: timm_model("deit_tiny_patch16_224"), 224, 12, 3),
    "vit_small_patch14_reg4_dinov2": (
        lambda: timm_model("vit_small_patch14_reg4_dinov2", img_size=112), 112, 12, 6),
    "vit_medium_patch16_reg4_gap_256": (
        lambda: timm_model("vit_medium_patch16_reg4_gap_256", img_size=128), 128, 12, 8),
}


def check_reference(ref, layers: int, heads: int, out_dim: int) -> None:
    assert ref.output.shape == (BATCH, out_dim)
    assert set(ref.heads) == {(l, h) for l in range(layers) for h in range(heads)}
    assert set(ref.mlp) == set(range(layers))
    for key, err in ref.checks.items():
        assert err <= TOL, f"internal check {key}: relative error {err:.2e}"
    err = ref.relative_error()
    assert err <= TOL, f"reference terms do not sum to the output: relative error {err:.2e}"
    # every kind of term matters (otherwise the check above could pass vacuously)
    scale = ref.output.double().abs().max()
    assert max(t.abs().max() for t in ref.heads.values()) > 1e-3 * scale
    assert max(t.abs().max() for t in ref.mlp.values()) > 1e-3 * scale


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_reference_sums_to_output(name):
    build, size, layers, heads = TIMM_CASES[name]
    model = build()
    ref = reference_timm_vit(model, image(size))
    check_reference(ref, layers, heads, model.num_features)
    if model.reg_token is not None:
        assert model.num_prefix_tokens > 1
    if name.startswith("vit_small_patch14_reg4_dinov2"):
        assert not isinstance(model.blocks[0].ls1, nn.Identity)       # layer scale exercised
        assert "norm.bias" in ref.constants
    if name.endswith("gap_256"):
        assert model.global_pool == "avg" and "fc_norm.bias" in ref.constants


def test_open_clip_reference_sums_to_output():
    visual = open_clip_visual("ViT-B-32")
    ref = reference_open_clip_vit(visual, image(224))
    check_reference(ref, 12, 12, 512)
    assert "ln_post.bias" in ref.constants and "stream" in ref.checks


def test_reference_rejects_training_mode():
    import timm
    model = timm.create_model("deit_tiny_patch16_224", depth=1).train()
    with pytest.raises(ValueError):
        reference_timm_vit(model, image(224))


# ---------------------------------------------------------------------------------------------
# The engine against the reference
# ---------------------------------------------------------------------------------------------

from fxdecomp import decompose  # an import failure of the engine fails these tests


def compare_heads(target: nn.Module, ref, x: torch.Tensor) -> None:
    """Engine head components (kind "attn_head") against the reference, relative to max |output|;
    then the per-layer MLP components (kind "mlp", which like the reference leave the MLP's output
    bias to a "bias" component) and the engine's output."""
    with torch.no_grad():
        d = decompose(target, x, granularity="heads")(x)
    scale = ref.output.double().abs().max()

    def worst(found: dict, want: dict):
        return max((float((found[k].double() - want[k]).abs().max() / scale), k) for k in want)

    heads = {(lab.layer, lab.head): d.components[i] for i, lab in enumerate(d.labels)
             if lab.kind == "attn_head"}
    assert set(heads) == set(ref.heads), (
        f"(layer, head) pairs only in the engine: {sorted(set(heads) - set(ref.heads))[:5]}, "
        f"only in the reference: {sorted(set(ref.heads) - set(heads))[:5]}")
    err, key = worst(heads, ref.heads)
    assert err <= TOL, f"head {key} differs from the reference: relative error {err:.2e}"

    mlp = {lab.layer: d.components[i] for i, lab in enumerate(d.labels) if lab.kind == "mlp"}
    assert set(mlp) == set(ref.mlp)
    err, key = worst(mlp, ref.mlp)
    assert err <= TOL, f"MLP of layer {key} differs from the reference: relative error {err:.2e}"

    assert d.reconstruction_error() <= TOL
    out_err = float((d.output.double() - ref.output.double()).abs().max() / scale)
    assert out_err <= TOL, f"engine output differs from the model's: {out_err:.2e}"


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_engine_heads_match_reference_timm(name):
    from fxdecomp.capture.adapters import timm_target
    build, size, _, _ = TIMM_CASES[name]
    model = build()
    x = image(size)
    compare_heads(timm_target(model, "pre_logits"), reference_timm_vit(model, x), x)


def test_engine_heads_match_reference_open_clip():
    from fxdecomp.capture.adapters import open_clip_target
    visual = open_clip_visual("ViT-B-32")
    x = image(224)
    compare_heads(open_clip_target(visual, "embedding"), reference_open_clip_vit(visual, x), x)
