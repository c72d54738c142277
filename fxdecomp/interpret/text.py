"""CLIP text side: description embeddings averaged over prompt templates, cached in memory.

>>> import open_clip                                              # doctest: +SKIP
>>> model = open_clip.create_model("ViT-B-32", pretrained=None)   # doctest: +SKIP
>>> tok = open_clip.get_tokenizer("ViT-B-32")                     # doctest: +SKIP
>>> text_embeddings(["red color", "blue color"], model, tok, templates="single").shape  # doctest: +SKIP
torch.Size([2, 512])
"""
from __future__ import annotations

import weakref
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F

from fxdecomp.errors import InputError

__all__ = ["IMAGENET_TEMPLATES", "TEMPLATE_SETS", "text_embeddings", "resolve_templates",
           "clear_text_cache", "text_cache_size"]

#: The 80 ImageNet prompt templates of the CLIP paper (Radford et al. 2021), ``{}`` = description.
IMAGENET_TEMPLATES: list[str] = [
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
]

#: Named template sets: the full 80, the 7-template subset the CLIP authors selected, and one prompt.
TEMPLATE_SETS: dict[str, list[str]] = {
    "imagenet80": IMAGENET_TEMPLATES,
    "imagenet7": [
        'itap of a {}.',
        'a bad photo of the {}.',
        'a origami {}.',
        'a photo of the large {}.',
        'a {} in a video game.',
        'art of the {}.',
        'a photo of the small {}.',
    ],
    "single": ["a photo of a {}."],
    "none": ["{}"],
}

# (model key, descriptions, templates) -> [k, E] float32 CPU tensor. A model key is the caller's
# model id, or ("object", id(model)) when none is given; entries of the latter kind are dropped
# when the model object is garbage-collected (so a recycled id() never returns stale vectors).
_CACHE: dict[tuple, torch.Tensor] = {}


def clear_text_cache() -> None:
    """Forget every cached description embedding."""
    _CACHE.clear()


def text_cache_size() -> int:
    """Number of (model, descriptions, templates) entries currently cached."""
    return len(_CACHE)


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """A template set name (``TEMPLATE_SETS``), a list of ``{}`` templates, or None (imagenet80)."""
    if templates is None:
        return list(IMAGENET_TEMPLATES)
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[templates])
        if "{}" in templates:
            return [templates]
        raise InputError(f"unknown template set {templates!r}; known: {sorted(TEMPLATE_SETS)} "
                         "(or pass a list of strings containing '{}')")
    out = list(templates)
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise InputError(f"templates must be a non-empty list of strings containing '{{}}'; "
                         f"bad: {bad[:3]}")
    return out


def _model_key(model, model_id: Hashable | None) -> Hashable:
    if model_id is not None:
        return ("id", model_id)
    return ("object", id(model))


def _drop_object_entries(obj_id: int) -> None:
    for key in [k for k in _CACHE if k[0] == ("object", obj_id)]:
        _CACHE.pop(key, None)


@torch.inference_mode()
def _encode(model, tokenizer: Callable, prompts: list[str], batch_size: int,
            device: torch.device) -> torch.Tensor:
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        emb = model.encode_text(tokens).float()
        out.append(F.normalize(emb, dim=-1).cpu())
    return torch.cat(out)


def text_embeddings(descriptions: Sequence[str], model, tokenizer: Callable, *,
                    templates: str | Sequence[str] | None = None,
                    model_id: Hashable | None = None, batch_size: int = 256,
                    use_cache: bool = True) -> torch.Tensor:
    """CLIP text embeddings of ``descriptions`` [k] -> [k, E] (float32, CPU, unit rows).

    Each description is put in every template (``template.format(description)``); the prompts are
    encoded with ``model.encode_text(tokenizer(prompts))``, each prompt embedding L2-normalised,
    averaged over templates, and the mean L2-normalised again (CLIP's zero-shot recipe).

    templates: a name in ``TEMPLATE_SETS`` ("imagenet80" = the 80 CLIP-paper templates, the
        default; "imagenet7"; "single"; "none"), or a list of strings containing ``{}``.
    model_id: a hashable naming the model and its weights (e.g. "open_clip:ViT-B-32@laion2b");
        results are cached in memory per (model_id, descriptions, templates). Without an id the
        cache is tied to the model object and cleared when it is garbage-collected.

    The 80-template default costs 80 text-tower passes per description: about 50 ms each for
    ViT-B-32 on two CPU cores, so use templates="imagenet7"/"single" for quick CPU runs.
    """
    descriptions = [str(d) for d in descriptions]
    if not descriptions:
        raise InputError("text_embeddings needs at least one description")
    temps = resolve_templates(templates)
    key = (_model_key(model, model_id), tuple(descriptions), tuple(temps))
    if use_cache and key in _CACHE:
        return _CACHE[key].clone()

    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")
    prompts = [t.format(d) for d in descriptions for t in temps]
    emb = _encode(model, tokenizer, prompts, batch_size, device)          # [k*T, E]
    emb = F.normalize(emb.view(len(descriptions), len(temps), -1).mean(1), dim=-1)
    if use_cache:
        if model_id is None and not any(k[0] == key[0] for k in _CACHE):
            try:
                weakref.finalize(model, _drop_object_entries, id(model))
            except TypeError:            # not weak-referenceable: keep no object-keyed entry
                return emb
        _CACHE[key] = emb
    return emb.clone()
