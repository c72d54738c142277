"""The `fxdecomp` command: the README's main job, coverage, and dispatch to the interpret commands."""
from __future__ import annotations

import json

from fxdecomp.cli import main


def test_default_main_job(tmp_path, monkeypatch, capsys):
    """`fxdecomp` with no arguments: the ground-truth world report, with what the issue promises
    (exactness, the retrieval table, and that the text-scored components find the attributes)."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "fxdecomp-report"
    assert str(report.resolve()) in out and "relative error" in out
    for name in ("report.md", "metrics.json", "scores.png", "precision.png", "retrieval.png"):
        assert (report / name).stat().st_size > 0, name
    m = json.loads((report / "metrics.json").read_text())
    assert m["exactness_max_relative_error"] <= 1e-5
    prec = m["retrieval_precision_at_10"]
    assert set(prec) == {"color", "shape", "texture", "background"}
    for attr in prec:
        assert set(prec[attr]) >= {"top_components", "full_representation", "random_components"}
    for attr in ("color", "shape"):
        assert prec[attr]["top_components"] >= prec[attr]["random_components"] + 0.2, prec[attr]
    assert any(prec[a]["top_components"] > prec[a]["full_representation"]
               for a in ("color", "texture", "background")), prec
    assert 0 < m["alignment_heldout_cosine"] <= 1


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
    assert main(["coverage", "timm:fastvit_t8", "--random-init", "--output", "stages"]) == 0


def test_align_then_rank(tmp_path, capsys):
    path = tmp_path / "align.safetensors"
    common = ["--subject", "timm:deit_tiny_patch16_224", "--clip", "ViT-B-32", "--random-init",
              "--synthetic", "16"]
    assert main(["align", *common, "--out", str(path)]) == 0
    assert path.exists()
    assert main(["rank", *common, "--aligner", str(path), "--feature", "color",
                 "--templates", "single"]) == 0
    assert "blocks" in capsys.readouterr().out
