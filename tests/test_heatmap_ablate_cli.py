"""The ``heatmap`` and ``ablate`` verbs end to end on small random-weight models."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fxdecomp.cli import main


SUBJECT = "world:subject"      # the world's tiny 64 px conv-stem ViT, here with seeded random weights


def _square(path, top, left, size=64):
    a = np.full((size, size, 3), 110, np.uint8)
    a[top:top + 16, left:left + 16] = (220, 30, 30)
    Image.fromarray(a).save(path)


def test_heatmap_verb_writes_overlays(tmp_path):
    _square(tmp_path / "a.png", 8, 40)
    _square(tmp_path / "b.png", 40, 4)
    out = tmp_path / "maps"
    assert main(["heatmap", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--subject",
                 SUBJECT, "--random-init", "--layers", "-1", "--out", str(out)]) == 0
    summary = json.loads((out / "heatmaps.json").read_text())
    assert [r["grid"] for r in summary["images"]] == [[8, 8], [8, 8]]     # the stem's stride 8
    assert (out / "a.png").stat().st_size > 1000 and (out / "b.png").stat().st_size > 1000
    assert set(summary["images"][0]["special"]) == {"cls_token[0]"}


def test_heatmap_verb_query_needs_aligner(tmp_path, capsys):
    _square(tmp_path / "a.png", 8, 40)
    rc = main(["heatmap", str(tmp_path / "a.png"), "--subject", SUBJECT,
               "--random-init", "--query", "a red square", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1          # one clear line, non-zero exit
    assert "InputError" in err[0] and "--aligner" in err[0]


def test_ablate_verb(tmp_path):
    from fxdecomp.interpret.cli import synthetic_images
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i, im in enumerate(synthetic_images(16, size=64, seed=3)):
        name = f"im{i:02d}.png"
        im.save(imgs / name)
        rows.append({"file": name, "label": i % 2, "group": i % 4,
                     "split": "train" if i < 10 else "test"})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # an (untrained) aligner for the subject's heads: enough to exercise the verb's plumbing
    from fxdecomp import decompose
    from fxdecomp.capture.adapters import load_model
    from fxdecomp.interpret.align import CompAlign
    target, _ = load_model(SUBJECT, random_init=True)
    labels = decompose(target.eval(), torch.randn(2, 3, 64, 64), granularity="heads").labels
    from fxdecomp.world.models import SUBJECT_CONFIG
    CompAlign(labels, SUBJECT_CONFIG["embed_dim"], 512, subject=f"{SUBJECT}#random-init-seed0",
              clip_model="open_clip:ViT-B-32#random-init-seed0").save(tmp_path / "al.safetensors")
    out = tmp_path / "ablate.json"
    main(["ablate", "--subject", SUBJECT, "--random-init",
          "--images", str(imgs), "--labels", str(tmp_path / "labels.csv"),
          "--aligner", str(tmp_path / "al.safetensors"), "--templates", "single",
          "--spurious", "color", "--core", "shape", "--k", "3", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["k"] == 3 and len(res["removed"]) == 3 and not res["in_sample"]
    assert res["n_reference"] == 10 and res["n_test"] == 6
    for key in ("worst_group_before", "worst_group_after", "average_before", "average_after"):
        assert 0.0 <= res[key] <= 1.0


def test_read_labels_columns_and_world_paths(tmp_path):
    """Rows match on paths relative to the CSV's folder; string values are numbered in order."""
    from fxdecomp.apply.ablate_cli import read_labels
    (tmp_path / "images").mkdir()
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "angular", "background"])
        w.writerows([["images/0.png", "True", "water"], ["images/1.png", "False", "sand"],
                     ["images/2.png", "True", "sand"]])
    y, g, split = read_labels(tmp_path / "labels.csv", ["2.png", "0.png", "1.png"], "angular",
                              ["angular", "background"], tmp_path / "images")
    assert y.tolist() == [1, 1, 0]                    # False < True
    # groups: sorted (angular, background) tuples: (False,sand)=0, (True,sand)=1, (True,water)=2
    assert g.tolist() == [1, 2, 0] and split == ["", "", ""]
    from fxdecomp.errors import InputError
    with pytest.raises(InputError, match="no row"):
        read_labels(tmp_path / "labels.csv", ["9.png"], "angular", ["background"], tmp_path / "images")
