"""The coverage matrix: exact reconstruction on every supported architecture (random weights).

For each model and granularity: components.sum(0) equals the model's own eager output with
relative error <= 1e-5 (max |Σc − y| / max |y|), every residual block the model has is expanded,
and every attention block is split into heads.
"""
from __future__ import annotations

import collections

import pytest
import torch

import fxdecomp
from fxdecomp.capture.adapters import example_input, export_friendly, load_model

from .models import MATRIX, MODEL_KWARGS, NO_ATTENTION, OUTPUT, PARTIAL, XFAIL

REL_TOL = 1e-5

_cache: dict[str, tuple] = {}


def _target(spec: str):
    if spec not in _cache:
        _cache.clear()  # keep one model in memory at a time
        model, info = load_model(spec, random_init=True, seed=0, output=OUTPUT.get(spec),
                                 model_kwargs=MODEL_KWARGS.get(spec))
        x = example_input(info, batch=2, seed=0)
        _cache[spec] = (model, x)
    return _cache[spec]


def _params():
    for spec in MATRIX:
        for gran in ("blocks", "heads"):
            marks = [pytest.mark.slow]
            if spec in XFAIL:
                marks.append(pytest.mark.xfail(reason=XFAIL[spec], strict=True,
                                               raises=fxdecomp.UnsupportedGraphError))
            yield pytest.param(spec, gran, id=f"{spec}-{gran}", marks=marks)


@pytest.mark.parametrize("spec,granularity", list(_params()))
def test_exact(spec, granularity):
    model, x = _target(spec)
    if spec in PARTIAL:   # without the opt-out the collapse is an error naming the op
        with pytest.raises(fxdecomp.CollapseError):
            fxdecomp.decompose(model, x, granularity=granularity)
    dm = fxdecomp.decompose(model, x, granularity=granularity, allow_collapse=spec in PARTIAL)
    with torch.no_grad(), export_friendly():  # eager fused-MHA fast paths round differently
        d = dm(x)
        ref = model(x)
    assert d.components.shape[1:] == ref.shape
    assert len(d.labels) == d.components.shape[0]
    assert len({l.name for l in d.labels}) == len(d.labels), "component names must be unique"
    err = float((d.components.double().sum(0) - ref.double()).abs().max() / ref.double().abs().max())
    assert err <= REL_TOL, f"{spec} {granularity}: relative reconstruction error {err:.3e}"
    # the output is the model's own (same ops, as exported)
    torch.testing.assert_close(d.output, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    kinds = collections.Counter(l.kind for l in d.labels)
    cov = dm.block_coverage   # every residual block of the model expanded (none absorbed)
    if spec in PARTIAL:
        assert cov.absorbed and cov.expanded < cov.total, cov.describe()
    else:
        assert cov.expanded == cov.total and not cov.absorbed, cov.describe()
    if granularity == "heads" and spec not in NO_ATTENTION:
        # every attention block is split into more than one head
        per_block = collections.Counter(l.module for l in d.labels if l.kind == "attn_head")
        assert per_block, f"{spec}: no attention heads found ({dict(kinds)})"
        unsplit = [l.name for l in d.labels if l.kind == "attn"]
        assert not unsplit, f"{spec}: attention not split into heads in {unsplit[:4]}"
        # blocks with a single head exist (MViTv2's first stage); most must have several
        multi = sum(1 for c in per_block.values() if c > 1)
        assert multi >= max(1, len(per_block) // 2), f"{spec}: heads per block {dict(per_block)}"
    else:
        assert kinds.get("attn_head", 0) == 0
