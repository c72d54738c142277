"""Where a decomposed forward's extra time goes, per function of the rewritten graph.

    python benchmarks/profile_graph.py swin_tiny_patch4_window7_224 --batch 8
    python benchmarks/profile_graph.py maxvit_tiny_tf_224:pooled --batch 8 --top 40
    python benchmarks/profile_graph.py swin_tiny_patch4_window7_224 --project 8   # dm(x, project=D)

Builds the decomposition of a timm model (seeded random weights; ``NAME:OUTPUT`` picks an
adapter output), times the plain forward and the rewritten graph (best of ``--reps``), then runs
the graph once more node by node (``torch.fx.Interpreter``) and prints the time per called
function (the original forward's ATen ops and the ``rt.*`` functions of fxdecomp's runtime,
summed over calls) and the slowest single nodes with their output shapes. The node-by-node run
adds interpreter overhead and runs at whatever load the machine has: read it as shares, and
take ratios from ``bench_decompose.py``.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="timm name, optionally NAME:OUTPUT (e.g. maxvit_tiny_tf_224:pooled), "
                                 "or another source's spec (torchvision:swin_t)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--granularity", default="heads")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=30, help="rows of each table")
    p.add_argument("--project", type=int, default=0, metavar="K",
                   help="profile dm(x, project=D) with K seeded random directions (tokens mode)")
    p.add_argument("--allocator", choices=["keep", "glibc"], default="keep",
                   help="keep: fxdecomp.run.memory.keep_freed_memory() first, as the benchmark "
                        "does (no page faults for memory freed and reallocated between forwards)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.allocator == "keep":
        from fxdecomp.run.memory import keep_freed_memory
        keep_freed_memory()
    import fxdecomp
    from fxdecomp.capture.adapters import example_input, load_model, split_model_arg

    spec, output = split_model_arg(a.model)
    target, info = load_model(spec, random_init=True, seed=0, output=output)
    x = example_input(info, batch=a.batch, seed=0)
    granularity = "tokens" if a.project else a.granularity
    dm = fxdecomp.decompose(target, x, granularity=granularity)
    args = (x,)
    if a.project:
        with torch.no_grad():
            out_dim = target(x).shape[-1]
        D = torch.randn(out_dim, a.project, generator=torch.Generator().manual_seed(0))
        dm(x, project=D)                                  # builds the projected graph
        gm, args = dm._graph_for(int(x.shape[0]), project=True), (x, D)
    else:
        gm = dm.graph_module
    per_fn, calls, nodes = _timer_tables()
    plain_fn, plain_calls, _ = _timer_tables()
    from fxdecomp.capture.export import capture
    exported, _ = capture(target, x)        # the model's own graph, for its per-op times

    def timed(fn_table, call_table, node_list):
        class Timed(torch.fx.Interpreter):
            def run_node(self, n):
                t0 = time.perf_counter()
                out = super().run_node(n)
                dt = time.perf_counter() - t0
                if n.op in ("call_function", "call_method", "call_module"):
                    key = getattr(n.target, "__name__", str(n.target))
                    fn_table[key] += dt
                    call_table[key] += 1
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ""
                    node_list.append((dt, n.name, key, shape))
                return out
        return Timed

    with torch.no_grad():
        for _ in range(2):
            target(x)
            gm(*args)
        plain, decomposed = [], []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            target(x)
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            gm(*args)
            decomposed.append(time.perf_counter() - t0)
        timed(per_fn, calls, nodes)(gm).run(*args)
        timed(plain_fn, plain_calls, [])(exported).run(x)
    tp, tm = min(plain), min(decomposed)
    mode = f"projected k={a.project}" if a.project else a.granularity
    print(f"{a.model} batch {a.batch} {mode}: plain {tp * 1e3:.0f} ms, decomposed "
          f"{tm * 1e3:.0f} ms, ratio {tm / tp:.2f}x (best of {a.reps}); node by node "
          f"{sum(per_fn.values()) * 1e3:.0f} ms")
    print(f"\n(plain: the model's own exported graph node by node, "
          f"{sum(plain_fn.values()) * 1e3:.0f} ms; extra = decomposed - plain)")
    print("ms        calls  plain ms  calls    extra  function")
    for key, dt in per_fn.most_common(a.top):
        pt = plain_fn.get(key, 0.0)
        print(f"{dt * 1e3:8.1f}  x{calls[key]:4d}  {pt * 1e3:8.1f}  x{plain_calls[key]:4d}  "
              f"{(dt - pt) * 1e3:7.1f}  {key}")
    print("\nms        node                                      function                        shape")
    for dt, node, key, shape in sorted(nodes, reverse=True)[:a.top]:
        print(f"{dt * 1e3:8.1f}  {node:40s}  {key:30s}  {shape}")
    return 0


def _timer_tables():
    return collections.Counter(), collections.Counter(), []


if __name__ == "__main__":
    raise SystemExit(main())
