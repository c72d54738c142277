#!/usr/bin/env python
"""Benchmark the Triton kernels of fxdecomp_kernels against their torch references.

On a GPU, for ViT-B/16 shapes (H=12, dh=64, N=197, E=768 model width or 512 CLIP projection)
and ViT-L/14 shapes (H=16, dh=64, N=257, E=1024 or 768) at batch 64:

- head_projection, CLS rows (Q=1) and, unless --quick, all rows (Q=N); center + scale on;
- token_contributions, CLS rows (Q=1, [B, H, 1, N, E]) and, unless --quick, a mean-pooled
  target (Q=N with reduce_q, [B, H, N, E]);

each timed with ``triton.testing.do_bench`` (median and 20/80% quantiles, ms) for three
providers: ``triton`` (the kernel), ``torch`` (the reference in the same module) and, as a yard
stick, ``timm_forward``: a plain forward of the timm model (random init, same batch and dtype).
Reported per row: ms, effective GB/s and ratios (torch_ms / triton_ms; ms / forward ms).

GB/s counts the minimal traffic, once: every input read once (O or A, V, M, scale) plus the
output written once, in the input dtype. The kernel re-reads small inputs (A per E tile, M per
row tile) and the reference writes fp32 temporaries; neither is counted, so GB/s of two providers
compares like with like (their ratio is the speed ratio).

Results go to ``benchmarks/results/bench_kernels_<device>.csv`` and ``.json`` (the JSON also holds
the command line, versions and device). Without a GPU (or with --cpu) the kernels run through
Triton's interpreter at tiny shapes, for correctness only: the script says so and its timings
mean nothing.

    python benchmarks/bench_kernels.py --quick       # bf16, CLS targets, fewer repetitions
    python benchmarks/bench_kernels.py               # + fp32, all rows / mean pooling, both E
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Model shapes: heads, head dim, tokens (CLS + patches), output widths (model width, CLIP dim).
MODELS = {
    "vit_b16": dict(timm="vit_base_patch16_224", H=12, dh=64, N=197, E=(768, 512)),
    "vit_l14": dict(timm="vit_large_patch14_224", H=16, dh=64, N=257, E=(1024, 768)),
}
# Same tolerances as tests/test_kernels.py (kernel vs reference, both fp32-accumulated).
TOL = {"fp32": (2e-5, 2e-5), "bf16": (1.6e-2, 1.6e-2), "fp16": (2e-3, 2e-3)}
FIELDS = ["model", "kernel", "target", "dtype", "B", "H", "Q", "N", "dh", "E", "provider",
          "ms", "ms_p20", "ms_p80", "gb_moved", "gbps", "speedup_vs_torch", "x_forward",
          "max_abs_err", "ok"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark fxdecomp_kernels (head_projection, token_contributions) against "
                    "their torch references and a plain timm ViT forward. Without a GPU the "
                    "kernels run through Triton's interpreter at tiny shapes, for correctness "
                    "only.")
    p.add_argument("--quick", action="store_true",
                   help="bf16 only, CLS targets only, first E per model, fewer repetitions")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS),
                   help="model shapes to run (default: all)")
    p.add_argument("--batch", type=int, default=64, help="batch size on GPU (default 64)")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtypes (default: bf16 with --quick, bf16 fp32 otherwise)")
    p.add_argument("--no-forward", action="store_true",
                   help="skip the timm forward yard stick (no model is built)")
    p.add_argument("--cpu", action="store_true",
                   help="force the CPU interpreter correctness run even if a GPU is present")
    p.add_argument("--out-dir", type=Path, default=RESULTS,
                   help=f"where to write CSV and JSON (default {RESULTS})")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# cases, inputs, byte counts
# ---------------------------------------------------------------------------------------------
def gpu_cases(args):
    dtypes = args.dtypes or (["bf16"] if args.quick else ["bf16", "fp32"])
    cases = []
    for model in args.models:
        m = MODELS[model]
        widths = m["E"][:1] if args.quick else m["E"]
        for dt in dtypes:
            for E in widths:
                base = dict(model=model, dtype=dt, B=args.batch, H=m["H"], N=m["N"], dh=m["dh"],
                            E=E)
                cases.append(dict(base, kernel="head_projection", target="cls", Q=1))
                cases.append(dict(base, kernel="token_contributions", target="cls", Q=1))
                if not args.quick:
                    cases.append(dict(base, kernel="head_projection", target="all_rows",
                                      Q=m["N"]))
                    cases.append(dict(base, kernel="token_contributions", target="mean_pool",
                                      Q=m["N"]))
    return cases


def cpu_cases(args):
    """Tiny awkward shapes for the interpreter (correctness only)."""
    dtypes = args.dtypes or ["fp32", "bf16", "fp16"]
    cases = []
    for dt in dtypes:
        for kernel, target, Q in [("head_projection", "cls", 1),
                                  ("head_projection", "all_rows", 17),
                                  ("token_contributions", "cls", 1),
                                  ("token_contributions", "mean_pool", 17)]:
            cases.append(dict(model="tiny", kernel=kernel, target=target, dtype=dt, B=2, H=3,
                              Q=Q, N=17, dh=48, E=40))
    return cases


def make_inputs(torch, case, device):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case["dtype"]]
    g = torch.Generator(device=device).manual_seed(0)
    B, H, Q, N, dh, E = (case[k] for k in ("B", "H", "Q", "N", "dh", "E"))

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    M = (randn(H, dh, E) / dh ** 0.5).to(dtype)
    scale = torch.rand(B, Q, generator=g, device=device) + 0.5
    if case["kernel"] == "head_projection":
        O = randn(B, Q, H, dh).to(dtype).transpose(1, 2)  # the usual view of [B, Q, H*dh]
        return dict(O=O, M=M, scale=scale, center=True)
    A = torch.softmax(randn(B, H, Q, N), dim=-1).to(dtype)
    V = randn(B, H, N, dh).to(dtype)
    return dict(A=A, V=V, M=M, scale=scale, reduce_q=case["target"] == "mean_pool")


def bytes_moved(case):
    """Minimal traffic: each input read once + the output written once (input dtype; scale
    fp32)."""
    es = {"fp32": 4, "bf16": 2, "fp16": 2}[case["dtype"]]
    B, H, Q, N, dh, E = (case[k] for k in ("B", "H", "Q", "N", "dh", "E"))
    m_and_scale = H * dh * E * es + B * Q * 4
    if case["kernel"] == "head_projection":
        return B * H * Q * dh * es + m_and_scale + H * B * Q * E * es
    out = B * H * N * E if case["target"] == "mean_pool" else B * H * Q * N * E
    return B * H * Q * N * es + B * H * N * dh * es + m_and_scale + out * es


def run_fn(K, case, inputs, backend):
    if case["kernel"] == "head_projection":
        return lambda: K.head_projection(**inputs, backend=backend)
    return lambda: K.token_contributions(**inputs, backend=backend)


def check(torch, got, ref, dt):
    atol, rtol = TOL[dt]
    err = (got.float() - ref.float()).abs()
    ok = bool((err <= atol + rtol * ref.float().abs()).all())
    return float(err.max()) if err.numel() else 0.0, ok


def device_slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ---------------------------------------------------------------------------------------------
# GPU benchmark
# ---------------------------------------------------------------------------------------------
def bench_gpu(args, torch, device="cuda"):
    import triton.testing

    import fxdecomp_kernels as K

    warmup, rep = (10, 50) if args.quick else (25, 100)
    quantiles = [0.5, 0.2, 0.8]
    forward_ms = {}
    if not args.no_forward:
        import timm

        dtypes = sorted({c["dtype"] for c in gpu_cases(args)})
        for model in args.models:
            net = timm.create_model(MODELS[model]["timm"], pretrained=False).eval().to(device)
            for dt in dtypes:
                tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dt]
                net = net.to(tdt)
                x = torch.randn(args.batch, 3, 224, 224, device=device, dtype=tdt)
                with torch.inference_mode():
                    forward_ms[(model, dt)] = triton.testing.do_bench(
                        lambda: net(x), warmup=warmup, rep=rep, quantiles=quantiles)
                print(f"  timm forward {MODELS[model]['timm']} {dt} B={args.batch}: "
                      f"{forward_ms[(model, dt)][0]:.3f} ms", flush=True)
            del net
            if device == "cuda":
                torch.cuda.empty_cache()

    rows = []
    for case in gpu_cases(args):
        inputs = make_inputs(torch, case, device)
        fns = {p: run_fn(K, case, inputs, p) for p in ("triton", "torch")}
        err, ok = check(torch, fns["triton"](), fns["torch"](), case["dtype"])  # also autotunes
        times = {p: triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=quantiles)
                 for p, fn in fns.items()}
        fwd = forward_ms.get((case["model"], case["dtype"]))
        gb = bytes_moved(case) / 1e9
        for provider, (ms, p20, p80) in times.items():
            rows.append(dict(case, provider=provider, ms=ms, ms_p20=p20, ms_p80=p80,
                             gb_moved=gb, gbps=gb / (ms * 1e-3),
                             speedup_vs_torch=times["torch"][0] / ms,
                             x_forward=(ms / fwd[0]) if fwd else None,
                             max_abs_err=err, ok=ok))
        print(f"  {case['model']} {case['kernel']:<19} {case['target']:<9} {case['dtype']} "
              f"E={case['E']:<4}: triton {times['triton'][0]:.3f} ms "
              f"({gb / (times['triton'][0] * 1e-3):.0f} GB/s), torch {times['torch'][0]:.3f} ms,"
              f" speedup {times['torch'][0] / times['triton'][0]:.2f}x"
              + (f", {times['triton'][0] / fwd[0]:.3f}x forward" if fwd else "")
              + ("" if ok else f"  MISMATCH max err {err:.3g}"), flush=True)
        del inputs, fns
        if device == "cuda":
            torch.cuda.empty_cache()
    for (model, dt), (ms, p20, p80) in forward_ms.items():
        m = MODELS[model]
        rows.append(dict(model=model, kernel="timm_forward", target=m["timm"], dtype=dt,
                         B=args.batch, H=m["H"], Q=None, N=m["N"], dh=m["dh"], E=None,
                         provider="timm_forward", ms=ms, ms_p20=p20, ms_p80=p80, gb_moved=None,
                         gbps=None, speedup_vs_torch=None, x_forward=1.0, max_abs_err=None,
                         ok=None))
    return rows


# ---------------------------------------------------------------------------------------------
# CPU: interpreter correctness run
# ---------------------------------------------------------------------------------------------
def check_cpu(args, torch):
    import fxdecomp_kernels as K
    from fxdecomp_kernels import _common

    if not _common.interpreting():
        raise SystemExit("Triton's interpreter is not active (TRITON_INTERPRET=1 must be set "
                         "before triton is imported); cannot run the kernels on CPU.")
    rows = []
    for case in cpu_cases(args):
        inputs = make_inputs(torch, case, "cpu")
        t0 = time.perf_counter()
        got = run_fn(K, case, inputs, "triton")()
        ms = (time.perf_counter() - t0) * 1e3
        err, ok = check(torch, got, run_fn(K, case, inputs, "torch")(), case["dtype"])
        rows.append(dict(case, provider="triton_interpreter", ms=ms, ms_p20=None, ms_p80=None,
                         gb_moved=bytes_moved(case) / 1e9, gbps=None, speedup_vs_torch=None,
                         x_forward=None, max_abs_err=err, ok=ok))
        print(f"  {case['kernel']:<19} {case['target']:<9} {case['dtype']}: "
              f"max abs err {err:.3g} {'ok' if ok else 'MISMATCH'}", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    import torch  # does not import triton; the interpreter must be chosen before triton is

    gpu = torch.cuda.is_available() and not args.cpu
    if gpu:
        device = torch.cuda.get_device_name()
        print(f"GPU: {device}; batch {args.batch}; {'quick' if args.quick else 'full'} run",
              flush=True)
    else:
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        device = "cpu interpreter"
        print("No GPU (or --cpu): running the kernels through Triton's interpreter at tiny "
              "shapes, for CORRECTNESS ONLY. Timings are not meaningful; no torch/forward "
              "comparison is made.", flush=True)

    rows = bench_gpu(args, torch) if gpu else check_cpu(args, torch)

    import triton

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"bench_kernels_{device_slug(device)}"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in FIELDS})
    meta = dict(command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), device=device,
                correctness_only=not gpu, quick=args.quick, batch=args.batch,
                torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                bytes_counted="each input read once + output written once, in the input dtype",
                tolerances=TOL)
    with open(f"{stem}.json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    bad = [r for r in rows if r.get("ok") is False]
    print(f"wrote {stem}.csv and {stem}.json ({len(rows)} rows)"
          + (f"; {len(bad)} rows MISMATCH the reference" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
