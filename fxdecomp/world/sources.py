"""The world's tiny models as model sources of ``fxdecomp.capture.adapters``.

Registered when ``fxdecomp.world`` is imported (``fxdecomp`` imports it), so
``load_model("world:subject")``, ``load_model("world:clip")`` and ``load_clip("world")`` work
everywhere, while capture itself never imports this application package.
"""
from __future__ import annotations

from fxdecomp.capture.adapters import OpenClipImageTarget, register_source
from fxdecomp.errors import ModelLoadError


def load_world_model(name, random_init, checkpoint, seed, output):
    """``world:subject``: the subject ViT trained on the world's spurious split (a TimmTarget);
    ``world:clip``: the tiny CLIP's image tower. Weights ship in ``fxdecomp/world/weights``."""
    from fxdecomp.world import models
    if name not in ("subject", "clip"):
        raise ModelLoadError(f"world models are 'world:subject' and 'world:clip', not {name!r}")
    if name == "subject":
        return models.load_subject(output or "pre_logits", checkpoint,
                                   random_init_seed=seed if random_init else None)
    if random_init:
        raise ModelLoadError("world:clip is a trained model; random_init does not apply")
    clip, _, _ = models.load_world_clip(checkpoint)
    target = OpenClipImageTarget(clip.visual.eval(), output or "embedding").eval()
    info = {"spec": "world:clip", "family": "world", "name": "clip", "output": target.output,
            "weights": str(checkpoint) if checkpoint else "shipped",
            "input_size": (3, models.IMAGE_SIZE, models.IMAGE_SIZE), "mean": models.MEAN,
            "std": models.STD, "module_prefix": "visual.", "pretrained_tag": None}
    return target, info


def load_world_clip(random_init: bool = False, checkpoint=None):
    """``load_clip("world")``: the tiny CLIP (model, preprocess, tokenizer)."""
    from fxdecomp.world.models import load_world_clip as load
    if random_init:
        raise ModelLoadError("the world CLIP is a trained model; random_init does not apply")
    return load(checkpoint)


register_source("world", load_world_model,
                clips={"world": load_world_clip, "world:clip": load_world_clip})
