"""`fxdecomp retrieve`: image and text queries over a folder, with explicit random-init models.

The full-representation ranking is checked against an independent computation: cosine
similarities of the subject's own outputs (components sum to the output, so the rankings agree).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fxdecomp.cli import build_parser, main, run

SUBJECT = "timm:deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from fxdecomp.interpret.cli import synthetic_images
    d = tmp_path_factory.mktemp("images")
    for i, im in enumerate(synthetic_images(8, size=224, seed=3)):
        im.save(d / f"img{i}.png")
    return d


def _common(folder):
    return ["retrieve", "--subject", SUBJECT, "--clip", "ViT-B-32", "--random-init",
            "--images", str(folder), "--templates", "single", "--align-steps", "0", "--k", "3",
            "--top", "4", "--no-progress", "--against", "shape,texture"]


def test_retrieve_image_query_ranks_like_the_subjects_own_output(folder, tmp_path):
    out = tmp_path / "r.json"
    assert main(_common(folder) + ["--query-image", str(folder / "img2.png"),
                                   "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["query"] == "img2.png" and r["query_kind"] == "image" and len(r["components"]) == 3
    for method in ("top_components", "full_representation"):
        files, scores = r["results"][method]["files"], r["results"][method]["scores"]
        assert len(files) == 4 and "img2.png" not in files and scores == sorted(scores)[::-1]
    # independent reference: the subject's output on the same pixels
    from fxdecomp.capture.adapters import load_model
    from fxdecomp.interpret.cli import _pixels, _subject_transform, load_images
    target, info = load_model(SUBJECT, random_init=True, seed=0)
    images, names = load_images(folder)
    with torch.no_grad():
        rep = target.eval()(_pixels(images, _subject_transform(target, info or {})))
    sims = torch.nn.functional.normalize(rep, dim=-1) @ torch.nn.functional.normalize(rep, dim=-1)[2]
    sims[2] = -2
    order = [names[i] for i in sims.argsort(descending=True)[:4].tolist()]
    assert r["results"]["full_representation"]["files"] == order
    np.testing.assert_allclose(r["results"]["full_representation"]["scores"],
                               sims.sort(descending=True).values[:4].numpy(), rtol=1e-4)


def test_retrieve_text_query_and_bad_arguments(folder, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(_common(folder) + ["--query", "red color", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["query_kind"] == "text" and r["score"] == "projection"
    assert len(r["results"]["top_components"]["files"]) == 4 and r["rank"] == "margin"
    # --rank score: the k best color scores, in order (at least as high as the margin's picks)
    out2 = tmp_path / "t2.json"
    assert main(_common(folder) + ["--query", "red color", "--rank", "score",
                                   "--json", str(out2)]) == 0
    r2 = json.loads(out2.read_text())
    assert r2["rank"] == "score" and r2["component_scores"] == sorted(r2["component_scores"])[::-1]
    passed_over = [sc for c, sc in zip(r["components"], r["component_scores"])
                   if c not in r2["components"]]
    assert all(min(r2["component_scores"]) >= sc for sc in passed_over)
    with pytest.raises(Exception, match="exactly one of --query-image"):
        run(_common(folder))
    with pytest.raises(Exception, match="neither a file nor one of the 8 image names"):
        run(_common(folder) + ["--query-image", "nope.png"])
    args = build_parser().parse_args(["retrieve", "--query", "x"])     # default models
    assert args.subject is None and args.clip is None
