"""The ``fxdecomp`` command.

    fxdecomp                         # the main job: the ground-truth world demo (fxdecomp.world)
    fxdecomp demo [--out DIR]        # the same; --model SPEC summarises any model's decomposition
    fxdecomp world --out DIR --n N   # write the generated world (images, masks, labels.csv)
    fxdecomp coverage MODEL... [--random-init | --checkpoint PATH]
    fxdecomp align / rank / describe # interpret components through CLIP (fxdecomp.interpret)
    fxdecomp retrieve / heatmap / ablate   # applications (fxdecomp.apply)
    fxdecomp extract --model SPEC --data DIR --out STORE   # decompose a collection once, to disk
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

import torch

from .errors import FxDecompError, one_line

DEFAULT_MODEL = "timm:deit_tiny_patch16_224"
REL_TOL = 1e-5


def _load(spec: str, args):
    from .capture.adapters import load_model
    return load_model(spec, random_init=args.random_init, checkpoint=args.checkpoint,
                      seed=args.seed, output=getattr(args, "output", None))


def check_model(spec: str, args, granularities=("blocks", "heads")) -> dict:
    """Decompose ``spec`` in each granularity and measure the reconstruction error (the same
    check the test matrix makes)."""
    from . import decompose
    from .capture.adapters import example_input
    row: dict = {"model": spec}
    try:
        target, info = _load(spec, args)
        x = example_input(info, batch=args.batch, seed=args.seed)
        for gran in granularities:
            t0 = time.perf_counter()
            dm = decompose(target, x, granularity=gran,
                           allow_collapse=getattr(args, "allow_collapse", False))
            build = time.perf_counter() - t0
            with torch.no_grad():
                err = dm.verify(x)
            kinds = Counter(lab.kind for lab in dm.labels)
            cov = dm.block_coverage
            row[gran] = {"error": err, "components": len(dm.labels), "kinds": dict(kinds),
                         "build_s": round(build, 2), "blocks": len(dm.blocks),
                         "blocks_expanded": [cov.expanded, cov.total],
                         "whole_attention": dict(dm.whole_attention)}
        row["pass"] = all(row[g]["error"] <= REL_TOL for g in granularities)
    except Exception as e:  # report and go on with the next model
        row["pass"] = False
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def cmd_coverage(args) -> int:
    rows = []
    for spec in args.models:
        row = check_model(spec, args, tuple(args.granularity))
        rows.append(row)
        if "error" in row:
            print(f"FAIL  {spec}\n      {row['error'].splitlines()[0]}")
            for line in row["error"].splitlines()[1:]:
                print(f"      {line}")
            continue
        status = "pass" if row["pass"] else "FAIL"
        for gran in args.granularity:
            r = row[gran]
            kinds = ", ".join(f"{k}={v}" for k, v in sorted(r["kinds"].items()))
            print(f"{status:5s} {spec:42s} {gran:7s} rel.err={r['error']:.2e} "
                  f"blocks={r['blocks_expanded'][0]}/{r['blocks_expanded'][1]} "
                  + (f"whole={len(r['whole_attention'])} " if gran != "blocks" else "") +
                  f"components={r['components']} ({kinds}) build={r['build_s']}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    passed = sum(r["pass"] for r in rows)
    print(f"{passed}/{len(rows)} models exact to {REL_TOL:g}")
    return 0 if passed == len(rows) else 1


def cmd_demo(args) -> int:
    """Without --model: the main job (``fxdecomp.world.cli.run_demo``). With --model: decompose
    that model on synthetic images and show what each part contributes."""
    if args.model is None:
        from .world.cli import run_demo
        return run_demo(args)
    from . import decompose
    from .capture.adapters import example_input
    target, info = _load(args.model, args)
    x = example_input(info, batch=args.batch, seed=args.seed)
    print(f"model {args.model} ({info.get('weights')}), input {tuple(x.shape)}")
    t0 = time.perf_counter()
    dm = decompose(target, x, granularity=args.granularity)
    print(f"built in {time.perf_counter() - t0:.1f}s: {len(dm.labels)} components over "
          f"{len(dm.blocks)} residual blocks ({args.granularity} granularity)")
    with torch.no_grad():
        d = dm(x)
    err = d.reconstruction_error()
    print(f"sum of components vs the model's output: relative error {err:.2e}")
    share = d.components.flatten(2).norm(dim=-1).mean(1)
    total = d.output.flatten(1).norm(dim=-1).mean()
    by_kind = d.group("kind")
    print("\nby kind            components   mean ‖c‖ / ‖output‖")
    kinds = Counter(lab.kind for lab in d.labels)
    for lab, c in zip(by_kind.labels, by_kind.components):
        print(f"  {lab.name:16s} {kinds[lab.name]:10d}   {float(c.flatten(1).norm(dim=-1).mean() / total):.3f}")
    order = share.argsort(descending=True)[: args.top]
    print(f"\ntop {args.top} components by mean norm")
    for i in order.tolist():
        lab = d.labels[i]
        print(f"  {lab.name:36s} {lab.kind:15s} layer={lab.layer!s:4s} {float(share[i] / total):.3f}")
    print("\nprint(dm.code) shows the rewritten graph; fxdecomp coverage MODEL checks any model.")
    return 0 if err <= REL_TOL else 1


def _model_args(p: argparse.ArgumentParser, random_default: bool = False) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--random-init", action="store_true", default=random_default,
                     help="seeded random weights (no download)")
    src.add_argument("--pretrained", dest="random_init", action="store_false",
                     help="library pretrained weights (needs the network or a local cache)")
    src.add_argument("--checkpoint", default=None, help="local state_dict (.safetensors/.pt/.pth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--output", default=None,
                   help="representation: timm pre_logits|logits, open_clip embedding|pre_proj, "
                        "torchvision pre_logits|logits, hf cls|pooler_output|image_embeds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxdecomp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo", help="the main job (ground-truth world report), or with --model "
                                    "a summary of any model's decomposition on synthetic input")
    p.add_argument("--model", default=None,
                   help=f"summarise this model's decomposition instead (e.g. {DEFAULT_MODEL})")
    from .world.cli import add_demo_arguments
    add_demo_arguments(p)
    p.add_argument("--granularity", default="heads", choices=("blocks", "heads", "tokens"))
    p.add_argument("--top", type=int, default=10)
    _model_args(p, random_default=True)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("coverage", help="check exact decomposition on models (pass/fail, "
                                        "components per kind, reconstruction error)")
    p.add_argument("models", nargs="+",
                   help="timm:NAME, open_clip:NAME[:TAG], torchvision:NAME, hf:HUB_ID")
    p.add_argument("--granularity", nargs="+", default=["blocks", "heads"],
                   choices=("blocks", "heads", "tokens"))
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--allow-collapse", action="store_true",
                   help="pass models whose residual blocks are partly absorbed by a nonlinear op "
                        "on the stream (blocks=E/T shows how many were expanded)")
    _model_args(p)
    p.set_defaults(func=cmd_coverage)

    from .interpret.cli import add_subcommands
    add_subcommands(sub)
    from .store.cli import add_subcommands as add_store_subcommands
    add_store_subcommands(sub)
    from .world.cli import add_subcommands as add_world_subcommands
    add_world_subcommands(sub)
    from .apply.cli import add_subcommands as add_apply_subcommands
    add_apply_subcommands(sub)
    from .apply.heatmap_cli import add_subcommands as add_heatmap_subcommands
    add_heatmap_subcommands(sub)
    from .apply.ablate_cli import add_subcommands as add_ablate_subcommands
    add_ablate_subcommands(sub)
    return parser


def run(argv=None):
    """Parse ``argv`` and run the command; returns what it computed (an exit code or an object)
    and lets its errors propagate (for Python callers and tests; ``main`` is the command)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # the embedded default: the demo
        args = parser.parse_args(["demo"])
    if getattr(args, "checkpoint", None):
        args.random_init = False
    return args.func(args)  # the interpret commands return what they computed


def main(argv=None) -> int:
    """The ``fxdecomp`` command: an FxDecompError is one line on stderr and exit status 2."""
    try:
        result = run(argv)
    except FxDecompError as err:  # one clear line, no traceback
        print(f"fxdecomp: error: {one_line(err)}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
