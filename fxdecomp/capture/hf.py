"""Hugging Face ``transformers`` vision models as targets (``hf:NAME`` specs).

``NAME`` is a hub id (``google/siglip-base-patch16-224``, ``facebook/dinov2-small``) or a local
directory with a ``config.json``. For CLIP-style towers (``clip``, ``siglip``, ...) only the image
tower is built. Representations (``output=``):

=================  ==============================================================================
``cls``            ``last_hidden_state[:, 0]``: the CLS token after the final norm (ViT, DeiT,
                   DINOv2; default for models without a pooled readout)
``pooler_output``  the model's own pooled output (SigLIP's attention pool, BEiT's and Swin's
                   normed mean; default for those)
``image_embeds``   the projected image embedding of a ``...VisionModelWithProjection`` (CLIP;
                   default where such a class exists); for SigLIP the same as ``pooler_output``
=================  ==============================================================================

Weights: pretrained (``from_pretrained``; offline -> ``ModelLoadError``), a local state dict, or
seeded random weights from the config: a cached ``config.json`` if there is one, else the config
class's defaults for the model type named in ``NAME`` (``model_kwargs`` override config fields,
e.g. ``{"hidden_size": 64, "num_hidden_layers": 2, "image_size": 32}``). The attention
implementation is the library's default (SDPA); ``model_kwargs={"attn_implementation": "eager"}``
picks another. Needs the optional dependency: ``pip install -e ".[hf]"``.
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from fxdecomp.errors import InputError, ModelLoadError

OUTPUTS = ("cls", "pooler_output", "image_embeds")
# model types whose own pooled output is the representation users read (attention pool, normed
# mean); the rest default to the CLS token, or to image_embeds where a projection class exists
_POOLED = ("siglip", "siglip2", "beit", "swin", "swinv2", "data2vec-vision")
_MEAN_STD = {"siglip": ((0.5,) * 3, (0.5,) * 3), "siglip2": ((0.5,) * 3, (0.5,) * 3),
             "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class HFTarget(nn.Module):
    """A transformers vision model's ``output`` (see the module docstring) for pixel values x."""

    module_prefix = "model."

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        if output not in OUTPUTS:
            raise InputError(f"output={output!r} is not available for {type(model).__name__}; "
                             f"choose one of {OUTPUTS}")
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        if self.output == "cls":
            return out.last_hidden_state[:, 0]
        value = getattr(out, self.output, None)
        if value is None and self.output == "image_embeds":
            value = out.pooler_output
        return value


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError("hf: models need the optional dependency transformers: "
                             "pip install -e \".[hf]\"") from e
    return transformers


def model_type_of(name: str) -> str:
    """The transformers model type a hub id names (the longest config key that is a word of it):
    ``google/siglip-base-patch16-224`` -> ``siglip``, ``openai/clip-vit-base-patch32`` ->
    ``clip``, ``facebook/dinov2-small`` -> ``dinov2``."""
    from transformers import CONFIG_MAPPING
    norm = name.rsplit("/", 1)[-1].lower().replace("-", "_")
    found = [k for k in CONFIG_MAPPING.keys()
             if re.search(rf"(^|_){re.escape(k.replace('-', '_'))}(_|$)", norm)]
    if not found:
        raise ModelLoadError(f"cannot tell which transformers model type {name!r} is without its "
                             f"config.json (offline); name a type in it, e.g. 'hf:vit', 'hf:dinov2'")
    return max(found, key=len)


def _vision_config(config):
    """The image tower's config of a text-image model (CLIP, SigLIP), else the config itself."""
    return getattr(config, "vision_config", None) or config


def _config(name: str, random_init: bool, checkpoint, overrides: dict):
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(
            name, local_files_only=bool(random_init or checkpoint))
    except (OSError, ValueError) as e:
        if not (random_init or checkpoint):
            from fxdecomp.capture.adapters import _download_failed
            raise _download_failed(f"transformers model {name!r}", e) from e
        config = transformers.CONFIG_MAPPING[model_type_of(name)]()
    family = config.model_type
    config = _vision_config(config)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise InputError(f"model_kwargs: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    return family, config


def _projected_class(config):
    """The ``...WithProjection`` class of a vision config (CLIP), or None."""
    transformers = _transformers()
    base = transformers.MODEL_MAPPING[type(config)]
    return getattr(transformers, base.__name__ + "WithProjection", None)


def load_hf(name: str, random_init: bool, checkpoint, seed: int, output: str | None,
            kwargs: dict) -> tuple[HFTarget, dict]:
    from fxdecomp.capture.adapters import _instantiate
    kwargs = dict(kwargs)
    attn = kwargs.pop("attn_implementation", None)
    family, config = _config(name, random_init, checkpoint, kwargs)
    if attn is not None:
        config._attn_implementation = attn
    transformers = _transformers()
    projected = _projected_class(config)
    if output is None:
        output = ("image_embeds" if projected is not None else
                  "pooler_output" if family in _POOLED else "cls")
    if output not in OUTPUTS:
        raise InputError(f"output={output!r} is not available for hf models; choose one of {OUTPUTS}")
    cls = projected if (output == "image_embeds" and projected is not None) \
        else transformers.MODEL_MAPPING[type(config)]
    model = _instantiate(lambda pretrained: cls.from_pretrained(name, config=config) if pretrained
                         else cls(config), random_init, checkpoint, seed,
                         f"transformers model {name!r}")
    size = getattr(config, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean, std = _MEAN_STD.get(family, _IMAGENET)
    if not (random_init or checkpoint) and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            proc = transformers.AutoImageProcessor.from_pretrained(name)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError, AttributeError):
            pass
    extra = {"input_size": (getattr(config, "num_channels", 3), *size), "mean": tuple(mean),
             "std": tuple(std), "module_prefix": "model.", "model_type": family}
    return HFTarget(model.eval(), output), extra
