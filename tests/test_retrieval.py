"""fxdecomp.apply.retrieval: planted properties are retrieved, unrelated components stay at
chance, text directions rank their images first, selection prefers the specific component."""
from __future__ import annotations

import math

import pytest
import torch

from fxdecomp.apply import (chance_precision, precision_at_k, property_retrieval,
                            select_components, text_retrieval)
from fxdecomp.errors import InputError
from fxdecomp.interpret import score_components


def _planted_world(n=600, d=16, seed=0):
    """Components [6, n, d]: 0 encodes attribute A (6 values), 1 encodes B (4 values, independent
    of A), 2..5 are noise four times larger than the signal."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 6, (n,), generator=g)
    b = torch.randint(0, 4, (n,), generator=g)
    means_a = torch.randn(6, d, generator=g) * 3
    means_b = torch.randn(4, d, generator=g) * 3
    comps = torch.randn(6, n, d, generator=g) * 4
    comps[0] = means_a[a] + 0.1 * torch.randn(n, d, generator=g)
    comps[1] = means_b[b] + 0.1 * torch.randn(n, d, generator=g)
    return comps, a, b


def _margin(p: float, q: int, k: int) -> float:
    """Five standard errors of a mean of q * k Bernoulli(p) draws."""
    return 5 * math.sqrt(p * (1 - p) / (q * k))


def test_planted_property_component_retrieves_by_it_and_unrelated_ones_at_chance():
    comps, a, b = _planted_world()
    queries = torch.arange(0, 600, 3)                                  # 200 queries
    idx, sim = property_retrieval(comps, queries, selected=[0], top=10)
    assert idx.shape == sim.shape == (200, 10)
    assert precision_at_k(idx, a.tolist(), a[queries].tolist()) == 1.0
    # the same neighbours are unrelated to B: chance, computed from B's label counts
    chance_b = chance_precision(b, b[queries])
    got = precision_at_k(idx, b, b[queries])
    assert abs(got - chance_b) < _margin(chance_b, 200, 10), (got, chance_b)
    # a pure-noise component: at chance for A
    idx_noise, _ = property_retrieval(comps, queries, selected=[3], top=10)
    chance_a = chance_precision(a, a[queries])
    got = precision_at_k(idx_noise, a, a[queries])
    assert abs(got - chance_a) < _margin(chance_a, 200, 10), (got, chance_a)
    # B's component retrieves by B
    idx_b, _ = property_retrieval(comps, queries, selected=[1], top=10)
    assert precision_at_k(idx_b, b, b[queries]) == 1.0
    # the full representation (all six, noise-dominated) is far worse for A than component 0
    idx_full, _ = property_retrieval(comps, queries, top=10)
    assert precision_at_k(idx_full, a, a[queries]) < 0.6


def test_property_retrieval_matches_a_dense_reference_and_chunking_does_not_matter():
    g = torch.Generator().manual_seed(1)
    comps = torch.randn(7, 53, 5, generator=g)
    queries = [0, 52, 17, 17, 8]
    sel = [1, 4, 6]
    rep = comps[sel].sum(0)
    dense = (rep @ rep.T) / (rep.norm(dim=1)[:, None] * rep.norm(dim=1)[None, :])
    dense.fill_diagonal_(-2.0)                                      # exclude_self
    ref_sim, ref_idx = dense[queries].sort(dim=1, descending=True)
    for chunk in (None, 1, 2, 100):
        idx, sim = property_retrieval(comps, queries, selected=sel, top=None, chunk_size=chunk)
        assert idx.shape == (5, 52)
        assert torch.equal(idx, ref_idx[:, :52])
        torch.testing.assert_close(sim, ref_sim[:, :52], rtol=1e-5, atol=1e-6)
        for q, row in zip(queries, idx.tolist()):
            assert q not in row
    idx, sim = property_retrieval(comps, queries, selected=sel, top=53, exclude_self=False)
    assert idx[:, 0].tolist() == queries and torch.allclose(sim[:, 0], torch.ones(5))
    # selected=None is every component
    a, _ = property_retrieval(comps, queries, top=4)
    b, _ = property_retrieval(comps, queries, selected=range(7), top=4)
    assert torch.equal(a, b)


def test_text_retrieval_ranks_images_with_the_planted_direction_first():
    g = torch.Generator().manual_seed(2)
    c, n, e = 5, 300, 32
    aligned = torch.randn(c, n, e, generator=g)
    text = torch.randn(e, generator=g)
    carriers = torch.randperm(n, generator=g)[:25]
    aligned[2, carriers] += 8 * text / text.norm()                   # component 2 carries it
    idx, score = text_retrieval(aligned, text, selected=[2], top=25)
    assert set(idx.tolist()) == set(carriers.tolist())
    assert torch.all(score[:-1] >= score[1:])
    # independent reference: projections of the selected sum
    ref = (aligned[[2, 4]].sum(0) @ text) / text.norm()
    idx2, score2 = text_retrieval(aligned, text, selected=[2, 4], top=None)
    torch.testing.assert_close(score2, ref.sort(descending=True).values)
    # several texts at once: one row each
    other = torch.randn(e, generator=g)
    idx3, _ = text_retrieval(aligned, torch.stack([text, other]), selected=[2], top=25)
    assert idx3.shape == (2, 25) and torch.equal(idx3[0], idx)


def test_selection_picks_the_feature_specific_component_over_a_generalist():
    """Scores computed by the library on planted aligned components: component 0 encodes color
    only; component 1 encodes color, shape and texture (highest raw color score)."""
    g = torch.Generator().manual_seed(3)
    n, e = 400, 48
    basis = torch.linalg.qr(torch.randn(e, 9, generator=g))[0].T      # 9 orthonormal directions
    texts = {"color": basis[0:3], "shape": basis[3:6], "texture": basis[6:9]}
    coef = {f: torch.randn(n, 3, generator=g) for f in texts}
    aligned = 0.05 * torch.randn(8, n, e, generator=g)
    aligned[0] += coef["color"] @ texts["color"]
    for f in texts:
        aligned[1] += 2 * (torch.randn(n, 3, generator=g) @ texts[f]) + coef[f] @ texts[f]
    aligned[5] += coef["shape"] @ texts["shape"]
    scores = {f: score_components(aligned, t) for f, t in texts.items()}
    assert int(scores["color"].argmax()) == 1                       # the generalist wins raw
    assert select_components(scores, "color", 1).tolist() == [0]
    assert select_components(scores, "shape", 1).tolist() == [5]
    top3 = select_components(scores, "color", 3)
    assert top3.dtype == torch.long and top3.shape == (3,) and int(top3[0]) == 0


def test_score_rule_keeps_the_best_encoder_that_leaks_into_an_unencoded_feature():
    """The world's failure mode of the paper's margin, planted: no component encodes texture, but
    the best color component (0) also moves along the texture texts (in CLIP space a color
    changes the projection on texture descriptions), so the total's texture projection is that
    leak and component 0's texture score is as high as its color score. The margin rule then
    prefers the weaker color component 1; rule="score" keeps component 0, which retrieves by
    color far better (planted labels)."""
    g = torch.Generator().manual_seed(5)
    n, e, n_colors = 600, 32, 6
    basis = torch.linalg.qr(torch.randn(e, 9, generator=g))[0].T
    texts = {"color": basis[0:3], "shape": basis[3:6], "texture": basis[6:9]}
    color = torch.randint(0, n_colors, (n,), generator=g)
    code = torch.randn(n_colors, 3, generator=g)[color]                 # [n, 3] per color value
    code = (code - code.mean(0)) / code.std(0)
    aligned = 0.05 * torch.randn(4, n, e, generator=g)
    aligned[0] += code @ texts["color"] + code @ texts["texture"]       # clean color + leak
    aligned[1] += 0.5 * (code + torch.randn(n, 3, generator=g)) @ texts["color"]   # noisier
    aligned[2] += torch.randn(n, 3, generator=g) @ texts["shape"]
    scores = {f: score_components(aligned, t) for f, t in texts.items()}
    assert scores["texture"][0] > 0.8 * scores["color"][0]              # the leak's score
    margin = select_components(scores, "color", 1)
    by_score = select_components(scores, "color", 1, rule="score")
    assert margin.tolist() == [1] and by_score.tolist() == [0]
    assert torch.equal(select_components(scores, "color", 4, rule="score"),
                       torch.argsort(scores["color"], descending=True))
    labels, queries = color.tolist(), list(range(100))
    prec = {name: precision_at_k(property_retrieval(aligned, queries, sel, top=10)[0], labels,
                                 [labels[q] for q in queries])
            for name, sel in (("margin", margin), ("score", by_score))}
    assert prec["score"] > 0.95 and prec["score"] > prec["margin"] + 0.3, prec
    with pytest.raises(InputError, match="rule must be one of"):
        select_components(scores, "color", 1, rule="max")


def test_precision_and_chance_reference_values():
    idx = torch.tensor([[1, 2], [0, 3]])
    labels = ["x", "x", "y", "y"]
    assert precision_at_k(idx, labels, ["x", "y"]) == pytest.approx((1 + 1) / 4)
    # x: (2-1)/3, y: (2-1)/3 ; without self exclusion 2/4
    assert chance_precision(labels, ["x", "y"]) == pytest.approx(1 / 3)
    assert chance_precision(labels, ["x", "y"], exclude_self=False) == pytest.approx(0.5)


def test_bad_inputs_raise_input_errors_naming_the_cause():
    comps = torch.randn(3, 10, 4)
    with pytest.raises(InputError, match=r"\[C, N, d\]"):
        property_retrieval(comps[0], [0])
    with pytest.raises(InputError, match="queries"):
        property_retrieval(comps, [10])
    with pytest.raises(InputError, match="selected"):
        property_retrieval(comps, [0], selected=[3], top=3)
    with pytest.raises(InputError, match="top=10 but only 9"):
        property_retrieval(comps, [0], top=10)
    with pytest.raises(InputError, match="E=4"):
        text_retrieval(comps, torch.randn(5))
    with pytest.raises(InputError, match="feature 'shape'"):
        select_components({"color": torch.ones(3), "texture": torch.ones(3)}, "shape", 1)
    with pytest.raises(InputError, match="k must be"):
        select_components({"color": torch.ones(3), "texture": torch.ones(3)}, "color", 4)
    with pytest.raises(InputError, match="same C"):
        select_components({"color": torch.ones(3), "texture": torch.ones(4)}, "color", 1)
    with pytest.raises(InputError, match="query labels"):
        precision_at_k(torch.zeros(2, 3, dtype=torch.long), [0] * 5, [0])
    assert issubclass(InputError, ValueError)
