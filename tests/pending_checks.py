"""Checks shared by the pending-projection tests (tests/test_pending_*.py): exactness plus
agreement of the first stage's heads with a float64 reference, and the sizes of every value the
rewritten graph computes from the first head-blocked terms."""
from __future__ import annotations

import math
from typing import Callable

import torch

import fxdecomp


def decompose_exactly(model, x: torch.Tensor, granularity: str):
    """(the decomposed model, its decomposition of x) at ``granularity``, asserting
    components.sum(0) equals model(x) (rel. err <= 1e-5)."""
    dm = fxdecomp.decompose(model, x, granularity=granularity)
    with torch.no_grad():
        d = dm(x)
        y = model(x)
    err = float((d.components.double().sum(0) - y.double()).abs().max() / y.double().abs().max())
    assert err <= 1e-5, err
    return dm, d


def assert_exact_and_heads_match(model, x: torch.Tensor, ref: dict, in_stage: Callable[[str], bool],
                                 heads: int) -> None:
    """components.sum(0) equals model(x) (rel. err <= 1e-5), and the heads of the modules
    ``in_stage`` accepts equal ``ref`` {head: [B, E] float64} to 1e-5 of their scale."""
    _, d = decompose_exactly(model, x, "heads")
    got = {lab.head: d.components[i] for i, lab in enumerate(d.labels)
           if lab.kind == "attn_head" and in_stage(lab.module)}
    assert sorted(got) == list(range(heads))
    for h in range(heads):
        scale = float(ref[h].abs().max())
        assert scale > 1e-3   # a head that reaches the output
        assert float((got[h].double() - ref[h]).abs().max()) <= 1e-5 * scale + 1e-7, h


def downstream(starts, stop: Callable = lambda n: False) -> set:
    """Every node computed from the nodes ``starts`` (``stop``: nodes not entered, nor what
    only they lead to)."""
    after, todo = set(), list(starts)
    while todo:
        for u in todo.pop().users:
            if u not in after and not stop(u):
                after.add(u)
                todo.append(u)
    return after


def tensor_shapes(gm: torch.fx.GraphModule, *args) -> dict:
    """Runs ``gm`` on args (no grad): {node: shape} of every tensor value it computes."""
    shapes = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n] = tuple(out.shape)
            return out

    with torch.no_grad():
        Record(gm).run(*args)
    return shapes


def sizes_after_first_heads(dm, x: torch.Tensor) -> tuple[int, dict, list]:
    """Runs the rewritten graph on x: (numel of the first head-blocked terms, {node name: numel}
    of every tensor value computed from them, the shapes of all tensor values)."""
    from fxdecomp.rewrite import runtime as rt
    first = next(n for n in dm.graph_module.graph.nodes if n.target is rt.head_blocks)
    after = downstream([first])
    shapes = tensor_shapes(dm.graph_module, x)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    return numel[first], {n.name: numel[n] for n in after if n in numel}, list(shapes.values())


def record_inputs(model, x: torch.Tensor, modules: dict) -> dict:
    """{key: the input of ``modules[key]``} during one forward of ``model`` on x."""
    rec = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, key=key: rec.__setitem__(key, a[0]))
             for key, m in modules.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rec
