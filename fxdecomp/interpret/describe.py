"""Text descriptions of a component: TextSpan-style greedy choice from a pool of descriptions.

Given one aligned component a(x) [N, E] (centred over images) and a pool of text embeddings
T [M, E], repeat k times (Gandelsman et al. 2024, "TextSpan"):

1. pick the description m whose (residual) direction t_m carries the most of the component's
   residual variance, ||A t_m||² (texts are not renormalised after removal, so a description
   mostly spanned by earlier choices scores low);
2. remove the chosen direction u = t_m/||t_m|| from the component (A <- A(I - uuᵀ)) and from every
   text (T <- T(I - uuᵀ)).

The variance explained after step j is 1 - ||A_j||²/||A_0||² (it only grows). A step's gain is
||A u||², which can exceed the criterion ||A t_m||² once t_m has been shortened by earlier
removals, so gains need not decrease from step to step. The greedy runs on the E×E covariance,
so its cost does not grow with the number of images.

>>> a = torch.randn(50, 8); pool = torch.eye(8)
>>> describe_component(a, pool, [f"d{i}" for i in range(8)], k=2).descriptions   # doctest: +SKIP
['d3', 'd6']
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from fxdecomp.errors import InputError

__all__ = ["ComponentDescription", "describe_component", "describe_components", "default_text_pool",
           "load_text_pool"]


@dataclass
class ComponentDescription:
    """The k descriptions chosen for one component, in the order chosen.

    gains[j]: share of the component's variance the j-th description removed;
    cumulative[j]: share explained by the first j+1 descriptions together.
    """

    component: str | None
    descriptions: list[str]
    indices: list[int]
    gains: list[float] = field(default_factory=list)
    cumulative: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        head = f"component {self.component}" if self.component is not None else "component"
        rows = [head, f"{'#':>3}  {'gain':>7}  {'cumul.':>7}  description"]
        for j, (d, g, c) in enumerate(zip(self.descriptions, self.gains, self.cumulative)):
            rows.append(f"{j + 1:>3}  {g:>7.2%}  {c:>7.2%}  {d}")
        return "\n".join(rows)


@lru_cache(maxsize=1)
def _default_pool() -> tuple[str, ...]:
    text = resources.files("fxdecomp.interpret").joinpath("text_pool.json").read_text("utf-8")
    return tuple(_pool_from_json(json.loads(text)))


def _pool_from_json(obj) -> list[str]:
    if isinstance(obj, list):
        return [str(d) for d in obj]
    if isinstance(obj, dict) and "descriptions" in obj:
        return [str(d) for d in obj["descriptions"]]
    if isinstance(obj, dict) and "groups" in obj:
        return [str(d) for group in obj["groups"].values() for d in group]
    raise InputError("a text pool JSON must be a list of strings, or an object with "
                     "'descriptions' (list) or 'groups' (name -> list)")


def default_text_pool() -> list[str]:
    """The shipped pool: ~340 generic image descriptions (colours, textures, patterns, shapes,
    animals, people, objects, scenes, lighting, styles, layout, counts, materials, moods)."""
    return list(_default_pool())


def load_text_pool(path: str | Path) -> list[str]:
    """A user pool: a .json file (see ``_pool_from_json``) or a text file, one description a line."""
    path = Path(path)
    text = path.read_text("utf-8")
    if path.suffix.lower() == ".json":
        pool = _pool_from_json(json.loads(text))
    else:
        pool = [line.strip() for line in text.splitlines() if line.strip()]
    if not pool:
        raise InputError(f"text pool {path} holds no descriptions")
    return list(dict.fromkeys(pool))


def describe_component(aligned: torch.Tensor, text_embeddings: torch.Tensor,
                       descriptions: Sequence[str], k: int = 5, *, rank: int | None = None,
                       name: str | None = None) -> ComponentDescription:
    """Greedily pick ``k`` of ``descriptions`` that explain most of one component's variance.

    aligned: [N, E] one aligned component over N images; text_embeddings: [M, E] the pool's
    embeddings (any scale; the greedy uses their directions); descriptions: the M strings.
    rank: if set, first project the texts onto the component's top-``rank`` principal
    directions (TextSpan's denoising step); None uses the full space.
    """
    a = torch.as_tensor(aligned).double()
    t = torch.as_tensor(text_embeddings).double()
    if a.ndim != 2 or t.ndim != 2 or a.shape[1] != t.shape[1]:
        raise InputError(f"describe_component needs aligned [N, E] and text [M, E], got "
                         f"{tuple(a.shape)} and {tuple(t.shape)}")
    if len(descriptions) != t.shape[0]:
        raise InputError(f"{len(descriptions)} descriptions but {t.shape[0]} text embeddings")
    k = min(int(k), t.shape[0])
    a = a - a.mean(0, keepdim=True)
    cov = a.T @ a                                                    # [E, E]
    total = float(cov.trace())
    if total <= 0:
        return ComponentDescription(name, [], [], [], [])
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if rank is not None:
        _, _, vh = torch.linalg.svd(a, full_matrices=False)
        top = vh[:rank]                                              # [rank, E]
        t = (t @ top.T) @ top
    chosen: list[int] = []
    gains: list[float] = []
    cumulative: list[float] = []
    residual = total
    for _ in range(k):
        var = torch.einsum("me,ef,mf->m", t, cov, t)                 # ||A t_m||² for every text
        if chosen:
            var[chosen] = -float("inf")
        m = int(var.argmax())
        u = t[m] / t[m].norm().clamp_min(1e-12)
        proj = torch.eye(u.numel(), dtype=u.dtype) - torch.outer(u, u)
        cov = proj @ cov @ proj
        t = t @ proj
        new_residual = float(cov.trace())
        chosen.append(m)
        gains.append((residual - new_residual) / total)
        cumulative.append(1.0 - new_residual / total)
        residual = new_residual
    return ComponentDescription(name, [descriptions[m] for m in chosen], chosen, gains, cumulative)


def describe_components(aligned: torch.Tensor, text_embeddings: torch.Tensor,
                        descriptions: Sequence[str], k: int = 5, *,
                        names: Sequence[str] | None = None,
                        rank: int | None = None) -> list[ComponentDescription]:
    """``describe_component`` for each of aligned [C, N, E]."""
    aligned = torch.as_tensor(aligned)
    if aligned.ndim != 3:
        raise InputError(f"describe_components needs aligned [C, N, E], got {tuple(aligned.shape)}")
    names = list(names) if names is not None else [str(i) for i in range(aligned.shape[0])]
    return [describe_component(aligned[i], text_embeddings, descriptions, k, rank=rank,
                               name=names[i]) for i in range(aligned.shape[0])]
