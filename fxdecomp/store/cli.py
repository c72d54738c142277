"""Command line: ``fxdecomp extract`` and the ``--store`` option other verbs share.

    fxdecomp extract --model timm:deit_small_patch16_224 --data imgs/ --out store/ --random-init
    torchrun --nproc-per-node 4 -m fxdecomp extract --model ... --data imgs/ --out store/

``add_subcommands(sub)`` registers ``extract``; ``add_store_argument(parser)`` adds ``--store``
to any verb and ``components_from_store(args)`` reads it (None without ``--store``).
"""
from __future__ import annotations

import argparse
import json
import os

from fxdecomp.run.memory import keep_freed_memory
from fxdecomp.store.extract import DTYPES, ExtractOptions, extract

__all__ = ["add_subcommands", "add_store_argument", "components_from_store", "cmd_extract"]


def cmd_extract(args) -> dict:
    """Decompose every image of --data into the component store --out (resumable)."""
    if args.allocator == "keep":     # one process, thousands of same-shape forwards
        keep_freed_memory()
    opts = ExtractOptions(
        model=args.model, data=args.data, out=args.out, granularity=args.granularity,
        layers=args.layers, dtype=args.dtype, batch_size=args.batch_size, workers=args.workers,
        shard_size=args.shard_size, random_init=args.random_init, checkpoint=args.checkpoint,
        seed=args.seed, output=args.output, model_kwargs=args.model_kwargs, clip=args.clip,
        clip_checkpoint=args.clip_checkpoint,
        device=args.device, progress=not args.no_progress)
    summary = extract(opts)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return summary


def add_subcommands(subparsers) -> None:
    """Register ``extract`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "extract", help="decompose an image collection once, into a resumable component store",
        description=cmd_extract.__doc__ + " Run it under `torchrun --nproc-per-node N -m "
        "fxdecomp extract ...` to split the images over N processes.")
    p.add_argument("--model", required=True,
                   help="subject model spec, e.g. timm:deit_small_patch16_224")
    p.add_argument("--data", required=True,
                   help="image folder (ImageFolder layout or flat, recursive) or a file list "
                        "(one path a line, relative to the list's folder)")
    p.add_argument("--out", required=True, help="store folder (created; resumed if it exists)")
    p.add_argument("--granularity", default="heads", choices=("blocks", "heads", "tokens"))
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="expand only these residual blocks (negative from the end)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="stored component dtype (float16 halves the size; computed in float32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding images (default min(4, CPUs - 1))")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per shard file (default: at most 128 MiB of components and at "
                        "least 64 shards, not below --batch-size; a resumed store keeps its own)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--random-init", action="store_true",
                     help="seeded random weights for the model (and --clip); no download")
    src.add_argument("--checkpoint", default=None, help="local state_dict (.safetensors/.pt/.pth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None,
                   help="representation: timm pre_logits|logits|pooled|stages, open_clip "
                        "embedding|pre_proj, torchvision pre_logits|logits")
    p.add_argument("--model-kwargs", type=_json_object, default=None,
                   help='model constructor arguments as JSON, e.g. \'{"img_size": 112}\' (timm)')
    p.add_argument("--clip", default=None,
                   help="also store this open_clip model's image embeddings (CompAlign targets), "
                        "e.g. ViT-B-32")
    p.add_argument("--clip-checkpoint", default=None)
    p.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK if available), cpu, cuda")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allocator", default="keep", choices=("keep", "glibc"),
                   help="keep (default): memory freed during one batch's forward stays in the "
                        "process for the next (fxdecomp.run.memory.keep_freed_memory; glibc "
                        "only), instead of being returned to the OS and faulted in again; "
                        "glibc: leave malloc's defaults")
    p.set_defaults(func=cmd_extract)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object, e.g. '{\"img_size\": 112}'")
    return value


def add_store_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--store PATH``: read components from a store instead of decomposing images."""
    parser.add_argument("--store", default=None,
                        help="component store from `fxdecomp extract` (no images are decomposed)")


def components_from_store(args, with_targets: bool = False):
    """(components [C, N, ...] float32, labels, ids, targets [N, E] or None) from ``--store``;
    None when the verb was not given ``--store``."""
    import torch

    from fxdecomp.store.reader import open_store
    if not getattr(args, "store", None):
        return None
    store = open_store(args.store)
    targets = store.targets().float() if with_targets else None
    return store.tensor().to(torch.float32), list(store.labels), list(store.ids), targets
