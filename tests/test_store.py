"""The component store: `fxdecomp extract` survives kill -9, splits over torchrun, detects damage,
refuses mismatched resumes and concurrent writers; align/rank read it instead of decomposing.

Subject: a random-init DeiT-tiny at 32 px (4 patches) so that extraction is cheap; a few dozen
small JPEGs written by the test in ImageFolder layout.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fxdecomp.cli import main, run
from fxdecomp.store import (StoreCorruptError, StoreIncompleteError, StoreLockedError,
                            StoreMismatchError, open_store)

N_IMAGES = 16
MODEL = ["--model", "timm:deit_tiny_patch16_224", "--random-init",
         "--model-kwargs", '{"img_size": 32}']


def _env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, ".pyshim"),
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"         # as torchrun does per rank; same rounding everywhere
    return env


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here too, like the subprocesses (bitwise-comparable results; and far
    faster than oversubscribed threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _extract_args(data, out, *extra) -> list[str]:
    return ["extract", *MODEL, "--data", str(data), "--out", str(out), "--shard-size", "3",
            "--batch-size", "2", "--workers", "0", "--no-progress", *extra]


def _shard_files(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "shards").glob("shard-*.safetensors"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from fxdecomp.interpret.cli import synthetic_images
    root = tmp_path_factory.mktemp("imgs")
    for i, im in enumerate(synthetic_images(N_IMAGES, size=48, seed=3)):
        d = root / f"class{i % 3}"
        d.mkdir(exist_ok=True)
        im.save(d / f"img{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """An uninterrupted single-process extraction."""
    out = tmp_path_factory.mktemp("ref") / "store"
    assert main(_extract_args(images, out)) == 0
    return out


def test_store_content_and_invariant(reference, images):
    store = open_store(reference)
    expected = sorted(str(p.relative_to(images)) for p in images.rglob("*.jpg"))
    assert store.ids == expected                                   # ids: paths below the root
    comps, out = store.tensor(), store.output()
    assert comps.shape == (len(store.labels), N_IMAGES, 192) and comps.dtype == torch.float32
    err = (comps.double().sum(0) - out.double()).abs().max() / out.double().abs().max()
    assert err <= 1e-5                                             # Σ components == model output
    assert any(lab.kind == "attn_head" for lab in store.labels)
    # the stored output is the model's own output on the model's own preprocessing
    from fxdecomp.capture.adapters import load_model
    from fxdecomp.interpret.cli import _subject_transform
    from PIL import Image
    target, info = load_model("timm:deit_tiny_patch16_224", random_init=True,
                              model_kwargs={"img_size": 32})
    tf = _subject_transform(target, info)
    some = [store.ids[5], store.ids[0], store.ids[11]]
    x = torch.stack([tf(Image.open(images / i).convert("RGB")) for i in some])
    with torch.no_grad():
        torch.testing.assert_close(store.output(some), target(x), rtol=1e-4, atol=1e-5)
    # lazy reads: subsets, component selection and batches agree with the whole tensor
    idx = [store.ids.index(i) for i in some]
    assert torch.equal(store.tensor(ids=some), comps[:, idx])
    names = [store.labels[7].name, store.labels[2].name]
    assert torch.equal(store.tensor(components=names), comps[[7, 2]])
    batches = list(store.batches(2))
    assert [i for b in batches for i in b.ids] == store.ids
    assert torch.equal(torch.cat([b.components for b in batches], 1), comps)


def test_sigkill_then_resume_equals_uninterrupted(reference, images, tmp_path):
    out = tmp_path / "store"
    args = _extract_args(images, out)                              # the reference's command
    proc = subprocess.Popen([sys.executable, "-m", "fxdecomp", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(_shard_files(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = len(_shard_files(out))
    n_shards = len(_shard_files(reference))
    assert 2 <= done < n_shards                                    # killed mid-run
    with pytest.raises(StoreIncompleteError, match="run the same"):
        open_store(out)
    assert main(args) == 0                                         # the same command, resumed
    store, ref = open_store(out), open_store(reference)
    assert store.ids == ref.ids                                    # every image exactly once
    assert _shard_files(out) == _shard_files(reference)            # the same bytes (checksums)
    assert torch.equal(store.tensor(), ref.tensor())
    assert torch.equal(store.output(), ref.output())
    assert store.manifest["stats"]["extracted_now"] == N_IMAGES - 3 * done


def test_truncated_and_corrupted_shards_are_detected_and_redone(reference, images, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    files = _shard_files(out)
    victim, flipped = out / "shards" / files[1], out / "shards" / files[3]
    victim.write_bytes(victim.read_bytes()[:-100])                 # truncated
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF                                               # one flipped byte, same size
    flipped.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="truncated"):
        open_store(out, verify=False)                              # sizes alone catch truncation
    (out / "shards" / ".shard-000009-0000.tmp").write_bytes(b"half a shard")  # a write cut short
    with pytest.raises(StoreCorruptError, match="checksum|truncated"):
        open_store(out)
    assert main(_extract_args(images, out)) == 0
    store = open_store(out)
    assert _shard_files(out) == _shard_files(reference)            # redone byte for byte
    assert torch.equal(store.tensor(), open_store(reference).tensor())
    assert store.manifest["stats"]["extracted_now"] == 6           # two shards of 3 redone
    assert not list((out / "shards").glob("*.tmp"))


def test_resume_with_other_arguments_is_refused(reference, images, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    with pytest.raises(StoreMismatchError) as err:
        run(_extract_args(images, out, "--granularity", "blocks", "--dtype", "float16"))
    msg = str(err.value)
    assert "granularity: the store has 'heads', this run 'blocks'" in msg
    assert "dtype: the store has 'float32', this run 'float16'" in msg
    with pytest.raises(StoreMismatchError, match="weights_sha256"):
        run(_extract_args(images, out, "--seed", "1"))            # other random weights
    assert open_store(out).config["granularity"] == "heads"        # untouched


def test_concurrent_writer_refused_and_dead_lock_taken_over(reference, images, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fxdecomp.store.format import StoreLock; "
         f"StoreLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
        env=_env(), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            run(_extract_args(images, out))
    finally:
        holder.kill()                                              # SIGKILL: no cleanup ran
        holder.wait()
    assert str(holder.pid) in (out / ".lock").read_text()          # the stale holder is recorded
    logs = []
    from fxdecomp.store.extract import ExtractOptions, extract
    extract(ExtractOptions(model="timm:deit_tiny_patch16_224", random_init=True,
                           model_kwargs={"img_size": 32}, data=str(images), out=str(out),
                           shard_size=3, batch_size=2, workers=0, progress=False,
                           log=logs.append))
    assert any(f"left by pid {holder.pid}" in m for m in logs)
    assert open_store(out).ids == open_store(reference).ids


def test_torchrun_two_processes_equal_one(reference, images, tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fxdecomp", *_extract_args(images, out, "--device", "cpu")]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["processes"] == 2 and summary["extracted_now"] == N_IMAGES
    store, ref = open_store(out), open_store(reference)
    assert store.ids == ref.ids
    assert [s["ids"] for s in store.shards] == [s["ids"] for s in ref.shards]
    assert _shard_files(out) == _shard_files(reference)            # the same bytes (checksums)
    assert torch.equal(store.tensor(), ref.tensor())


def test_align_and_rank_from_store_equal_recomputation(tmp_path, capsys):
    from fxdecomp.interpret.cli import synthetic_images
    data = tmp_path / "imgs"
    data.mkdir()
    for i, im in enumerate(synthetic_images(8, size=64, seed=5)):
        im.save(data / f"{i}.png")
    store = tmp_path / "store"
    assert main(["extract", "--model", "timm:deit_tiny_patch16_224", "--random-init",
                 "--clip", "ViT-B-32", "--data", str(data), "--out", str(store),
                 "--batch-size", "16", "--workers", "0", "--no-progress"]) == 0
    assert open_store(store).targets().shape == (8, 512)
    common = ["--clip", "ViT-B-32", "--random-init", "--no-progress", "--epochs", "3"]
    a_img = main(["align", "--subject", "timm:deit_tiny_patch16_224", "--images", str(data),
                  *common, "--out", str(tmp_path / "a.safetensors")])
    a_store = main(["align", "--store", str(store), *common,
                    "--out", str(tmp_path / "b.safetensors")])
    from fxdecomp.interpret import CompAlign
    a, b = CompAlign.load(tmp_path / "a.safetensors"), CompAlign.load(tmp_path / "b.safetensors")
    assert a.subject == b.subject and a.names == b.names
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.bias, a.bias, rtol=1e-4, atol=1e-6)
    rank = ["rank", "--clip", "ViT-B-32", "--random-init", "--feature", "color",
            "--aligner", str(tmp_path / "a.safetensors"), "--templates", "single"]
    r_img = _rank_rows(tmp_path / "r1.json", rank + ["--subject", "timm:deit_tiny_patch16_224",
                                                     "--images", str(data)])
    r_store = _rank_rows(tmp_path / "r2.json", rank + ["--store", str(store)])
    assert [r["component"] for r in r_store] == [r["component"] for r in r_img]
    assert [r["score"] for r in r_store] == pytest.approx([r["score"] for r in r_img], rel=1e-4,
                                                          abs=1e-6)
    assert a_img == a_store == 0


def _rank_rows(path: Path, argv: list[str]) -> list[dict]:
    assert main(argv + ["--json", str(path)]) == 0
    return json.loads(path.read_text())["rows"]


def test_auto_shard_size_bounds_bytes_and_splits_small_collections():
    from fxdecomp.store.extract import MIN_SHARDS, SHARD_TARGET_BYTES, auto_shard_size
    per_image = 113 * 384 * 2                                      # deit_small heads, fp16
    for n, batch in [(64, 32), (6400, 32), (10**6, 32), (10**6, 4096), (5, 1)]:
        s = auto_shard_size(n, per_image, batch)
        assert s * per_image <= max(SHARD_TARGET_BYTES, per_image)  # shards stay bounded
        if n >= MIN_SHARDS * batch and (n // MIN_SHARDS) * per_image <= SHARD_TARGET_BYTES:
            assert -(-n // s) >= MIN_SHARDS                         # enough shards to split
        assert s >= min(batch, SHARD_TARGET_BYTES // per_image)     # batches are not cut up
