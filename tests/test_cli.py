"""The `fxdecomp` command: the README's main job, coverage, and dispatch to the interpret commands."""
from __future__ import annotations

import json

from fxdecomp.cli import main


def test_default_main_job(tmp_path, monkeypatch, capsys):
    """`fxdecomp` with no arguments: the ground-truth world report (exactness, the retrieval
    table, the alignment, the figures)."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "fxdecomp-report"
    assert str(report.resolve()) in out and "relative error" in out
    for name in ("report.md", "metrics.json", "scores.png", "precision.png", "retrieval.png",
                 "heatmaps.png"):
        assert (report / name).stat().st_size > 0, name
    m = json.loads((report / "metrics.json").read_text())
    assert m["exactness_max_relative_error"] <= 1e-5
    prec = m["retrieval_precision_at_10"]
    assert set(prec) == {"color", "shape", "texture", "background"}
    for attr in prec:
        assert set(prec[attr]) >= {"top_components", "top_scored_components", "full_representation",
                                   "random_components"}
    for attr in prec:
        assert all(0 <= prec[attr][meth] <= 1 for meth in prec[attr]), prec[attr]
    # what the shipped models carry (see README, The ground-truth world): the subject knows the
    # 8 shapes (full representation 0.951 measured, chance 0.125) ...
    assert prec["shape"]["full_representation"] >= 0.8, prec["shape"]
    # ... the components the text scores select retrieve color and shape far better than random
    # components, by both selection rules (seed 0, the target being +0.2: score − max
    # other +0.19 / +0.20, score alone +0.36 / +0.20 measured) ...
    for attr in ("color", "shape"):
        for method in ("top_components", "top_scored_components"):
            assert prec[attr][method] >= prec[attr]["random_components"] + 0.1, (method, prec[attr])
    # ... and for an attribute the subject was never trained on they beat the full
    # representation (color: 0.721 vs 0.466 measured; background 1.000 vs 0.993)
    assert max(prec[a]["top_components"] - prec[a]["full_representation"]
               for a in ("color", "texture", "background")) >= 0.1, prec
    bg = prec["background"]
    assert bg["top_components"] >= 2.5 * m["chance_precision_at_10"]["background"], bg
    assert 0.7 <= m["alignment_heldout_cosine"] <= 1            # 0.824 measured
    # the subject does not carry texture (a linear probe on its output reads it at 0.34, chance
    # 0.25; color 0.99): the aligned total follows CLIP along the texture texts far less than
    # along the others' (texture 0.31-0.40, others 0.73-0.97 over world seeds 0-5, all images)
    fid = m["attribute_fidelity"]
    assert set(fid) == {"color", "shape", "texture", "background"}
    assert fid["texture"] < 0.5 and min(fid[a] for a in ("color", "shape", "background")) > 0.6, fid
    # the k sweep: k = 1..8, top-k and random-k for every attribute, k = 3 the same as the table
    sweep = m["retrieval_sweep_k"]
    assert list(sweep) == [str(k) for k in range(1, 9)]
    for method in ("top_components", "top_scored_components"):
        assert sweep["3"]["shape"][method] == prec["shape"][method]
    # token heatmaps and segmentation (README, How to read it): shares and metrics in [0, 1],
    # the chance level is the objects' share of the image (neither empty nor the whole image)
    assert 0 <= m["heatmap_pointing_accuracy"] <= 1
    assert 0 < m["heatmap_pointing_chance"] < 1
    assert m["n_heatmap_images"] == 300 and m["heatmap_attribute"] == "color"
    assert len(m["heatmap_heads"]) == m["k"]
    for key in ("segmentation", "segmentation_selected_heads", "segmentation_all_heads",
                "segmentation_center_blob"):
        assert set(m[key]) == {"pixel_accuracy", "miou", "map"}, key
        assert all(0 <= v <= 1 for v in m[key].values()), (key, m[key])
    # the segmentation map (|first layer's heads|, chosen on world seeds 1 and 2) beats the
    # image-blind centre blob on the default seed 0 (mIoU 0.657 vs 0.475 measured)
    assert m["segmentation_map"] == "first_layer_magnitude"
    assert m["segmentation"]["miou"] > m["segmentation_center_blob"]["miou"] + 0.03
    # pointing: the selected color heads' peak falls in the object far more often than the
    # object's share of the image (0.700 vs 0.140 measured)
    assert m["heatmap_pointing_accuracy"] >= 2 * m["heatmap_pointing_chance"]
    # spurious-cue ablation: k as stated (--spurious-k, default 3), accuracies in [0, 1], the
    # worst group never above the mean over groups, and k = 0 in the sweep is "before"
    s = m["spurious"]
    assert s["k"] == 3 and len(s["removed"]) == 3
    for when in ("before", "after"):
        assert 0 <= s[f"worst_group_{when}"] <= s[f"average_{when}"] <= 1, s
        assert set(s[f"group_accuracy_{when}"]) == {"0", "1", "2", "3"}
    assert s["sweep_k"]["0"]["worst_group"] == s["worst_group_before"]
    assert s["sweep_k"]["3"]["worst_group"] == s["worst_group_after"]
    # the head is a logistic regression fitted on spurious-train (the subject's own head is
    # reported alongside). Worst group after > before is not asserted: 0.954 -> 0.958 at k = 3
    # on seed 0 (own head 0.952 -> 0.958), but with earlier shipped models the gain was small and
    # not monotone in k (0.870 -> 0.874; k = 10: 0.846), so it is not a property of the method
    assert s["head"].startswith("logistic regression")
    assert m["spurious_own_head"]["head"] == "the subject's own classifier"
    assert m["spurious_own_head"]["removed"] == s["removed"]
    assert "## Removing the spurious cue" in (report / "report.md").read_text()


def test_demo_of_any_model(capsys):
    assert main(["demo", "--model", "timm:deit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "relative error" in out and "attn_head" in out


def test_coverage_reports_pass_and_fail(tmp_path, capsys):
    report = tmp_path / "cov.json"
    rc = main(["coverage", "timm:deit_tiny_patch16_224", "timm:fastvit_t8", "--random-init",
               "--json", str(report)])
    out = capsys.readouterr().out
    assert rc == 1  # fastvit_t8's default representation ends in a GELU
    assert "pass  timm:deit_tiny_patch16_224" in out and "FAIL  timm:fastvit_t8" in out
    assert "gelu" in out  # the error names the op
    rows = json.loads(report.read_text())
    assert rows[0]["pass"] and rows[0]["heads"]["error"] <= 1e-5
    # its stage transitions end in GELU too: the earlier stages' blocks are absorbed, which
    # coverage reports as a failure naming the op unless the collapse is accepted explicitly
    assert main(["coverage", "timm:fastvit_t8", "--random-init", "--output", "stages"]) == 1
    assert "CollapseError" in capsys.readouterr().out
    assert main(["coverage", "timm:fastvit_t8", "--random-init", "--output", "stages",
                 "--allow-collapse"]) == 0


def test_align_then_rank(tmp_path, capsys):
    """align writes an aligner; rank scores every component of the subject's decomposition for
    the feature, sorted, and prints the top rows of that ranking."""
    path, table = tmp_path / "align.safetensors", tmp_path / "rank.json"
    common = ["--subject", "timm:deit_tiny_patch16_224", "--clip", "ViT-B-32", "--random-init",
              "--synthetic", "16"]
    # 16 samples leave no validation split, so the fit runs to its cap: keep the test's short
    assert main(["align", *common, "--out", str(path), "--max-steps", "200"]) == 0
    assert path.exists()
    capsys.readouterr()
    assert main(["rank", *common, "--aligner", str(path), "--feature", "color",
                 "--templates", "single", "--top", "5", "--json", str(table)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(table.read_text())["rows"]
    from fxdecomp import decompose
    from fxdecomp.capture.adapters import example_input, load_model
    model, info = load_model("timm:deit_tiny_patch16_224", random_init=True)
    names = [lab.name for lab in decompose(model, example_input(info), granularity="heads").labels]
    assert sorted(r["component"] for r in rows) == sorted(names)      # every component, once
    assert [r["rank"] for r in rows] == list(range(1, len(names) + 1))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "} and "-" in line)
    printed = [line.split()[1] for line in lines[rule + 1:rule + 6]]  # rank, component, ...
    assert printed == [r["component"] for r in rows[:5]]


def test_errors_are_one_line_and_exit_2(capsys):
    """Both entry points print an FxDecompError as one line on stderr and exit non-zero."""
    from fxdecomp.interpret.cli import main as interpret_main
    assert main(["demo", "--model", "timm:no_such_model_xyz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxdecomp: error: ModelLoadError:") and "no_such_model_xyz" in err
    assert len(err.splitlines()) == 1
    assert interpret_main(["rank", "--subject", "timm:no_such_model_xyz", "--random-init",
                           "--synthetic", "4", "--aligner", "missing.safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxdecomp-interpret: error:") and len(err.splitlines()) == 1
