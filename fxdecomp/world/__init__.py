"""A ground-truth world: generated images with known attributes, and two tiny models trained on
it (``fxdecomp.world.models``: a subject ViT and a tiny CLIP) that ship with the package.

>>> from fxdecomp.world import generate
>>> world = generate(8, seed=0, split="test")     # images [8, 64, 64, 3], masks, label records
"""
from fxdecomp.world.generate import (ANGULAR, ATTRIBUTES, BACKGROUNDS, COLOR_RGB, COLORS,
                                     LAND_BACKGROUNDS, ROUND, SHAPES, SPLITS, SPURIOUS_AGREEMENT,
                                     TEXTURES, WATER_BACKGROUNDS, World, caption, generate,
                                     read_labels, write_world)
from fxdecomp.world import sources as _sources  # noqa: F401  (registers world:subject / world:clip)

__all__ = ["ANGULAR", "ATTRIBUTES", "BACKGROUNDS", "COLOR_RGB", "COLORS", "LAND_BACKGROUNDS",
           "ROUND", "SHAPES", "SPLITS", "SPURIOUS_AGREEMENT", "TEXTURES", "WATER_BACKGROUNDS",
           "World", "caption", "generate", "read_labels", "write_world"]
