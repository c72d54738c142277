"""Extraction throughput into a component store vs in-memory decomposition throughput.

    python benchmarks/bench_extract.py                       # deit_small, 128 images, 3 reps
    python benchmarks/bench_extract.py --model timm:vit_base_patch16_224 --images 512 --reps 5

Both sides use the same model (seeded random weights), the same images, the same batch size and
the same decomposition (``--granularity``, default heads), interleaved rep by rep in one process:

* in-memory: the images decoded and preprocessed into one tensor in RAM beforehand; timed is the
  loop of decomposed forwards ``dm(x)`` over the batches (what ``align``/``rank`` do per call);
* extraction: ``fxdecomp.store.extract`` end to end from the JPEG files: DataLoader workers decode
  and preprocess, the decomposed forward, the cast to ``--dtype`` (default float16), a background
  thread encoding, checksumming, fsyncing and renaming shards. Timed is its loop (first image read
  to last shard on disk); the model build (export + rewrite, the same one-off cost for both) is
  reported apart.

Reported: images/s of each (median over reps, min-max spread) and the ratio
in-memory images/s / extraction images/s (median of the per-rep paired ratios); 1.0 means the
store costs nothing over decomposing. Results go to ``--out`` (JSON + CSV).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_images(root: Path, n: int, size: int) -> None:
    from fxdecomp.interpret.cli import synthetic_images
    for i, im in enumerate(synthetic_images(n, size=size, seed=0)):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{i:06d}.jpg", quality=90)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def in_memory(dm, pixels: torch.Tensor, batch: int, device) -> tuple[float, float]:
    """(wall s, CPU s) for decomposed forwards over every batch of pre-decoded pixels."""
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), cpu_seconds()
        for s in range(0, pixels.shape[0], batch):
            d = dm(pixels[s:s + batch].to(device, non_blocking=True))
            d.components.sum()                                   # consume like a user would
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, cpu_seconds() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:deit_small_patch16_224")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=256, help="side of the JPEGs on disk")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--granularity", default="heads")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's; the JSON records it)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tmp", default=None, help="where images and stores go (default: a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from fxdecomp import decompose
    from fxdecomp.capture.adapters import load_model
    from fxdecomp.interpret.cli import _subject_transform
    from fxdecomp.store import open_store
    from fxdecomp.store.extract import ExtractOptions, extract, list_samples
    from PIL import Image

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    work = Path(args.tmp or tempfile.mkdtemp(prefix="bench_extract_"))
    data = work / "images"
    if not data.exists():
        write_images(data, args.images, args.image_size)
    root, ids = list_samples(data)
    print(f"{len(ids)} JPEGs {args.image_size}px in {data}; model {args.model}; device {device}; "
          f"torch threads {torch.get_num_threads()}; batch {args.batch_size}; "
          f"workers {args.workers}; {args.granularity}; store dtype {args.dtype}", flush=True)

    c_build = cpu_seconds()
    target, info = load_model(args.model, random_init=True)
    load_cpu_s = cpu_seconds() - c_build
    target = target.to(device).eval()
    tf = _subject_transform(target, info)
    pixels = torch.stack([tf(Image.open(root / i).convert("RGB")) for i in ids])
    t0, c_build = time.perf_counter(), cpu_seconds()
    dm = decompose(target, pixels[:2].to(device), granularity=args.granularity)
    build_s = time.perf_counter() - t0
    build_cpu_s = load_cpu_s + cpu_seconds() - c_build    # what extract() also spends first
    in_memory(dm, pixels[:args.batch_size], args.batch_size, device)         # warm-up

    rows = []
    for rep in range(args.reps):
        t_mem, cpu_mem = in_memory(dm, pixels, args.batch_size, device)
        c0 = cpu_seconds()
        out = work / f"store_{rep}"
        shutil.rmtree(out, ignore_errors=True)
        summary = extract(ExtractOptions(
            model=args.model, data=str(data), out=str(out), granularity=args.granularity,
            dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
            random_init=True, device=args.device, progress=False, log=lambda m: None))
        cpu_ext = cpu_seconds() - c0                      # incl. model build, workers, writer
        store_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        assert len(open_store(out, verify=False)) == len(ids)
        row = {"rep": rep, "in_memory_s": t_mem, "extract_loop_s": summary["loop_s"],
               "extract_total_s": summary["total_s"],
               "in_memory_img_s": len(ids) / t_mem,
               "extract_img_s": len(ids) / summary["loop_s"],
               "ratio": summary["loop_s"] / t_mem, "store_bytes": store_bytes,
               "in_memory_cpu_s": cpu_mem, "extract_cpu_s_incl_build": cpu_ext}
        rows.append(row)
        print(f"rep {rep}: in-memory {row['in_memory_img_s']:.2f} img/s, extraction "
              f"{row['extract_img_s']:.2f} img/s (x{row['ratio']:.3f} the time), store "
              f"{store_bytes / 2**20:.1f} MiB, extract incl. model build "
              f"{summary['total_s']:.1f}s; "
              f"CPU s: in-memory {cpu_mem:.1f}, extraction incl. build {cpu_ext:.1f}",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)

    def stat(key):
        vals = [r[key] for r in rows]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    result = {
        "command": "python benchmarks/bench_extract.py " + " ".join(argv if argv is not None
                                                                    else sys.argv[1:]),
        "model": args.model, "images": len(ids), "image_size": args.image_size,
        "batch_size": args.batch_size, "granularity": args.granularity, "dtype": args.dtype,
        "workers": args.workers, "torch_threads": torch.get_num_threads(),
        "device": str(device), "cpu_count": os.cpu_count(), "machine": platform.platform(),
        "load_avg_at_end": os.getloadavg(), "build_s": build_s, "build_cpu_s": build_cpu_s,
        "in_memory_img_s": stat("in_memory_img_s"), "extract_img_s": stat("extract_img_s"),
        "in_memory_cpu_s": stat("in_memory_cpu_s"),
        "extract_cpu_s_incl_build": stat("extract_cpu_s_incl_build"),
        "time_ratio_extract_over_in_memory": stat("ratio"),
        "bytes_per_image": rows[-1]["store_bytes"] / len(ids), "reps": rows,
    }
    r = result["time_ratio_extract_over_in_memory"]
    print(f"\nmedian: in-memory {result['in_memory_img_s']['median']:.2f} img/s, extraction "
          f"{result['extract_img_s']['median']:.2f} img/s; extraction time / in-memory time "
          f"{r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}; target <= 1.2)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"extract_{device.type}{'_' + args.tag if args.tag else ''}"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out_dir / name}.json and .csv")
    if not args.tmp:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
