"""``fxdecomp ablate``: remove the components that carry a spurious feature, measure per group.

    fxdecomp ablate --subject SPEC --clip ViT-B-32 --aligner al.safetensors --images DIR \\
        --labels labels.csv --spurious location --core animal --k 10 --json out.json

``labels.csv`` has a header and one row per image: ``file`` (path relative to ``--images``),
``label`` (class), ``group`` (e.g. class × background) and optionally ``split``
(``train``/``test``); ``--label-column`` / ``--group-columns`` pick other columns (the world's
``labels.csv``: ``--label-column angular --group-columns angular background``). Components (heads mode) are computed over every image; each
component is scored for the spurious and the core feature (``score_components`` on the aligned
components of the reference images) and the top-k by score_spurious − score_core are
mean-ablated (means over the reference images). A logistic-regression head is fitted on the
reference images' full representation and evaluated on the test images before and after.
Reference = the ``train`` rows, test = the ``test`` rows; without a split column both are all
images (then the numbers are in-sample, and the output says so).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import torch

from fxdecomp.apply.ablate import ablate_spurious
from fxdecomp.errors import InputError

__all__ = ["add_subcommands", "cmd_ablate", "read_labels"]


def read_labels(path: str | Path, names: list[str], label_column: str = "label",
                group_columns: Sequence[str] = ("group",), images_dir: str | Path | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(labels [N], groups [N], splits [N]) for the image ``names`` (paths relative to
    ``images_dir``) from the CSV. Rows are matched on ``file`` as given or relative to the CSV's
    folder (``fxdecomp world`` writes ``images/NNN.png``). Values of the label column and the
    group columns may be any strings: labels are numbered in sorted order of their values (ints
    by value), groups by the sorted tuples of the group columns' values."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels file {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"file", label_column, *group_columns}
    if not rows or not need <= set(rows[0]):
        raise InputError(f"{path} needs a header with columns {sorted(need)} (+ optional split); "
                         f"got {sorted(rows[0]) if rows else 'no rows'}")
    by_file = {r["file"]: r for r in rows}
    base = Path(images_dir).resolve() if images_dir is not None else None

    def row_of(name: str):
        if name in by_file:
            return by_file[name]
        if base is not None:
            try:
                rel = (base / name).relative_to(path.parent.resolve()).as_posix()
            except ValueError:
                return None
            return by_file.get(rel)
        return None

    found = [row_of(n) for n in names]
    missing = [n for n, r in zip(names, found) if r is None]
    if missing:
        raise InputError(f"{len(missing)} images have no row in {path}, e.g. {missing[:3]}")

    def numbered(values: list) -> torch.Tensor:
        key = lambda v: (0, int(v), "") if str(v).lstrip("-").isdigit() else (1, 0, str(v))  # noqa: E731
        index = {v: i for i, v in enumerate(sorted(set(values), key=key))}
        return torch.tensor([index[v] for v in values])

    labels = numbered([r[label_column] for r in found])
    groups = numbered([tuple(r[c] for c in group_columns) if len(group_columns) > 1
                       else r[group_columns[0]] for r in found])
    splits = [(r.get("split") or "").strip().lower() for r in found]
    return labels, groups, splits


def cmd_ablate(args) -> dict:
    """Mean-ablate the top-k spurious components; worst-group accuracy before and after."""
    from fxdecomp.interpret.cli import (_format_table, _label_name, _parse_feature, _Session,
                                        _write_outputs)
    from fxdecomp.interpret.score import score_components

    if not args.images:
        raise InputError("ablate needs --images DIR and --labels CSV (labels and groups per image)")
    s = _Session(args)
    labels, groups, splits = read_labels(args.labels, s.image_names, args.label_column,
                                         args.group_columns, args.images)
    comps, comp_labels = s.components()
    al = s.aligner(comp_labels, comps.shape[-1])
    has_split = any(splits)
    train = torch.tensor([sp == "train" for sp in splits]) if has_split else torch.ones(len(splits), dtype=torch.bool)
    test = torch.tensor([sp == "test" for sp in splits]) if has_split else torch.ones(len(splits), dtype=torch.bool)
    if not bool(train.any()) or not bool(test.any()):
        raise InputError("the split column must mark some rows 'train' and some 'test'")
    with torch.no_grad():
        aligned = al(comps[:, train])
    scores = {}
    for role, spec in (("spurious", args.spurious), ("core", args.core)):
        name, descs = _parse_feature(spec)
        scores[role] = score_components(aligned, s.text(descs))
    names = [_label_name(l) for l in comp_labels]
    res = ablate_spurious(comps[:, test], labels[test], groups[test],
                          score_spurious=scores["spurious"], score_core=scores["core"], k=args.k,
                          reference=comps[:, train], reference_labels=labels[train], names=names)
    summary = res.summary()
    summary.update({"in_sample": not has_split, "n_reference": int(train.sum()),
                    "n_test": int(test.sum()), "spurious_feature": args.spurious,
                    "core_feature": args.core,
                    "per_group_before": res.before["per_group"],
                    "per_group_after": res.after["per_group"]})
    rows = [{"": "before", "worst_group": res.before["worst_group"],
             "mean_group": res.before["mean_group"], "accuracy": res.before["accuracy"]},
            {"": "after", "worst_group": res.after["worst_group"],
             "mean_group": res.after["mean_group"], "accuracy": res.after["accuracy"]}]
    print(f"removed k={res.k}: {', '.join(summary['removed'])}")
    print(_format_table(rows, ["", "worst_group", "mean_group", "accuracy"]))
    if not has_split:
        print("note: no split column; head, means and evaluation all use every image (in-sample)")
    _write_outputs(args, [], summary)          # --json
    return summary


def add_subcommands(subparsers) -> None:
    """Register ``ablate`` on an argparse subparsers object."""
    from fxdecomp.interpret.cli import _common, _text_args
    p = subparsers.add_parser("ablate", help="mean-ablate the top-k spurious components; "
                                             "worst-group accuracy before/after",
                              description=cmd_ablate.__doc__)
    _common(p)
    _text_args(p)
    p.add_argument("--labels", required=True, help="CSV: file,label,group[,split]")
    p.add_argument("--label-column", default="label",
                   help="CSV column with the class (default label; e.g. angular for the world)")
    p.add_argument("--group-columns", nargs="+", default=["group"],
                   help="CSV column(s) whose values form the groups (default group; e.g. "
                        "angular background)")
    p.add_argument("--spurious", required=True, help="spurious feature (preset or 'name=a,b')")
    p.add_argument("--core", required=True, help="core feature (preset or 'name=a,b')")
    p.add_argument("--k", type=int, default=10, help="components to remove (default 10)")
    p.set_defaults(func=cmd_ablate)
