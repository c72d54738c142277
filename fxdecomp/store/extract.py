"""Extraction: decompose every image of a folder or file list into a component store.

    extract(ExtractOptions(model="timm:deit_small_patch16_224", data="imgs/", out="store/",
                           random_init=True))

Pipeline per process: a DataLoader (``workers`` processes decode and preprocess images with the
model's own transform) -> the decomposed model (one forward per batch) -> a background writer
thread that encodes, checksums and atomically writes each finished shard. Decoding, compute and
disk I/O overlap.

Plan: the sorted sample list is cut into shards of ``shard_size`` consecutive samples; shard k
holds samples ``[k*S, (k+1)*S)`` whoever writes it. On start (rank 0, holding the store lock) the
shards already on disk are verified (SHA-256) and the damaged ones deleted; what is missing is
split round-robin over the ranks of ``torchrun`` (``WORLD_SIZE`` processes; gloo on CPU, NCCL on
GPU) or done by the one process. Once every rank is through, rank 0 verifies that each shard is
there exactly once and writes the final manifest. A run killed at any point leaves complete
shards, at most a temp file (deleted on resume) and an incomplete manifest; the same command then
does exactly the missing shards. Because the plan does not depend on the number of processes,
one process and N processes write the same shard files.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fxdecomp.errors import FxDecompError, InputError
from fxdecomp.store import format as fmt
from fxdecomp.store.format import (StoreCorruptError, StoreError, StoreLock, StoreMismatchError)

__all__ = ["ExtractOptions", "extract", "list_samples", "weights_sha256", "DTYPES"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHARD_TARGET_BYTES = 128 << 20
MIN_SHARDS = 64
# what must be equal to resume into a store (dotted paths into the manifest's config)
RESUME_KEYS = ("model.spec", "model.output", "model.model_kwargs", "model.weights_sha256",
               "preprocess", "granularity", "layers", "dtype", "clip.spec",
               "clip.weights_sha256", "data.n_samples", "data.ids_sha256", "shard_size",
               "labels_sha256")


@dataclass
class ExtractOptions:
    """What ``fxdecomp extract`` takes (see ``fxdecomp extract --help``)."""

    model: str
    data: str
    out: str
    granularity: str = "heads"
    layers: list[int] | None = None
    dtype: str = "float32"
    batch_size: int = 32
    workers: int | None = None          # None: min(4, cpu count - 1)
    shard_size: int | None = None       # None: about 128 MiB of components per shard
    random_init: bool = False
    checkpoint: str | None = None
    seed: int = 0
    output: str | None = None
    model_kwargs: dict | None = None    # timm constructor arguments, e.g. {"img_size": 112}
    clip: str | None = None
    clip_checkpoint: str | None = None
    device: str = "auto"
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))


# ---------------------------------------------------------------------------- samples
def list_samples(data: str | Path) -> tuple[Path, list[str]]:
    """(root, sample ids): the images under a folder (recursive, sorted; ImageFolder's
    ``class/img.jpg`` layout or flat), or the lines of a file list (paths relative to the list's
    folder, or absolute; blank lines and ``#`` comments skipped). Ids are paths relative to root."""
    data = Path(data)
    if data.is_dir():
        root = data
        ids = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                     if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not ids:
            raise InputError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {data}")
    elif data.is_file():
        root = data.parent
        ids = [line.strip() for line in data.read_text().splitlines()
               if line.strip() and not line.strip().startswith("#")]
        if not ids:
            raise InputError(f"file list {data} names no images")
    else:
        raise InputError(f"--data {data}: no such folder or file list")
    seen = set()
    for i in ids:
        if i in seen:
            raise InputError(f"{data}: the image {i!r} is listed twice (sample ids must be unique)")
        seen.add(i)
    return root, ids


class ImageDataset(torch.utils.data.Dataset):
    """Sample ``i`` -> (i, subject pixels [3, H, W], CLIP pixels or None), decoded with PIL."""

    def __init__(self, root: Path, ids: Sequence[str], transform: Callable,
                 clip_transform: Callable | None = None):
        self.root, self.ids = Path(root), list(ids)
        self.transform, self.clip_transform = transform, clip_transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        from PIL import Image
        path = self.root / self.ids[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as err:
            raise InputError(f"cannot read image {path}: {type(err).__name__}: {err}") from None
        clip = self.clip_transform(img) if self.clip_transform is not None else None
        return i, self.transform(img), clip


def _collate(items):
    idx = torch.tensor([it[0] for it in items])
    x = torch.stack([it[1] for it in items])
    c = torch.stack([it[2] for it in items]) if items[0][2] is not None else None
    return idx, x, c


# ---------------------------------------------------------------------------- identities
def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes): the weights' identity."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _get(config: dict, dotted: str):
    cur = config
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def config_differences(stored: dict, wanted: dict) -> list[str]:
    """Readable differences between two store configs on the keys a resume needs equal."""
    out = []
    for key in RESUME_KEYS:
        a, b = _get(stored, key), _get(wanted, key)
        if a != b:
            out.append(f"{key}: the store has {a!r}, this run {b!r}")
    return out


# ---------------------------------------------------------------------------- distributed
class _Dist:
    """torchrun's process group (WORLD_SIZE > 1), or a stand-in for one process."""

    def __init__(self, device: str):
        import torch.distributed as dist
        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.created = False
        if self.world > 1 and not dist.is_initialized():
            use_cuda = device != "cpu" and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if use_cuda else "gloo")
            self.created = True
        if dist.is_available() and dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def active(self) -> bool:
        return self.world > 1

    def broadcast(self, obj):
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()


_ERRORS = {cls.__name__: cls for cls in (StoreError, StoreCorruptError, StoreMismatchError,
                                          fmt.StoreLockedError, fmt.StoreIncompleteError,
                                          InputError, FxDecompError)}


def _raise_from(status: dict) -> None:
    if status.get("error"):
        cls = _ERRORS.get(status["error_type"], FxDecompError)
        raise cls(status["error"])


# ---------------------------------------------------------------------------- writer thread
class _ShardWriter:
    """Encodes, checksums and atomically writes finished shards on a background thread (a
    bounded queue: compute waits only if the disk falls ``depth`` shards behind)."""

    def __init__(self, directory: Path, depth: int = 2):
        self.directory = directory
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written: list[dict] = []
        self.thread = threading.Thread(target=self._run, name="fxdecomp-shard-writer",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                index, ids, comps, output, targets = item
                data = fmt.encode_shard(comps, output, ids, targets)
                self.written.append(fmt.write_shard(self.directory, index, data))
            except BaseException as err:                          # re-raised in the main thread
                self.error = err

    def put(self, index: int, ids, comps, output, targets) -> None:
        if self.error is not None:
            raise StoreError(f"writing shard failed: {self.error}") from self.error
        self.queue.put((index, ids, comps, output, targets))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise StoreError(f"writing shard failed: {self.error}") from self.error


# ---------------------------------------------------------------------------- the run
def _device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if pref == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(pref)


def _subject(opts: ExtractOptions, device: torch.device):
    from fxdecomp.capture.adapters import load_model
    from fxdecomp.interpret.cli import _model_id, _subject_transform
    target, info = load_model(opts.model, random_init=opts.random_init,
                              checkpoint=opts.checkpoint, seed=opts.seed, output=opts.output,
                              model_kwargs=opts.model_kwargs)
    target.eval()
    record = {"spec": opts.model, "output": info.get("output"), "weights": info.get("weights"),
              "weights_sha256": weights_sha256(target), "random_init": bool(opts.random_init),
              "checkpoint": opts.checkpoint, "seed": opts.seed,
              "model_kwargs": opts.model_kwargs or None,
              "id": _model_id(opts.model, opts.random_init, opts.checkpoint, opts.seed)}
    preprocess = {"input_size": list(info.get("input_size", ())),
                  "mean": list(info.get("mean", ())), "std": list(info.get("std", ()))}
    return target.to(device), info, _subject_transform(target, info), record, preprocess


def _clip(opts: ExtractOptions, device: torch.device):
    if not opts.clip:
        return None, None, None
    from fxdecomp.capture.adapters import load_clip
    from fxdecomp.interpret.cli import _clip_transform, _model_id
    model, preprocess, _ = load_clip(opts.clip, random_init=opts.random_init,
                                     checkpoint=opts.clip_checkpoint, seed=opts.seed)
    model.eval()
    spec = opts.clip if opts.clip.startswith("open_clip:") else f"open_clip:{opts.clip}"
    record = {"spec": spec, "weights_sha256": weights_sha256(model.visual),
              "id": _model_id(spec, opts.random_init, opts.clip_checkpoint, opts.seed),
              "embed_dim": getattr(model.visual, "output_dim", None)}
    return model.to(device), _clip_transform(model, preprocess), record


def _scan(store: Path, config: dict, plan_ids: Callable[[int], list[str]], log) -> dict[int, dict]:
    """Verify the shards on disk (rank 0, lock held): delete temp files and damaged, foreign or
    duplicate shards; return {index: manifest entry} of the good ones."""
    shard_dir = store / fmt.SHARD_DIR
    good: dict[int, dict] = {}
    for path in sorted(shard_dir.iterdir()) if shard_dir.is_dir() else []:
        if path.name.endswith(".tmp"):
            path.unlink()                              # a write cut short: never renamed
            continue
        parsed = fmt.parse_shard_name(path.name)
        if parsed is None:
            continue
        index = parsed[0]
        check = fmt.check_shard(path)
        reason = None if check.ok else check.reason
        if reason is None and index >= config["n_shards"]:
            reason = f"index {index} beyond the plan's {config['n_shards']} shards"
        if reason is None and fmt.shard_ids(path) != plan_ids(index):
            reason = "holds other samples than the plan assigns to it"
        if reason is None and index in good:
            reason = f"a second copy of shard {index}"
        if reason is not None:
            log(f"redoing shard {index}: {path.name} {reason}")
            path.unlink()
            continue
        good[index] = {"index": index, "file": f"{fmt.SHARD_DIR}/{path.name}",
                       "sha256": check.sha256, "bytes": check.bytes}
    return good


def _prepare(opts: ExtractOptions, store: Path, config: dict, labels: list[dict],
             plan_ids, log) -> dict[int, dict]:
    """Rank 0: check the store against this run, verify the shards on disk, return the good
    ones ({index: manifest entry}); the rest is to do."""
    manifest = fmt.read_manifest(store)
    ours = lambda name: name in (fmt.LOCK, fmt.SHARD_DIR) or name.startswith(f".{fmt.MANIFEST}.")
    if manifest is None and store.exists() and not all(ours(p.name) for p in store.iterdir()):
        raise StoreError(f"--out {store} exists, is not empty and is not a component store; "
                         "choose a new or empty folder")
    if manifest is not None:
        diffs = config_differences(manifest["config"], config)
        if diffs:
            raise StoreMismatchError(
                f"refusing to resume into {store}: it was made with other arguments:\n  "
                + "\n  ".join(diffs) + "\nrerun with the store's arguments, or give a new --out")
    for stale in store.glob(f".{fmt.MANIFEST}.*.tmp"):   # a manifest write cut short
        stale.unlink()
    (store / fmt.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    good = _scan(store, config, plan_ids, log)
    pending = [k for k in range(config["n_shards"]) if k not in good]
    if manifest is None or pending or not manifest.get("complete"):
        fmt.write_json(store / fmt.MANIFEST, {
            "format": fmt.FORMAT, "complete": False, "config": config, "labels": labels,
            "shards": [dict(good[k], ids=plan_ids(k)) for k in sorted(good)]})
    if good and pending:
        log(f"resuming {store}: {len(good)} of {config['n_shards']} shards already done")
    return good


def _finish(store: Path, config: dict, labels: list[dict], plan_ids, good: dict[int, dict],
            written: list[dict], stats: dict) -> dict:
    """Rank 0 after every rank is through: every planned shard exactly once (the ones verified
    at the start plus the ones the ranks wrote, whose checksums they computed from the bytes
    they wrote; here only their sizes are checked), then the final manifest."""
    entries = dict(good)
    for e in written:
        if e["index"] in entries and entries[e["index"]]["sha256"] != e["sha256"]:
            raise StoreCorruptError(f"{store}: shard {e['index']} was written twice with "
                                    "different content")
        entries[e["index"]] = e
    missing = [k for k in range(config["n_shards"]) if k not in entries]
    if missing:
        raise StoreCorruptError(f"{store}: shards {missing[:10]} are missing after every process "
                                "finished; run the same command again to redo them")
    for e in entries.values():
        c = fmt.check_shard(store / e["file"], e["sha256"], e["bytes"], full=False)
        if not c.ok:
            raise StoreCorruptError(f"{store}: shard {e['file']} {c.reason} right after it was "
                                    "written; run the same command again")
    good = entries
    manifest = {"format": fmt.FORMAT, "complete": True, "config": config, "labels": labels,
                "shards": [dict(good[k], ids=plan_ids(k)) for k in sorted(good)],
                "stats": stats}
    fmt.write_json(store / fmt.MANIFEST, manifest)
    return manifest


def auto_shard_size(n_samples: int, bytes_per_sample: int, batch_size: int) -> int:
    """Images per shard when --shard-size is not given: at most ``SHARD_TARGET_BYTES`` of
    components, and at least ``MIN_SHARDS`` shards (so torchrun has work to split even for a
    small collection) unless that would make shards smaller than a batch."""
    by_bytes = max(1, SHARD_TARGET_BYTES // max(1, bytes_per_sample))
    return max(1, min(by_bytes, max(batch_size, -(-n_samples // MIN_SHARDS))))


def _stored_shard_size(store: Path) -> int | None:
    """A resumed store keeps its plan: its shard size (read-only; the manifest is atomic)."""
    try:
        manifest = fmt.read_manifest(store) if store.is_dir() else None
    except StoreError:
        return None                                  # reported properly by rank 0's checks
    return int(manifest["config"]["shard_size"]) if manifest else None


def extract(opts: ExtractOptions) -> dict:
    """Run (or resume) an extraction; returns a summary (samples, shards, seconds, images/s).
    Under torchrun every rank calls this with the same options."""
    from fxdecomp import decompose
    from fxdecomp.capture.adapters import example_input

    if opts.dtype not in DTYPES:
        raise InputError(f"--dtype {opts.dtype!r}: choose one of {sorted(DTYPES)}")
    if opts.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.shard_size is not None and opts.shard_size < 1:
        raise InputError(f"--shard-size must be >= 1, got {opts.shard_size}")
    store_dtype = DTYPES[opts.dtype]
    dtype_name = str(store_dtype).removeprefix("torch.")
    t_start = time.perf_counter()
    dist = _Dist(opts.device)
    log = opts.log if dist.rank == 0 else (lambda msg: None)
    lock = None
    try:
        device = _device(opts.device, dist.local_rank)
        store = Path(opts.out)
        root, ids = list_samples(opts.data)
        target, info, transform, model_record, preprocess = _subject(opts, device)
        clip_model, clip_transform, clip_record = _clip(opts, device)
        example = example_input(info, batch=2, seed=opts.seed).to(device)
        dm = decompose(target, example, granularity=opts.granularity, layers=opts.layers)
        with torch.no_grad():
            probe = dm(example[:1]).components
        feature_shape = list(probe.shape[2:])
        labels = [lab.to_dict() for lab in dm.labels]
        per_sample = len(labels) * max(1, int(torch.tensor(feature_shape).prod())) \
            * torch.empty((), dtype=store_dtype).element_size()
        shard_size = opts.shard_size or _stored_shard_size(store) or auto_shard_size(
            len(ids), per_sample, opts.batch_size)
        n_shards = (len(ids) + shard_size - 1) // shard_size
        config = {
            "model": model_record, "preprocess": preprocess, "granularity": opts.granularity,
            "layers": list(opts.layers) if opts.layers is not None else None,
            "dtype": dtype_name, "compute_dtype": str(example.dtype).removeprefix("torch."),
            "clip": clip_record,
            "data": {"root": str(root.resolve()), "n_samples": len(ids),
                     "ids_sha256": _sha_json(ids)},
            "shard_size": shard_size, "n_shards": n_shards,
            "n_components": len(labels), "feature_shape": feature_shape,
            "labels_sha256": _sha_json(labels), "batch_size": opts.batch_size,
        }

        def plan_ids(k: int) -> list[str]:
            return ids[k * shard_size:(k + 1) * shard_size]

        # rank 0 takes the lock and decides what is left; everyone learns it (or the error)
        status: dict = {}
        good: dict[int, dict] = {}
        if dist.rank == 0:
            try:
                lock = StoreLock(store).acquire()
                prev = lock.previous
                if prev and prev.get("pid") and prev.get("pid") != os.getpid():
                    log(f"took over the lock of {store} left by pid {prev.get('pid')} on "
                        f"{prev.get('host')} (no longer running)")
                good = _prepare(opts, store, config, labels, plan_ids, log)
                status = {"pending": [k for k in range(n_shards) if k not in good]}
            except FxDecompError as err:
                status = {"error": str(err), "error_type": type(err).__name__}
        status = dist.broadcast(status)
        _raise_from(status)
        pending: list[int] = status["pending"]
        mine = pending[dist.rank::dist.world]
        n_mine = sum(len(plan_ids(k)) for k in mine)
        if not pending:
            log(f"{store}: all {len(ids)} samples are already extracted")

        batches = [list(range(k * shard_size + lo, min((k * shard_size) + len(plan_ids(k)),
                                                       k * shard_size + lo + opts.batch_size)))
                   for k in mine for lo in range(0, len(plan_ids(k)), opts.batch_size)]
        workers = (opts.workers if opts.workers is not None
                   else min(4, max(0, (os.cpu_count() or 1) - 1)))
        loader = torch.utils.data.DataLoader(
            ImageDataset(root, ids, transform, clip_transform), batch_sampler=batches,
            num_workers=workers, collate_fn=_collate, pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None)
        writer = _ShardWriter(store / fmt.SHARD_DIR)
        bar = None
        if opts.progress and dist.rank == 0 and n_mine:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_mine, unit="img", desc=f"extract{' rank 0' if dist.active else ''}",
                       dynamic_ncols=True)
        t_loop = time.perf_counter()
        acc: dict[str, list] = {"c": [], "o": [], "t": []}
        current, filled = None, 0
        try:
            with torch.no_grad():
                for idx, x, cx in loader:
                    k = int(idx[0]) // shard_size
                    if k != current:
                        current, filled = k, 0
                        acc = {"c": [], "o": [], "t": []}
                    d = dm(x.to(device, non_blocking=True))
                    acc["c"].append(d.components.to(store_dtype).cpu())
                    acc["o"].append(d.output.float().cpu())
                    if clip_model is not None:
                        acc["t"].append(clip_model.encode_image(cx.to(device)).float().cpu())
                    filled += len(idx)
                    if filled == len(plan_ids(k)):
                        writer.put(k, plan_ids(k), torch.cat(acc["c"], 1), torch.cat(acc["o"]),
                                   torch.cat(acc["t"]) if acc["t"] else None)
                        acc = {"c": [], "o": [], "t": []}
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            writer.close()
            if bar is not None:
                bar.close()
        loop_s = time.perf_counter() - t_loop
        counts = dist.gather({"samples": n_mine, "loop_s": loop_s, "written": writer.written})
        dist.barrier()
        summary = {"store": str(store), "n_samples": len(ids), "extracted_now": sum(
            c["samples"] for c in counts), "processes": dist.world, "n_shards": n_shards,
            "loop_s": round(max(c["loop_s"] for c in counts), 3),
            "total_s": round(time.perf_counter() - t_start, 3)}
        summary["images_per_s"] = round(summary["extracted_now"] / summary["loop_s"], 2) \
            if summary["loop_s"] > 0 else None
        status = {}
        if dist.rank == 0:
            try:
                _finish(store, config, labels, plan_ids, good,
                        [e for c in counts for e in c["written"]], summary)
            except FxDecompError as err:
                status = {"error": str(err), "error_type": type(err).__name__}
        status = dist.broadcast(status)
        _raise_from(status)
        return summary
    finally:
        if lock is not None:
            lock.release()
        dist.close()
