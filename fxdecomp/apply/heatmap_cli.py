"""``fxdecomp heatmap``: token heatmaps of images as PNG overlays.

    fxdecomp heatmap a.jpg b.jpg --subject timm:deit_tiny_patch16_224 --out maps/
    fxdecomp heatmap a.jpg --subject SPEC --clip ViT-B-32 --aligner al.safetensors \\
        --query "a red object" --layers -2 -1 --out maps/

The subject is decomposed in tokens mode (``--layers``: the residual blocks expanded per token;
everything before is one ``init`` term), every selected head's per-token contribution is
projected on the direction — the CLIP text embedding of ``--query`` (or the mean embedding of a
``--feature``'s descriptions) mapped per head through the aligner (``head_directions``), or the
image's own output direction when neither is given — and placed on the image by its
``TokenPosition``. Writes ``DIR/<image>.png`` (image with the heatmap over it) and
``DIR/heatmaps.json`` (per image: the peak cell, the special tokens' values, the total).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import torch

from fxdecomp.apply.heatmap import save_overlay, token_heatmap
from fxdecomp.errors import InputError

__all__ = ["add_subcommands", "cmd_heatmap"]


def _images(paths: Sequence[str]):
    from PIL import Image
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"image {p} does not exist")
        out.append(Image.open(p).convert("RGB"))
    return out


def _direction(args, session_like) -> torch.Tensor | None:
    """The CLIP-space direction: --query's text embedding or --feature's mean one."""
    from fxdecomp.interpret.cli import _parse_feature
    from fxdecomp.interpret.text import text_embeddings
    if not (args.query or args.feature):
        return None
    if args.query:
        descriptions = [args.query]
    else:
        descriptions = _parse_feature(args.feature)[1]
    model, _, tokenizer = session_like
    emb = text_embeddings(descriptions, model, tokenizer, templates=args.templates)
    d = emb.mean(0)
    return d / d.norm().clamp_min(1e-12)


def cmd_heatmap(args) -> dict:
    """Decompose the subject per token, project on the direction, write one PNG per image."""
    from fxdecomp import decompose
    from fxdecomp.capture.adapters import load_clip, load_model
    from fxdecomp.interpret.align import CompAlign
    from fxdecomp.interpret.cli import _subject_transform
    from fxdecomp.run.decomposition import Decomposition

    target, info = load_model(args.subject, random_init=args.random_init,
                              checkpoint=args.checkpoint, seed=args.seed, output=args.output)
    target.eval()
    transform = _subject_transform(target, info or {})
    images = _images(args.images)
    x = torch.stack([transform(im) for im in images])
    direction, aligner = None, None
    if args.query or args.feature:
        if not args.aligner:
            raise InputError("--query/--feature need --aligner (a CompAlign file from `fxdecomp "
                             "align`) to map the text direction into the subject's space")
        aligner = CompAlign.load(args.aligner)
        clip = load_clip(args.clip, random_init=args.random_init, checkpoint=args.clip_checkpoint,
                         seed=args.seed)
        clip[0].eval()
        with torch.no_grad():
            direction = _direction(args, clip)
    layers = [int(v) for v in args.layers] if args.layers else None
    dm = decompose(target, x[:1], granularity="tokens", layers=layers)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"subject": args.subject, "query": args.query, "feature": args.feature,
               "layers": dm.expanded_layers, "images": []}
    with torch.no_grad():
        for i, img in enumerate(images):
            d = dm(x[i:i + 1])
            if args.heads:
                wanted = set(args.heads)
                keep = [j for j, lab in enumerate(d.labels) if lab.kind != "attn_head_token"
                        or f"{lab.module}.h{lab.head}" in wanted or lab.module in wanted]
                d = Decomposition(d.output, d.components[keep], [d.labels[j] for j in keep])
            hm = token_heatmap(d, direction, aligner=aligner, layer=dm.expanded_layers)
            smooth = hm.upsampled("bilinear")[0]
            disp = img.resize((smooth.shape[1], smooth.shape[0]))
            name = Path(args.images[i]).stem
            title = f"{name}: " + (f"'{args.query}'" if args.query else
                                   f"feature {args.feature}" if args.feature else "output direction")
            png = save_overlay(disp, smooth, out_dir / f"{name}.png", title=title)
            finest = max(hm.grids, key=lambda g: g[0] * g[1])
            cell = int(hm.grids[finest][0].flatten().argmax())
            summary["images"].append({
                "image": str(args.images[i]), "png": str(png), "grid": list(finest),
                "peak_cell": list(divmod(cell, finest[1])),
                "special": {k: float(v[0]) for k, v in hm.special.items()},
                "total": float(hm.total()[0])})
            print(f"wrote {png}  peak cell {tuple(divmod(cell, finest[1]))} of {finest}")
    (out_dir / "heatmaps.json").write_text(json.dumps(summary, indent=1))
    return summary


def add_subcommands(subparsers) -> None:
    """Register ``heatmap`` on an argparse subparsers object."""
    from fxdecomp.interpret.text import TEMPLATE_SETS
    p = subparsers.add_parser("heatmap", help="token heatmaps of images (PNG overlays)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--subject", required=True, help='model spec, e.g. "timm:deit_tiny_patch16_224"')
    p.add_argument("--output", default=None, help="representation (see the adapters' output=)")
    p.add_argument("--random-init", action="store_true", help="seeded random weights (no download)")
    p.add_argument("--checkpoint", default=None, help="local state_dict of the subject")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", nargs="+", default=["-2", "-1"],
                   help="residual blocks expanded per token (default: the last two)")
    p.add_argument("--heads", nargs="+", default=None,
                   help="only these heads/blocks (e.g. blocks.11.attn.h3 blocks.10.attn)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--query", default=None, help="text whose CLIP direction to project on")
    q.add_argument("--feature", default=None,
                   help="preset feature or 'name=desc a,desc b' (mean text direction)")
    p.add_argument("--clip", default="ViT-B-32", help="open_clip model for the text")
    p.add_argument("--clip-checkpoint", default=None)
    p.add_argument("--aligner", default=None, help="CompAlign file (needed with --query/--feature)")
    p.add_argument("--templates", default="imagenet80",
                   help=f"prompt templates: {'/'.join(TEMPLATE_SETS)}")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_heatmap)
