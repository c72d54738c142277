"""Which components encode a feature? Scores of aligned components against text directions.

A feature is a list of descriptions; their CLIP text embeddings [k, E] span the feature's
subspace. With the aligned components a_i(x) [C, N, E] and their total s(x) = Σ_i a_i(x):

- ``score_components`` (the paper's score): orthonormalise the embeddings in the order given
  (Gram–Schmidt, basis B [r, E]); s_j = B_j·s, p_ij = B_j·a_i, both centred over images;
  score_i = mean_j Corr(s_j, p_ij).
- ``score_components_invariant``: tr Cov(s, p_i) / sqrt(tr Cov(s) · tr Cov(p_i)) with s, p_i the
  projections onto span(B). It depends only on the span, not on the basis, so it is unchanged
  by reordering or rescaling the descriptions (the paper's score is unchanged by rescaling, but
  does change with the order unless the embeddings are mutually orthogonal).
- ``variance_explained``: tr Cov(B a_i) / tr Cov(a_i), the share of the component's variance
  that lies in the feature's span.
- ``feature_fidelity``: whether the aligned total carries the feature at all: mean_j
  Corr(B_j·s, B_j·clip(x)) against CLIP's own image embeddings of the same images. A feature
  the subject does not encode still gets scores (its directions receive whatever the alignment
  maps there, e.g. color): low fidelity says those scores, and margins that subtract them
  (``retrieval_scores``), read leakage.

>>> aligned = torch.randn(4, 100, 8); text = torch.randn(3, 8)
>>> score_components(aligned, text).shape
torch.Size([4])
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fxdecomp.errors import InputError

__all__ = ["FEATURES", "feature_descriptions", "orthonormal_basis", "score_components",
           "score_components_invariant", "variance_explained", "feature_fidelity",
           "retrieval_scores"]

#: Description lists of the paper's features (Balasubramanian et al. 2024).
FEATURES: dict[str, list[str]] = {
    "color": ["blue color", "green color", "red color", "yellow color", "black color",
              "white color"],
    "texture": ["rough texture", "smooth texture", "furry texture", "sleek texture",
                "slimy texture", "spiky texture", "glossy texture"],
    "animal": ["camel", "elephant", "giraffe", "cat", "dog", "zebra", "cheetah"],
    "person": ["face", "head", "man", "woman", "human", "arms", "legs"],
    "location": ["sea", "beach", "forest", "desert", "city", "sky", "marsh"],
    "pattern": ["spotted pattern", "striped pattern", "polka dot pattern", "plain pattern",
                "checkered pattern"],
    "shape": ["triangular shape", "rectangular shape", "circular shape", "octagon"],
    "fabric": ["linen", "velvet", "cotton", "silk", "chiffon"],
    "vehicle": ["car", "truck", "jeep", "van"],
}

_EPS = 1e-12


def feature_descriptions(feature: str | Sequence[str]) -> list[str]:
    """A preset name from ``FEATURES`` or the user's own list of descriptions."""
    if isinstance(feature, str):
        if feature not in FEATURES:
            raise InputError(f"unknown feature {feature!r}; presets: {sorted(FEATURES)} "
                             "(or pass a list of descriptions)")
        return list(FEATURES[feature])
    out = [str(d) for d in feature]
    if not out:
        raise InputError("a feature needs at least one description")
    return out


def orthonormal_basis(text_embeddings: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Gram–Schmidt (via QR) of the rows of ``text_embeddings`` [k, E] in their order -> [r, E].

    Rows nearly dependent on the earlier ones (|R_jj| <= rtol · max |R_jj|) are dropped, so
    r <= min(k, E). Rescaling any row by a non-zero factor changes at most the sign of a basis row.
    """
    t = _as_matrix(text_embeddings, "text_embeddings").double()
    q, r = torch.linalg.qr(t.T)                                     # t.T = Q R, Q [E, k]
    diag = r.diagonal().abs()
    keep = diag > rtol * diag.max().clamp_min(_EPS)
    return q[:, keep].T.contiguous()


def _as_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"{name} must be [k, E] with k >= 1, got {tuple(x.shape)}")
    return x


def _check_aligned(aligned: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    aligned = torch.as_tensor(aligned)
    if aligned.ndim != 3:
        raise InputError(f"aligned components must be [C, N, E], got {tuple(aligned.shape)}")
    if aligned.shape[-1] != text.shape[-1]:
        raise InputError(f"aligned components have E={aligned.shape[-1]} but the text embeddings "
                         f"have E={text.shape[-1]}; align to the same CLIP model first")
    if aligned.shape[1] < 2:
        raise InputError(f"scoring needs at least 2 images (got N={aligned.shape[1]})")
    return aligned.double()


def _projections(aligned: torch.Tensor, text_embeddings: torch.Tensor):
    """Centred projections onto the basis: s [N, r] (total) and p [C, N, r] (components)."""
    basis = orthonormal_basis(text_embeddings)
    a = _check_aligned(aligned, basis)
    a = a - a.mean(1, keepdim=True)
    p = torch.einsum("cne,re->cnr", a, basis)
    s = p.sum(0)                                  # projection is linear: B Σ a_i = Σ B a_i
    return s, p, a


def score_components(aligned: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """The paper's score [C]: mean over basis directions j of Corr_x(s_j, p_ij).

    aligned: [C, N, E] aligned components (bias excluded; it is constant and centring removes
    it); text_embeddings: [k, E]. A direction along which a component (or the total) does not
    vary contributes a correlation of 0. Returns float32 on the input's device.
    """
    s, p, _ = _projections(aligned, text_embeddings)
    cov = torch.einsum("nr,cnr->cr", s, p)
    norm = torch.sqrt((s * s).sum(0)[None] * (p * p).sum(1))
    corr = torch.where(norm > _EPS, cov / norm.clamp_min(_EPS), torch.zeros_like(cov))
    return corr.mean(1).float()


def score_components_invariant(aligned: torch.Tensor,
                               text_embeddings: torch.Tensor) -> torch.Tensor:
    """Basis-invariant score [C]: tr Cov(s, p_i) / sqrt(tr Cov(s) · tr Cov(p_i)).

    s and p_i are the centred projections of the total and of component i onto the span of the
    text embeddings. Only the span matters, so the result does not depend on description order
    or scale. Lies in [-1, 1]; 0 for a component with no variance in the span.
    """
    s, p, _ = _projections(aligned, text_embeddings)
    cross = torch.einsum("nr,cnr->c", s, p)
    norm = torch.sqrt((s * s).sum() * (p * p).sum((1, 2)))
    out = torch.where(norm > _EPS, cross / norm.clamp_min(_EPS), torch.zeros_like(cross))
    return out.float()


def variance_explained(aligned: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """[C]: tr Cov(B a_i) / tr Cov(a_i), the share of each component's variance in the span."""
    _, p, a = _projections(aligned, text_embeddings)
    total = (a * a).sum((1, 2))
    inside = (p * p).sum((1, 2))
    out = torch.where(total > _EPS, inside / total.clamp_min(_EPS), torch.zeros_like(total))
    return out.float()


def feature_fidelity(total: torch.Tensor, reference: torch.Tensor,
                     text_embeddings: torch.Tensor) -> float:
    """How faithfully an aligned total carries a feature: mean over the feature's orthonormal
    basis directions j of Corr_x(B_j·total, B_j·reference), both centred over images.

    total: [N, E] aligned sums Σ_i f_i(c_i(x)) (``CompAlign.total``); reference: [N, E] CLIP's
    own image embeddings of the same images (best held out from the alignment); text_embeddings:
    [k, E]. Near 1: the total varies along the feature's texts as CLIP does; near 0: what
    varies there is not what CLIP sees (the subject does not encode the feature), so the
    feature's component scores read leakage. A direction along which either does not vary
    contributes 0.
    """
    basis = orthonormal_basis(text_embeddings)
    pair = []
    for name, x in (("total", total), ("reference", reference)):
        x = _as_matrix(x, name).double()
        if x.shape[-1] != basis.shape[-1]:
            raise InputError(f"{name} has E={x.shape[-1]} but the text embeddings have "
                             f"E={basis.shape[-1]}")
        pair.append((x - x.mean(0)) @ basis.T)                     # [N, r]
    s, c = pair
    if s.shape[0] != c.shape[0] or s.shape[0] < 2:
        raise InputError(f"total [N, E] and reference [N, E] need the same N >= 2 images, got "
                         f"{tuple(total.shape)} and {tuple(reference.shape)}")
    norm = torch.sqrt((s * s).sum(0) * (c * c).sum(0))
    corr = torch.where(norm > _EPS, (s * c).sum(0) / norm.clamp_min(_EPS), torch.zeros_like(norm))
    return float(corr.mean())


def retrieval_scores(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per feature F: score_F − max over the other features' scores (the paper's retrieval rank).

    ``scores`` maps feature name -> [C] scores of the same components; needs >= 2 features.
    """
    names = list(scores)
    if len(names) < 2:
        raise InputError("retrieval_scores needs scores for at least two features")
    stack = torch.stack([torch.as_tensor(scores[n]).float() for n in names])       # [F, C]
    out = {}
    for f, name in enumerate(names):
        others = torch.cat([stack[:f], stack[f + 1:]])
        out[name] = stack[f] - others.max(0).values
    return out
