"""Target modules and model loading (fxdecomp.capture.adapters). Small models, CPU, no network."""
from __future__ import annotations

import copy
import json
import logging
import urllib.error

import pytest
import torch
import torch.nn.functional as F

from fxdecomp.capture.adapters import (
    example_input, export_friendly, load_clip, load_model, open_clip_target, parse_spec,
    timm_target, torchvision_target,
)
from fxdecomp.errors import ModelLoadError

logging.getLogger().setLevel(logging.ERROR)     # open_clip logs "initialized randomly" warnings

TINY_TIMM = ("timm:deit_tiny_patch16_224", {"depth": 2})
TINY_CLIP = "fxd-tiny-clip"                      # registered by the tiny_clip fixture


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Register a 2-layer open_clip config, so open_clip tests build and save in milliseconds."""
    import open_clip
    folder = tmp_path_factory.mktemp("oc_cfg")
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return TINY_CLIP


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- specs and inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("spec, want", [
    ("timm:vit_base_patch16_224.augreg_in21k", ("timm", "vit_base_patch16_224.augreg_in21k", None)),
    ("open_clip:ViT-B-16", ("open_clip", "ViT-B-16", None)),
    ("open_clip:ViT-B-16:laion2b_s34b_b88k", ("open_clip", "ViT-B-16", "laion2b_s34b_b88k")),
    ("open_clip:hf-hub:timm/ViT-B-16-SigLIP", ("open_clip", "hf-hub:timm/ViT-B-16-SigLIP", None)),
    ("torchvision:vit_b_16", ("torchvision", "vit_b_16", None)),
])
def test_parse_spec(spec, want):
    assert parse_spec(spec) == want


@pytest.mark.parametrize("spec", ["vit_b_16", "keras:vit", "timm:", "timm:deit:tag"])
def test_bad_spec(spec):
    with pytest.raises(ModelLoadError):
        parse_spec(spec)


def test_unknown_model_names():
    for spec in ("timm:no_such_model", "open_clip:No-Such-Model", "torchvision:no_such_model"):
        with pytest.raises(ModelLoadError, match="no model"):
            load_model(spec, random_init=True)


def test_example_input_is_deterministic():
    info = {"input_size": (3, 40, 24)}
    torch.manual_seed(123)
    a = example_input(info, batch=3, seed=5)
    torch.manual_seed(456)
    b = example_input(info, batch=3, seed=5)
    assert a.shape == (3, 3, 40, 24) and torch.equal(a, b)
    assert not torch.equal(a, example_input(info, batch=3, seed=6))


# --- seeded random init -----------------------------------------------------------------------

def test_timm_random_init_is_seeded():
    spec, kw = TINY_TIMM
    a, info = load_model(spec, random_init=True, seed=7, model_kwargs=kw)
    b, _ = load_model(spec, random_init=True, seed=7, model_kwargs=kw)
    c, _ = load_model(spec, random_init=True, seed=8, model_kwargs=kw)
    assert same_state(a, b) and not same_state(a, c)
    assert not a.training and info["weights"] == "random(seed=7)"
    assert info["family"] == "timm" and info["name"] == "deit_tiny_patch16_224"
    assert info["output"] == "pre_logits" and info["input_size"] == (3, 224, 224)
    assert info["mean"] == (0.485, 0.456, 0.406) and len(info["std"]) == 3
    x = example_input(info)
    assert torch.equal(a(x), b(x)) and a(x).shape == (2, 192)


def test_open_clip_random_init_is_seeded(tiny_clip):
    a, info = load_model(f"open_clip:{tiny_clip}", random_init=True, seed=1)
    b, _ = load_model(f"open_clip:{tiny_clip}", random_init=True, seed=1)
    c, _ = load_model(f"open_clip:{tiny_clip}", random_init=True, seed=2)
    assert same_state(a, b) and not same_state(a, c)
    assert info["input_size"] == (3, 32, 32) and info["output"] == "embedding"
    assert a(example_input(info)).shape == (2, 32)


def test_timm_img_size_override_sets_input_size():
    target, info = load_model("timm:vit_small_patch14_reg4_dinov2", random_init=True,
                              model_kwargs={"img_size": 56, "depth": 1})
    assert info["input_size"] == (3, 56, 56)
    assert target(example_input(info)).shape == (2, 384)


# --- targets equal the libraries' own calls ---------------------------------------------------

def test_timm_targets_match_timm():
    spec, kw = TINY_TIMM
    pre, info = load_model(spec, random_init=True, model_kwargs=kw)
    model = pre.model
    logits = timm_target(model, "logits")
    headless = copy.deepcopy(model)
    headless.reset_classifier(0)                   # timm's own "num_classes=0" model
    x = example_input(info)
    with torch.no_grad():
        assert torch.equal(pre(x), headless(x))
        assert torch.equal(logits(x), model(x))
        assert torch.equal(model.head(pre(x)), model(x))


def test_timm_gap_model_pre_logits():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_medium_patch16_reg4_gap_256", depth=1).eval()
    headless = copy.deepcopy(model)
    headless.reset_classifier(0)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(timm_target(model)(x), headless(x))


def test_open_clip_targets_match_encode_image(tiny_clip):
    clip, preprocess, tokenizer = load_clip(tiny_clip, random_init=True)
    x = torch.randn(2, 3, 32, 32)
    emb = open_clip_target(clip)
    pre = open_clip_target(clip, "pre_proj")
    normed = open_clip_target(clip.visual, normalize=True)
    with torch.no_grad():
        assert torch.equal(emb(x), clip.encode_image(x))
        assert torch.equal(normed(x), clip.encode_image(x, normalize=True))
        assert torch.allclose(pre(x) @ clip.visual.proj, emb(x), atol=1e-6)
        assert pre(x).shape == (2, 64)
        assert clip.encode_text(tokenizer(["a photo of a cat"])).shape == (1, 32)
    assert preprocess is not None


def test_open_clip_vit_b_32_info():
    target, info = load_model("open_clip:ViT-B-32", random_init=True)
    assert info["input_size"] == (3, 224, 224) and info["module_prefix"] == "visual."
    assert info["mean"] == (0.48145466, 0.4578275, 0.40821073) and info["pretrained_tag"] is None
    with torch.no_grad():
        assert target(example_input(info, batch=1)).shape == (1, 512)


def test_torchvision_vit_pre_logits():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                              hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    pre, logits = torchvision_target(model), torchvision_target(model, "logits")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.heads(pre(x)), model(x))
        assert torch.equal(logits(x), model(x))
        assert pre(x).shape == (2, 32)


def test_torchvision_swin_pre_logits():
    from torchvision.models import SwinTransformer
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                            window_size=[4, 4], num_classes=10).eval()
    pre = torchvision_target(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.head(pre(x)), model(x))
        assert pre(x).shape == (2, 32)


def test_torchvision_load_model_info():
    target, info = load_model("torchvision:swin_t", random_init=True, seed=3)
    assert info["input_size"] == (3, 224, 224) and info["output"] == "pre_logits"
    assert info["mean"] == (0.485, 0.456, 0.406)
    assert not target.training


def test_torchvision_pre_logits_unsupported_model():
    from torchvision.models import resnet18
    with pytest.raises(ModelLoadError, match="pre_logits"):
        torchvision_target(resnet18())


# --- checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_checkpoint_roundtrip(tmp_path, suffix):
    spec, kw = TINY_TIMM
    src, info = load_model(spec, random_init=True, seed=11, model_kwargs=kw)
    path = tmp_path / f"w{suffix}"
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)      # a training-style wrapper is unwrapped
    dst, dinfo = load_model(spec, checkpoint=str(path), seed=0, model_kwargs=kw)
    assert dinfo["weights"] == str(path)
    assert same_state(src, dst)
    x = example_input(info)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_timm_checkpoint_mismatch_names_keys(tmp_path):
    spec, kw = TINY_TIMM
    src, _ = load_model(spec, random_init=True, model_kwargs=kw)
    sd = dict(src.model.state_dict())
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(5, 192)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError) as err:
        load_model(spec, checkpoint=str(path), model_kwargs=kw)
    msg = str(err.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "extra.weight" in msg and "head.weight" in msg
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(spec, checkpoint=str(tmp_path / "missing.pt"), model_kwargs=kw)


@pytest.mark.parametrize("which", ["full", "visual"])
def test_open_clip_checkpoint_roundtrip(tmp_path, tiny_clip, which):
    clip, _, _ = load_clip(tiny_clip, random_init=True, seed=5)
    sd = clip.state_dict() if which == "full" else clip.visual.state_dict()
    path = tmp_path / f"{which}.pt"
    torch.save(sd, path)
    target, info = load_model(f"open_clip:{tiny_clip}", checkpoint=str(path))
    assert same_state(target.visual, clip.visual)
    if which == "full":
        clip2, _, _ = load_clip(tiny_clip, checkpoint=str(path))
        assert same_state(clip2, clip)
    x = example_input(info)
    with torch.no_grad():
        assert torch.equal(target(x), clip.encode_image(x))


def test_open_clip_checkpoint_mismatch(tmp_path, tiny_clip):
    clip, _, _ = load_clip(tiny_clip, random_init=True)
    sd = dict(clip.visual.state_dict())
    sd["proj"] = torch.zeros(64, 16)
    path = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ModelLoadError, match="proj: checkpoint"):
        load_model(f"open_clip:{tiny_clip}", checkpoint=str(path))


def test_random_init_and_checkpoint_exclusive(tmp_path):
    with pytest.raises(ModelLoadError):
        load_model("timm:deit_tiny_patch16_224", random_init=True, checkpoint=str(tmp_path / "x.pt"))


# --- offline pretrained loading ---------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty caches: HF hub in offline mode, torch.hub downloads fail."""
    import huggingface_hub.constants as hf_constants
    import torch.hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: refusing to download {url}")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


@pytest.mark.parametrize("spec", ["timm:deit_tiny_patch16_224", "open_clip:ViT-B-32",
                                  "open_clip:ViT-B-16:laion2b_s34b_b88k", "torchvision:vit_b_16"])
def test_offline_pretrained_raises_model_load_error(offline, spec):
    with pytest.raises(ModelLoadError) as err:
        load_model(spec)
    msg = str(err.value)
    assert "could not be downloaded" in msg
    assert "--random-init" in msg and "--checkpoint PATH" in msg
    assert err.value.__cause__ is not None


def test_offline_load_clip_raises(offline):
    with pytest.raises(ModelLoadError, match="could not be downloaded"):
        load_clip("ViT-B-32:openai")


# --- export -----------------------------------------------------------------------------------

def test_export_friendly_restores_switches():
    spec, kw = TINY_TIMM
    target, _ = load_model(spec, random_init=True, model_kwargs=kw)
    before = torch.backends.mha.get_fastpath_enabled()
    flags = [m.fused_attn for m in target.modules() if hasattr(m, "fused_attn")]
    assert flags
    with export_friendly(target, fused_attn=not flags[0]):
        assert torch.backends.mha.get_fastpath_enabled() is False
        assert all(m.fused_attn is (not flags[0]) for m in target.modules() if hasattr(m, "fused_attn"))
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert [m.fused_attn for m in target.modules() if hasattr(m, "fused_attn")] == flags
    with pytest.raises(ValueError):
        with export_friendly(fused_attn=False):
            pass


@pytest.mark.parametrize("fused", [True, False])
def test_timm_target_exports_with_dynamic_batch(fused):
    spec, kw = TINY_TIMM
    target, info = load_model(spec, random_init=True, model_kwargs=kw)
    with export_friendly(target, fused_attn=fused):
        ep = torch.export.export(target, (example_input(info),),
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
        targets = {str(n.target) for n in ep.module().graph.nodes if n.op == "call_function"}
        x3 = example_input(info, batch=3, seed=1)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x3), target(x3), rtol=0, atol=0)
    sdpa = "aten.scaled_dot_product_attention.default"
    assert (sdpa in targets) == fused
    assert ("aten.softmax.int" in targets) == (not fused)


def test_open_clip_target_exports_with_sdpa(tiny_clip):
    target, info = load_model(f"open_clip:{tiny_clip}", random_init=True)
    with export_friendly():
        ep = torch.export.export(target, (example_input(info),),
                                 dynamic_shapes=({0: torch.export.Dim("batch")},))
        x3 = example_input(info, batch=3, seed=1)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x3), target(x3), rtol=0, atol=0)
    targets = [str(n.target) for n in ep.module().graph.nodes if n.op == "call_function"]
    assert targets.count("aten.scaled_dot_product_attention.default") == 2
