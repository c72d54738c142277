"""Command line: ``retrieve``, property and text retrieval over an image folder.

    fxdecomp retrieve --images DIR --query-image DIR/a.png --feature color --k 5 --top 10
    fxdecomp retrieve --images DIR --query "a red object" --feature color --json out.json

Components of the subject's representation are computed over the images (the interpret
commands' session: ``fxdecomp.interpret.cli._Session``), aligned to CLIP (``--aligner FILE``,
``--identity``, or CompAlign fitted on the images with its defaults), scored for ``--feature``
and the ``--against`` features, and the top ``--k`` for the feature (score minus the max over
the others) are used for retrieval, side by side with the full representation.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fxdecomp.apply.retrieval import (SELECTION_RULES, property_retrieval, select_components,
                                      text_retrieval)
from fxdecomp.errors import InputError
from fxdecomp.interpret.align import MAX_STEPS, CompAlign
from fxdecomp.interpret.cli import (_Session, _common, _format_table, _label_name, _text_args,
                                    _write_outputs)
from fxdecomp.interpret.score import FEATURES, feature_descriptions, score_components

__all__ = ["add_subcommands", "cmd_retrieve", "DEFAULT_MODELS", "DEFAULT_AGAINST"]

#: Models used when no model argument is given: the ground-truth world's shipped subject and
#: tiny CLIP (fxdecomp.world; no download).
DEFAULT_MODELS = {"subject": "world:subject", "clip": "world", "random_init": False}
#: Features a component must not encode to be selected for ``--feature`` (minus itself).
DEFAULT_AGAINST = ("color", "shape", "texture", "pattern", "location")


def _parse_feature(spec: str) -> tuple[str, list[str]]:
    """'color' (a preset), 'name=desc a,desc b', or 'desc a,desc b'."""
    if "=" in spec:
        name, _, descs = spec.partition("=")
        return name.strip(), feature_descriptions([d.strip() for d in descs.split(",")
                                                   if d.strip()])
    if spec in FEATURES:
        return spec, feature_descriptions(spec)
    return spec, feature_descriptions([d.strip() for d in spec.split(",") if d.strip()])


def _apply_model_defaults(args) -> None:
    if args.subject is None:
        if args.clip is not None or args.subject_checkpoint:
            raise InputError("give --subject together with --clip / --subject-checkpoint")
        args.subject, args.clip = DEFAULT_MODELS["subject"], DEFAULT_MODELS["clip"]
        args.random_init = args.random_init or DEFAULT_MODELS["random_init"]
    elif args.clip is None:
        args.clip = DEFAULT_MODELS["clip"]


def _query_index(session: _Session, query_image: str) -> int:
    """Index of the query image among the session's images, appending it if it is not one."""
    names = session.image_names
    if query_image in names:
        return names.index(query_image)
    path = Path(query_image)
    if session.args.images and path.is_file():
        folder = Path(session.args.images).resolve()
        try:
            rel = str(path.resolve().relative_to(folder))
        except ValueError:
            rel = None
        if rel in names:
            return names.index(rel)
    if not path.is_file():
        raise InputError(f"--query-image {query_image!r} is neither a file nor one of the "
                         f"{len(names)} image names (e.g. {names[:3]})")
    from PIL import Image
    session.images.append(Image.open(path).convert("RGB"))
    names.append(str(path))
    return len(names) - 1


def cmd_retrieve(args) -> dict:
    """Rank images by the top-k components for a feature, and by the full representation."""
    from tqdm.auto import tqdm
    if (args.query_image is None) == (args.query is None):
        raise InputError("give exactly one of --query-image FILE and --query TEXT")
    _apply_model_defaults(args)
    bar = tqdm(total=5, desc="retrieve", unit="stage", disable=args.no_progress)
    s = _Session(args)
    q = _query_index(s, args.query_image) if args.query_image is not None else None
    bar.set_postfix_str("components")
    comps, labels = s.components()
    bar.update(1)
    bar.set_postfix_str("alignment")
    if args.aligner or args.identity:
        al = s.aligner(labels, comps.shape[-1])
        fitted = None
    else:
        targets = s.clip_image_embeddings()
        al = CompAlign(labels, comps.shape[-1], targets.shape[-1], subject=s.subject_id,
                       clip_model=s.clip_id, seed=args.seed)
        al.fit(comps, targets, max_steps=args.align_steps, progress=not args.no_progress,
               seed=args.seed)
        fitted = al.mean_cosine(comps, targets)
    with torch.no_grad():
        aligned = al(comps)
    bar.update(1)
    bar.set_postfix_str("scores")
    fname, descs = _parse_feature(args.feature)
    against = [f for f in (args.against.split(",") if args.against else DEFAULT_AGAINST)
               if f.strip() and f.strip() != fname]
    if not against:
        raise InputError("--against must name at least one feature other than --feature")
    features = dict([(fname, descs)] + [_parse_feature(f.strip()) for f in against])
    scores = {f: score_components(aligned, s.text(d)) for f, d in features.items()}
    k = min(args.k, len(labels))
    selected = select_components(scores, fname, k, rule=args.rank)
    bar.update(1)
    bar.set_postfix_str("retrieval")
    top = min(args.top, len(s.images) - (q is not None))
    if top < 1:
        raise InputError("need at least two images to retrieve from")
    if q is not None:
        rankings = {"top_components": property_retrieval(comps, [q], selected, top=top),
                    "full_representation": property_retrieval(comps, [q], None, top=top)}
        rankings = {m: (i[0], v[0]) for m, (i, v) in rankings.items()}
        score_name = "cosine"
    else:
        text = s.text([args.query])[0]
        rankings = {"top_components": text_retrieval(aligned, text, selected, top=top),
                    "full_representation": text_retrieval(aligned, text, None, top=top)}
        score_name = "projection"
    bar.update(2)
    bar.close()
    names = [_label_name(l) for l in labels]
    payload = {
        "query": args.query if q is None else s.image_names[q],
        "query_kind": "text" if q is None else "image",
        "feature": fname, "descriptions": descs, "against": list(features)[1:], "k": k,
        "rank": args.rank,
        "components": [names[i] for i in selected.tolist()],
        "component_scores": [float(scores[fname][i]) for i in selected.tolist()],
        "subject": s.subject_id, "clip_model": s.clip_id,
        "aligner": args.aligner or ("identity" if args.identity else "fitted"),
        "alignment_cos_all_images": fitted, "score": score_name,
        "results": {m: {"files": [s.image_names[i] for i in idx.tolist()],
                        "scores": [float(v) for v in val]}
                    for m, (idx, val) in rankings.items()},
    }
    print(f"query {payload['query']!r}; feature {fname!r}: top {k} components "
          f"{payload['components']}")
    rows = [{"rank": r + 1,
             "top_components": payload["results"]["top_components"]["files"][r],
             score_name: payload["results"]["top_components"]["scores"][r],
             "full_representation": payload["results"]["full_representation"]["files"][r],
             f"{score_name} (full)": payload["results"]["full_representation"]["scores"][r]}
            for r in range(top)]
    print(_format_table(rows, list(rows[0])))
    _write_outputs(args, [], payload)          # --json
    return payload


def add_subcommands(subparsers) -> None:
    """Register ``retrieve`` on an argparse subparsers object."""
    p = subparsers.add_parser("retrieve", help="retrieve images by the components that encode "
                                               "a feature (image or text query)",
                              description=cmd_retrieve.__doc__)
    _common(p)
    _text_args(p)
    p.set_defaults(clip=None)
    q = p.add_argument_group("query")
    q.add_argument("--query-image", default=None,
                   help="query image: a file (in the folder or not) or an image name")
    q.add_argument("--query", default=None, help="text query (ranked on the aligned sum)")
    q.add_argument("--feature", default="color",
                   help=f"preset ({', '.join(FEATURES)}), 'name=desc a,desc b' or "
                        "'desc a,desc b' (default color)")
    q.add_argument("--against", default=None,
                   help="comma list of the other features (default: "
                        f"{','.join(DEFAULT_AGAINST)})")
    q.add_argument("--k", type=int, default=5, help="components selected for the feature")
    q.add_argument("--rank", choices=SELECTION_RULES, default="margin",
                   help="how components are selected: margin (default, the paper's: score for "
                        "the feature minus the max over --against) or score (the feature's own)")
    q.add_argument("--top", type=int, default=10, help="images retrieved")
    q.add_argument("--align-steps", type=int, default=MAX_STEPS,
                   help="without --aligner: at most this many CompAlign refinement steps after "
                        f"its closed-form warm start (default {MAX_STEPS}, CompAlign's; it stops "
                        "on convergence first; 0: warm start only)")
    q.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_retrieve)
