"""The world's two tiny models, their configurations and the weights shipped with the package.

- the *subject*: a timm ``VisionTransformer`` with a convolutional stem (64 px; ``SUBJECT_STEM``:
  3 x [conv3x3 stride 2, BatchNorm, ReLU] giving an 8 x 8 grid of tokens through
  ``timm.layers.HybridEmbed``, then ``SUBJECT_CONFIG``'s 4 blocks; "Early convolutions help
  transformers see better", Xiao et al. 2021: the plain patch-16 ViT never learned shape here)
  pretrained on the 8 shapes plus self-supervised losses (reconstruction, SimCLR crops), then
  trained on the binary label round vs angular shape over the spurious split; never told color,
  texture or background (``fxdecomp.world.train``). The decomposition treats the stem
  as the embedding (it is before the first residual block). ``load_subject()`` -> (``TimmTarget`` of its pre-logits, info).
- the *tiny CLIP*: an open_clip ``CLIP`` (``CLIP_CONFIG``: a ViT image tower on an 8 x 8 grid
  whose patch embedding is a convolutional stem like the subject's, ``CLIP_STEM``: the earlier
  patch-16 tower's 4 x 4 grid could not see shape, zero-shot shape accuracy 0.24; and a small text
  tower with a word-level tokenizer, ``WorldTokenizer``) trained contrastively on the world's
  captions and attribute phrases ("red color", "triangle shape", "striped texture",
  "grass background"). ``load_world_clip()`` -> (clip, preprocess, tokenizer), like
  ``fxdecomp.capture.adapters.load_clip``.

Both read ``fxdecomp/world/weights/{subject,clip}.safetensors`` and the JSON beside each, which
records the training command, seed, data sizes and the accuracies reached
(``python -m fxdecomp.world.train subject|clip`` rewrites them). Both models take images
normalised as ``(x / 255 - 0.5) / 0.5`` (``MEAN``, ``STD``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fxdecomp.errors import ModelLoadError
from fxdecomp.world.generate import ATTRIBUTES

__all__ = ["SUBJECT_CONFIG", "SUBJECT_STEM", "CLIP_STEM", "CLIP_CONFIG", "conv_stem", "MEAN", "STD", "WEIGHTS_DIR", "WorldTokenizer",
           "attribute_prompts", "WORLD_FEATURES", "build_subject", "build_clip", "load_subject",
           "load_world_clip", "read_record", "preprocess_pil"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGE_SIZE = 64

#: channels of the subject's convolutional stem (each stage: conv3x3 stride 2, BatchNorm, ReLU)
SUBJECT_STEM = (3, 16, 32, 64)
#: timm VisionTransformer arguments of the subject (patch_size 1 on the stem's 8 x 8 feature map)
SUBJECT_CONFIG = dict(img_size=IMAGE_SIZE, patch_size=1, embed_dim=64, depth=4, num_heads=8,
                      mlp_ratio=2.0, num_classes=2, global_pool="token", class_token=True)
#: channels of the tiny CLIP's convolutional stem, which replaces open_clip's patch embedding
#: ``visual.conv1`` (the same stages as the subject's: stride 8 -> the 8 x 8 grid of
#: ``patch_size`` 8; the last channel count is the tower's width)
CLIP_STEM = (3, 16, 32, 64)
#: open_clip CLIP(embed_dim, vision_cfg, text_cfg) of the tiny CLIP (vocab_size set by the
#: tokenizer; the image tower's patch embedding replaced by ``CLIP_STEM``)
CLIP_CONFIG = dict(embed_dim=64,
                   vision_cfg=dict(layers=4, width=64, head_width=16, mlp_ratio=2.0, patch_size=8,
                                   image_size=IMAGE_SIZE),
                   text_cfg=dict(context_length=16, width=64, heads=4, layers=2, mlp_ratio=2.0))

#: The phrase naming one attribute value (the zero-shot prompts and the demo's descriptions).
_PHRASE = {"color": "{} color", "shape": "{} shape", "texture": "{} texture",
           "background": "{} background"}


def attribute_prompts(attribute: str) -> list[str]:
    """One phrase per value of ``attribute``: ["red color", "orange color", ...]."""
    return [_PHRASE[attribute].format(v) for v in ATTRIBUTES[attribute]]


#: Feature descriptions for scoring components of the world models (one per attribute value).
WORLD_FEATURES: dict[str, list[str]] = {a: attribute_prompts(a) for a in ATTRIBUTES}

_BASE_WORDS = ("a", "an", "on", "of", "the", "photo", "object", "color", "shape", "texture",
               "background", "image", "picture", "with", "in", "and", "round", "angular")


class WorldTokenizer:
    """Word-level tokenizer for the tiny CLIP, called like an open_clip tokenizer:
    ``tokenizer(["a red circle", ...])`` -> LongTensor [n, context_length].

    Ids: 0 <pad>, 1 <unk>, 2 <sot>, then the words, and <eot> last, so that the text tower's
    argmax pooling reads the end-of-text position. Lower-cases and splits on non-letters;
    unknown words become <unk>; too long texts are cut, keeping <eot>.
    """

    def __init__(self, words: Sequence[str] | None = None, context_length: int = 16):
        if words is None:
            words = list(_BASE_WORDS) + sorted({w for vals in ATTRIBUTES.values() for w in vals})
        words = list(dict.fromkeys(w.lower() for w in words))
        self.vocab = ["<pad>", "<unk>", "<sot>", *words, "<eot>"]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = int(context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, 1) for w in re.findall(r"[a-z]+", text.lower())]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [2, *self.encode(text)][: n - 1] + [len(self.vocab) - 1]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def conv_stem(channels: Sequence[int]) -> nn.Sequential:
    """[conv3x3 stride 2, BatchNorm2d, ReLU] per consecutive channel pair: [B, channels[0], S, S]
    -> [B, channels[-1], S / 2^(len - 1), S / 2^(len - 1)]."""
    layers = []
    for a, b in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    stem = nn.Sequential(*layers)
    stem.num_features = channels[-1]
    return stem


def build_subject(seed: int = 0) -> nn.Module:
    """A freshly initialised subject: timm VisionTransformer (``SUBJECT_CONFIG``) whose embedding
    is ``HybridEmbed`` over the convolutional stem (``SUBJECT_STEM``, stride 8 -> 8 x 8 tokens)."""
    from functools import partial
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    ratio = 2 ** (len(SUBJECT_STEM) - 1)
    embed = partial(HybridEmbed, backbone=conv_stem(SUBJECT_STEM), feature_size=IMAGE_SIZE // ratio,
                    feature_ratio=ratio)
    return VisionTransformer(embed_layer=embed, **SUBJECT_CONFIG)


def build_clip(tokenizer: WorldTokenizer | None = None, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny CLIP (open_clip ``CLIP`` with ``CLIP_CONFIG``) whose image
    tower's patch embedding ``visual.conv1`` is the convolutional stem ``CLIP_STEM`` (open_clip's
    ``VisionTransformer.forward`` only calls ``conv1(x)`` and flattens its [B, width, 8, 8]
    output into the 64 patch tokens)."""
    from open_clip.model import CLIP
    tokenizer = tokenizer or WorldTokenizer()
    torch.manual_seed(seed)
    text_cfg = dict(CLIP_CONFIG["text_cfg"], vocab_size=tokenizer.vocab_size,
                    context_length=tokenizer.context_length, eos_id=tokenizer.vocab_size - 1)
    clip = CLIP(CLIP_CONFIG["embed_dim"], dict(CLIP_CONFIG["vision_cfg"]), text_cfg)
    # the stem's output grid must be the tower's positional grid (image_size / patch_size)
    assert IMAGE_SIZE // 2 ** (len(CLIP_STEM) - 1) == clip.visual.grid_size[0]
    assert CLIP_STEM[-1] == CLIP_CONFIG["vision_cfg"]["width"]
    clip.visual.conv1 = conv_stem(CLIP_STEM)
    clip.visual.preprocess_cfg = {"size": IMAGE_SIZE, "mean": MEAN, "std": STD,
                                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return clip


def read_record(which: str) -> dict:
    """The JSON record shipped beside ``weights/{which}.safetensors`` (command, seed, data sizes,
    accuracies)."""
    path = WEIGHTS_DIR / f"{which}.json"
    if not path.is_file():
        raise ModelLoadError(f"no record {path}; train it with python -m fxdecomp.world.train {which}")
    return json.loads(path.read_text())


def _state_dict(which: str, checkpoint: str | Path | None) -> dict:
    from safetensors.torch import load_file
    path = Path(checkpoint) if checkpoint else WEIGHTS_DIR / f"{which}.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"the world {which} weights {path} are missing; train them with "
                             f"python -m fxdecomp.world.train {which}")
    return load_file(str(path), device="cpu")


def load_subject(output: str = "pre_logits", checkpoint: str | Path | None = None, *,
                 random_init_seed: int | None = None):
    """The shipped subject as a ``TimmTarget`` (eval mode) and its info dict (the same keys as
    ``load_model``'s). ``random_init_seed``: the same architecture with seeded random weights."""
    from fxdecomp.capture.adapters import TimmTarget, _break_zero_init, _load_strict
    if random_init_seed is not None:
        model = build_subject(random_init_seed)
        _break_zero_init(model, random_init_seed)
        weights = f"random(seed={random_init_seed})"
    else:
        model = build_subject()
        sd = _state_dict("subject", checkpoint)
        _load_strict(model, sd, str(checkpoint or WEIGHTS_DIR / "subject.safetensors"),
                     "the world subject")
        weights = str(checkpoint) if checkpoint else "shipped"
    info = {"spec": "world:subject", "family": "world", "name": "subject", "output": output,
            "weights": weights,
            "input_size": (3, IMAGE_SIZE, IMAGE_SIZE), "mean": MEAN, "std": STD,
            "module_prefix": "model."}
    return TimmTarget(model.eval(), output).eval(), info


def load_world_clip(checkpoint: str | Path | None = None):
    """(tiny CLIP in eval mode, PIL -> tensor preprocessing, ``WorldTokenizer``)."""
    from fxdecomp.capture.adapters import _load_strict
    record = read_record("clip")
    tokenizer = WorldTokenizer(record["tokenizer"]["words"], record["tokenizer"]["context_length"])
    clip = build_clip(tokenizer)
    _load_strict(clip, _state_dict("clip", checkpoint),
                 str(checkpoint or WEIGHTS_DIR / "clip.safetensors"), "the world CLIP")
    return clip.eval(), preprocess_pil, tokenizer


def preprocess_pil(img) -> torch.Tensor:
    """PIL image -> [3, 64, 64] normalised as the world models expect (resized if needed)."""
    from PIL import Image
    img = img.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5
