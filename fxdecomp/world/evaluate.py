"""The ground-truth evaluation: does decompose -> CompAlign -> score find the components that
truly encode each attribute of the world?

On a freshly generated ``test`` split (all attributes independent):

1. decompose the shipped subject (``world:subject``, heads granularity): components
   c_i(x) [C, N, d] with Σ_i c_i(x) = subject(x) (the exactness error is measured);
2. align them to the shipped tiny CLIP with ``CompAlign`` (its defaults) on ``ALIGN_FRACTION``
   of the images; the held-out cosine cos(Σ_i f_i(c_i(x)) + b, clip(x)) is measured on the rest;
3. score every component for each attribute (``score_components`` on the aligned components and
   the CLIP text embeddings of the attribute's values, ``WORLD_FEATURES``);
4. property retrieval (``fxdecomp.apply``): for query images, rank all images by the cosine of
   (a) the sum of the k components selected for the attribute (``select_components``),
   (b) the full representation, (c) the sum of k random components (averaged over
   ``RANDOM_DRAWS`` seeded draws), and measure precision@10: the share of the 10 nearest images
   that have the query's value of the attribute.

Only components that vary over images are candidates (kinds ``CANDIDATE_KINDS``: heads and MLPs;
the embedding and bias terms are constant for a CLS representation).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fxdecomp.world.generate import ATTRIBUTES, World, generate

__all__ = ["ATTRIBUTE_ORDER", "METHODS", "evaluate_world", "WorldEvaluation", "CANDIDATE_KINDS"]

ATTRIBUTE_ORDER = ("color", "shape", "texture", "background")
METHODS = ("top_components", "full_representation", "random_components")
CANDIDATE_KINDS = ("attn_head", "attn", "mlp", "attn_head_token")
ALIGN_FRACTION = 0.7
RANDOM_DRAWS = 20
PRECISION_K = 10


@dataclass
class WorldEvaluation:
    """Everything the report needs: metrics (JSON-ready) and the tensors behind them."""
    metrics: dict
    world: World
    labels: list
    components: torch.Tensor              # [C, N, d]
    scores: dict                          # attribute -> [C] (0 for non-candidates)
    selected: dict                        # attribute -> [k] component indices
    queries: torch.Tensor                 # [Q] image indices
    retrieved: dict = field(default_factory=dict)   # (attribute, method) -> [Q, 10]


def _batched(fn, x: torch.Tensor, batch: int, desc: str, progress: bool):
    from tqdm.auto import tqdm
    outs = []
    for i in tqdm(range(0, len(x), batch), desc=desc, leave=False, disable=not progress):
        outs.append(fn(x[i:i + batch]))
    return outs


@torch.no_grad()
def evaluate_world(n: int = 2000, seed: int = 0, k: int = 3, queries: int = 500,
                   layers: Sequence[int] | None = None, align_kwargs: dict | None = None,
                   progress: bool = True, world: World | None = None) -> WorldEvaluation:
    """Run the ground-truth evaluation (see the module docstring) on n images of the ``test``
    split generated with ``seed``; ``k`` components per attribute; ``queries`` query images
    (the first ones of the held-out part). ``align_kwargs`` go to ``CompAlign.fit`` (default:
    none, i.e. its defaults)."""
    from fxdecomp import decompose
    from fxdecomp.apply import precision_at_k, property_retrieval, select_components
    from fxdecomp.capture.adapters import load_clip, load_model
    from fxdecomp.interpret import CompAlign, score_components, text_embeddings
    from fxdecomp.world.models import WORLD_FEATURES

    t0 = time.perf_counter()
    timings = {}
    world = world if world is not None else generate(n, seed=seed, split="test",
                                                     progress=progress)
    n = len(world)
    x = world.tensor()
    timings["generate_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    subject, _ = load_model("world:subject")
    dm = decompose(subject, x[:2], granularity="heads", layers=layers)
    parts = _batched(dm, x, 250, "decompose", progress)
    components = torch.cat([p.components for p in parts], 1)            # [C, N, d]
    output = torch.cat([p.output for p in parts])
    err = float(((components.sum(0) - output).norm(dim=-1) / output.norm(dim=-1)).max())
    labels = list(dm.labels)
    timings["decompose_s"] = time.perf_counter() - t

    t = time.perf_counter()
    clip, _, tokenizer = load_clip("world")
    targets = torch.cat(_batched(clip.encode_image, x, 500, "CLIP images", progress))
    rng = np.random.default_rng(seed)
    perm = torch.from_numpy(rng.permutation(n))
    n_fit = int(round(ALIGN_FRACTION * n))
    fit_idx, held_idx = perm[:n_fit], perm[n_fit:]
    aligner = CompAlign(labels, components.shape[-1], targets.shape[-1],
                        subject="world:subject", clip_model="world:clip")
    with torch.enable_grad():
        aligner.fit(components[:, fit_idx], targets[fit_idx], progress=progress,
                    **(align_kwargs or {}))
    held_cos = float(F.cosine_similarity(aligner.total(components[:, held_idx]),
                                         targets[held_idx], dim=-1).mean())
    aligned = aligner(components)                                       # [C, N, E]
    timings["align_s"] = time.perf_counter() - t

    t = time.perf_counter()
    candidates = torch.tensor([lab.kind in CANDIDATE_KINDS for lab in labels])
    cand_idx = candidates.nonzero().flatten()
    scores, cand_scores = {}, {}
    for attr in ATTRIBUTE_ORDER:
        text = text_embeddings(WORLD_FEATURES[attr], clip, tokenizer, templates="none",
                               model_id="world:clip")
        s = score_components(aligned[cand_idx], text)
        cand_scores[attr] = s
        full = torch.zeros(len(labels))
        full[cand_idx] = s
        scores[attr] = full
    k = min(k, len(cand_idx))
    selected = {a: cand_idx[select_components(cand_scores, a, k)] for a in ATTRIBUTE_ORDER}

    query_idx = held_idx[: min(queries, len(held_idx))]
    g = np.random.default_rng(seed + 1)
    random_sets = [cand_idx[torch.from_numpy(g.choice(len(cand_idx), k, replace=False))]
                   for _ in range(RANDOM_DRAWS)]
    precision, retrieved, chance = {}, {}, {}
    for attr in ATTRIBUTE_ORDER:
        values = world.labels(attr)
        qvals = [values[i] for i in query_idx.tolist()]
        row = {}
        for method, sel in (("top_components", selected[attr]), ("full_representation", None)):
            idx, _ = property_retrieval(components, query_idx, sel, top=PRECISION_K)
            retrieved[(attr, method)] = idx
            row[method] = precision_at_k(idx, values, qvals)
        rand = []
        for sel in random_sets:
            idx, _ = property_retrieval(components, query_idx, sel, top=PRECISION_K)
            rand.append(precision_at_k(idx, values, qvals))
        retrieved[(attr, "random_components")] = idx
        row["random_components"] = float(np.mean(rand))
        row["random_components_std"] = float(np.std(rand))
        precision[attr] = row
        chance[attr] = 1.0 / len(ATTRIBUTES[attr])
    timings["score_retrieve_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    names = [lab.name for lab in labels]
    metrics = {
        "retrieval_precision_at_10": precision,
        "chance_precision_at_10": chance,
        "alignment_heldout_cosine": held_cos,
        "exactness_max_relative_error": err,
        "k": k,
        "selected_components": {a: [names[i] for i in selected[a].tolist()]
                                for a in ATTRIBUTE_ORDER},
        "component_scores": {a: {names[i]: float(scores[a][i]) for i in cand_idx.tolist()}
                             for a in ATTRIBUTE_ORDER},
        "n_images": n, "n_queries": int(len(query_idx)), "n_align_fit": n_fit,
        "n_components": len(labels), "n_candidates": int(len(cand_idx)),
        "random_draws": RANDOM_DRAWS, "seed": seed, "split": world.split,
        "layers": list(layers) if layers is not None else "all",
        "aligner": {k_: v for k_, v in aligner.stats.items() if isinstance(v, (int, float, str, bool))},
        "seconds": {k_: round(v, 2) for k_, v in timings.items()},
    }
    return WorldEvaluation(metrics, world, labels, components, scores, selected, query_idx,
                           retrieved)
