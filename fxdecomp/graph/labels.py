"""Component labels: the static description of one component (shared by every stage)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

KINDS = ("embed", "attn", "attn_head", "attn_head_token", "mlp", "conv", "bias", "init", "other")


@dataclass(frozen=True)
class ComponentLabel:
    """Static description of one component.

    name:   unique, readable (``blocks.7.attn.h3``, ``blocks.7.mlp``, ``blocks.7.attn.proj.bias``)
    module: owning module path in the original model ("" for the root module)
    kind:   one of ``KINDS``
    layer:  index of the residual block the component joins the stream in (None for embed/bias
            terms that join before the first block, and for init)
    head:   attention head index (attn_head / attn_head_token), else None
    token:  source token index (attn_head_token), else None
    """

    name: str
    module: str
    kind: str
    layer: int | None = None
    head: int | None = None
    token: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)
