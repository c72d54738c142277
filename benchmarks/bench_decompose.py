#!/usr/bin/env python
"""Benchmark fxdecomp.decompose: decomposed forward vs a plain forward of the target (CPU, or a
GPU with ``--device cuda``).

For every configuration (model, model_kwargs, batch, mode) with mode one of ``plain``,
``blocks``, ``heads``, ``tokens`` the suite starts a FRESH Python process (a worker: this same
script with ``--worker``) that

1. loads the timm model with seeded random weights (``load_model(..., random_init=True)``) and
   builds ``x = example_input(info, batch)`` (fp32);
2. for a decomposition mode, times ``fxdecomp.decompose(target, x, granularity=mode)`` once (the
   one-time build cost: torch.export + rewrite, cold, in a fresh process, as a user pays it), then
   ``dm.verify(x)`` (max relative reconstruction error against ``target(x)``);
3. warms up (``--warmup`` calls of each), then for each of ``--reps`` repetitions times one plain
   forward ``target(x)`` and then one decomposed forward ``dm(x)``, both under ``torch.no_grad()``
   (interleaved, so drifting load on a shared machine hits both alike);
4. reports medians over the reps: images/s of each (median time), ``ratio`` = the median over
   reps of the paired ratio t_mode / t_plain of the same rep (robust to load that drifts between
   reps on a shared machine), and as cross-checks ``ratio_of_medians`` = median(t_mode) /
   median(t_plain) and ``ratio_min`` = min(t_mode) / min(t_plain); and the peak resident set
   size of the process (``getrusage(RUSAGE_SELF).ru_maxrss``) -- the whole process: Python,
   torch, the weights, the plain forwards and the decomposed forwards/build. The ``plain`` row is
   a process that only loads the model and runs plain forwards, so it is the baseline to subtract.

The plain forward is ``target(x)`` exactly as a user would call it (timm's fused SDPA attention
included); the decomposed forward runs the exported/rewritten graph.

Allocator (CPU): by default a worker first calls ``fxdecomp.run.memory.keep_freed_memory()``, so
glibc keeps memory freed during one forward for the next instead of returning the top of its heap
to the OS and faulting it in again (``--allocator glibc`` leaves glibc's dynamic thresholds as
they are). Both forwards of a configuration run under the same setting. Each row records the
median minor page faults of one call of each (``faults_plain``, ``faults_mode``): under glibc's
defaults a decomposed forward of a ViT at batch 8 takes 2-75 thousand (a plain one 0-50
thousand, varying with the heap's layout), a few percent of a forward; kept, both take ~0.

Guards: the parent polls the worker's RSS (``/proc/PID/status`` VmRSS) and kills it above
``--mem-cap-gib``, and kills it after ``--timeout`` s; before timing, a worker estimates the size
of the components tensor (C * B * E * 4 bytes) and skips when it alone would exceed a third of the
cap. Such configurations, and any that fail, are recorded as ``skipped (reason)`` / ``error``
rows with the message; the suite goes on.

Scaling (heads mode, ``--scale-batch``, on ``--scale-model``): image size 224 vs 384
(``model_kwargs={"img_size": 384}``) and depth 6 vs 12 (``model_kwargs={"depth": 6}``).

Outputs in ``--out`` (default benchmarks/results): ``decompose_<tag>.csv``, ``.json`` (rows,
machine info, the exact command line, and a ``targets`` section with pass/fail) and ``.png``
(ratio to plain as grouped bars). A markdown table is printed at the end.

``--device cuda``: the model, input and directions live on the GPU; each timed call is bracketed
by ``torch.cuda.synchronize()``, and ``peak_cuda_gib`` (``torch.cuda.max_memory_allocated``)
joins the peak RSS. The targets stay the CPU ones (the GPU numbers have none); tag default
``cuda``. One prepared call on a lent GPU machine:
``python benchmarks/bench_decompose.py --device cuda --models deit_small_patch16_224,\
vit_base_patch16_224,swin_tiny_patch4_window7_224 --batches 8,64 --modes plain,heads,tokens,projected
--no-scaling --reps 10``.

    python benchmarks/bench_decompose.py --quick            # smoke run, a couple of minutes
    python benchmarks/bench_decompose.py                    # full suite (long on a small CPU)
    python benchmarks/bench_decompose.py --models deit_small_patch16_224,vit_base_patch16_224 \\
        --batches 8 --no-scaling                            # the batch-8 target configurations
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["deit_small_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224",
          "vit_small_patch14_dinov2"]
BATCHES = [1, 8, 32]
MODES = ["plain", "blocks", "heads", "tokens", "projected"]   # projected: tokens, dm(x, project=D)
GiB = 2 ** 30

# Must-show targets (CPU, batch 8, fp32, medians). Issue 13: (model, mode) -> limit.
RATIO_TARGETS = {"blocks": 1.15, "heads": 1.05, "tokens": 1.5, "projected": 1.2}
RATIO_TARGET_MODELS = ["deit_small_patch16_224", "vit_base_patch16_224"]
EXTRA_TARGETS = [(m, "heads", 1.2) for m in (
    "swin_tiny_patch4_window7_224", "beit_base_patch16_224", "vit_medium_patch16_reg4_gap_256",
    "maxvit_tiny_tf_224:pooled")] + [("vit_base_patch16_224", "projected", 1.2),
                                     ("swin_tiny_patch4_window7_224", "projected", 1.2)]
SWIN_RSS_TARGET = ("swin_tiny_patch4_window7_224", "tokens", 6.0)   # GiB, all layers, batch 8
BUILD_TARGET = ("vit_base_patch16_224", "heads", 15.0)          # seconds
RSS_TARGET = ("vit_base_patch16_224", "tokens", 6.0)            # GiB, all layers


# ---------------------------------------------------------------------------------------------
# Worker: one configuration in a fresh process
# ---------------------------------------------------------------------------------------------

def _maxrss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _minor_faults() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(cfg: dict) -> dict:
    import torch
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    import fxdecomp
    from fxdecomp.capture.adapters import example_input, load_model, split_model_arg

    res: dict = {"threads": torch.get_num_threads()}
    if cfg.get("allocator", "keep") == "keep":
        from fxdecomp.run.memory import keep_freed_memory
        res["allocator"] = "kept" if keep_freed_memory() else "default (not glibc)"
    else:
        res["allocator"] = "default"
    device = torch.device(cfg.get("device") or "cpu")
    cuda = device.type == "cuda"
    spec, output = split_model_arg(cfg["model"])
    target, info = load_model(spec, random_init=True, seed=0,
                              model_kwargs=cfg.get("model_kwargs") or None, output=output)
    target = target.to(device)
    x = example_input(info, batch=cfg["batch"], seed=0).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res["input_size"] = list(info["input_size"])
    res["params_M"] = round(sum(p.numel() for p in target.parameters()) / 1e6, 2)
    res["rss_after_load_gib"] = _maxrss_bytes() / GiB
    mode = cfg["mode"]

    def plain():
        return target(x)

    fns = [("plain", plain)]
    if mode != "plain":
        t0 = time.perf_counter()
        dm = fxdecomp.decompose(target, x, granularity="tokens" if mode == "projected" else mode)
        res["build_s"] = time.perf_counter() - t0
        res["components"] = len(dm.labels)
        res["rss_after_build_gib"] = _maxrss_bytes() / GiB
        with torch.no_grad():
            E = int(target(x[:1]).shape[-1])
        D = None
        if mode == "projected":   # k fixed directions, e.g. text embeddings in output space
            D = torch.randn(E, cfg.get("project_k", 8),
                            generator=torch.Generator().manual_seed(0)).to(device)
            with torch.no_grad():
                dm(x, project=D)   # builds the projected graph once (not timed as a forward)
            res["build_s"] = time.perf_counter() - t0
            E = D.shape[1]
        est = len(dm.labels) * cfg["batch"] * E * 4
        res["components_tensor_gib"] = est / GiB
        if est > cfg["mem_cap_gib"] * GiB / 3:
            res["status"] = (f"skipped (components tensor alone {est / GiB:.1f} GiB > a third of "
                             f"the {cfg['mem_cap_gib']:g} GiB cap)")
            res["peak_rss_gib"] = _maxrss_bytes() / GiB
            return res
        fns.append((mode, (lambda: dm(x, project=D)) if D is not None else (lambda: dm(x))))

    times = {name: [] for name, _ in fns}
    faults = {name: [] for name, _ in fns}
    with torch.no_grad():
        for _ in range(cfg["warmup"]):
            for _, fn in fns:
                fn()
        # Adaptive rep count: never past the worker's time budget (half of --timeout, minus what
        # is already spent), at least 2 reps.
        budget = cfg["timeout"] * 0.5
        t_start = time.perf_counter()
        for r in range(cfg["reps"]):
            for name, fn in fns:
                sync()
                f0 = _minor_faults()
                t0 = time.perf_counter()
                out = fn()
                sync()
                times[name].append(time.perf_counter() - t0)
                faults[name].append(_minor_faults() - f0)
                del out
            elapsed = time.perf_counter() - t_start
            if r >= 1 and elapsed / (r + 1) * (r + 2) > budget:
                break
    res["reps_done"] = len(times["plain"])
    if cfg.get("profile"):   # the top ops of one more call of each, by self CPU time
        from torch.profiler import ProfilerActivity, profile
        res["profile"] = {}
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        with torch.no_grad():
            for name, fn in fns:
                with profile(activities=acts) as prof:
                    fn()
                    sync()
                top = sorted(prof.key_averages(), key=lambda e: -own(e))[:8]
                res["profile"][name] = [(e.key, round(own(e) / 1e3, 1), e.count) for e in top]
    if mode != "plain":
        res["rel_err"] = dm.verify(x)
    B = cfg["batch"]
    tp = statistics.median(times["plain"])
    res["plain_ms"] = tp * 1e3
    res["plain_img_s"] = B / tp
    res["times_plain_s"] = times["plain"]
    res["faults_plain"] = statistics.median(faults["plain"])
    if mode == "plain":
        res["ms"], res["img_s"] = tp * 1e3, B / tp
        res["ratio"] = res["ratio_of_medians"] = res["ratio_min"] = 1.0
    else:
        tm = statistics.median(times[mode])
        res["ms"], res["img_s"] = tm * 1e3, B / tm
        paired = sorted(a / b for a, b in zip(times[mode], times["plain"]))
        res["ratio"] = statistics.median(paired)
        res["ratio_spread"] = [paired[0], paired[-1]]   # min, max of the paired ratios
        res["ratio_of_medians"] = tm / tp
        res["ratio_min"] = min(times[mode]) / min(times["plain"])
        res["times_mode_s"] = times[mode]
        res["faults_mode"] = statistics.median(faults[mode])
    res["peak_rss_gib"] = _maxrss_bytes() / GiB
    if cuda:
        res["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    res["status"] = "ok"
    return res


# ---------------------------------------------------------------------------------------------
# Parent: spawn, guard, collect
# ---------------------------------------------------------------------------------------------

def _vmrss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_config(cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as td:
        out_path = Path(td) / "res.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg),
               "--worker-out", str(out_path)]
        log_path = Path(td) / "log.txt"
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            peak_seen, reason = 0, None
            while proc.poll() is None:
                rss = _vmrss(proc.pid)
                peak_seen = max(peak_seen, rss)
                if rss > cfg["mem_cap_gib"] * GiB:
                    reason = f"skipped (RSS {rss / GiB:.1f} GiB passed the {cfg['mem_cap_gib']:g} GiB cap)"
                elif time.perf_counter() - t0 > cfg["timeout"]:
                    reason = f"skipped (ran past the {cfg['timeout']:g} s time limit)"
                if reason:
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(0.1)
        wall = time.perf_counter() - t0
        if reason:
            return {"status": reason, "peak_rss_gib": peak_seen / GiB, "wall_s": wall}
        if proc.returncode != 0 or not out_path.exists():
            tail = log_path.read_text(errors="replace").strip().splitlines()
            msg = " | ".join(l for l in tail[-6:] if l.strip())
            return {"status": f"error (exit {proc.returncode}): {msg[-800:]}", "wall_s": wall}
        res = json.loads(out_path.read_text())
        res["wall_s"] = wall
        return res


def machine_info() -> dict:
    import torch
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import timm
        timm_v = timm.__version__
    except Exception:  # noqa: BLE001
        timm_v = None
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return {"cpu_model": cpu, "logical_cpus": os.cpu_count(), "mem_total_gib": mem,
            "torch": torch.__version__, "timm": timm_v, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_start": list(os.getloadavg())}


def model_label(model: str, kw: dict) -> str:
    if not kw:
        return model
    return model + " (" + ", ".join(f"{k}={v}" for k, v in sorted(kw.items())) + ")"


def evaluate_targets(rows: list[dict]) -> list[dict]:
    def find(model, mode, batch=8):
        for r in rows:
            if r["model"] == model and not r["model_kwargs"] and r["mode"] == mode and r["batch"] == batch:
                return r
        return None

    out = []
    for model in RATIO_TARGET_MODELS:
        for mode, lim in RATIO_TARGETS.items():
            r = find(model, mode)
            val = r.get("ratio") if r else None
            out.append({"target": f"{mode} forward <= {lim}x plain ({model}, CPU, batch 8, fp32, medians)",
                        "limit": lim, "measured": val,
                        "result": "not measured" if val is None else ("pass" if val <= lim else "fail"),
                        "status": r["status"] if r else "not run"})
    model, mode, lim = BUILD_TARGET
    r = find(model, mode)
    val = r.get("build_s") if r else None
    out.append({"target": f"build (decompose: export + rewrite, cold, fresh process) <= {lim} s "
                          f"({model}, {mode} mode)", "limit": lim, "measured": val,
                "result": "not measured" if val is None else ("pass" if val <= lim else "fail"),
                "status": r["status"] if r else "not run"})
    for model, mode, lim in EXTRA_TARGETS:
        r = find(model, mode)
        val = r.get("ratio") if r and r.get("status") == "ok" else None
        out.append({"target": f"{mode} forward <= {lim}x plain ({model}, CPU, batch 8, fp32, medians)",
                    "limit": lim, "measured": val, "spread": r.get("ratio_spread") if r else None,
                    "result": "not measured" if val is None else ("pass" if val <= lim else "fail"),
                    "status": r["status"] if r else "not run"})
    for model, mode, lim in (RSS_TARGET, SWIN_RSS_TARGET):
        r = find(model, mode)
        val = r.get("peak_rss_gib") if r and r.get("status") == "ok" else None
        out.append({"target": f"{mode} mode, all layers, batch 8: peak RSS of the whole process < {lim} GiB ({model})",
                    "limit": lim, "measured": val,
                    "result": "not measured" if val is None else ("pass" if val < lim else "fail"),
                    "status": r["status"] if r else "not run"})
    return out


CSV_FIELDS = ["model", "model_kwargs", "batch", "mode", "status", "img_s", "ms", "plain_img_s",
              "plain_ms", "ratio", "ratio_spread", "ratio_of_medians", "ratio_min", "peak_rss_gib",
              "peak_cuda_gib", "build_s", "rel_err", "components",
              "components_tensor_gib", "reps_done", "threads", "params_M", "input_size", "wall_s",
              "allocator", "faults_plain", "faults_mode"]


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | mode | img/s | ratio to plain (min-max) | peak RSS (GiB) | build s | rel err "
             "| page faults plain / mode |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {model_label(r['model'], r['model_kwargs'])} | {r['batch']} | {r['mode']} | "
                         f"{r['status'][:90]} | | | | | |")
            continue
        lines.append(f"| {model_label(r['model'], r['model_kwargs'])} | {r['batch']} | {r['mode']} | "
                     f"{fmt(r.get('img_s'), '.2f')} | {fmt(r.get('ratio'), '.2f')}x"
                     + (" ({:.2f}-{:.2f})".format(*r["ratio_spread"]) if r.get("ratio_spread") else "")
                     + " | "
                     f"{fmt(r.get('peak_rss_gib'), '.2f')} | {fmt(r.get('build_s'), '.1f')} | "
                     f"{fmt(r.get('rel_err'), '.1e')} | {fmt(r.get('faults_plain'), '.0f')}"
                     + (f" / {r['faults_mode']:.0f}" if r.get("faults_mode") is not None else "") + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, device: str = "cpu") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("blocks", "heads", "tokens", "projected") if any(r["mode"] == m for r in rows)]
    groups = []
    for r in rows:
        g = (model_label(r["model"], r["model_kwargs"]), r["batch"])
        if r["mode"] in modes and g not in groups:
            groups.append(g)
    if not groups:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 2), 4.5))
    w = 0.8 / max(1, len(modes))
    for j, m in enumerate(modes):
        xs, ys = [], []
        for i, (lab, b) in enumerate(groups):
            r = next((r for r in rows if model_label(r["model"], r["model_kwargs"]) == lab
                      and r["batch"] == b and r["mode"] == m), None)
            if r is not None and r.get("status") == "ok":
                xs.append(i + (j - (len(modes) - 1) / 2) * w)
                ys.append(r["ratio"])
        bars = ax.bar(xs, ys, w, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        if m in RATIO_TARGETS:
            ax.axhline(RATIO_TARGETS[m], ls="--", lw=0.8, color=bars.patches[0].get_facecolor()
                       if bars.patches else "k")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{lab.replace('_patch', chr(10) + 'patch')}\nB={b}" for lab, b in groups], fontsize=7)
    ax.set_ylabel("time / plain forward\n(median over reps of paired ratio)")
    ax.set_yscale("log")  # Swin tokens (~280x) would flatten every other bar
    ax.set_title(f"fxdecomp: decomposed vs plain forward ({device.upper()}, fp32)\n"
                 "dashed lines: targets at batch 8 (CPU)",
                 fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows, meta, out_dir: Path, tag: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"decompose_{tag}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            rr = dict(r)
            rr["model_kwargs"] = json.dumps(r["model_kwargs"]) if r["model_kwargs"] else ""
            wr.writerow(rr)
    meta = dict(meta, targets=evaluate_targets(rows), rows=rows)
    meta.setdefault("finished", datetime.datetime.now().isoformat(timespec="seconds"))
    with open(stem.with_suffix(".json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        plot(rows, stem.with_suffix(".png"), meta.get("settings", {}).get("device", "cpu"))
    except Exception as e:  # noqa: BLE001 -- a plot failure must not lose the results
        print(f"plot failed: {e!r}", file=sys.stderr)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: deit_small, batch 2, all modes, 3 reps, small scaling check")
    p.add_argument("--models", help=f"comma list of timm names, NAME:OUTPUT, or another source's spec such as torchvision:swin_t (default: {','.join(MODELS)})")
    p.add_argument("--batches", help="comma list (default 1,8,32)")
    p.add_argument("--modes", help="comma list of plain,blocks,heads,tokens (default all)")
    p.add_argument("--reps", type=int, help="timed repetitions per config (default 5; quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each before timing")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU: synchronised timing, "
                   "peak GPU memory)")
    p.add_argument("--profile", action="store_true",
                   help="record and print the top ops (self CPU time) of one call per mode")
    p.add_argument("--project-k", type=int, default=8, help="directions of the projected mode")
    p.add_argument("--allocator", choices=["keep", "glibc"], default="keep",
                   help="keep: each worker calls fxdecomp.run.memory.keep_freed_memory() first "
                        "(freed memory stays in the heap between forwards); glibc: its dynamic "
                        "defaults (the top of the heap returned to the OS and faulted in again)")
    p.add_argument("--no-scaling", action="store_true", help="skip the image-size / depth scaling runs")
    p.add_argument("--scale-model", default="deit_small_patch16_224")
    p.add_argument("--scale-batch", type=int, help="batch of the scaling runs (default 8; quick 2)")
    p.add_argument("--mem-cap-gib", type=float, default=12.0,
                   help="kill a worker whose RSS passes this (and record it as skipped)")
    p.add_argument("--timeout", type=float, help="seconds per configuration (default 900; quick 120)")
    p.add_argument("--tag", help="file name tag: decompose_<tag>.* (default cpu, quick: cpu_quick)")
    p.add_argument("--out", default=str(RESULTS), help="output directory")
    p.add_argument("--replot", metavar="JSON",
                   help="no runs: rewrite the CSV/PNG/targets of an earlier decompose_*.json and print its table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        res = worker(json.loads(a.worker))
        Path(a.worker_out).write_text(json.dumps(res))
        return 0

    if a.replot:
        src = Path(a.replot)
        meta = json.loads(src.read_text())
        rows = meta.pop("rows")
        meta.pop("targets", None)
        meta = write_outputs(rows, meta, src.parent, src.stem.removeprefix("decompose_"))
        print(markdown(rows))
        for t in meta["targets"]:
            print(f"- {t['result'].upper():12s} {t['target']}: {t['measured']} (limit {t['limit']})")
        return 0

    q = a.quick
    models = a.models.split(",") if a.models else (["deit_small_patch16_224"] if q else MODELS)
    batches = [int(b) for b in a.batches.split(",")] if a.batches else ([2] if q else BATCHES)
    modes = a.modes.split(",") if a.modes else MODES
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {MODES}")
    reps = a.reps or (3 if q else 5)
    timeout = a.timeout or (120.0 if q else 900.0)
    scale_batch = a.scale_batch or (2 if q else 8)
    tag = a.tag or (("cpu_quick" if q else "cpu") if a.device == "cpu" else a.device)

    configs = []
    for m in models:
        for b in batches:
            for mode in modes:
                configs.append((m, {}, b, mode, "main"))
    if not a.no_scaling:
        for kw in ({}, {"img_size": 384}, {"depth": 6}):
            for mode in ("plain", "heads"):
                configs.append((a.scale_model, kw, scale_batch, mode, "scaling"))
    seen, uniq = set(), []
    for c in configs:
        key = (c[0], json.dumps(c[1], sort_keys=True), c[2], c[3])
        if key not in seen:
            seen.add(key)
            uniq.append(c)

    meta = {"command": " ".join(shlex.quote(s) for s in [sys.executable] + sys.argv),
            "argv": sys.argv, "cwd": os.getcwd(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_info(),
            "settings": {"device": a.device, "reps": reps, "warmup": a.warmup,
                         "threads": a.threads or None, "allocator": a.allocator,
                         "mem_cap_gib": a.mem_cap_gib, "timeout_s": timeout, "dtype": "float32",
                         "weights": "timm random init, seed 0", "input": "example_input(info, batch, seed=0)"},
            "method": ("fresh process per (model, model_kwargs, batch, mode); plain forward target(x) and "
                       "decomposed forward dm(x) interleaved per rep under torch.no_grad(), after warmup; "
                       "medians over reps; ratio = median over reps of t_mode/t_plain (same rep, same process); "
                       "ratio_of_medians = median(t_mode)/median(t_plain); ratio_min = min/min; peak_rss_gib = ru_maxrss of that "
                       "process (includes python/torch/weights and the plain forwards); build_s = "
                       "fxdecomp.decompose wall time, cold in that process; rel_err = dm.verify(x); allocator "
                       "keep: keep_freed_memory() first in each worker (--allocator glibc: glibc's "
                       "defaults); faults_* = median minor page faults of one call")}
    print(f"# {len(uniq)} configurations; machine: {meta['machine']['cpu_model']}, "
          f"torch {meta['machine']['torch']}, {meta['machine']['torch_threads']} threads", flush=True)

    rows = []
    for i, (m, kw, b, mode, group) in enumerate(uniq):
        cfg = {"model": m, "model_kwargs": kw, "batch": b, "mode": mode, "reps": reps,
               "warmup": a.warmup, "threads": a.threads, "mem_cap_gib": a.mem_cap_gib,
               "timeout": timeout, "profile": a.profile, "project_k": a.project_k,
               "device": a.device, "allocator": a.allocator}
        print(f"[{i + 1}/{len(uniq)}] {model_label(m, kw)} batch={b} mode={mode} ...", end=" ", flush=True)
        res = run_config(cfg)
        row = {"model": m, "model_kwargs": kw, "batch": b, "mode": mode, "group": group, **res}
        rows.append(row)
        if row["status"] == "ok":
            print(f"{row['img_s']:.2f} img/s, ratio {row['ratio']:.2f}x, peak RSS "
                  f"{row['peak_rss_gib']:.2f} GiB" + (f", build {row['build_s']:.1f} s, err "
                                                      f"{row['rel_err']:.1e}" if mode != "plain" else "")
                  + f" ({row['wall_s']:.0f} s)", flush=True)
        else:
            print(row["status"], flush=True)
        for name, top in (row.get("profile") or {}).items():
            print(f"    top ops, {name}: " + "; ".join(f"{k} {ms:.0f} ms x{n}" for k, ms, n in top[:6]),
                  flush=True)
        write_outputs(rows, meta, Path(a.out), tag)  # partial results survive an abort

    meta = write_outputs(rows, meta, Path(a.out), tag)
    print()
    print(markdown(rows))
    print()
    for t in meta["targets"]:
        v = t["measured"]
        print(f"- {t['result'].upper():12s} {t['target']}: "
              f"{'-' if v is None else format(v, '.3g')} (limit {t['limit']})")
    stem = Path(a.out) / f"decompose_{tag}"
    print(f"\nwrote {stem}.csv, {stem}.json, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
