"""fxdecomp.interpret: CompAlign, CLIP text embeddings, feature scores, TextSpan descriptions, CLI.

Every test plants a ground truth (known maps, known text directions) and checks it is recovered.
"""
from __future__ import annotations

import csv
import json
import types

import pytest
import torch
import torch.nn.functional as F

from fxdecomp.interpret import (FEATURES, AlignmentMismatchError, CompAlign, IMAGENET_TEMPLATES,
                                clear_text_cache, default_text_pool, describe_component,
                                feature_fidelity, orthonormal_basis, retrieval_scores, score_components,
                                score_components_invariant, text_cache_size, text_embeddings,
                                variance_explained)
from fxdecomp.run.decomposition import ComponentLabel


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops; with other jobs on the (2-core) machine, torch's
    intra-op threads make them 10x slower, so use one thread here and restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _labels(n_layers: int = 2, n_heads: int = 3) -> list[ComponentLabel]:
    out = [ComponentLabel(f"blocks.{l}.attn.h{h}", f"blocks.{l}.attn", "attn_head", l, h)
           for l in range(n_layers) for h in range(n_heads)]
    return out + [ComponentLabel("norm.bias", "", "bias")]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


# ================================================================== CompAlign
def _planted(d: int, e: int, c: int = 6, n: int = 2048, orthogonal: bool = True, seed: int = 0):
    """Components [C, N, d] and targets Σ_i A_iᵀ c_i (+ offset) with known maps A [C, d, e]."""
    g = torch.Generator().manual_seed(seed)
    if orthogonal:      # orthonormal columns (d >= e) or rows (d < e): W_iᵀW_i = I or W_iW_iᵀ = I
        q, _ = torch.linalg.qr(torch.randn(c, max(d, e), min(d, e), generator=g))
        maps = q if d >= e else q.transpose(1, 2)
    else:
        maps = torch.randn(c, d, e, generator=g) / d ** 0.5
    comps = torch.randn(c, n, d, generator=g)
    return comps, torch.einsum("cnd,cde->ne", comps, maps), maps


def _heldout_cos(al: CompAlign, comps, targets) -> torch.Tensor:
    with torch.no_grad():
        return F.cosine_similarity(al.total(comps), targets, dim=-1)


def test_compalign_recovers_random_planted_maps():
    # Non-orthogonal random maps plus a constant offset: the penalty is switched off (lam=0),
    # since near-orthogonal maps cannot express these; the offset is learnt by the bias term.
    comps, targets, _ = _planted(32, 24, orthogonal=False)
    targets = targets + 0.5
    al = CompAlign(6, 32, 24).fit(comps[:, :1536], targets[:1536], lam=0.0, lr=1e-2,
                                  batch_size=64, epochs=20, progress=False)
    cos = _heldout_cos(al, comps[:, 1536:], targets[1536:])
    assert cos.min() >= 0.99, f"held-out cosine {cos.min():.4f} < 0.99"
    # untrained maps are far from it: the check can fail
    assert _heldout_cos(CompAlign(6, 32, 24), comps[:, 1536:], targets[1536:]).mean() < 0.5


@pytest.mark.parametrize("d,e", [(32, 24), (16, 24)])   # d >= e: WᵀW = I;  d < e: WWᵀ = I
def test_compalign_recovers_orthogonal_maps_and_stays_orthogonal(d, e):
    comps, targets, maps = _planted(d, e)
    al = CompAlign(6, d, e).fit(comps[:, :1536], targets[:1536], lr=1e-2, batch_size=64,
                                epochs=20, progress=False)          # lam = 1 (paper default)
    cos = _heldout_cos(al, comps[:, 1536:], targets[1536:])
    assert cos.min() >= 0.99, f"held-out cosine {cos.min():.4f} < 0.99"
    w = al.weight.detach()
    gram = w.transpose(1, 2) @ w if d >= e else w @ w.transpose(1, 2)
    r = min(d, e)
    dev = (gram - torch.eye(r)).norm(dim=(1, 2)) / r ** 0.5
    # stated bound: every learnt map within 0.02 (per-dimension RMS of the Gram deviation)
    assert dev.max() < 0.02, f"maps not near-orthogonal: {dev.tolist()}"
    rel = (w - maps).norm(dim=(1, 2)) / maps.norm(dim=(1, 2))
    assert rel.max() < 0.05, f"learnt maps differ from the planted ones: {rel.tolist()}"


def test_compalign_streaming_batches_with_validation_early_stop():
    comps, targets, _ = _planted(16, 24, n=1024)
    batches = [(comps[:, s:s + 64], targets[s:s + 64]) for s in range(0, 768, 64)]
    val = (comps[:, 768:], targets[768:])
    al = CompAlign(6, 16, 24).fit(batches, val=val, lr=1e-2, epochs=200, patience=20,
                                  eval_every=5, progress=False)
    assert al.stats["monitor"] == "val" and al.stats["stopped_early"]
    assert al.stats["steps"] < 200 * len(batches)
    assert len(al.history["loss"]) == al.stats["steps"] and al.history["val"]
    assert _heldout_cos(al, *val).min() >= 0.99
    best_val = min(v for _, v in al.history["val"])
    assert al._evaluate(CompAlign._as_batches(val, 64), 1.0) == pytest.approx(best_val, abs=1e-6)
    with pytest.raises(Exception, match="one-shot iterator"):
        CompAlign(6, 16, 24).fit(iter(batches), epochs=2, progress=False)


# The paper's settings (ImageNet-size data); reachable by arguments.
_PAPER = dict(warm_start=False, epochs=2, lr=3e-4, batch_size=32, patience=50, rel_tol=0.0,
              val_fraction=0.0, max_steps=None)


def _orthogonal_maps(c: int, d: int, e: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(c, max(d, e), min(d, e), generator=g))
    return q if d >= e else q.transpose(1, 2)


@pytest.mark.parametrize("c,d,e,bias", [(5, 24, 12, 0.0),      # the report
                                        (5, 24, 12, 4.0),      # d_model > d_clip, large bias
                                        (6, 16, 24, 4.0)])     # d_model < d_clip, large bias
def test_compalign_defaults_fit_planted_orthogonal_maps(c, d, e, bias):
    """2,500 training samples, default arguments: held-out cosine >= 0.99, maps orthogonal and
    equal to the planted ones; the paper's settings on the same data leave the maps untrained."""
    g = torch.Generator().manual_seed(7)
    maps = _orthogonal_maps(c, d, e, g)
    comps = torch.randn(c, 3000, d, generator=g)
    offset = bias * torch.randn(e, generator=g)
    targets = torch.einsum("cnd,cde->ne", comps, maps) + offset
    train, test = slice(0, 2500), slice(2500, 3000)
    al = CompAlign(c, d, e).fit(comps[:, train], targets[train], progress=False)
    cos = _heldout_cos(al, comps[:, test], targets[test])
    assert cos.min() >= 0.99, f"held-out cosine {cos.min():.4f} < 0.99"
    assert al.stats["warm_start"]["used"] and al.stats["heldout_cos"] >= 0.99
    w = al.weight.detach()
    gram = w.transpose(1, 2) @ w if d >= e else w @ w.transpose(1, 2)
    dev = (gram - torch.eye(min(d, e))).norm(dim=(1, 2)) / min(d, e) ** 0.5
    assert dev.max() < 0.02, f"maps not near-orthogonal: {dev.tolist()}"
    rel = (w - maps).norm(dim=(1, 2)) / maps.norm(dim=(1, 2))
    assert rel.max() < 0.05, f"learnt maps differ from the planted ones: {rel.tolist()}"
    # cosine is scale-free: the bias is recovered up to the maps' common scale (here 1)
    assert (al.bias.detach() - offset).norm() <= 0.05 * max(offset.norm(), 1.0)
    paper = CompAlign(c, d, e).fit(comps[:, train], targets[train], progress=False, **_PAPER)
    assert _heldout_cos(paper, comps[:, test], targets[test]).mean() < 0.5


def test_compalign_defaults_on_streamed_batches_accumulate_normal_equations():
    g = torch.Generator().manual_seed(8)
    maps = _orthogonal_maps(4, 20, 10, g)
    comps = torch.randn(4, 2600, 20, generator=g)
    targets = torch.einsum("cnd,cde->ne", comps, maps) + 2.0
    batches = [(comps[:, s:s + 100], targets[s:s + 100]) for s in range(0, 2000, 100)]
    al = CompAlign(4, 20, 10).fit(batches, progress=False)            # no validation data
    assert al.stats["warm_start"]["form"] == "primal" and al.stats["monitor"] == "running"
    assert _heldout_cos(al, comps[:, 2000:], targets[2000:]).min() >= 0.99
    assert ((al.weight.detach() - maps).norm() / maps.norm()) < 0.05
    al2 = CompAlign(4, 20, 10).fit(lambda: iter(batches), val=(comps[:, 2000:], targets[2000:]),
                                   progress=False)
    assert al2.stats["heldout_cos"] >= 0.99 and al2.stats["warm_start"]["heldout_cos"] >= 0.99


def test_ridge_warm_start_dual_form_equals_primal_form():
    """Fewer images than the joint width: the kernel form X_cᵀ(X_cX_cᵀ + λI)⁻¹Y_c must give the
    primal (S_xx + λI)⁻¹S_xy solution (same λ)."""
    from fxdecomp.interpret.warm_start import ridge_warm_start
    g = torch.Generator().manual_seed(9)
    comps, targets = torch.randn(6, 80, 20, generator=g), torch.randn(80, 7, generator=g) + 1
    dual = ridge_warm_start(None, False, ridge=1e-2, tensor_data=comps, tensor_targets=targets)
    primal = ridge_warm_start([(comps[:, :40], targets[:40]), (comps[:, 40:], targets[40:])],
                              False, ridge=1e-2)
    assert dual.form == "dual" and primal.form == "primal"
    torch.testing.assert_close(dual.weight, primal.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dual.bias, primal.bias, rtol=1e-4, atol=1e-5)


def test_compalign_without_a_warm_start_warns_and_still_trains():
    comps, targets, _ = _planted(16, 24, n=512)
    batches = [(comps[:, s:s + 64], targets[s:s + 64]) for s in range(0, 512, 64)]
    with pytest.warns(UserWarning, match="exceeds max_warm_start_dim|max_dim"):
        al = CompAlign(6, 16, 24).fit(batches, max_warm_start_dim=50, max_steps=20,
                                      progress=False)
    assert al.stats["warm_start"]["used"] is False and al.stats["steps"] == 20
    assert "max_dim = 50" in al.stats["warm_start"]["reason"]


def test_compalign_forward_matches_per_component_reference_and_sums_exactly():
    labels = _labels()
    al = CompAlign(labels, 8, 5, seed=3)
    with torch.no_grad():
        al.bias.copy_(torch.arange(5.0))
    comps = torch.randn(len(labels), 4, 8)
    out = al(comps)
    ref = torch.stack([comps[i] @ al.weight[i] for i in range(len(labels))])
    torch.testing.assert_close(out, ref)
    terms, names = al.with_bias(comps)
    assert names[-1] == "compalign.bias" and terms.shape == (len(labels) + 1, 4, 5)
    torch.testing.assert_close(terms.sum(0), al.total(comps))
    torch.testing.assert_close(al.total(comps), out.sum(0) + al.bias)
    with pytest.raises(Exception, match=r"components \[C=7"):
        al(torch.randn(3, 4, 8))
    torch.testing.assert_close(al(comps[[4, 1]], indices=[4, 1]), out[[4, 1]])


def test_identity_from_projection_is_exact():
    labels = _labels()
    comps = torch.randn(len(labels), 5, 12, dtype=torch.float64)
    proj = torch.randn(12, 7, dtype=torch.float64)
    al = CompAlign.identity_from_projection(labels, proj)
    torch.testing.assert_close(al.total(comps), comps.sum(0) @ proj)
    same = CompAlign.identity_from_projection(labels, d_model=12)
    torch.testing.assert_close(same.total(comps), comps.sum(0).to(same.weight.dtype))


def test_save_load_roundtrip_and_mismatch_errors(tmp_path):
    labels = _labels()
    comps, targets, _ = _planted(8, 6, c=len(labels), n=256)
    al = CompAlign(labels, 8, 6, subject="timm:toy", clip_model="open_clip:toy")
    al.fit(comps, targets, epochs=1, progress=False)
    path = al.save(tmp_path / "al.safetensors")
    back = CompAlign.load(path, labels=labels, subject="timm:toy", clip_model="open_clip:toy")
    assert torch.equal(back(comps), al(comps)) and torch.equal(back.bias, al.bias)
    assert back.labels == labels and back.history["loss"] == pytest.approx(al.history["loss"])
    assert back.stats["steps"] == al.stats["steps"]

    renamed = labels[:2] + [ComponentLabel("blocks.9.attn.h0", "blocks.9.attn", "attn_head", 9, 0)] \
        + labels[3:]
    with pytest.raises(AlignmentMismatchError, match=r"blocks\.0\.attn\.h2.*\n.*blocks\.9\.attn\.h0"):
        CompAlign.load(path, labels=renamed)
    with pytest.raises(AlignmentMismatchError, match="trained on 7 components, 6 were given"):
        CompAlign.load(path, labels=labels[:-1])
    with pytest.raises(AlignmentMismatchError, match="different order.*index 0"):
        CompAlign.load(path, labels=labels[::-1])
    moved = [ComponentLabel(l.name, l.module, l.kind, 5 if l.layer == 1 else l.layer, l.head)
             for l in labels]
    with pytest.raises(AlignmentMismatchError, match="field 'layer'"):
        CompAlign.load(path, labels=moved)
    with pytest.raises(AlignmentMismatchError, match="'timm:toy', given 'timm:other'"):
        CompAlign.load(path, subject="timm:other")
    with pytest.raises(AlignmentMismatchError, match="CLIP model differs"):
        CompAlign.load(path, clip_model="open_clip:other")


# ================================================================== scoring
def _feature_world(e: int = 256, n: int = 400, seed: int = 0):
    """Text directions of two features and components: 0 varies along 'color', 1 along
    'texture', 2..5 isotropic noise (independent of everything, same total variance)."""
    g = torch.Generator().manual_seed(seed)
    color = _unit(torch.randn(6, e, generator=g))
    texture = _unit(torch.randn(7, e, generator=g))
    comp0 = torch.randn(n, 6, generator=g) @ color
    comp1 = torch.randn(n, 7, generator=g) @ texture
    scale = (comp0.pow(2).sum(1).mean()) ** 0.5
    noise = torch.randn(4, n, e, generator=g) * scale / e ** 0.5
    return torch.cat([comp0[None], comp1[None], noise]), color, texture


def test_planted_component_ranks_first_and_independent_ones_score_near_zero():
    aligned, color, texture = _feature_world()
    for text, planted in ((color, 0), (texture, 1)):
        s = score_components(aligned, text)
        assert int(s.argmax()) == planted
        assert s[planted] > 0.85
        # an independent isotropic component correlates with the total only through its own
        # share of the total's variance along each direction: ≈ sqrt((r/E) / 1.1) ≈ 0.15 here
        others = [i for i in range(2, 6)]
        assert s[others].abs().max() < 0.3
        inv = score_components_invariant(aligned, text)
        assert int(inv.argmax()) == planted and inv[planted] > 0.85
        ve = variance_explained(aligned, text)
        assert ve[planted] == pytest.approx(1.0, abs=1e-5)
        assert ve[others].max() < 0.1          # ≈ r / E = 6/256 or 7/256
    r = retrieval_scores({"color": score_components(aligned, color),
                          "texture": score_components(aligned, texture)})
    assert int(r["color"].argmax()) == 0 and int(r["texture"].argmax()) == 1


def test_feature_fidelity_separates_a_carried_feature_from_a_missing_one():
    """Planted: CLIP's embeddings vary along 'color' and 'texture'; the aligned total carries
    color (plus noise) but not texture, and an orthogonal map moved its own content into the
    texture directions instead (what CompAlign's orthogonality does for an unencoded
    feature). Fidelity: color high, texture ~0, although both spans see variance in the total
    and its components score there."""
    g = torch.Generator().manual_seed(4)
    e, n = 64, 3000
    color = _unit(torch.randn(6, e, generator=g))
    texture = _unit(torch.randn(4, e, generator=g))
    col, tex = torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)
    reference = col @ color + tex @ texture
    leak = torch.randn(n, 4, generator=g)                  # not texture: something else
    total = col @ color + leak @ texture + 0.3 * torch.randn(n, e, generator=g)
    assert feature_fidelity(total, reference, color) > 0.9
    assert abs(feature_fidelity(total, reference, texture)) < 0.1
    assert feature_fidelity(reference, reference, texture) == pytest.approx(1.0, abs=1e-9)
    # the texture span of the total does vary, so a component carrying the leak scores high
    assert float(score_components(torch.stack([leak @ texture, total - leak @ texture]),
                                  texture)[0]) > 0.9
    with pytest.raises(ValueError, match="same N"):
        feature_fidelity(total[:10], reference[:11], color)


def test_component_independent_of_total_scores_near_zero():
    # A component uncorrelated with the total along the span: total = big signal, component =
    # small independent noise the total barely contains -> score ~ sqrt(var share) -> small.
    g = torch.Generator().manual_seed(1)
    text = _unit(torch.randn(5, 32, generator=g))
    big = (torch.randn(2000, 5, generator=g) * 10) @ text
    small = torch.randn(2000, 32, generator=g) * 0.1
    s = score_components(torch.stack([big, small]), text)
    assert s[0] > 0.99 and abs(float(s[1])) < 0.05


def test_scores_invariant_to_scaling_descriptions():
    aligned, color, _ = _feature_world()
    scaled = color * torch.tensor([3.0, -0.2, 7.0, 1.0, -5.0, 0.01])[:, None]
    for fn in (score_components, score_components_invariant, variance_explained):
        torch.testing.assert_close(fn(aligned, scaled), fn(aligned, color), atol=1e-5, rtol=0)


def test_description_order_changes_paper_score_but_not_invariant_score():
    g = torch.Generator().manual_seed(2)
    e, n = 32, 500
    common = _unit(torch.randn(e, generator=g))
    text = _unit(0.8 * common + 0.6 * _unit(torch.randn(4, e, generator=g)))   # correlated
    mix = torch.randn(3, e, e, generator=g) * torch.linspace(0.1, 3, e)         # anisotropic
    aligned = torch.einsum("cnf,cfe->cne", torch.randn(3, n, e, generator=g), mix)
    perm = torch.tensor([3, 1, 0, 2])
    paper, paper_perm = score_components(aligned, text), score_components(aligned, text[perm])
    assert (paper - paper_perm).abs().max() > 1e-3, "expected order dependence"
    torch.testing.assert_close(score_components_invariant(aligned, text[perm]),
                               score_components_invariant(aligned, text), atol=1e-6, rtol=0)
    torch.testing.assert_close(variance_explained(aligned, text[perm]),
                               variance_explained(aligned, text), atol=1e-6, rtol=0)
    # ... and the paper's score does not depend on the order when the embeddings are orthogonal
    ortho = orthonormal_basis(text).float()
    torch.testing.assert_close(score_components(aligned, ortho[perm]),
                               score_components(aligned, ortho), atol=1e-6, rtol=0)


def test_feature_presets_match_paper_lists():
    assert set(FEATURES) == {"color", "texture", "shape", "pattern", "location", "animal",
                             "person", "fabric", "vehicle"}
    assert FEATURES["vehicle"] == ["car", "truck", "jeep", "van"]
    assert len(FEATURES["texture"]) == 7 and len(FEATURES["pattern"]) == 5


# ================================================================== describe
def test_describe_recovers_planted_descriptions_in_order():
    g = torch.Generator().manual_seed(0)
    e, m, n = 64, 200, 300
    pool = _unit(torch.randn(m, e, generator=g))
    names = [f"desc {i}" for i in range(m)]
    planted = [17, 123, 58]
    coeff = torch.randn(n, 3, generator=g) * torch.tensor([3.0, 2.0, 1.0])
    comp = coeff @ pool[planted] + 0.02 * torch.randn(n, e, generator=g) + 5.0
    res = describe_component(comp, pool * 2.5, names, k=3, name="blocks.1.attn.h0")
    assert res.indices == planted
    assert res.descriptions == [names[i] for i in planted]
    assert all(b > a for a, b in zip(res.cumulative, res.cumulative[1:]))
    assert res.cumulative[-1] > 0.99 and res.gains[0] > res.gains[1] > res.gains[2] > 0
    assert "desc 17" in res.table()
    assert describe_component(comp, pool, names, k=3, rank=3).indices == planted


def test_default_text_pool_is_a_few_hundred_unique_descriptions():
    pool = default_text_pool()
    assert 200 <= len(pool) <= 1000 and len(set(pool)) == len(pool)


# ================================================================== CLIP text side
@pytest.fixture(scope="module")
def clip_b32():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    return model, open_clip.get_tokenizer("ViT-B-32")


def test_text_embeddings_shape_average_and_cache(clip_b32):
    model, tok = clip_b32
    clear_text_cache()
    calls = []
    real = model.encode_text
    model.encode_text = lambda t: (calls.append(t.shape[0]), real(t))[1]
    try:
        temps = ["a photo of a {}.", "art of the {}."]
        emb = text_embeddings(["red color", "striped pattern", "a dog"], model, tok,
                              templates=temps, model_id="b32-random")
        assert emb.shape == (3, 512) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
        with torch.no_grad():
            manual = F.normalize(real(tok(["a photo of a red color.", "art of the red color."])),
                                 dim=-1).mean(0)
        torch.testing.assert_close(emb[0], F.normalize(manual, dim=0), atol=1e-5, rtol=0)
        assert sum(calls) == 6
        again = text_embeddings(["red color", "striped pattern", "a dog"], model, tok,
                                templates=temps, model_id="b32-random")
        assert sum(calls) == 6 and torch.equal(again, emb) and text_cache_size() == 1
        text_embeddings(["red color"], model, tok, templates="single", model_id="b32-random")
        assert sum(calls) == 7 and text_cache_size() == 2
    finally:
        model.encode_text = real
    assert len(IMAGENET_TEMPLATES) == 80 and all("{}" in t for t in IMAGENET_TEMPLATES)


# ================================================================== CLI (stand-in engine)
class _ToySubject(torch.nn.Module):
    """Pooled pixels -> C fixed linear maps; the output is their sum (the components)."""

    def __init__(self, c: int = 7, d: int = 10):
        super().__init__()
        self.maps = torch.nn.Parameter(torch.randn(c, 48, d, generator=torch.Generator()
                                                   .manual_seed(0)) / 7)

    def parts(self, x):
        pooled = F.adaptive_avg_pool2d(x, 4).flatten(1)                 # [B, 48]
        return torch.einsum("bp,cpd->cbd", pooled, self.maps)

    def forward(self, x):
        return self.parts(x).sum(0)


class _ToyClip(torch.nn.Module):
    def __init__(self, e: int = 12):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.visual = types.SimpleNamespace(image_size=32, output_dim=e, proj=None)
        self.img = torch.nn.Parameter(torch.randn(48, e, generator=g))
        self.tok = torch.nn.Parameter(torch.randn(128, e, generator=g))

    def encode_image(self, x):
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.img

    def encode_text(self, tokens):
        return self.tok[tokens].mean(1)


def _toy_tokenizer(texts):
    return torch.tensor([[ord(ch) % 128 for ch in (t + " " * 24)[:24]] for t in texts])


@pytest.fixture
def toy_engine(monkeypatch):
    from fxdecomp.interpret import cli
    labels = _labels()
    state = {"d": 10}                 # the toy subject's width (12 = the toy CLIP's: --identity)

    def decompose(model, example, granularity="heads"):
        assert granularity == "heads" and example.ndim == 4
        return lambda x: types.SimpleNamespace(components=model.parts(x), labels=labels,
                                               output=model(x))

    def load_model(spec, random_init=False, checkpoint=None, seed=0):
        torch.manual_seed(seed)
        return _ToySubject(d=state["d"]), {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3}

    def load_clip(name, random_init=False, checkpoint=None, seed=0):
        return _ToyClip(), None, _toy_tokenizer

    monkeypatch.setattr(cli, "_engine", lambda: (decompose, load_model, load_clip))
    return cli, labels, state


def test_cli_align_rank_describe_with_stand_in_engine(toy_engine, tmp_path, capsys):
    cli, labels, _ = toy_engine
    common = ["--subject", "toy:subject", "--clip", "toy", "--random-init", "--synthetic", "20",
              "--batch-size", "8"]
    al_path = tmp_path / "al.safetensors"
    assert cli.main(["align", *common, "--out", str(al_path), "--epochs", "3",
                     "--no-progress"]) == 0
    al = CompAlign.load(al_path, labels=labels, subject="toy:subject#random-init-seed0")
    assert al.stats["steps"] == 3 * 1 and al.clip_model == "open_clip:toy#random-init-seed0"

    out_csv, out_json = tmp_path / "rank.csv", tmp_path / "rank.json"
    assert cli.main(["rank", *common, "--aligner", str(al_path), "--feature", "color",
                     "--feature", "mine=red stripes,blue dots", "--templates", "single",
                     "--csv", str(out_csv), "--json", str(out_json)]) == 0
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 2 * len(labels)
    assert {r["feature"] for r in rows} == {"color", "mine"} and "score_minus_max_other" in rows[0]
    payload = json.loads(out_json.read_text())
    assert payload["features"]["mine"] == ["red stripes", "blue dots"]
    printed = capsys.readouterr().out
    assert "feature 'color'" in printed and "blocks.0.attn.h0" in printed

    pool = tmp_path / "pool.txt"
    pool.write_text("red\nblue\nstripes\ndots\ngreen grass\n")
    desc_json = tmp_path / "desc.json"
    assert cli.main(["describe", "blocks.1.attn.h2", *common, "--aligner", str(al_path),
                     "--pool", str(pool), "--k", "3", "--templates", "none",
                     "--json", str(desc_json)]) == 0
    d = json.loads(desc_json.read_text())
    assert d["component"] == "blocks.1.attn.h2" and len(d["descriptions"]) == 3

    # another seed = another random subject: the saved aligner must refuse it, naming both ids
    assert cli.main(["rank", *common[:-2], "--seed", "1", "--aligner", str(al_path)]) == 2
    assert "toy:subject#random-init-seed0" in capsys.readouterr().err


def test_cli_identity_alignment_for_a_clip_subject(toy_engine, tmp_path, capsys):
    cli, labels, state = toy_engine
    state["d"] = 12                                  # components already in CLIP space
    common = ["--subject", "toy:clip-tower", "--clip", "toy", "--synthetic", "6"]
    path = tmp_path / "id.safetensors"
    assert cli.main(["align", *common, "--identity", "--out", str(path)]) == 0
    al = CompAlign.load(path, labels=labels)
    assert al.shared and torch.equal(al.weight[0], torch.eye(12)) and al.stats["trained"] is False
    out = tmp_path / "r.csv"
    assert cli.main(["rank", *common, "--identity", "--templates", "none", "--csv", str(out)]) == 0
    assert len(list(csv.DictReader(open(out)))) == len(labels)
    state["d"] = 10                                  # a width the CLIP projection cannot take
    assert cli.main(["rank", *common, "--identity"]) == 2
    assert "components have d=10, but CLIP embeds in 12" in capsys.readouterr().err


def test_synthetic_images_are_seeded():
    from fxdecomp.interpret.cli import synthetic_images
    import numpy as np
    a, b, c = synthetic_images(5, 32, seed=0), synthetic_images(5, 32, seed=0), \
        synthetic_images(5, 32, seed=1)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c))


# ================================================================== end to end (real engine)
def _engine():
    """The engine (an import failure fails the test: the engine is part of this package)."""
    from fxdecomp import decompose
    from fxdecomp.capture.adapters import load_clip, load_model   # noqa: F401
    return decompose


def test_end_to_end_deit_tiny_to_clip_b32(clip_b32, tmp_path):
    decompose = _engine()
    import timm
    from fxdecomp.interpret.cli import _clip_transform, _pixels, _to_tensor, synthetic_images
    torch.manual_seed(0)
    subject = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    clip, tok = clip_b32
    images = synthetic_images(32, seed=0)
    x = _pixels(images, _to_tensor(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    with torch.no_grad():
        dm = decompose(subject, x[:2], granularity="heads")
        d = dm(x)
        comps = d.components.detach()
        targets = clip.encode_image(_pixels(images, _clip_transform(clip, None)))
    assert comps.shape[:2] == (len(d.labels), 32) and comps.shape[2] == 192
    torch.testing.assert_close(comps.sum(0), subject(x), atol=1e-4, rtol=1e-4)

    al = CompAlign(d.labels, 192, 512, subject="timm:deit_tiny_patch16_224#random-init-seed0",
                   clip_model="open_clip:ViT-B-32#random-init-seed0")
    al.fit(comps, targets, epochs=2, batch_size=8, progress=False)
    assert al.history["loss"] and al.stats["steps"] == 8
    path = al.save(tmp_path / "deit_tiny.safetensors")
    back = CompAlign.load(path, labels=d.labels, subject=al.subject, clip_model=al.clip_model)

    text = text_embeddings(FEATURES["color"], clip, tok, templates="single",
                           model_id="b32-random")
    with torch.no_grad():
        before, after = score_components(al(comps), text), score_components(back(comps), text)
    assert before.shape == (len(d.labels),) and torch.isfinite(before).all()
    assert torch.equal(before, after)
    with pytest.raises(AlignmentMismatchError):
        CompAlign.load(path, labels=d.labels[1:])


def test_tied_warm_start_is_one_orthogonal_map_for_every_component():
    """start="tied": every component starts from the same map, the polar factor of the
    least-squares map of their sum; with targets planted as (Σ_i c_i) M (M semi-orthogonal) that
    is M itself, for every component, and the aligned sum reproduces the targets."""
    g = torch.Generator().manual_seed(3)
    m = torch.linalg.qr(torch.randn(24, 12, generator=g))[0]              # [24, 12], MᵀM = I
    comps = torch.randn(5, 1500, 24, generator=g)
    targets = comps.sum(0) @ m
    al = CompAlign(5, 24, 12).fit(comps[:, :1200], targets[:1200], start="tied", max_steps=0,
                                  progress=False)
    assert al.stats["warm_start"]["start"] == "tied"
    for i in range(5):
        assert torch.allclose(al.weight[i], m, atol=1e-4), i
    assert al.mean_cosine(comps[:, 1200:], targets[1200:]) > 0.9999
    # with a different planted map per component the tied start is still one shared orthogonal
    # map, where the polar start keeps one map per component
    maps = torch.linalg.qr(torch.randn(5, 24, 12, generator=g))[0]
    targets = torch.einsum("cnd,cde->ne", comps, maps)
    tied = CompAlign(5, 24, 12).fit(comps, targets, start="tied", max_steps=0, progress=False)
    polar = CompAlign(5, 24, 12).fit(comps, targets, start="polar", max_steps=0, progress=False)
    w = tied.weight.detach()
    assert torch.allclose(w, w[:1].expand_as(w))
    assert torch.allclose(w[0].T @ w[0], torch.eye(12), atol=1e-4)
    assert torch.allclose(polar.weight[1], maps[1], atol=1e-3)
    assert not torch.allclose(w[1], maps[1], atol=1e-1)
