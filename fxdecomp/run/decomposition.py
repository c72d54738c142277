"""What a decomposed forward returns: the output, its additive components and their labels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ComponentNotFoundError, InputError
from ..graph.labels import KINDS, ComponentLabel  # re-exported: the public home of both

__all__ = ["Decomposition", "ComponentLabel", "KINDS"]


def _matches(label: ComponentLabel, kind, layer, head, token, module) -> bool:
    def ok(value, want):
        if want is None:
            return True
        if isinstance(want, (list, tuple, set, frozenset, range)):
            return value in want
        return value == want

    return (ok(label.kind, kind) and ok(label.layer, layer) and ok(label.head, head)
            and ok(label.token, token)
            and (module is None or label.module == module or label.module.startswith(module + ".")))


@dataclass
class Decomposition:
    """``output`` [B, ...]; ``components`` [C, B, ...] with ``components.sum(0) == output``.

    >>> d = dm(x)                                  # doctest: +SKIP
    >>> d.components.shape                         # [C, B, E]
    >>> d.select(kind="attn_head", layer=11)       # the last block's heads
    >>> d.group("layer")                           # one component per layer (+ the rest)
    """

    output: torch.Tensor
    components: torch.Tensor
    labels: list[ComponentLabel]

    def __post_init__(self):
        if self.components.shape[0] != len(self.labels):
            raise InputError(f"{self.components.shape[0]} components but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def index(self, name: str) -> int:
        for i, lab in enumerate(self.labels):
            if lab.name == name:
                return i
        raise ComponentNotFoundError(f"no component named {name!r}; some names: {self.names[:8]}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.components[self.index(name)]

    def mask(self, kind=None, layer=None, head=None, token=None, module=None) -> torch.Tensor:
        """Boolean [C] mask of the components matching every given criterion (None = any)."""
        return torch.tensor([_matches(lab, kind, layer, head, token, module) for lab in self.labels],
                            dtype=torch.bool)

    def select(self, kind=None, layer=None, head=None, token=None, module=None) -> "Decomposition":
        """The matching components only (their sum is then *part* of the output)."""
        keep = self.mask(kind, layer, head, token, module)
        idx = keep.nonzero().flatten()
        return Decomposition(self.output, self.components[idx.to(self.components.device)],
                             [self.labels[i] for i in idx.tolist()])

    def residual(self, **criteria) -> torch.Tensor:
        """Sum of the components *not* matching the criteria (output minus the selection)."""
        keep = ~self.mask(**criteria)
        return self.components[keep.to(self.components.device)].sum(0)

    def group(self, by: str | Callable[[ComponentLabel], str]) -> "Decomposition":
        """Sum components sharing a key. ``by`` is a label field ("kind", "layer", "module",
        "head") or a function label -> key. Heads of one attention block, for example, collapse
        with ``group(lambda l: l.name.rsplit('.h', 1)[0] if l.head is not None else l.name)``.
        The result is still an exact decomposition."""
        keyfn = (lambda lab: str(getattr(lab, by))) if isinstance(by, str) else by
        order: dict[str, list[int]] = {}
        for i, lab in enumerate(self.labels):
            order.setdefault(keyfn(lab), []).append(i)
        dev = self.components.device
        index = torch.empty(len(self.labels), dtype=torch.long)
        labels = []
        for g, (key, members) in enumerate(order.items()):
            index[members] = g
            first = self.labels[members[0]]
            same = lambda f: getattr(first, f) if all(getattr(self.labels[m], f) == getattr(first, f) for m in members) else None
            labels.append(ComponentLabel(name=str(key), module=same("module") or "",
                                         kind=same("kind") or "other", layer=same("layer"),
                                         head=same("head"), token=same("token")))
        out = self.components.new_zeros((len(order),) + tuple(self.components.shape[1:]))
        out.index_add_(0, index.to(dev), self.components)
        return Decomposition(self.output, out, labels)

    def sum_heads(self) -> "Decomposition":
        """Merge per-head (and per-token) components back into one per attention block."""
        split = ("attn_head", "attn_head_token")
        merged = self.group(lambda lab: lab.module if lab.kind in split else lab.name)
        heads_of = {lab.module for lab in self.labels if lab.kind in split}
        labels = [ComponentLabel(l.name, l.module, "attn", l.layer) if l.name in heads_of else l
                  for l in merged.labels]
        return Decomposition(merged.output, merged.components, labels)

    def sum_tokens(self) -> "Decomposition":
        """Merge per-token components into per-head components."""
        def key(lab: ComponentLabel) -> str:
            return f"{lab.module}.h{lab.head}" if lab.kind == "attn_head_token" else lab.name
        merged = self.group(key)
        labels = [ComponentLabel(l.name, l.module, "attn_head", l.layer, l.head)
                  if l.head is not None and l.token is None else l for l in merged.labels]
        return Decomposition(merged.output, merged.components, labels)

    def reconstruction_error(self) -> float:
        """max |Σ components − output| / max |output| (the relative error the tests bound)."""
        diff = (self.components.sum(0).double() - self.output.double()).abs().max()
        scale = self.output.double().abs().max().clamp_min(1e-30)
        return float(diff / scale)

    def to(self, *args, **kwargs) -> "Decomposition":
        return Decomposition(self.output.to(*args, **kwargs), self.components.to(*args, **kwargs),
                             self.labels)
