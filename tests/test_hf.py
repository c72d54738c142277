"""The ``hf:`` source (Hugging Face transformers): representations equal to the library's own
outputs, random weights from config defaults offline, the offline ModelLoadError, clear errors.
(Exactness of the decompositions is in the test matrix: tests/test_matrix.py.)"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from fxdecomp.capture.adapters import example_input, load_model   # noqa: E402
from fxdecomp.capture.hf import model_type_of                      # noqa: E402
from fxdecomp.errors import InputError, ModelLoadError             # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8)


@pytest.mark.parametrize("name,kind", [
    ("google/siglip-base-patch16-224", "siglip"), ("google/siglip2-base-patch16-224", "siglip2"),
    ("openai/clip-vit-base-patch32", "clip"), ("facebook/dinov2-small", "dinov2"),
    ("facebook/dinov2-with-registers-small", "dinov2_with_registers"),
    ("microsoft/swin-tiny-patch4-window7-224", "swin"), ("google/vit-base-patch16-224", "vit")])
def test_model_type_from_the_name(name, kind):
    assert model_type_of(name) == kind


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="cannot tell which transformers model type"):
        load_model("hf:someone/resnetish-thing", random_init=True)


@pytest.mark.parametrize("spec,output,field", [
    ("hf:google/vit-base-patch16-224", "cls", None),
    ("hf:google/siglip-base-patch16-224", "pooler_output", "pooler_output"),
    ("hf:openai/clip-vit-base-patch32", "image_embeds", "image_embeds")])
def test_default_representation_is_the_models_own(spec, output, field):
    target, info = load_model(spec, random_init=True, model_kwargs=TINY)
    assert info["output"] == output and info["input_size"] == (3, 16, 16)
    x = example_input(info)
    with torch.no_grad():
        got = target(x)
        own = target.model(pixel_values=x)
    want = own.last_hidden_state[:, 0] if field is None else getattr(own, field)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert target.model.config._attn_implementation == "sdpa"     # the library's default


def test_random_init_is_seeded_and_config_fields_checked():
    a, _ = load_model("hf:facebook/deit-small-patch16-224", random_init=True, model_kwargs=TINY)
    b, _ = load_model("hf:facebook/deit-small-patch16-224", random_init=True, model_kwargs=TINY)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    with pytest.raises(InputError, match="has no field 'depth'"):
        load_model("hf:facebook/deit-small-patch16-224", random_init=True, model_kwargs={"depth": 2})


def test_pretrained_offline_is_a_model_load_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(ModelLoadError, match="--random-init"):
        load_model("hf:fxdecomp-test/no-such-model-siglip")
