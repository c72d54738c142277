"""Target modules: a model plus the one representation the user wants from it.

A *target* is an ``nn.Module`` whose ``forward(x)`` returns exactly the representation to be
decomposed (pre-logits, logits, a CLIP image embedding, ...). The decomposition engine exports
the target, so the target must be a plain eval-mode module with one tensor input and one tensor
output. Building it is the only model-family-specific code in fxdecomp; everything downstream
works on the exported graph.

>>> target, info = load_model("timm:deit_tiny_patch16_224", random_init=True)   # doctest: +SKIP
>>> x = example_input(info, batch=2)                                            # doctest: +SKIP
>>> target(x).shape                                                             # doctest: +SKIP
torch.Size([2, 192])
>>> info["input_size"], info["weights"]                                         # doctest: +SKIP
((3, 224, 224), 'random(seed=0)')

Every target wraps the library's model in one attribute (``model`` for timm and torchvision,
``visual`` for open_clip), so module paths in an exported graph carry that prefix
(``model.blocks.3.attn``); ``info["module_prefix"]`` names it for code that wants to strip it.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxdecomp.capture.export import export_friendly
from fxdecomp.errors import InputError, ModelLoadError

__all__ = [
    "TimmTarget", "OpenClipImageTarget", "TorchvisionTarget",
    "timm_target", "open_clip_target", "torchvision_target",
    "load_model", "load_clip", "example_input", "export_friendly", "parse_spec",
]

FAMILIES = ("timm", "open_clip", "torchvision", "hf")

#: Model sources registered from above (``register_source``): family -> loader
#: ``(name, random_init, checkpoint, seed, output) -> (target, info)``. The ground-truth world
#: (``fxdecomp.world``) registers ``world:subject`` / ``world:clip`` this way, so capture never
#: imports an application.
SOURCES: dict[str, Callable] = {}
#: CLIP sources for ``load_clip``: name -> loader ``(random_init, checkpoint) -> (clip, preprocess,
#: tokenizer)``.
CLIP_SOURCES: dict[str, Callable] = {}


def register_source(family: str, load: Callable | None = None,
                    clips: dict[str, Callable] | None = None) -> None:
    """Register a model family for ``load_model("FAMILY:NAME")`` and named CLIPs for
    ``load_clip(NAME)``."""
    if load is not None:
        SOURCES[family] = load
    CLIP_SOURCES.update(clips or {})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OFFLINE_HINT = ("use --random-init for seeded random weights, or --checkpoint PATH to load a local "
                 "state_dict (.safetensors / .pt / .pth)")


# ---------------------------------------------------------------------------------------------
# Target modules
# ---------------------------------------------------------------------------------------------

class TimmTarget(nn.Module):
    """A timm model's pre-logits (``forward_head(forward_features(x), pre_logits=True)``) or
    logits (``model(x)``). Works for every timm model with the standard forward seams."""

    OUTPUTS = ("pre_logits", "logits", "pooled", "stages")
    module_prefix = "model."  # stripped from component names by the engine

    def __init__(self, model: nn.Module, output: str = "pre_logits"):
        super().__init__()
        _check_output(output, self.OUTPUTS, type(model).__name__)
        if output == "pre_logits" and not (hasattr(model, "forward_features")
                                            and hasattr(model, "forward_head")):
            raise ModelLoadError(f"{type(model).__name__} has no forward_features/forward_head; "
                                 f"output='pre_logits' needs both (use output='logits')")
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "logits":
            return self.model(x)
        if self.output == "stages":
            # the last stage's output, mean-pooled over space: before any final conv/norm head
            # (FastViT's final_conv is a conv-BN-GELU that would leave nothing linear to split)
            (y,) = self.model.forward_intermediates(x, indices=1, intermediates_only=True)
            return y.mean(dim=(-2, -1)) if y.dim() == 4 else y.mean(dim=1)
        feats = self.model.forward_features(x)
        head = getattr(self.model, "head", None)
        if self.output == "pooled" and hasattr(head, "global_pool"):
            # the pooled (and normed) features, before a head's hidden MLP (MaxViT's
            # pre_logits ends in Linear + Tanh, which would leave nothing linear to split)
            y = head.global_pool(feats)
            for part in ("norm", "flatten"):
                if hasattr(head, part):
                    y = getattr(head, part)(y)
            return y
        return self.model.forward_head(feats, pre_logits=True)


class OpenClipImageTarget(nn.Module):
    """The open_clip image tower.

    output="embedding": ``clip.encode_image(x, normalize=normalize)`` (projected; unnormalised by
    default, so that the output is a sum of its components).
    output="pre_proj": the pooled representation *before* the final projection, i.e. what
    ``VisionTransformer.forward`` holds just before ``pooled @ self.proj`` (after ln_post and
    pooling), or for a timm-backed tower the trunk's pooled features before ``head.proj/mlp``.
    """

    OUTPUTS = ("embedding", "pre_proj")
    module_prefix = "visual."

    def __init__(self, visual: nn.Module, output: str = "embedding", normalize: bool = False):
        super().__init__()
        _check_output(output, self.OUTPUTS, type(visual).__name__)
        if output == "pre_proj":
            _check_pre_proj_supported(visual)
        if getattr(visual, "output_tokens", False):
            raise ModelLoadError(f"{type(visual).__name__} has output_tokens=True; the target must "
                                 f"return a single tensor")
        self.visual = visual
        self.output = output
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output == "embedding":
            out = self.visual(x)
        else:
            out = _open_clip_pre_proj(self.visual, x)
        return F.normalize(out, dim=-1) if self.normalize else out


class TorchvisionTarget(nn.Module):
    """A torchvision classifier's logits, or its representation before the classification head:
    ViT (``VisionTransformer``): the CLS row after ``encoder`` (which ends in ``encoder.ln``);
    Swin (``SwinTransformer``): ``flatten(avgpool(permute(norm(features(x)))))``."""

    OUTPUTS = ("pre_logits", "logits")
    module_prefix = "model."

    def __init__(self, model: nn.Module, output: str = "pre_logits"):
        super().__init__()
        _check_output(output, self.OUTPUTS, type(model).__name__)
        if output == "pre_logits" and _torchvision_kind(model) is None:
            raise ModelLoadError(
                f"output='pre_logits' is implemented for torchvision VisionTransformer and "
                f"SwinTransformer, not {type(model).__name__} (use output='logits')")
        self.model = model
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.output == "logits":
            return m(x)
        if _torchvision_kind(m) == "vit":          # torchvision VisionTransformer.forward minus heads
            x = m._process_input(x)
            cls = m.class_token.expand(x.shape[0], -1, -1)
            x = m.encoder(torch.cat([cls, x], dim=1))
            return x[:, 0]
        x = m.features(x)                           # SwinTransformer.forward minus head
        x = m.norm(x)
        x = m.permute(x)
        x = m.avgpool(x)
        return m.flatten(x)


def timm_target(model: nn.Module, output: str = "pre_logits") -> TimmTarget:
    """Wrap a timm model; see ``TimmTarget``. The result is in eval mode."""
    return TimmTarget(model, output).eval()


def open_clip_target(clip_or_visual: nn.Module, output: str = "embedding",
                     normalize: bool = False) -> OpenClipImageTarget:
    """Wrap an open_clip model (or its ``.visual`` tower); see ``OpenClipImageTarget``."""
    visual = getattr(clip_or_visual, "visual", clip_or_visual)
    return OpenClipImageTarget(visual, output, normalize).eval()


def torchvision_target(model: nn.Module, output: str = "pre_logits") -> TorchvisionTarget:
    """Wrap a torchvision classifier; see ``TorchvisionTarget``."""
    return TorchvisionTarget(model, output).eval()


def _check_output(output: str, allowed: tuple[str, ...], what: str) -> None:
    if output not in allowed:
        raise InputError(f"output={output!r} is not available for {what}; choose one of {allowed}")


def _torchvision_kind(model: nn.Module) -> str | None:
    from torchvision.models import SwinTransformer, VisionTransformer
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    return None


def _check_pre_proj_supported(visual: nn.Module) -> None:
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer
    if isinstance(visual, VisionTransformer):
        if not all(hasattr(visual, a) for a in ("_embeds", "transformer", "_pool")):
            raise ModelLoadError("this open_clip version's VisionTransformer lacks _embeds/_pool; "
                                 "output='pre_proj' needs open_clip >= 2.30")
        return
    if isinstance(visual, TimmModel):
        return
    raise ModelLoadError(f"output='pre_proj' is implemented for open_clip VisionTransformer and "
                         f"TimmModel towers, not {type(visual).__name__} (use output='embedding')")


def _open_clip_pre_proj(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer.forward`` without ``pooled @ proj`` (and without tokens);
    for a ``TimmModel`` tower, the trunk's (optionally attention-) pooled features."""
    from open_clip.timm_model import TimmModel
    if isinstance(visual, TimmModel):
        x = visual.trunk(x)
        head = visual.head
        if "pool" in head._modules:               # abs_attn / rot_attn pooling belongs to the head
            x = head.pool(x)
        return x
    x = visual._embeds(x)
    x = visual.transformer(x)
    pooled, _tokens = visual._pool(x)
    return pooled


# ---------------------------------------------------------------------------------------------
# Export helpers
# ---------------------------------------------------------------------------------------------

def example_input(info: dict, batch: int = 2, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A deterministic N(0, 1) tensor ``[batch, *info["input_size"]]`` (the scale of a normalised
    image). The same (info, batch, seed) always gives the same tensor, whatever the global RNG."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *tuple(info["input_size"])), generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """``"family:NAME[:TAG]"`` -> (family, name, tag). Only open_clip takes a tag (a pretrained
    tag such as ``laion2b_s34b_b88k``); open_clip ``hf-hub:``/``local-dir:`` names are kept whole.

    >>> parse_spec("open_clip:ViT-B-16:laion2b_s34b_b88k")
    ('open_clip', 'ViT-B-16', 'laion2b_s34b_b88k')
    >>> parse_spec("timm:vit_base_patch16_224.augreg_in21k")
    ('timm', 'vit_base_patch16_224.augreg_in21k', None)
    """
    family, sep, rest = spec.partition(":")
    family = family.strip().lower().replace("-", "_")
    if family == "openclip":
        family = "open_clip"
    if not sep or not rest or family not in FAMILIES + tuple(SOURCES):
        raise ModelLoadError(f"model spec {spec!r} is not 'FAMILY:NAME' with FAMILY one of "
                             f"{FAMILIES + tuple(SOURCES)} "
                             f"(e.g. 'timm:deit_tiny_patch16_224', 'open_clip:ViT-B-16:laion2b_s34b_b88k', "
                             f"'torchvision:vit_b_16')")
    tag = None
    if family == "open_clip" and not rest.startswith(("hf-hub:", "local-dir:")) and ":" in rest:
        rest, tag = rest.rsplit(":", 1)
    elif family != "open_clip" and ":" in rest:
        raise ModelLoadError(f"model spec {spec!r}: only open_clip specs take a ':TAG' "
                             f"(for timm put the tag after a dot: 'timm:NAME.TAG')")
    return family, rest, tag or None


def split_model_arg(arg: str) -> tuple[str, str | None]:
    """A benchmark's model argument -> (spec for ``load_model``, output or None): a timm name,
    ``NAME:OUTPUT`` (a timm name and the adapter output, e.g. "maxvit_tiny_tf_224:pooled"), or
    another source's spec ("torchvision:swin_t", kept whole).

    >>> split_model_arg("maxvit_tiny_tf_224:pooled"), split_model_arg("torchvision:swin_t")
    (('timm:maxvit_tiny_tf_224', 'pooled'), ('torchvision:swin_t', None))
    """
    name, _, output = arg.partition(":")
    if name in FAMILIES + tuple(SOURCES):
        return arg, None
    return "timm:" + name, output or None


def load_model(spec: str, random_init: bool = False, checkpoint: str | None = None, seed: int = 0,
               output: str | None = None, *, normalize: bool = False,
               model_kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """Build the target module for ``spec`` and describe it.

    spec:        "timm:NAME", "open_clip:NAME[:TAG]", "torchvision:NAME", "hf:HUB_ID" (Hugging
                 Face transformers, see ``fxdecomp.capture.hf``), or "world:subject" /
                 "world:clip" (the ground-truth world's tiny models, weights shipped).
    random_init: seeded random weights (``torch.manual_seed(seed)`` before construction, so two
                 calls give identical weights).
    checkpoint:  a local state_dict file (.safetensors, .pt, .pth, .bin) loaded strictly; for
                 open_clip either a whole-CLIP or an image-tower state_dict.
    otherwise:   the library's pretrained weights (ModelLoadError when they cannot be fetched).
    output:      timm/torchvision "pre_logits" (default) | "logits"; hf "cls" | "pooler_output"
                 | "image_embeds" (default per model type);
                 open_clip "embedding" (default) | "pre_proj".
    normalize:   open_clip only: L2-normalise the output (off by default: breaks additivity).
    model_kwargs: extra constructor arguments (e.g. ``{"img_size": 224}`` for timm; config
                 fields for hf, e.g. ``{"hidden_size": 64, "num_hidden_layers": 2}``).

    Returns (target in eval mode, info) with info keys spec, family, name, output, input_size
    (3, H, W), mean, std, weights ("random(seed=S)" | checkpoint path | "pretrained"),
    module_prefix, and for open_clip pretrained_tag.
    """
    if random_init and checkpoint:
        raise ModelLoadError("random_init and checkpoint are mutually exclusive")
    family, name, tag = parse_spec(spec)
    if family in SOURCES:
        return SOURCES[family](name, random_init, checkpoint, seed, output)
    if tag and (random_init or checkpoint):
        raise ModelLoadError(f"spec {spec!r} names the pretrained tag {tag!r}, which cannot be "
                             f"combined with random_init or checkpoint")
    if normalize and family != "open_clip":
        raise InputError("normalize=True is only meaningful for open_clip embeddings")
    kwargs = dict(model_kwargs or {})
    weights = f"random(seed={seed})" if random_init else (str(checkpoint) if checkpoint else "pretrained")
    if family == "timm":
        target, extra = _load_timm(name, random_init, checkpoint, seed, output or "pre_logits", kwargs)
    elif family == "open_clip":
        target, extra = _load_open_clip(name, tag, random_init, checkpoint, seed,
                                        output or "embedding", normalize, kwargs)
    elif family == "hf":
        from fxdecomp.capture.hf import load_hf
        target, extra = load_hf(name, random_init, checkpoint, seed, output, kwargs)
    else:
        target, extra = _load_torchvision(name, random_init, checkpoint, seed,
                                          output or "pre_logits", kwargs)
    info = {"spec": spec, "family": family, "name": name, "output": target.output,
            "weights": weights, **extra}
    return target.eval(), info


def load_clip(name: str, random_init: bool = False, checkpoint: str | None = None,
              seed: int = 0) -> tuple[nn.Module, Any, Any]:
    """The whole open_clip model (for its text side), its eval image preprocessing and tokenizer.

    name: "ViT-B-16", "ViT-B-16:laion2b_s34b_b88k" or the same with an "open_clip:" prefix.
    Returns (clip_model in eval mode, preprocess or None, tokenizer).
    """
    if name in CLIP_SOURCES:                 # e.g. "world": the tiny CLIP of fxdecomp.world
        return CLIP_SOURCES[name](random_init, checkpoint)
    spec = name if ":" in name and name.split(":", 1)[0].lower() in ("open_clip", "openclip") \
        else f"open_clip:{name}"
    _, model_name, tag = parse_spec(spec)
    if tag and (random_init or checkpoint):
        raise ModelLoadError(f"{name!r} names the pretrained tag {tag!r}, which cannot be combined "
                             f"with random_init or checkpoint")
    clip, _tag = _create_open_clip(model_name, tag, random_init, checkpoint, seed)
    import open_clip
    try:
        from open_clip.transform import PreprocessCfg, image_transform_v2
        preprocess = image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)
    except (ImportError, AttributeError, TypeError):   # an older open_clip without v2 configs
        preprocess = None
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as e:
        raise ModelLoadError(f"could not build the tokenizer for open_clip model {model_name!r} "
                             f"(HF tokenizers need a download): {e}") from e
    return clip.eval(), preprocess, tokenizer


# --- state dicts ------------------------------------------------------------------------------

def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ModelLoadError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not read checkpoint {path!r}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model", "model_state_dict", "module"):   # common training wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"checkpoint {path!r} does not hold a state_dict (a dict of tensors)")
    if sd and all(k.startswith("module.") for k in sd):                   # DataParallel prefix
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: str, what: str) -> None:
    """``module.load_state_dict(sd, strict=True)`` with a readable error listing the
    missing, unexpected and wrongly shaped keys."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in sd and sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        lines = [f"checkpoint {path!r} does not match {what}:"]
        if missing:
            lines.append(f"  missing keys: {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {show(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches: {show(shapes)}")
        raise ModelLoadError("\n".join(lines))
    module.load_state_dict(sd, strict=True)


def _download_failed(what: str, e: BaseException) -> ModelLoadError:
    return ModelLoadError(f"pretrained weights for {what} could not be downloaded or found in the "
                          f"local cache ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"{_OFFLINE_HINT}")


# --- timm -------------------------------------------------------------------------------------

def _break_zero_init(model: nn.Module, seed: int) -> None:
    """Seeded noise on the values random initialisation leaves at exactly 0 or 1.

    Libraries zero-initialise the last norm or scale of residual branches (timm's BatchNorm
    "zero-init residual", tiny layer scales) so that a freshly built network starts near the
    identity. For testing a decomposition that hides real structure: whole components are exactly
    0. Every 1-D parameter (norm weights and biases, biases, layer scales), every all-zero weight
    and BatchNorm's running statistics get a small seeded perturbation.
    """
    g = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or not bool(p.any()):
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.mul_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _instantiate(build: Callable[[bool], nn.Module], random_init: bool, checkpoint: str | None,
                 seed: int, what: str) -> nn.Module:
    """``build(pretrained)`` the model: seeded random weights (zero-initialised residual scales
    perturbed) and/or a local checkpoint loaded strictly, else the family's pretrained weights,
    an offline download failure (any OSError) becoming ``ModelLoadError``."""
    if random_init or checkpoint:
        torch.manual_seed(seed)
        model = build(False)
        if random_init:
            _break_zero_init(model, seed)
        if checkpoint:
            _load_strict(model, _read_state_dict(checkpoint), checkpoint, what)
        return model
    try:
        return build(True)
    except OSError as e:      # huggingface_hub / urllib errors are OSError subclasses
        raise _download_failed(what, e) from e


def _load_timm(name, random_init, checkpoint, seed, output, kwargs):
    import timm
    import timm.data
    if not timm.is_model(name.split(".")[0]):
        raise ModelLoadError(f"timm has no model {name!r}")
    model = _instantiate(lambda pretrained: timm.create_model(name, pretrained=pretrained, **kwargs),
                         random_init, checkpoint, seed, f"timm model {name!r}")
    cfg = timm.data.resolve_model_data_config(model)
    input_size = tuple(cfg["input_size"])
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    if img_size is not None and not getattr(model, "dynamic_img_size", False):
        input_size = (input_size[0], *tuple(img_size))      # constructor override (img_size=...)
    extra = {"input_size": input_size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
             "module_prefix": "model."}
    return TimmTarget(model.eval(), output), extra


# --- open_clip --------------------------------------------------------------------------------

def _create_open_clip(name, tag, random_init, checkpoint, seed):
    """The whole CLIP model in fp32 on CPU, and the pretrained tag used (or None)."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg
    schema = name.split(":", 1)[0] if name.startswith(("hf-hub:", "local-dir:")) else None
    if schema is None and name.replace("/", "-") not in open_clip.list_models():
        raise ModelLoadError(f"open_clip has no model config {name!r}; e.g. ViT-B-16, ViT-B-32, ViT-L-14")
    if random_init or checkpoint:
        torch.manual_seed(seed)
        try:
            clip = open_clip.create_model(name, pretrained=None, load_weights=False,
                                          pretrained_image=False, pretrained_text=False)
        except (OSError, RuntimeError) as e:     # hf-hub: configs need the hub
            raise _download_failed(f"open_clip model {name!r}", e) from e
        if random_init:
            _break_zero_init(clip, seed)
        if checkpoint:
            sd = _read_state_dict(checkpoint)
            if any(k.startswith("visual.") for k in sd):
                _load_open_clip_full(clip, sd, checkpoint, name)
            else:
                _load_strict(clip.visual, sd, checkpoint, f"the image tower of open_clip {name!r}")
        return clip.eval(), None
    if schema is None and tag is None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            raise ModelLoadError(f"open_clip lists no pretrained weights for {name!r}; {_OFFLINE_HINT}")
        tag = tags[0]
    quick_gelu = bool((get_pretrained_cfg(name, tag) or {}).get("quick_gelu", False)) if tag else False
    try:
        clip = open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu,
                                      require_pretrained=True)
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError) or "download" in str(e).lower():
            raise _download_failed(f"open_clip model {name!r} (tag {tag!r})", e) from e
        raise ModelLoadError(f"open_clip could not build {name!r} with tag {tag!r}: {e}") from e
    return clip.eval(), tag


def _load_open_clip_full(clip, sd, path, name):
    """A whole-CLIP state_dict, with open_clip's own format conversions (OpenAI/timm/big_vision
    key layouts, position-embedding resizing) before the strict load."""
    from open_clip.factory import convert_state_dict
    from open_clip.model import resize_pos_embed, resize_text_pos_embed
    try:
        sd = convert_state_dict(clip, dict(sd))
        resize_pos_embed(sd, clip)
        resize_text_pos_embed(sd, clip)
    except Exception as e:
        raise ModelLoadError(f"open_clip could not convert checkpoint {path!r} for {name!r}: {e}") from e
    if "logit_scale" in sd and sd["logit_scale"].ndim != clip.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(clip.logit_scale.shape)
    _load_strict(clip, sd, path, f"open_clip model {name!r}")


def _load_open_clip(name, tag, random_init, checkpoint, seed, output, normalize, kwargs):
    if kwargs:
        raise ModelLoadError(f"model_kwargs are not supported for open_clip (got {sorted(kwargs)})")
    clip, used_tag = _create_open_clip(name, tag, random_init, checkpoint, seed)
    visual = clip.visual
    pp = getattr(visual, "preprocess_cfg", {}) or {}
    size = getattr(visual, "image_size", None) or pp.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    extra = {"input_size": (3, *size), "mean": tuple(pp.get("mean", getattr(visual, "image_mean", ()))),
             "std": tuple(pp.get("std", getattr(visual, "image_std", ()))),
             "module_prefix": "visual.", "pretrained_tag": used_tag}
    return OpenClipImageTarget(visual.eval(), output, normalize), extra


# --- torchvision ------------------------------------------------------------------------------

def _load_torchvision(name, random_init, checkpoint, seed, output, kwargs):
    import torchvision
    if name not in torchvision.models.list_models():
        raise ModelLoadError(f"torchvision has no model {name!r}")
    try:
        default = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        default = None
    if not (random_init or checkpoint) and default is None:
        raise ModelLoadError(f"torchvision has no pretrained weights for {name!r}; {_OFFLINE_HINT}")
    model = _instantiate(lambda pretrained: torchvision.models.get_model(
        name, weights=default if pretrained else None, **kwargs),
        random_init, checkpoint, seed, f"torchvision model {name!r}")
    crop, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    if default is not None:
        tf = default.transforms()
        crop = tf.crop_size[0] if isinstance(tf.crop_size, (list, tuple)) else tf.crop_size
        mean, std = tuple(tf.mean), tuple(tf.std)
    size = getattr(model, "image_size", None)   # ViT built for another size (image_size=...)
    hw = (size, size) if isinstance(size, int) else (crop, crop)
    extra = {"input_size": (3, *hw), "mean": mean, "std": std, "module_prefix": "model."}
    return TorchvisionTarget(model.eval(), output), extra
