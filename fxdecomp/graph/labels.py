"""Component labels: the static description of one component (shared by every stage)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

KINDS = ("embed", "attn", "attn_head", "attn_head_token", "mlp", "conv", "bias", "init", "other")


@dataclass(frozen=True)
class TokenPosition:
    """Where one source token sits.

    kind:   "patch" (a cell of a spatial grid), "cls", "distillation", "register", "token"
            (another inserted parameter token), "pad" (a padding/constant cell), "unknown"
            (positions could not be derived; ``source`` says why, naming the op)
    row, col: the cell on the grid of its attention (patch only)
    grid:   (rows, cols) of that grid; stride: pixels per cell (y, x)
    box:    (y0, x0, y1, x1) pixel box of the cell on the input image (patch only)
    source: the parameter an inserted token comes from, with its row (``cls_token[0]``)
    window: the window (batch-folded group) the key belongs to, for window attention
    """

    kind: str
    row: int | None = None
    col: int | None = None
    grid: tuple[int, int] | None = None
    stride: tuple[float, float] | None = None
    box: tuple[int, int, int, int] | None = None
    source: str | None = None
    window: int | None = None

    @property
    def spatial(self) -> bool:
        return self.kind == "patch"


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
    position: where that source token sits on the input (attn_head_token): a ``TokenPosition``
            (grid row/col and pixel box, or "cls"/"register"/"distillation"/...), derived from the
            graph by ``fxdecomp.analyse.positions``; None where it cannot be derived
    """

    name: str
    module: str
    kind: str
    layer: int | None = None
    head: int | None = None
    token: int | None = None
    position: TokenPosition | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["position"] is None:      # labels without a position read as they always did
            del d["position"]
        return d
