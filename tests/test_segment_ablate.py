"""Segmentation metrics against values computed by hand, and mean-ablation of a planted spurious
component on a constructed group-shift set."""
from __future__ import annotations

import math

import pytest
import torch

from fxdecomp.apply.ablate import (ablate_spurious, fit_linear_head, group_accuracy,
                                   mean_ablate)
from fxdecomp.apply.segment import (average_precision, center_blob, pointing_accuracy,
                                    segmentation_metrics)
from fxdecomp.errors import InputError


# ----------------------------------------------------------------------------- segmentation
def test_segmentation_metrics_by_hand():
    # image 1: heat [[0,1],[2,3]] -> normalised [[0,1/3],[2/3,1]], mean 1/2 -> fg = bottom row
    # image 2: constant heat -> all 0 -> nothing above the mean -> all background
    heat = torch.tensor([[[0., 1.], [2., 3.]], [[5., 5.], [5., 5.]]])
    mask = torch.tensor([[[0, 1], [1, 1]], [[0, 0], [0, 1]]], dtype=torch.bool)
    m = segmentation_metrics(heat, mask)
    assert m["pixel_accuracy"] == pytest.approx(6 / 8)
    # background IoU: inter 1 + 3, union 2 + 4; foreground IoU: inter 2 + 0, union 3 + 1
    assert m["miou"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    # AP image 1 (8 ranked class scores): thresholds 1, 2/3, 1/3, 0 give (P, R) =
    # (1, .5), (.75, .75), (4/6, 1), (.5, 1) -> .5·1 + .25·.75 + .25·4/6 = 41/48
    # AP image 2: thresholds 1, 0 give (.75, .75), (.5, 1) -> .75·.75 + .25·.5 = 11/16
    assert m["map"] == pytest.approx((41 / 48 + 11 / 16) / 2)


def test_average_precision_by_hand_and_perfect():
    assert average_precision(torch.tensor([.9, .8, .7, .1]), torch.tensor([1, 0, 1, 0])) == \
        pytest.approx(.5 * 1 + .5 * (2 / 3))
    assert average_precision(torch.tensor([3., 2., 1.]), torch.tensor([1, 1, 0])) == 1.0
    assert math.isnan(average_precision(torch.tensor([1., 2.]), torch.tensor([0, 0])))


def test_perfect_heatmap_and_center_blob_baseline():
    mask = torch.zeros(3, 16, 16, dtype=torch.bool)
    mask[0, 0:5, 0:5] = True      # objects off-centre: the blob baseline must lose
    mask[1, 10:16, 9:15] = True
    mask[2, 2:8, 10:16] = True
    perfect = segmentation_metrics(mask.float(), mask)
    assert perfect == {"pixel_accuracy": 1.0, "miou": 1.0, "map": 1.0}
    blob = center_blob(3, (16, 16))
    assert blob.shape == (3, 16, 16)
    assert blob[0, 7, 7] == blob[0, 8, 8] == blob[0].max()        # centred
    s = 0.25 * 16
    # pixel (8, 12) has its centre (8.5, 12.5) at (0.5, 4.5) from the image centre (8, 8)
    assert float(blob[0, 8, 12]) == pytest.approx(math.exp(-(0.5 ** 2 + 4.5 ** 2) / (2 * s * s)))
    base = segmentation_metrics(blob, mask)
    assert base["miou"] < perfect["miou"] and base["map"] < 1.0
    assert pointing_accuracy(mask.float(), mask) == 1.0
    assert pointing_accuracy(blob, mask) == 0.0


def test_segmentation_bad_input():
    with pytest.raises(InputError, match="same shape"):
        segmentation_metrics(torch.zeros(2, 4, 4), torch.zeros(2, 8, 8, dtype=torch.bool))
    with pytest.raises(InputError, match="NaN"):
        segmentation_metrics(torch.full((1, 2, 2), float("nan")), torch.zeros(1, 2, 2))


# ----------------------------------------------------------------------------- ablation
def _group_shift(n, agree, seed):
    """Label y and spurious attribute a; a == y with probability ``agree``. Component 0 carries
    y (noisy), component 1 carries a (clean and strong), components 2, 3 are noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    a = torch.where(torch.rand(n, generator=g) < agree, y, 1 - y)
    d = 6
    comps = 0.3 * torch.randn(4, n, d, generator=g)
    comps[0, :, 0] += (2 * y - 1).float() * 1.0 + 1.0 * torch.randn(n, generator=g)
    comps[1, :, 1] += (2 * a - 1).float() * 3.0
    return comps, y, a, 2 * y + a            # groups: (y, a)


def test_mean_ablation_is_exact():
    comps = torch.randn(5, 7, 3)
    means = torch.randn(5, 3)
    out = mean_ablate(comps, [1, 3], means)
    want = comps[0] + comps[2] + comps[4] + means[1] + means[3]
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.allclose(mean_ablate(comps, [], means), comps.sum(0))


def test_ablating_planted_spurious_component_raises_worst_group():
    train, y_tr, _, _ = _group_shift(2000, agree=0.95, seed=0)
    test, y_te, a_te, g_te = _group_shift(2000, agree=0.5, seed=1)   # balanced: every group
    scores_spur = torch.tensor([0.1, 0.9, 0.2, 0.1])                 # component 1: the cue
    scores_core = torch.tensor([0.8, 0.1, 0.1, 0.2])
    res = ablate_spurious(test, y_te, g_te, score_spurious=scores_spur, score_core=scores_core,
                          k=1, reference=train, reference_labels=y_tr)
    assert res.removed == [1]
    # before: the head follows the cue, so the groups where it disagrees with y fail
    assert res.before["worst_group"] < 0.3
    assert res.after["worst_group"] > 0.7
    assert res.after["worst_group"] > res.before["worst_group"] + 0.4
    assert res.after["mean_group"] > res.before["mean_group"]
    s = res.summary()
    assert s["k"] == 1 and s["worst_group_after"] == res.after["worst_group"]
    # control: removing a noise component changes little; removing the core one hurts
    noise = ablate_spurious(test, y_te, g_te, remove=[2], reference=train, reference_labels=y_tr)
    assert abs(noise.after["worst_group"] - noise.before["worst_group"]) < 0.05
    core = ablate_spurious(test, y_te, g_te, remove=[0], head=res.head, reference=train)
    assert core.after["mean_group"] < core.before["mean_group"]


def test_group_accuracy_and_head_by_hand():
    r = group_accuracy(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]),
                       torch.tensor([0, 0, 1, 1]))
    assert r["per_group"] == {0: 1.0, 1: 0.5} and r["worst_group"] == 0.5
    assert r["accuracy"] == 0.75 and r["mean_group"] == 0.75
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    head = fit_linear_head(x, torch.tensor([0, 0, 1, 1]))
    assert head.predict(x).tolist() == [0, 0, 1, 1]
    with pytest.raises(InputError, match="two classes"):
        fit_linear_head(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError, match="score_spurious"):
        ablate_spurious(torch.randn(2, 4, 1), torch.tensor([0, 1, 0, 1]), torch.zeros(4))
