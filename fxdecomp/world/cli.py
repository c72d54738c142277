"""Command line: ``fxdecomp world`` (write a generated world to disk) and the main job
(``fxdecomp`` / ``fxdecomp demo``: the ground-truth evaluation and its report).

    fxdecomp world --out DIR --n 10000 --seed 0 [--size 64] [--split train|test|spurious-train|balanced-test]
    fxdecomp [demo] [--out ./fxdecomp-report] [--n 2000] [--k 3] [--world-seed 0]
                    [--heatmap-images 300] [--ablation-images 2000] [--spurious-k 3] [--spurious-head own|fitted]
"""
from __future__ import annotations

import argparse
import time

from fxdecomp.world.generate import SPLITS

__all__ = ["add_subcommands", "add_demo_arguments", "cmd_world", "run_demo"]

DEFAULT_REPORT_DIR = "fxdecomp-report"


def cmd_world(args) -> int:
    from fxdecomp.world.generate import generate, write_world
    t0 = time.perf_counter()
    world = generate(args.n, seed=args.seed, split=args.split, size=args.size,
                     workers=args.workers, progress=True)
    t1 = time.perf_counter()
    path = write_world(world, args.out)
    print(f"{len(world)} {args.split} images ({args.size} px, seed {args.seed}) generated in "
          f"{t1 - t0:.1f}s, written in {time.perf_counter() - t1:.1f}s: {path}")
    return 0


def add_subcommands(sub) -> None:
    """Register ``world`` on an argparse subparsers object."""
    p = sub.add_parser("world", help="write images, masks and labels.csv of the ground-truth world")
    p.add_argument("--out", required=True, help="output folder (images/, masks/, labels.csv)")
    p.add_argument("--n", type=int, default=10000, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--workers", type=int, default=1, help="generating processes")
    p.set_defaults(func=cmd_world)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The main job's options on the ``demo`` parser."""
    p.add_argument("--out", default=DEFAULT_REPORT_DIR,
                   help=f"report folder for the world demo (default ./{DEFAULT_REPORT_DIR})")
    p.add_argument("--n", type=int, default=2000, help="world images to evaluate on")
    p.add_argument("--k", type=int, default=3, help="components selected per attribute")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the generated world")
    p.add_argument("--heatmap-images", type=int, default=300,
                   help="held-out images for token heatmaps / segmentation (0: skip)")
    p.add_argument("--ablation-images", type=int, default=2000,
                   help="images of spurious-train and of balanced-test for the ablation (0: skip)")
    p.add_argument("--spurious-k", type=int, default=3,
                   help="components removed (top score_background - score_shape)")
    p.add_argument("--spurious-head", choices=("own", "fitted"), default="fitted",
                   help="head for the ablation: the subject's own classifier or a logistic "
                        "regression fitted on spurious-train (the other is reported alongside)")


def run_demo(args) -> int:
    """The main job: ground-truth evaluation of the shipped subject, report under args.out."""
    from fxdecomp.world.evaluate import ATTRIBUTE_ORDER, evaluate_world
    from fxdecomp.world.report import write_report
    print(f"fxdecomp main job: the shipped subject ViT on {args.n} fresh images of the "
          f"ground-truth world (decompose -> CompAlign -> score -> property retrieval)")
    ev = evaluate_world(n=args.n, seed=args.world_seed, k=args.k,
                        heatmap_images=args.heatmap_images, ablation_images=args.ablation_images,
                        spurious_k=args.spurious_k, spurious_head=args.spurious_head)
    path = write_report(ev, args.out)
    m = ev.metrics
    print(f"sum of components vs the model's output: relative error "
          f"{m['exactness_max_relative_error']:.2e} ({m['n_components']} components: attn_head, "
          f"mlp, embed, bias)")
    print(f"CompAlign held-out cosine to the tiny CLIP: {m['alignment_heldout_cosine']:.3f}; "
          "fidelity per attribute: "
          + ", ".join(f"{a} {v:.2f}" for a, v in m["attribute_fidelity"].items()))
    print(f"precision@10 (k={m['k']})   top-k   by score  full    random  chance")
    for a in ATTRIBUTE_ORDER:
        p = m["retrieval_precision_at_10"][a]
        print(f"  {a:12s}        {p['top_components']:.3f}   {p['top_scored_components']:.3f}     "
              f"{p['full_representation']:.3f}   {p['random_components']:.3f}   "
              f"{m['chance_precision_at_10'][a]:.3f}")
    if "segmentation" in m:
        seg, blob = m["segmentation"], m["segmentation_center_blob"]
        print(f"token heatmaps ({m['n_heatmap_images']} images, {m['heatmap_attribute']} heads): "
              f"pointing {m['heatmap_pointing_accuracy']:.3f} (object area "
              f"{m['heatmap_pointing_chance']:.3f}, centre blob "
              f"{m['heatmap_pointing_accuracy_center_blob']:.3f}); segmentation "
              f"({m['segmentation_map'].replace('_', ' ')} map) pixel acc / mIoU / "
              f"mAP {seg['pixel_accuracy']:.3f} / {seg['miou']:.3f} / {seg['map']:.3f} "
              f"(centre blob {blob['pixel_accuracy']:.3f} / {blob['miou']:.3f} / "
              f"{blob['map']:.3f})")
    if "spurious" in m:
        s = m["spurious"]
        print(f"spurious cue ({s['head']}), k={s['k']} removed: worst group {s['worst_group_before']:.3f} -> "
              f"{s['worst_group_after']:.3f}, mean over groups {s['average_before']:.3f} -> "
              f"{s['average_after']:.3f}")
    print(f"report: {path.resolve()}  (metrics.json, scores.png, precision.png, retrieval.png, "
          f"heatmaps.png; "
          f"{m['seconds']['total_s']:.0f}s)")
    return 0 if m["exactness_max_relative_error"] <= 1e-5 else 1

