"""Property retrieval and text retrieval over decomposed components.

Components c_i(x) [C, N, d] sum to the representation r(x) = Σ_i c_i(x). A subset S of them
(``selected``) gives a partial representation r_S(x) = Σ_{i∈S} c_i(x), and:

- **property retrieval** (the paper's image-based retrieval with respect to a property): for a
  query image q, rank every image x by cos(r_S(q), r_S(x)). With S = the components that encode a
  property (``select_components``), the nearest images share that property with the query; with
  S = all components (``selected=None``) this is retrieval by the full representation.
- **text retrieval**: with aligned components a_i(x) [C, N, E] (``CompAlign``), rank images by
  the projection ⟨Σ_{i∈S} a_i(x), t⟩ / ‖t‖ of the selected sum on a text embedding t.

Memory: only [N, d] (the partial sum) and [chunk, N] similarity blocks are ever held; queries
are processed in chunks, never an [N, N] matrix or a [Q, N, C, d] tensor.

>>> comps = torch.randn(5, 40, 8)
>>> idx, sim = property_retrieval(comps, [0, 1], selected=[2, 3], top=3)
>>> idx.shape, sim.shape
(torch.Size([2, 3]), torch.Size([2, 3]))
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import torch

from fxdecomp.errors import InputError
from fxdecomp.interpret.score import retrieval_scores

__all__ = ["select_components", "SELECTION_RULES", "property_retrieval", "text_retrieval", "precision_at_k",
           "chance_precision"]

#: Similarity entries held at once per query chunk ([chunk, N] floats).
_BLOCK_ELEMENTS = 1 << 24


#: how ``select_components`` ranks: "margin" (the paper's) or "score" (the feature's own)
SELECTION_RULES = ("margin", "score")


def select_components(scores: Mapping[str, torch.Tensor], feature: str, k: int,
                      rule: str = "margin") -> torch.Tensor:
    """The k components [k] (long) that best encode ``feature``.

    ``scores`` maps feature names -> [C] scores of the same C components (e.g.
    ``score_components`` per feature). ``rule``:

    - "margin" (default, the paper's): rank by score_F − max over the other features
      (``fxdecomp.interpret.retrieval_scores``; needs at least two features), so a component
      that scores high on every feature is not picked for any one of them;
    - "score": rank by score_F alone. Where the subject does not encode another feature G, the
      aligned total's projection on G's texts is made of whatever does vary (on the world, the
      texture-blind subject's texture scores are high for its color heads), and subtracting
      score_G then demotes the components that encode F best.
    """
    if rule not in SELECTION_RULES:
        raise InputError(f"rule must be one of {SELECTION_RULES}, got {rule!r}")
    if feature not in scores:
        raise InputError(f"no scores for feature {feature!r}; scored features: {list(scores)}")
    sizes = {name: tuple(torch.as_tensor(s).shape) for name, s in scores.items()}
    if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
        raise InputError(f"scores must all be [C] for the same C components, got {sizes}")
    rank = (retrieval_scores(scores)[feature] if rule == "margin"
            else torch.as_tensor(scores[feature]).float())
    n = rank.numel()
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise InputError(f"k must be an int in [1, {n}] (the number of components), got {k!r}")
    return torch.topk(rank, k).indices


def _as_index(values, n: int, what: str, allow_empty: bool = False) -> torch.Tensor:
    idx = torch.as_tensor(values if not isinstance(values, range) else list(values))
    if idx.dtype == torch.bool:
        raise InputError(f"{what} must be integer indices, not a boolean mask")
    if idx.is_floating_point() or idx.ndim > 1:
        raise InputError(f"{what} must be a 1-d sequence of integer indices, got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    idx = idx.long().flatten()
    if idx.numel() == 0 and not allow_empty:
        raise InputError(f"{what} is empty")
    if idx.numel() and (idx.min() < -n or idx.max() >= n):
        raise InputError(f"{what} must index [0, {n}), got values from {int(idx.min())} to "
                         f"{int(idx.max())}")
    return idx % n


def _partial_sum(components: torch.Tensor, selected) -> torch.Tensor:
    """Σ_{i∈selected} c_i [N, d] (all components when selected is None), without copying the
    selected components into one block."""
    if selected is None:
        return components.sum(0)
    sel = _as_index(selected, components.shape[0], "selected (component indices)")
    out = components[int(sel[0])].clone()
    for i in sel[1:].tolist():
        out += components[i]
    return out


def _check_top(top: int | None, available: int) -> int:
    if top is None:
        return available
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise InputError(f"top must be a positive int or None, got {top!r}")
    if top > available:
        raise InputError(f"top={top} but only {available} images can be retrieved per query")
    return top


def property_retrieval(components: torch.Tensor, queries: Sequence[int] | torch.Tensor,
                       selected: Sequence[int] | torch.Tensor | None = None, *,
                       top: int | None = 10, exclude_self: bool = True,
                       chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest images to each query image by cosine of the selected components' sum.

    components: [C, N, d] (one image per column N); queries: [Q] image indices;
    selected: component indices S (None = all = the full representation).
    Returns (indices [Q, top] long, cosine similarities [Q, top]), best first; with
    ``exclude_self`` the query image itself is never retrieved; ``top=None`` ranks every image.
    Images whose partial sum is zero have cosine 0 to everything.
    """
    components = torch.as_tensor(components)
    if components.ndim != 3 or 0 in components.shape:
        raise InputError(f"components must be [C, N, d] (C components, N images, width d), got "
                         f"{tuple(components.shape)}")
    n = components.shape[1]
    q = _as_index(queries, n, "queries (image indices)")
    top = _check_top(top, n - 1 if exclude_self else n)
    rep = torch.nn.functional.normalize(_partial_sum(components, selected).float(), dim=-1)
    chunk = chunk_size or max(1, _BLOCK_ELEMENTS // n)
    out_idx, out_sim = [], []
    for s in range(0, q.numel(), chunk):
        qi = q[s:s + chunk].to(rep.device)
        sims = rep[qi] @ rep.T                                      # [chunk, N]
        if exclude_self:
            sims[torch.arange(qi.numel(), device=rep.device), qi] = -float("inf")
        val, idx = torch.topk(sims, top, dim=1)
        out_idx.append(idx)
        out_sim.append(val)
    return torch.cat(out_idx), torch.cat(out_sim)


def text_retrieval(aligned: torch.Tensor, text_embedding: torch.Tensor,
                   selected: Sequence[int] | torch.Tensor | None = None, *,
                   top: int | None = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ranked by the projection of the selected aligned components' sum on a text.

    aligned: [C, N, E] aligned components (``CompAlign(components)``); text_embedding: [E]
    (or [T, E] for several texts at once). score(x) = ⟨Σ_{i∈S} a_i(x), t⟩ / ‖t‖.
    Returns (indices [top], scores [top]), best first ([T, top] each for [T, E] texts).
    """
    aligned = torch.as_tensor(aligned)
    if aligned.ndim != 3 or 0 in aligned.shape:
        raise InputError(f"aligned components must be [C, N, E], got {tuple(aligned.shape)}")
    text = torch.as_tensor(text_embedding)
    if text.ndim not in (1, 2) or text.shape[-1] != aligned.shape[-1]:
        raise InputError(f"text_embedding must be [E={aligned.shape[-1]}] (or [T, E]) to match "
                         f"the aligned components, got {tuple(text.shape)}")
    norms = text.float().norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise InputError("text_embedding has zero norm")
    top = _check_top(top, aligned.shape[1])
    total = _partial_sum(aligned, selected).float()                # [N, E]
    direction = (text.float() / norms).to(total.device)
    proj = direction @ total.T                                      # [N] or [T, N]
    val, idx = torch.topk(proj, top, dim=-1)
    return idx, val


def _codes(labels: Sequence, what: str) -> list:
    if isinstance(labels, torch.Tensor):
        if labels.ndim != 1:
            raise InputError(f"{what} must be 1-d, got {tuple(labels.shape)}")
        return labels.tolist()
    return list(labels)


def precision_at_k(indices: torch.Tensor, labels: Sequence, query_labels: Sequence) -> float:
    """Share of retrieved items whose label equals their query's, averaged over queries.

    indices: [Q, k] retrieved image indices (``property_retrieval``); labels: the N images'
    labels (any hashable values, or a 1-d tensor); query_labels: the Q queries' labels.
    """
    indices = torch.as_tensor(indices)
    if indices.ndim != 2 or indices.shape[1] == 0:
        raise InputError(f"indices must be [Q, k] with k >= 1, got {tuple(indices.shape)}")
    labels, query_labels = _codes(labels, "labels"), _codes(query_labels, "query_labels")
    if len(query_labels) != indices.shape[0]:
        raise InputError(f"{indices.shape[0]} queries retrieved but {len(query_labels)} query "
                         "labels given")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(labels)):
        raise InputError(f"indices must index the {len(labels)} labels, got values up to "
                         f"{int(indices.max())}")
    if indices.shape[0] == 0:
        raise InputError("no queries")
    hits = 0
    for row, ql in zip(indices.tolist(), query_labels):
        hits += sum(labels[i] == ql for i in row)
    return hits / indices.numel()


def chance_precision(labels: Sequence, query_labels: Sequence, *,
                     exclude_self: bool = True) -> float:
    """Expected ``precision_at_k`` of a uniformly random ranking (any k), from the label counts.

    A query with label y retrieves random images: each shares y with probability
    (n_y − 1) / (N − 1) when the query is one of the N images and is never retrieved itself
    (``exclude_self``, as in ``property_retrieval``), else n_y / N. Averaged over queries.
    """
    labels, query_labels = _codes(labels, "labels"), _codes(query_labels, "query_labels")
    n = len(labels)
    if n < 2 or not query_labels:
        raise InputError("chance_precision needs at least two labels and one query")
    counts = Counter(labels)
    own = int(bool(exclude_self))
    if own and any(counts[y] == 0 for y in query_labels):
        raise InputError("exclude_self: every query label must occur among the labels "
                         "(the queries are images of the collection)")
    return sum((counts[y] - own) / (n - own) for y in query_labels) / len(query_labels)
