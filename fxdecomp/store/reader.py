"""Reading a component store: ``open_store(path)`` -> ``ComponentStore``.

Nothing is loaded at open but the manifest; tensors are read from the memory-mapped shards
(safetensors ``safe_open``) only for the samples and components asked for, so stores larger than
RAM work through ``batches()`` or ``tensor(ids=...)`` on a subset.

>>> store = fxdecomp.open_store("runs/deit")            # doctest: +SKIP
>>> store.ids[:2], len(store.labels)                    # ['cat/001.jpg', 'cat/002.jpg'], 113
>>> store.tensor().shape                                # [C, N, d]: every sample
>>> store.tensor(ids=["cat/001.jpg"]).shape             # [C, 1, d]
>>> for b in store.batches(256): b.components, b.targets   # [C, ≤256, d], [≤256, E] or None
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fxdecomp.run.decomposition import ComponentLabel
from fxdecomp.store.format import (StoreCorruptError, StoreError, StoreIncompleteError,
                                   check_shard, read_manifest)

__all__ = ["ComponentStore", "StoreBatch", "open_store"]


@dataclass
class StoreBatch:
    """One batch read from a store: ``components`` [C, b, ...], ``output`` [b, ...] (float32, what
    the model returned), ``targets`` [b, E] or None."""

    ids: list[str]
    components: torch.Tensor
    output: torch.Tensor
    targets: torch.Tensor | None


class ComponentStore:
    """A finished extraction: sample ids, component labels, lazily read tensors.

    ``components.sum(0) == output`` per sample (to the stored dtype's rounding: 1e-5 relative
    for float32). ``model`` describes the subject (spec, output, weights source and SHA-256),
    ``clip`` the model of ``targets`` (None without ``--clip``).
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"no component store at {self.path} (not a directory)")
        manifest = read_manifest(self.path)
        if manifest is None:
            raise StoreError(f"{self.path} is not a component store (no manifest.json); make one "
                             "with `fxdecomp extract`")
        if not manifest.get("complete"):
            raise StoreIncompleteError(
                f"store {self.path} is incomplete ({len(manifest.get('shards', []))} of "
                f"{manifest['config']['n_shards']} shards recorded): its extraction was "
                "interrupted; run the same `fxdecomp extract` command again to finish it")
        self.manifest = manifest
        self.config: dict = manifest["config"]
        self.shards: list[dict] = sorted(manifest["shards"], key=lambda s: s["index"])
        bad = []
        for s in self.shards:
            c = check_shard(self.path / s["file"], s["sha256"], s["bytes"], full=verify)
            if not c.ok:
                bad.append(f"{s['file']}: {c.reason}")
        if bad:
            raise StoreCorruptError(
                f"store {self.path}: {len(bad)} damaged shard(s): {'; '.join(bad[:5])}; run the "
                "same `fxdecomp extract` command again to redo them")
        self.labels: list[ComponentLabel] = [ComponentLabel(**d) for d in manifest["labels"]]
        self.ids: list[str] = [i for s in self.shards for i in s["ids"]]
        self._where: dict[str, tuple[int, int]] = {}
        for k, s in enumerate(self.shards):
            for row, sid in enumerate(s["ids"]):
                self._where[sid] = (k, row)
        self.feature_shape: tuple[int, ...] = tuple(self.config["feature_shape"])
        self.dtype: torch.dtype = getattr(torch, self.config["dtype"])

    # ------------------------------------------------------------------ description
    @property
    def model(self) -> dict:
        return self.config["model"]

    @property
    def clip(self) -> dict | None:
        return self.config.get("clip")

    @property
    def has_targets(self) -> bool:
        return self.clip is not None

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    @property
    def shape(self) -> tuple[int, ...]:
        """[C, N, *feature] of ``tensor()``."""
        return (len(self.labels), len(self.ids), *self.feature_shape)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"ComponentStore({str(self.path)!r}, model={self.model['spec']!r}, "
                f"granularity={self.config['granularity']!r}, shape={self.shape}, "
                f"dtype={self.config['dtype']}, targets={self.has_targets})")

    # ------------------------------------------------------------------ reading
    def _component_index(self, components) -> slice | list[int]:
        if components is None:
            return slice(None)
        if isinstance(components, slice):
            return components
        names = {n: i for i, n in enumerate(self.names)}
        out = []
        for c in components:
            if isinstance(c, str):
                if c not in names:
                    raise KeyError(f"no component named {c!r} in {self.path}; some names: "
                                   f"{self.names[:8]}")
                out.append(names[c])
            else:
                out.append(int(c))
        return out

    def _read(self, key: str, shard: int, rows: slice, comp=None) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(str(self.path / self.shards[shard]["file"]), framework="pt") as f:
            sl = f.get_slice(key)
            if key != "components":
                return sl[rows]
            if isinstance(comp, list):               # arbitrary components: read rows, pick
                return sl[:, rows][comp]
            return sl[comp if comp is not None else slice(None), rows]

    def _gather(self, key: str, ids: Sequence[str] | None, comp=None) -> torch.Tensor:
        if key == "targets" and not self.has_targets:
            raise StoreError(f"store {self.path} has no targets: extract with --clip SPEC to "
                             "store CLIP image embeddings next to the components")
        axis = 1 if key == "components" else 0
        if ids is None:
            parts = [self._read(key, k, slice(None), comp) for k in range(len(self.shards))]
            return torch.cat(parts, axis)
        missing = [i for i in ids if i not in self._where]
        if missing:
            raise KeyError(f"{len(missing)} sample id(s) not in {self.path}, e.g. {missing[:3]}")
        # read each touched shard once (the span of its requested rows), then pick in order
        wanted: dict[int, list[int]] = {}
        for i in ids:
            k, row = self._where[i]
            wanted.setdefault(k, []).append(row)
        blocks = {}
        for k, rows in wanted.items():
            lo, hi = min(rows), max(rows) + 1
            blocks[k] = (lo, self._read(key, k, slice(lo, hi), comp))
        picks = []
        for i in ids:
            k, row = self._where[i]
            lo, block = blocks[k]
            picks.append(block.select(axis, row - lo).unsqueeze(axis))
        if not picks:
            return self._read(key, 0, slice(0, 0), comp)
        return torch.cat(picks, axis)

    def tensor(self, ids: Sequence[str] | None = None, components=None) -> torch.Tensor:
        """Components [C, n, *feature] (stored dtype) of ``ids`` (default: all, in store order);
        ``components``: names or indices (default all). Reads only the shards that hold them."""
        return self._gather("components", ids, self._component_index(components))

    def output(self, ids: Sequence[str] | None = None) -> torch.Tensor:
        """The model's own output [n, *feature] (float32) of ``ids``."""
        return self._gather("output", ids)

    def targets(self, ids: Sequence[str] | None = None) -> torch.Tensor:
        """CLIP image embeddings [n, E] (float32) of ``ids``; StoreError without ``--clip``."""
        return self._gather("targets", ids)

    def batches(self, batch_size: int = 256, components=None) -> Iterator[StoreBatch]:
        """Iterate over the store in order, ``batch_size`` samples at a time (the last batch may
        be smaller; batches do not cross shard files, so some may be smaller at shard ends);
        memory stays at one batch."""
        if batch_size < 1:
            raise StoreError(f"batch_size must be >= 1, got {batch_size}")
        comp = self._component_index(components)
        for k, s in enumerate(self.shards):
            n = len(s["ids"])
            for lo in range(0, n, batch_size):
                rows = slice(lo, min(n, lo + batch_size))
                yield StoreBatch(list(s["ids"][rows]), self._read("components", k, rows, comp),
                                 self._read("output", k, rows),
                                 self._read("targets", k, rows) if self.has_targets else None)

    def align_batches(self, batch_size: int = 32, dtype: torch.dtype = torch.float32):
        """A callable giving a fresh iterable of (components [C, b, d], targets [b, E]) per call,
        what ``CompAlign.fit`` streams from (no shuffling across shards)."""
        if not self.has_targets:
            self._gather("targets", None)                # raises the explanatory StoreError
        return lambda: ((b.components.to(dtype), b.targets.to(dtype))
                        for b in self.batches(batch_size))


def open_store(path: str | Path, verify: bool = True) -> ComponentStore:
    """Open a finished component store written by ``fxdecomp extract``.

    verify=True checks every shard's SHA-256 against the manifest (reads the whole store once);
    verify=False checks only the sizes (catches truncation, not bit flips).
    Raises StoreIncompleteError for an interrupted extraction, StoreCorruptError for a damaged
    shard (both say to rerun the extraction, which redoes exactly what is missing).
    """
    return ComponentStore(path, verify=verify)
