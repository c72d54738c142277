"""On-disk format of a component store: shards, manifest, checksums, the writer lock.

A store is a directory::

    STORE/manifest.json                         # written first (complete=false), rewritten last
    STORE/shards/shard-000012-<sha16>.safetensors
    STORE/.lock                                 # fcntl lock + "pid host time" of the writer

Shard ``k`` holds the samples with global indices ``[k * shard_size, (k + 1) * shard_size)`` of
the sorted sample list, in order, as safetensors tensors::

    components  [C, n, *feature]   the stored dtype (float32 / float16 / bfloat16)
    output      [n, *feature]      the model's own output, float32 (Σ_c components[c] == output)
    targets     [n, E]             optional: CLIP image embeddings of the same images, float32

plus the sample ids (JSON) in the safetensors header. ``<sha16>`` is the first 16 hex digits of
the SHA-256 of the whole file, so a shard is self-verifying: a truncated or corrupted file no
longer matches its name. Shards are written to a temp file, fsynced and renamed (atomic on
POSIX), so a file with a shard name is either complete or detectably damaged, never half new.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from fxdecomp.errors import FxDecompError, InputError

FORMAT = "fxdecomp-store/1"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
LOCK = ".lock"
_SHARD_RE = re.compile(r"^shard-(\d{6,})-([0-9a-f]{16})\.safetensors$")
_META_KEY = "fxdecomp_store"


# ---------------------------------------------------------------------------- errors
class StoreError(FxDecompError):
    """A component store cannot be read or written as asked."""


class StoreCorruptError(StoreError):
    """A shard is missing, truncated or does not match its checksum."""


class StoreIncompleteError(StoreError):
    """The store's extraction has not finished (run the same ``extract`` command again)."""


class StoreMismatchError(StoreError, InputError):
    """A resume or a read with other arguments than the store was made with."""


class StoreLockedError(StoreError):
    """Another live process is writing into the store."""


# ---------------------------------------------------------------------------- atomic files
def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:                                                  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:                                                  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one:
    temp file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_manifest(store: Path) -> dict | None:
    """The manifest of ``store``, or None if there is none yet."""
    path = Path(store) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StoreCorruptError(f"{path} is not readable JSON ({err}); it is written atomically, "
                                "so something else damaged it") from err
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: store format {manifest.get('format')!r}, this fxdecomp reads "
                         f"{FORMAT!r}")
    return manifest


# ---------------------------------------------------------------------------- shards
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_name(index: int, sha: str) -> str:
    return f"shard-{index:06d}-{sha[:16]}.safetensors"


def parse_shard_name(name: str) -> tuple[int, str] | None:
    """``shard-000012-<sha16>.safetensors`` -> (12, sha16); None for any other name."""
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def encode_shard(components, output, ids: list[str], targets=None) -> bytes:
    """safetensors bytes of one shard (see the module docstring)."""
    from safetensors.torch import save
    tensors = {"components": components.contiguous(), "output": output.contiguous()}
    if targets is not None:
        tensors["targets"] = targets.contiguous()
    return save(tensors, metadata={_META_KEY: json.dumps({"ids": list(ids)})})


def write_shard(directory: Path, index: int, data: bytes) -> dict:
    """Write one encoded shard atomically; returns its manifest entry (without ids)."""
    sha = sha256_bytes(data)
    name = shard_name(index, sha)
    atomic_write(Path(directory) / name, data)
    return {"index": index, "file": f"{SHARD_DIR}/{name}", "sha256": sha, "bytes": len(data)}


def shard_ids(path: Path) -> list[str]:
    """The sample ids recorded in a shard's header."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[_META_KEY])["ids"]


@dataclass
class ShardCheck:
    index: int
    path: Path
    ok: bool
    reason: str = ""
    sha256: str = ""
    bytes: int = 0


def check_shard(path: Path, expected_sha: str | None = None, expected_bytes: int | None = None,
                full: bool = True) -> ShardCheck:
    """Is the shard file intact? Size against the manifest (cheap: catches truncation), and with
    ``full`` its SHA-256 against the manifest / the 16 digits in its name."""
    path = Path(path)
    parsed = parse_shard_name(path.name)
    index = parsed[0] if parsed else -1
    if not path.is_file():
        return ShardCheck(index, path, False, "missing")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        return ShardCheck(index, path, False, f"truncated or resized: {size} bytes, the manifest "
                                              f"says {expected_bytes}", bytes=size)
    if not full:
        return ShardCheck(index, path, True, bytes=size, sha256=expected_sha or "")
    sha = sha256_file(path)
    if expected_sha is not None and sha != expected_sha:
        return ShardCheck(index, path, False, "checksum mismatch (SHA-256 differs from the "
                                              "manifest)", sha, size)
    if parsed and not sha.startswith(parsed[1]):
        return ShardCheck(index, path, False, "checksum mismatch (SHA-256 differs from the one in "
                                              "its name: truncated or corrupted)", sha, size)
    try:
        shard_ids(path)
    except Exception as err:                                         # unreadable header
        return ShardCheck(index, path, False, f"unreadable: {err}", sha, size)
    return ShardCheck(index, path, True, sha256=sha, bytes=size)


# ---------------------------------------------------------------------------- writer lock
class StoreLock:
    """One writer per store: an exclusive ``fcntl.flock`` on ``STORE/.lock``.

    The kernel drops the lock when its process dies (kill -9 included), so a dead writer never
    holds a store; the file keeps the last holder's ``pid host time`` for messages. flock is
    reliable on local file systems and on NFSv4 (Linux maps it to a POSIX lock there).
    """

    def __init__(self, store: Path):
        self.path = Path(store) / LOCK
        self.fd: int | None = None
        self.previous: dict | None = None

    def acquire(self) -> "StoreLock":
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise StoreError(f"cannot lock {self.path}: {err} (this file system does not "
                                 "support flock; put --out on a local disk or NFSv4)") from err
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('time')}"
                   if holder else "another process")
            raise StoreLockedError(f"store {self.path.parent} is being written by {who} "
                                   f"(lock {self.path}); wait for it to finish, or write into "
                                   "another --out") from None
        self.previous = _read_holder(fd) or None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
