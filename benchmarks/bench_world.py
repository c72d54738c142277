#!/usr/bin/env python
"""Ground-truth fidelity of decompose -> CompAlign -> score, on the generated world.

Runs ``fxdecomp.world.evaluate.evaluate_world`` (the main job's evaluation) for one or more world
seeds and values of k, and reports per attribute (color, shape, texture, background) the
property-retrieval precision@10 of the top-k components (the paper's rule, score minus the max
over the other attributes, and the attribute's own score), the full representation and random k
components, plus the alignment's held-out cosine and the exactness error. Any later change to
decomposition, alignment or scoring shows its effect here.

    python benchmarks/bench_world.py                     # seeds 0 ... 5, k 3, 2000 images
    python benchmarks/bench_world.py --seeds 0 --ks 1 3 5 --n 2000

Writes ``benchmarks/results/world_<tag>.csv`` (one row per seed x k x attribute) and
``world_<tag>.json`` (every run's metrics, the command, versions, means and spreads over seeds)
and prints the table (mean ± std over seeds).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5],
                   help="world seeds")
    p.add_argument("--ks", type=int, nargs="+", default=[3], help="components per attribute")
    p.add_argument("--n", type=int, default=2000, help="images per world")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--tag", default="cpu")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    import torch
    from fxdecomp.world.evaluate import ATTRIBUTE_ORDER, METHODS, evaluate_world
    from fxdecomp.world.generate import generate

    runs, rows = [], []
    for seed in args.seeds:
        world = generate(args.n, seed=seed, split="test")
        for k in args.ks:
            t0 = time.perf_counter()
            ev = evaluate_world(seed=seed, k=k, queries=args.queries, world=world, progress=False)
            m = ev.metrics
            runs.append(m)
            for a in ATTRIBUTE_ORDER:
                prec = m["retrieval_precision_at_10"][a]
                rows.append({"seed": seed, "k": k, "attribute": a,
                             **{meth: round(prec[meth], 4) for meth in METHODS},
                             "random_std": round(prec["random_components_std"], 4),
                             "chance": round(m["chance_precision_at_10"][a], 4),
                             "alignment_heldout_cosine": round(m["alignment_heldout_cosine"], 4),
                             "exactness_error": m["exactness_max_relative_error"],
                             "selected": " ".join(m["selected_components"][a]),
                             "selected_by_score": " ".join(m["selected_components_by_score"][a]),
                             "seconds": round(time.perf_counter() - t0, 1)})
            print(f"seed {seed} k {k}: done in {time.perf_counter() - t0:.0f}s", flush=True)

    summary = {}
    for k in args.ks:
        for a in ATTRIBUTE_ORDER:
            sel = [r for r in rows if r["k"] == k and r["attribute"] == a]
            summary[f"k={k}/{a}"] = {meth: {"mean": float(np.mean([r[meth] for r in sel])),
                                            "std": float(np.std([r[meth] for r in sel]))}
                                     for meth in METHODS}
        cos = [m["alignment_heldout_cosine"] for m in runs if m["k"] == k]
        summary[f"k={k}/alignment_heldout_cosine"] = {"mean": float(np.mean(cos)),
                                                      "std": float(np.std(cos))}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"world_{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"command": "python benchmarks/bench_world.py " + " ".join(sys.argv[1:] if argv is None
                                                                       else argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "settings": vars(args), "summary": summary,
            "runs": runs}
    (out / f"world_{args.tag}.json").write_text(json.dumps(meta, indent=2) + "\n")

    print(f"\nprecision@10 over {len(args.seeds)} world seed(s), {args.n} images, "
          f"{args.queries} queries (mean ± std)")
    print(f"{'k':>3s} {'attribute':12s} " + " ".join(f"{m:>22s}" for m in METHODS))
    for k in args.ks:
        for a in ATTRIBUTE_ORDER:
            s = summary[f"k={k}/{a}"]
            print(f"{k:3d} {a:12s} " + " ".join(f"{s[m]['mean']:15.3f} ± {s[m]['std']:.3f}"
                                                 for m in METHODS))
        c = summary[f"k={k}/alignment_heldout_cosine"]
        print(f"{k:3d} alignment held-out cosine {c['mean']:.3f} ± {c['std']:.3f}")
    print(f"wrote {out / f'world_{args.tag}.csv'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
