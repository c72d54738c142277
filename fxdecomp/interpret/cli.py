"""Command line: ``align``, ``rank`` and ``describe`` subcommands for the fxdecomp CLI.

``add_subcommands(subparsers)`` registers them on an argparse subparsers object; each sets
``func`` (call ``args.func(args)``). Standalone: ``python -m fxdecomp.interpret.cli ...``.

    fxdecomp align --subject timm:deit_tiny_patch16_224 --clip ViT-B-32 --images DIR --out al.safetensors
    fxdecomp rank --subject timm:deit_tiny_patch16_224 --aligner al.safetensors --feature color --synthetic 64
    fxdecomp describe blocks.11.attn.h2 --subject ... --aligner al.safetensors --k 5

The subject's components come from the decomposition engine (``fxdecomp.decompose(model,
example, granularity="heads")``) and the models from ``fxdecomp.capture.adapters``
(``load_model``, ``load_clip``); these are imported when a command runs, not at import time.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fxdecomp.errors import FxDecompError, InputError, one_line
from fxdecomp.interpret.align import MAX_STEPS, CompAlign
from fxdecomp.interpret.describe import default_text_pool, describe_component, load_text_pool
from fxdecomp.interpret.score import (FEATURES, feature_descriptions, retrieval_scores,
                                      score_components, score_components_invariant,
                                      variance_explained)
from fxdecomp.interpret.text import TEMPLATE_SETS, text_embeddings

__all__ = ["add_subcommands", "main", "synthetic_images", "load_images"]

_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------- engine seam
def _engine():
    """(decompose, load_model, load_clip) from the engine; a clear error if it is not there."""
    try:
        from fxdecomp import decompose
        from fxdecomp.capture.adapters import load_clip, load_model
    except ImportError as err:
        raise FxDecompError(
            "the interpret commands need the decomposition engine (fxdecomp.decompose and "
            f"fxdecomp.capture.adapters.load_model/load_clip), which could not be imported: {err}"
        ) from err
    return decompose, load_model, load_clip


def _model_id(spec: str, random_init: bool, checkpoint: str | None, seed: int) -> str:
    """A readable id that changes whenever the weights do (recorded in and checked on aligners)."""
    out = spec
    if checkpoint:
        out += f"@{Path(checkpoint).name}"
    if random_init:
        out += f"#random-init-seed{seed}"
    return out


# ---------------------------------------------------------------------------- images
def synthetic_images(n: int, size: int = 224, seed: int = 0) -> list:
    """n seeded random pattern images (stripes, checkers, discs, gradients, blobs) as PIL RGB."""
    from PIL import Image
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        c1, c2 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        kind = i % 5
        if kind == 0:                                               # stripes at a random angle
            a, f = rng.uniform(0, np.pi), rng.uniform(3, 20)
            m = (np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a))) > 0)
        elif kind == 1:                                             # checkerboard
            k = rng.integers(2, 16)
            m = ((np.floor(xx * k) + np.floor(yy * k)) % 2) == 0
        elif kind == 2:                                             # random discs
            m = np.zeros((size, size), bool)
            for _ in range(rng.integers(1, 8)):
                cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
                m |= (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        elif kind == 3:                                             # linear gradient
            a = rng.uniform(0, 2 * np.pi)
            t = (xx * np.cos(a) + yy * np.sin(a))
            m = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        else:                                                       # smooth random blobs
            low = rng.uniform(0, 1, (8, 8))
            m = np.kron(low, np.ones((size // 8 + 1, size // 8 + 1)))[:size, :size]
        m = np.asarray(m, np.float32)[..., None]
        img = m * c1 + (1 - m) * c2 + rng.normal(0, 0.03, (size, size, 3))
        images.append(Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB"))
    return images


def load_images(folder: str | Path, limit: int | None = None) -> tuple[list, list[str]]:
    """RGB PIL images of a folder (sorted, recursive), and their relative paths."""
    from PIL import Image
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXTS)
    if limit:
        files = files[:limit]
    if not files:
        raise InputError(f"no images ({', '.join(sorted(_IMAGE_EXTS))}) under {folder}")
    return [Image.open(p).convert("RGB") for p in files], [str(p.relative_to(folder))
                                                            for p in files]


def _to_tensor(size: int, mean, std) -> Callable:
    """PIL -> [3, size, size] float: resize the shorter side (bicubic), centre crop, normalise."""
    from PIL import Image
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)

    def apply(img):
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)
        return (x - mean_t) / std_t

    return apply


def _subject_transform(target, info: dict) -> Callable:
    """The subject's PIL -> tensor transform: ``info["preprocess"]``, else ``info["data_config"]``
    or ``info``'s input_size/mean/std, else timm's config of the model, else 224 + ImageNet."""
    if callable(info.get("preprocess")):
        return info["preprocess"]
    cfg = dict(info.get("data_config") or {})
    if not cfg and any(k in info for k in ("input_size", "mean", "std")):
        cfg = {k: info[k] for k in ("input_size", "mean", "std") if k in info}
    if not cfg and hasattr(target, "pretrained_cfg"):
        try:
            import timm.data
            cfg = timm.data.resolve_data_config(model=target)
        except Exception:                                           # pragma: no cover
            cfg = {}
    size = cfg.get("input_size", 224)
    size = size[-1] if isinstance(size, (tuple, list)) else int(size)
    return _to_tensor(size, cfg.get("mean", _IMAGENET_MEAN), cfg.get("std", _IMAGENET_STD))


def _clip_transform(clip_model, preprocess) -> Callable:
    if callable(preprocess):
        return preprocess
    size = getattr(getattr(clip_model, "visual", None), "image_size", 224)
    size = size[-1] if isinstance(size, (tuple, list)) else int(size)
    return _to_tensor(size, _CLIP_MEAN, _CLIP_STD)


def _pixels(images, transform) -> torch.Tensor:
    return torch.stack([transform(im) for im in images])


# ---------------------------------------------------------------------------- pipeline pieces
class _Session:
    """Lazily built models, images and components shared by one command."""

    def __init__(self, args):
        self.args = args
        self.decompose, self.load_model, self.load_clip = _engine()
        self.store = None
        if getattr(args, "store", None):         # components (and CLIP targets) read, not computed
            from fxdecomp.store import open_store
            self.store = open_store(args.store)
            self.images, self.image_names = None, list(self.store.ids)
            if args.subject and args.subject != self.store.model["spec"]:
                raise InputError(f"--subject {args.subject} but store {args.store} holds "
                                 f"components of {self.store.model['spec']} (drop --subject)")
        elif not args.subject:
            raise InputError("give --subject SPEC (the model to decompose) or --store PATH")
        elif args.images:
            self.images, self.image_names = load_images(args.images, args.limit)
        else:
            n = args.synthetic or 32
            self.images = synthetic_images(n, seed=args.seed)
            self.image_names = [f"synthetic_{i:05d}" for i in range(n)]
        self.subject_id = (self.store.model["id"] if self.store is not None else
                           _model_id(args.subject, args.random_init, args.subject_checkpoint,
                                     args.seed))
        self.clip_id = _model_id(f"open_clip:{args.clip}", args.random_init,
                                 args.clip_checkpoint, args.seed)
        self._clip = None

    @property
    def n_images(self) -> int:
        return len(self.image_names)

    def components(self) -> tuple[torch.Tensor, list]:
        """Components [C, N, d] of the subject's representation over all images, and labels."""
        a = self.args
        if self.store is not None:
            comps, labels = self.store.tensor().float(), list(self.store.labels)
            if comps.ndim != 3:
                raise InputError(f"the interpret commands need [C, N, d] components (a pooled "
                                 f"representation); store {a.store} holds {tuple(comps.shape)}")
            if a.from_layer is not None:
                comps, labels = _merge_before(comps, labels, a.from_layer)
            return comps, labels
        target, info = self.load_model(a.subject, random_init=a.random_init,
                                       checkpoint=a.subject_checkpoint, seed=a.seed)
        target.eval()
        transform = _subject_transform(target, info or {})
        bs = a.batch_size
        example = _pixels(self.images[:bs], transform)
        dm = self.decompose(target, example, granularity="heads")
        chunks, labels = [], None
        with torch.no_grad():
            for s in range(0, len(self.images), bs):
                d = dm(_pixels(self.images[s:s + bs], transform))
                comps = d.components.detach().float().cpu()
                if comps.ndim != 3:
                    raise InputError(f"the interpret commands need [C, B, d] components (a "
                                     f"pooled representation), got {tuple(comps.shape)}")
                chunks.append(comps)
                labels = labels or list(d.labels)
        comps = torch.cat(chunks, 1)
        if a.from_layer is not None:
            comps, labels = _merge_before(comps, labels, a.from_layer)
        return comps, labels

    def clip(self):
        if self._clip is None:
            a = self.args
            self._clip = self.load_clip(a.clip, random_init=a.random_init,
                                        checkpoint=a.clip_checkpoint, seed=a.seed)
            self._clip[0].eval()
        return self._clip

    def clip_image_embeddings(self) -> torch.Tensor:
        if self.store is not None:
            stored = self.store.clip
            if stored is None:
                raise InputError(f"store {self.args.store} has no CLIP image embeddings; extract "
                                 f"it with --clip {self.args.clip}")
            if stored["id"] != self.clip_id:
                raise InputError(f"store {self.args.store} holds image embeddings of "
                                 f"{stored['id']}, this command uses {self.clip_id} (--clip, "
                                 "--random-init, --clip-checkpoint must match the extraction)")
            return self.store.targets().float()
        model, preprocess, _ = self.clip()
        transform = _clip_transform(model, preprocess)
        out = []
        with torch.no_grad():
            for s in range(0, len(self.images), self.args.batch_size):
                out.append(model.encode_image(_pixels(self.images[s:s + self.args.batch_size],
                                                      transform)).float().cpu())
        return torch.cat(out)

    def text(self, descriptions: Sequence[str]) -> torch.Tensor:
        model, _, tokenizer = self.clip()
        return text_embeddings(descriptions, model, tokenizer, templates=self.args.templates,
                               model_id=self.clip_id)

    def aligner(self, labels, d_model: int) -> CompAlign:
        a = self.args
        if getattr(a, "aligner", None):
            return CompAlign.load(a.aligner, labels=labels, subject=self.subject_id,
                                  clip_model=self.clip_id)
        if getattr(a, "identity", False):
            return _identity_aligner(self, labels, d_model)
        raise InputError("give --aligner PATH (from `align`), or --identity for a CLIP subject")


def _merge_before(comps: torch.Tensor, labels: list, layer: int):
    """Sum every component joining before block ``layer`` (or with no layer) into one."""
    keep = [i for i, l in enumerate(labels) if getattr(l, "layer", None) is not None
            and l.layer >= layer]
    rest = [i for i in range(len(labels)) if i not in set(keep)]
    if not rest:
        return comps, labels
    from fxdecomp.run.decomposition import ComponentLabel
    merged = comps[rest].sum(0, keepdim=True)
    label = ComponentLabel(name=f"before_layer_{layer}", module="", kind="other")
    return torch.cat([merged, comps[keep]]), [label] + [labels[i] for i in keep]


def _identity_aligner(session: _Session, labels, d_model: int) -> CompAlign:
    model = session.clip()[0]
    e = getattr(model.visual, "output_dim", None)
    proj = getattr(model.visual, "proj", None)
    if e == d_model:                    # components already in the embedding space
        return CompAlign.identity_from_projection(labels, None, d_model,
                                                  subject=session.subject_id,
                                                  clip_model=session.clip_id)
    if proj is None or tuple(proj.shape) != (d_model, e):
        raise InputError(f"--identity: components have d={d_model}, but CLIP embeds in {e} "
                         f"dims and its projection is "
                         f"{None if proj is None else tuple(proj.shape)}; is the subject this "
                         "CLIP model's image tower?")
    return CompAlign.identity_from_projection(labels, proj.detach().float(),
                                              subject=session.subject_id,
                                              clip_model=session.clip_id)


def _label_name(label) -> str:
    return label if isinstance(label, str) else label.name


# ---------------------------------------------------------------------------- output helpers
def _format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[j]) for row in cells]) for j, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if j else v.ljust(w)
                                  for j, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _write_outputs(args, rows: list[dict], payload: dict) -> None:
    if getattr(args, "csv", None) and rows:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    if getattr(args, "json", None):
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")


# ---------------------------------------------------------------------------- commands
def cmd_align(args) -> CompAlign:
    """Decompose the subject over the images, fit CompAlign to CLIP's image embeddings, save."""
    s = _Session(args)
    comps, labels = s.components()
    if args.identity:
        al = _identity_aligner(s, labels, comps.shape[-1])
    else:
        targets = s.clip_image_embeddings()
        al = CompAlign(labels, comps.shape[-1], targets.shape[-1], subject=s.subject_id,
                       clip_model=s.clip_id, seed=args.seed)
        al.fit(comps, targets, lam=args.lam, warm_start=args.warm_start, ridge=args.ridge,
               lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
               max_steps=args.max_steps, batch_size=args.train_batch_size,
               patience=args.patience, rel_tol=args.rel_tol, val_fraction=args.val_fraction,
               seed=args.seed, progress=not args.no_progress)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(al.total(comps), targets, dim=-1)
        al.stats["mean_cos_all_images"] = float(cos.mean())
    al.save(args.out)
    rows = [{"key": k, "value": v} for k, v in al.stats.items()]
    print(f"CompAlign {s.subject_id} -> {s.clip_id}: {al.n_components} components, "
          f"d_model={al.d_model}, d_clip={al.d_clip}, {s.n_images} images")
    print(_format_table(rows, ["key", "value"]))
    print(f"saved {args.out}")
    _write_outputs(args, rows, {"aligner": str(args.out), **al.metadata()})
    return al


def _parse_feature(spec: str) -> tuple[str, list[str]]:
    """'color' (a preset) or 'name=desc one,desc two'."""
    if "=" in spec:
        name, _, descs = spec.partition("=")
        return name.strip(), feature_descriptions([d.strip() for d in descs.split(",") if d.strip()])
    return spec, feature_descriptions(spec)


def cmd_rank(args) -> list[dict]:
    """Score every component for each feature; print the top ones, write all as CSV/JSON."""
    s = _Session(args)
    comps, labels = s.components()
    al = s.aligner(labels, comps.shape[-1])
    with torch.no_grad():
        aligned = al(comps)
    features = [_parse_feature(f) for f in (args.feature or ["color"])]
    names = [_label_name(l) for l in labels]
    per_feature = {}
    for fname, descs in features:
        text = s.text(descs)
        per_feature[fname] = {"score": score_components(aligned, text),
                              "invariant": score_components_invariant(aligned, text),
                              "var_explained": variance_explained(aligned, text)}
    retrieval = (retrieval_scores({f: v["score"] for f, v in per_feature.items()})
                 if len(per_feature) > 1 else None)
    rows = []
    for fname, sc in per_feature.items():
        order = torch.argsort(sc["score"], descending=True).tolist()
        for rank, i in enumerate(order, 1):
            row = {"feature": fname, "rank": rank, "component": names[i],
                   "score": float(sc["score"][i]), "invariant": float(sc["invariant"][i]),
                   "var_explained": float(sc["var_explained"][i])}
            if retrieval is not None:
                row["score_minus_max_other"] = float(retrieval[fname][i])
            rows.append(row)
    cols = list(rows[0])
    for fname, _ in features:
        print(f"\nfeature {fname!r} ({len(dict(features)[fname])} descriptions), "
              f"top {args.top} of {len(names)} components, {s.n_images} images")
        print(_format_table([r for r in rows if r["feature"] == fname][:args.top], cols[1:]))
    _write_outputs(args, rows, {"subject": s.subject_id, "clip_model": s.clip_id,
                                "features": dict(features), "n_images": s.n_images,
                                "rows": rows})
    return rows


def cmd_describe(args) -> dict:
    """Pick the k pool descriptions that explain most of one component's aligned variance."""
    s = _Session(args)
    comps, labels = s.components()
    al = s.aligner(labels, comps.shape[-1])
    names = [_label_name(l) for l in labels]
    if args.component in names:
        idx = names.index(args.component)
    elif args.component.lstrip("-").isdigit() and -len(names) <= int(args.component) < len(names):
        idx = int(args.component) % len(names)
    else:
        close = [n for n in names if args.component in n][:8]
        raise InputError(f"no component {args.component!r}; "
                         f"{'similar: ' + str(close) if close else 'some names: ' + str(names[:8])}")
    pool = load_text_pool(args.pool) if args.pool else default_text_pool()
    with torch.no_grad():
        aligned = al(comps[idx:idx + 1], indices=[idx])[0]
    result = describe_component(aligned, s.text(pool), pool, k=args.k, rank=args.pca_rank,
                                name=names[idx])
    print(result.table())
    rows = [{"component": names[idx], "step": j + 1, "description": d, "gain": g,
             "cumulative": c} for j, (d, g, c) in enumerate(zip(result.descriptions,
                                                                result.gains, result.cumulative))]
    _write_outputs(args, rows, {"subject": s.subject_id, "clip_model": s.clip_id,
                                "pool_size": len(pool), **result.to_dict()})
    return result.to_dict()


# ---------------------------------------------------------------------------- argparse
def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--subject", default=None,
                   help='subject model spec, e.g. "timm:deit_tiny_patch16_224" (not with --store)')
    g.add_argument("--clip", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    g.add_argument("--random-init", action="store_true",
                   help="random weights for subject and CLIP (no download; for testing)")
    g.add_argument("--subject-checkpoint", default=None)
    g.add_argument("--clip-checkpoint", default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--from-layer", type=int, default=None,
                   help="merge every component joining before this block into one")
    d = p.add_argument_group("images")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--images", default=None, help="folder of images")
    src.add_argument("--synthetic", type=int, default=None,
                     help="N seeded synthetic pattern images (default 32 when no --images)")
    src.add_argument("--store", default=None,
                     help="component store from `fxdecomp extract` (with --clip for align): "
                          "the components are read, nothing is decomposed")
    d.add_argument("--limit", type=int, default=None, help="use at most this many images")
    d.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    o = p.add_argument_group("output")
    o.add_argument("--csv", default=None, help="write the table as CSV")
    o.add_argument("--json", default=None, help="write the results as JSON")


def _text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--templates", default="imagenet80",
                   help=f"prompt templates: {'/'.join(TEMPLATE_SETS)} (default imagenet80)")
    p.add_argument("--aligner", default=None, help="CompAlign file written by `align`")
    p.add_argument("--identity", action="store_true",
                   help="the subject is the CLIP image tower: use its own projection")


def add_subcommands(subparsers) -> None:
    """Register ``align``, ``rank`` and ``describe`` on an argparse subparsers object."""
    p = subparsers.add_parser("align", help="train CompAlign maps from components to CLIP space",
                              description=cmd_align.__doc__)
    _common(p)
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--identity", action="store_true",
                   help="the subject is the CLIP image tower: save its projection, no training")
    p.add_argument("--epochs", type=int, default=None,
                   help="at most this many passes (default: until converged or --max-steps)")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS,
                   help=f"at most this many refinement batches (default {MAX_STEPS}; it stops on "
                        "convergence first; 0: warm start only)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lam", type=float, default=1.0, help="orthogonality penalty weight")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--train-batch-size", type=int, default=256)
    p.add_argument("--patience", type=int, default=50,
                   help="stop after N batches without relative improvement > --rel-tol")
    p.add_argument("--rel-tol", type=float, default=1e-3)
    p.add_argument("--val-fraction", type=float, default=None,
                   help="hold out this share of images for choosing the ridge and early "
                        "stopping (default 0.1 from 50 images on, else the running loss)")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                   help="skip the closed-form ridge warm start (the paper's setting: "
                        "--no-warm-start --epochs 2 --lr 3e-4 --train-batch-size 32 "
                        "--rel-tol 0 --val-fraction 0)")
    p.add_argument("--ridge", type=float, default=None,
                   help="relative ridge of the warm start (default: chosen on held-out images)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_align)

    p = subparsers.add_parser("rank", help="rank components by how much they encode a feature",
                              description=cmd_rank.__doc__)
    _common(p)
    _text_args(p)
    p.add_argument("--feature", action="append", default=None,
                   help=f"preset ({', '.join(FEATURES)}) or 'name=desc a,desc b'; repeatable")
    p.add_argument("--top", type=int, default=10)
    p.set_defaults(func=cmd_rank)

    p = subparsers.add_parser("describe", help="TextSpan descriptions of one component",
                              description=cmd_describe.__doc__)
    _common(p)
    _text_args(p)
    p.add_argument("component", help="component name (or index)")
    p.add_argument("--k", type=int, default=5, help="number of descriptions")
    p.add_argument("--pool", default=None, help="text pool (.json or one description a line)")
    p.add_argument("--pca-rank", type=int, default=None,
                   help="project texts on the component's top principal directions first")
    p.set_defaults(func=cmd_describe)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxdecomp-interpret", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except FxDecompError as err:  # one clear line, no traceback
        print(f"fxdecomp-interpret: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
