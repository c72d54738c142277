"""Where each attention's source tokens sit on the input image, derived from the graph.

Idea: every tensor in the exported graph is paired with a *position tensor* of the same shape
that says, per element, which token it belongs to: the pixel centre (y, x) of the token's
receptive field on the input image, the image (batch) index b, and a tag (0 = image-derived
token; k ≥ 1 = row k of a parameter inserted as a token, such as CLS, a register or a
distillation token; -1 = a constant/padding cell; -2 = no single token). The graph is run once on
the example, and each op maps positions by its own kind, never by architecture:

* layout ops (reshape/view/permute/transpose/roll/pad/slice/select/cat/stack/unbind/expand/...)
  are re-run on the position tensors with the same arguments: a token goes where its data goes
  (window partition, cyclic shift and window-major batch folding included);
* elementwise / broadcasting ops (add, mul, norms, activations) keep each element's token,
  preferring an image-derived token over a parameter's (``x + pos_embed`` is the patch);
* contractions over the last dim (linear, matmul, mm, bmm, sdpa) map row r to row r: a token
  maps to itself; where the contracted dim held several tokens (patch merging) the result is
  their mean position (the merged cell);
* conv / pooling over [B, C, H, W] put output cell (i, j) at the receptive-field centre
  ``i·s − p + d·(k−1)/2`` of the input grid.

Anything else gives tag -2 ("no single token") and remembers the op, so an attention whose keys
cannot be placed is reported with that op's name.

For attention node A with values V [B', ..., N, d] (B' = B · windows: window attention folds
windows into the batch, window-major per image), ``token_tables`` returns an ``AttentionTokens``:
``positions[w][t]`` is where key t of window w sits (row, col on the grid of that stage, plus its
pixel box), or what non-spatial token it is.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from ..graph.labels import TokenPosition
from ..graph.ops import op_name
from ..graph.plan import PlanKind

IMAGE, CONST, MIXED = 0, -1, -2
_DEBUG = False  # print why an op could not be mapped (development aid)

LAYOUT = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "unsqueeze",
    "squeeze", "flatten", "unflatten", "roll", "slice", "select", "narrow", "split",
    "split_with_sizes", "chunk", "unbind", "cat", "concat", "stack", "index_select", "index",
    "repeat", "unfold", "movedim", "getitem", "permute_copy", "view_copy", "expand_copy",
    "slice_copy", "select_copy", "unsqueeze_copy", "squeeze_copy", "transpose_copy",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "flip",
}
IDENTITY = {"clone", "contiguous", "alias", "detach", "dropout", "_to_copy", "to", "type_as",
            "lift_fresh_copy", "native_dropout"}
PAD = {"constant_pad_nd", "pad"}
CONTRACT_LAST = {"linear", "matmul", "bmm", "mm", "addmm", "scaled_dot_product_attention",
                 "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"}
SPATIAL = {"conv2d", "convolution", "avg_pool2d", "max_pool2d", "max_pool2d_with_indices",
           "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"}
REDUCE = {"mean", "sum", "amax", "amin"}
# same shape in and out, but each output mixes elements along ``dim``: a token keeps its place
# only when that dim is the last (channels / keys), never along the token dims
ALONG_DIM = {"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax", "cumsum",
             "cumprod", "cummax", "cummin", "logcumsumexp", "sort", "argsort"}


class PositionError(ValueError):
    """Token positions cannot be derived (raised by users of the tables; see ``AttentionTokens``)."""




@dataclass
class AttentionTokens:
    """Key-token positions of one attention: ``positions[w][t]`` for window w, key t.
    ``windows`` is how many batch rows of the attention belong to one image (1 without window
    attention); batch row b' holds window b' % windows of image b' // windows."""

    windows: int
    positions: list[list[TokenPosition]]
    grid: tuple[int, int] | None
    error: str | None = None


@dataclass
class _Pos:
    y: torch.Tensor      # float: pixel-centre row (NaN when not an image token)
    x: torch.Tensor      # float: pixel-centre column
    b: torch.Tensor      # long: image index (-1: any)
    tag: torch.Tensor    # long: IMAGE / CONST / MIXED / parameter token id ≥ 1

    def map(self, fn) -> "_Pos":
        return _Pos(fn(self.y, "y"), fn(self.x, "x"), fn(self.b, "b"), fn(self.tag, "tag"))

    def expand(self, shape) -> "_Pos":
        return self.map(lambda t, _: t.expand(shape))


_FILL = {"y": float("nan"), "x": float("nan"), "b": -1, "tag": CONST}


def _full(shape, tag: int) -> _Pos:
    """Positions of a value that holds no image token (broadcast views: no memory)."""
    shape = tuple(shape)
    nan = torch.tensor(float("nan")).expand(shape)
    return _Pos(nan, nan, torch.tensor(-1).expand(shape), torch.tensor(tag).expand(shape))


class _Tracer:
    def __init__(self, gm: GraphModule, record: set[Node]):
        self.gm, self.record = gm, record
        self.param_rows: list[tuple[int, int, str]] = []   # (first tag, rows, parameter)
        self.mixed_by: dict[Node, str] = {}
        self.recorded: dict[Node, _Pos] = {}

    # ------------------------------------------------------------------ sources
    def image(self, x: torch.Tensor) -> _Pos:
        if x.dim() != 4:
            return _full(x.shape, MIXED)
        B, _, H, W = x.shape
        y = (torch.arange(H, dtype=torch.float32) + 0.5).view(1, 1, H, 1).expand(x.shape)
        xx = (torch.arange(W, dtype=torch.float32) + 0.5).view(1, 1, 1, W).expand(x.shape)
        b = torch.arange(B).view(B, 1, 1, 1).expand(x.shape)
        return _Pos(y, xx, b, torch.zeros(x.shape, dtype=torch.long))

    def param(self, name: str, value: torch.Tensor) -> _Pos:
        """Each row (all dims but the last) of a parameter is a token of its own."""
        if value.dim() == 0:
            return _full(value.shape, CONST)
        rows = int(math.prod(value.shape[:-1]))
        base = (self.param_rows[-1][0] + self.param_rows[-1][1]) if self.param_rows else 1
        self.param_rows.append((base, rows, name))
        tag = (torch.arange(rows) + base).view(tuple(value.shape[:-1]) + (1,)).expand(value.shape)
        res = _full(value.shape, CONST)
        return _Pos(res.y, res.x, res.b, tag)

    def param_name(self, tag: int) -> str:
        for base, rows, name in self.param_rows:
            if base <= tag < base + rows:
                return f"{name}[{tag - base}]"
        return "?"

    # ------------------------------------------------------------------ the run
    def run(self, example: torch.Tensor) -> None:
        env: dict[Node, object] = {}
        pos: dict[Node, object] = {}
        self.env = env
        nodes = list(self.gm.graph.nodes)
        last_use: dict[Node, int] = {}
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        for i, n in enumerate(nodes):
            if n.op == "placeholder":
                env[n] = example
                pos[n] = self.image(example)
            elif n.op == "get_attr":
                v = _fetch(self.gm, str(n.target))
                env[n] = v
                if isinstance(v, torch.Tensor):
                    name = str(n.target)
                    pos[n] = self.param(name, v) if v.dim() >= 2 else _full(v.shape, CONST)
            elif n.op == "call_function":
                args = torch.fx.node.map_arg(n.args, lambda a: env[a])
                kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
                out = n.target(*args, **kwargs)
                env[n] = out
                pos[n] = self.position(n, out, pos)
                if n in self.record:
                    self.recorded[n] = pos[n]
            elif n.op == "output":
                break
            for a in n.all_input_nodes:
                if last_use.get(a) == i and a not in self.record:
                    env.pop(a, None)
                    pos.pop(a, None)

    def position(self, n: Node, out, pos) -> object:
        name = op_name(n)
        ins = [a for a in n.all_input_nodes if isinstance(pos.get(a), (_Pos, tuple, list))]
        if not isinstance(out, (torch.Tensor, tuple, list)):
            return None
        if not ins:                                   # arange, zeros, full, ...: constants
            return _shape_like(out, CONST)
        try:
            res = self._position(n, name, out, pos)
        except Exception as e:                        # an op signature this map did not expect
            if _DEBUG: print("position map failed", n.format_node(), repr(e))
            res = None
        if res is None:
            res = _shape_like(out, MIXED)
            self.mixed_by.setdefault(n, name)
        else:
            src = next((self.mixed_by[a] for a in ins if a in self.mixed_by), None)
            if src is not None:
                self.mixed_by[n] = src
        return res

    def _position(self, n: Node, name: str, out, pos):
        P = lambda a: pos[a] if isinstance(a, Node) else a  # noqa: E731
        if n.target is operator.getitem:
            src = pos[n.args[0]]
            return src[n.args[1]] if isinstance(src, (tuple, list)) else None
        if name in IDENTITY:
            src = pos[n.args[0]]
            return src if isinstance(src, _Pos) and tuple(src.y.shape) == tuple(out.shape) else None
        if name in LAYOUT:
            return self._layout(n, P)
        if name in PAD:
            return self._pad(n, P)
        if name in CONTRACT_LAST:
            first = n.args[1] if name == "addmm" else n.args[0]
            src = pos[first]
            if name in ("mm", "addmm", "linear", "matmul", "bmm") and not _has_image(src):
                return None                           # W @ x: rows are not tokens
            target = out[0] if isinstance(out, (tuple, list)) else out
            rows = _reduce(src, [-1], keepdim=True)
            shape = tuple(target.shape)
            res = rows.map(lambda t, _: t.expand(shape[:-1] + (1,)).expand(shape))
            return (res,) + tuple(_shape_like(o, MIXED) for o in out[1:]) if isinstance(out, (tuple, list)) else res
        if name in SPATIAL:
            return self._spatial(n, name, out, pos)
        if name in REDUCE:
            dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
            src = pos[n.args[0]]
            if dims is None or dims == []:
                dims = list(range(src.y.dim()))
            dims = [dims] if isinstance(dims, int) else list(dims)
            return _reduce(src, dims, keep)
        if name in ALONG_DIM:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", -1)
            src = pos[n.args[0]]
            if not isinstance(src, _Pos) or dim % src.y.dim() != src.y.dim() - 1:
                return None                           # mixes tokens
            return src if not isinstance(out, (tuple, list)) else \
                (src,) + tuple(_shape_like(o, MIXED) for o in out[1:])
        # elementwise / broadcasting: every output of the op's shape keeps its token
        target = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(target, torch.Tensor):
            return None
        shape = tuple(target.shape)
        cands = []
        for a in n.all_input_nodes:
            p = pos.get(a)
            if isinstance(p, _Pos):
                try:
                    cands.append(p.expand(shape))
                except RuntimeError:              # a per-channel parameter of another layout
                    continue
        if not cands:
            return None
        res = _merge(cands)
        if isinstance(out, (tuple, list)):
            return (res,) + tuple(_shape_like(o, MIXED) for o in out[1:])
        return res

    def _layout(self, n: Node, P):
        def run(field):
            def sub(a):
                real = self.env.get(a)
                if isinstance(real, torch.Tensor) and not real.is_floating_point():
                    return real                       # index tensors stay what they are
                p = P(a)
                return getattr(p, field) if isinstance(p, _Pos) else self.env.get(a, a)
            args = torch.fx.node.map_arg(n.args, sub)
            kwargs = torch.fx.node.map_arg(n.kwargs, sub)
            if op_name(n) in ("view", "_unsafe_view", "view_copy"):   # positions may be strided
                return torch.reshape(args[0], args[1])
            return n.target(*args, **kwargs)
        outs = {f: run(f) for f in ("y", "x", "b", "tag")}
        if isinstance(outs["y"], (tuple, list)):
            return tuple(_Pos(*(outs[f][i] for f in ("y", "x", "b", "tag"))) for i in range(len(outs["y"])))
        return _Pos(outs["y"], outs["x"], outs["b"], outs["tag"])

    def _pad(self, n: Node, P):
        src = P(n.args[0])
        pads = n.args[1]
        res = {}
        for f in ("y", "x", "b", "tag"):
            t = getattr(src, f)
            res[f] = torch.nn.functional.pad(t if f in ("y", "x") else t.float(), list(pads),
                                             value=_FILL[f])
            if f in ("b", "tag"):
                res[f] = res[f].long()
        return _Pos(res["y"], res["x"], res["b"], res["tag"])

    def _spatial(self, n: Node, name: str, out, pos):
        """Output cell (i, j) sits at the receptive-field centre i·s − p + d·(k−1)/2 of the input
        grid (the input's positions are a regular grid along H and W)."""
        x = n.args[0]
        src = pos[x]
        target = out[0] if isinstance(out, (tuple, list)) else out
        if src.y.dim() != 4 or target.dim() != 4:
            return None
        H, W = src.y.shape[-2:]
        Ho, Wo = target.shape[-2:]
        if name in ("conv2d", "convolution"):
            w = n.args[1]
            k = tuple(w.meta["val"].shape[-2:])
            stride, padding, dilation = (_pair(n.args[i]) if len(n.args) > i else d
                                         for i, d in ((3, (1, 1)), (4, (0, 0)), (5, (1, 1))))
            if name == "convolution" and len(n.args) > 6 and n.args[6]:
                return None                               # transposed conv
        elif name in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_max_pool2d"):
            stride = (H // Ho, W // Wo)
            k = (H - (Ho - 1) * stride[0], W - (Wo - 1) * stride[1])
            padding, dilation = (0, 0), (1, 1)
        else:
            k = _pair(n.args[1])
            stride = _pair(n.args[2]) if len(n.args) > 2 and n.args[2] else k
            padding = _pair(n.args[3]) if len(n.args) > 3 else (0, 0)
            dilation = _pair(n.args[4]) if name.startswith("max") and len(n.args) > 4 else (1, 1)
        img = src.tag == IMAGE
        if not bool((img | (src.tag == CONST)).all()) or not bool(img.any()):
            return None                                   # only image cells and padding
        B = src.y.shape[0]
        img0 = img[:, 0]                                          # channel 0: [B, H, W]
        yrow = torch.where(img0, src.y[:, 0], float("nan")).nanmean(dim=2)            # [B, H]
        xcol = torch.where(img0, src.x[:, 0], float("nan")).nanmean(dim=1)            # [B, W]
        ys = _axis_at(yrow, Ho, k[0], stride[0], padding[0], dilation[0])             # [B, Ho]
        xs = _axis_at(xcol, Wo, k[1], stride[1], padding[1], dilation[1])             # [B, Wo]
        shape = tuple(target.shape)
        y = ys.view(B, 1, Ho, 1).expand(shape)
        xx = xs.view(B, 1, 1, Wo).expand(shape)
        b = src.b[:, :1, :1, :1].expand(shape)
        res = _Pos(y, xx, b, torch.zeros(shape, dtype=torch.long))
        if isinstance(out, (tuple, list)):
            return (res,) + tuple(_shape_like(o, MIXED) for o in out[1:])
        return res


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _pair(v):
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return v if len(v) == 2 else (v[0], v[0])


def _axis_at(coord: torch.Tensor, n_out: int, k: int, s: int, p: int, d: int) -> torch.Tensor:
    """Coordinates [B, n_out] at input index i·s − p + d·(k−1)/2 of a regular axis ``coord``
    [B, n_in] (NaN at padding; the axis is fitted from its first two known entries)."""
    c = torch.arange(n_out, dtype=torch.float32) * s - p + d * (k - 1) / 2
    known = (~torch.isnan(coord[0])).nonzero().flatten()
    i0 = int(known[0])
    i1 = int(known[1]) if known.numel() > 1 else None
    origin = coord[:, i0:i0 + 1]
    step = (coord[:, i1:i1 + 1] - origin) / (i1 - i0) if i1 is not None else torch.zeros_like(origin)
    return origin + (c.view(1, -1) - i0) * step


def _uniform(t: torch.Tensor) -> int | None:
    """The value of a tensor that is one scalar broadcast (all strides 0), else None."""
    if t.dim() == 0 or all(st == 0 for st in t.stride()):
        return int(t[(0,) * t.dim()]) if t.numel() else None
    return None


def _rank_of(tag: int) -> int:
    return 3 if tag == IMAGE else 2 if tag > 0 else 1 if tag == CONST else 0


def _merge(cands: list[_Pos]) -> _Pos:
    """Elementwise: each element keeps the best-ranked input's token (``_rank``). Fast paths:
    an input that is one broadcast constant (a bias, a norm weight) only fills lower-ranked
    cells, and nothing replaces cells that already hold image tokens."""
    res = cands[0]
    for c in cands[1:]:
        cval, rval = _uniform(c.tag), _uniform(res.tag)
        if cval is not None and rval is not None:
            if _rank_of(cval) > _rank_of(rval):
                res = c
            continue
        if rval == IMAGE or (cval is not None and _rank_of(cval) <= 1
                             and not bool((res.tag == MIXED).any())):
            continue
        if not bool((res.tag != IMAGE).any()):
            continue
        better = _rank(c.tag) > _rank(res.tag)
        if not bool(better.any()):
            continue
        res = _Pos(*(torch.where(better, getattr(c, f), getattr(res, f)) for f in ("y", "x", "b", "tag")))
    return res


def _rank(tag: torch.Tensor) -> torch.Tensor:
    """Preference when two inputs meet elementwise: image > parameter token > constant > mixed."""
    return ((tag == IMAGE).to(torch.int8) * 3 + (tag > 0).to(torch.int8) * 2
            + (tag == CONST).to(torch.int8))


def _has_image(p) -> bool:
    return isinstance(p, _Pos) and bool((p.tag == IMAGE).any())


def _reduce(src: _Pos, dims, keepdim: bool) -> _Pos:
    """Several elements become one: mean image position; a single tag if all agree, else the
    image part if the rest is padding, else MIXED."""
    dims = [d % src.y.dim() for d in dims]
    if len(dims) == 1 and _constant_along(src, dims[0]):      # the common case: one token
        return src.map(lambda t, _: t.narrow(dims[0], 0, 1) if keepdim else t.select(dims[0], 0))
    img = src.tag == IMAGE
    y = torch.where(img, src.y, float("nan")).nanmean(dim=dims, keepdim=keepdim)
    x = torch.where(img, src.x, float("nan")).nanmean(dim=dims, keepdim=keepdim)
    tmax = src.tag.amax(dim=dims, keepdim=keepdim)
    tmin = src.tag.amin(dim=dims, keepdim=keepdim)
    any_img = img.any(dim=dims, keepdim=keepdim)
    only_img_or_const = ((src.tag == IMAGE) | (src.tag == CONST)).all(dim=dims, keepdim=keepdim)
    tag = torch.where(tmax == tmin, tmax,
                      torch.where(any_img & only_img_or_const, IMAGE, MIXED))
    b = src.b.amax(dim=dims, keepdim=keepdim)
    return _Pos(y, x, b, tag)


def _constant_along(src: _Pos, dim: int) -> bool:
    if src.y.shape[dim] <= 1:
        return True
    for t in (src.tag, src.b):
        if t.stride(dim) and not bool((t == t.narrow(dim, 0, 1)).all()):
            return False
    for t in (src.y, src.x):
        if t.stride(dim):
            t0 = t.narrow(dim, 0, 1)
            if not bool(((t == t0) | (torch.isnan(t) & torch.isnan(t0))).all()):
                return False
    return True


def _shape_like(out, tag):
    if isinstance(out, torch.Tensor):
        return _full(tuple(out.shape), tag)
    if isinstance(out, (tuple, list)):
        return tuple(_shape_like(o, tag) if isinstance(o, torch.Tensor) else None for o in out)
    return None


def _special_kind(source: str) -> str:
    low = source.lower()
    if "dist" in low:
        return "distillation"
    if "reg" in low:
        return "register"
    if "cls" in low or "class" in low:
        return "cls"
    return "token"


def token_tables(gm: GraphModule, example: torch.Tensor, values: dict[Node, Node],
                 prefix: str = "") -> dict[Node, AttentionTokens]:
    """Key-token positions for each attention node in ``values`` (attention node -> the node
    holding its values V [B', ..., N, d], keys along dim −2). ``example`` is an input the graph
    accepts ([B, C, H, W]); the graph is run once on it with position tensors alongside."""
    if example.dim() != 4:
        err = f"token positions need an image input [B, C, H, W], got shape {tuple(example.shape)}"
        return {a: AttentionTokens(1, [], None, err) for a in values}
    tracer = _Tracer(gm, set(values.values()))
    with torch.no_grad():
        tracer.run(example)
    B, _, H_img, W_img = example.shape
    out = {}
    for attn, v in values.items():
        p = tracer.recorded.get(v)
        out[attn] = _table(attn, v, p, tracer, B, (H_img, W_img), prefix)
    return out


def _table(attn: Node, v: Node, p, tracer: _Tracer, B: int, image_hw, prefix: str) -> AttentionTokens:
    if not isinstance(p, _Pos) or p.y.dim() < 2:
        return AttentionTokens(1, [], None, f"no positions for the values of {attn.name}")
    # keys along dim -2; keep batch dim 0; take element 0 of every other dim
    idx = [slice(None)] + [0] * (p.y.dim() - 3) + [slice(None), 0]
    f = {k: getattr(p, k)[tuple(idx)] for k in ("y", "x", "b", "tag")}          # [B', N]
    tag = f["tag"]
    if bool((tag == MIXED).any()):
        op = tracer.mixed_by.get(v, "?")
        return AttentionTokens(1, [], None,
                               f"the keys of attention {attn.name} do not descend from single "
                               f"image tokens through layout ops: op {op!r} mixes tokens")
    Bp = tag.shape[0]
    if Bp % B:
        return AttentionTokens(1, [], None, f"attention {attn.name}: batch {Bp} is not a multiple "
                               f"of the image batch {B}")
    nw = Bp // B
    img = tag == IMAGE
    expect = (torch.arange(Bp) // nw).view(-1, 1).expand_as(tag)
    if bool((img & (f["b"] != expect)).any()):
        return AttentionTokens(1, [], None, f"attention {attn.name}: windows are not folded into "
                               "the batch image-major (b' = b·windows + w)")
    ys, xs = f["y"][:nw][img[:nw]], f["x"][:nw][img[:nw]]
    grid, stride = None, None
    if ys.numel():
        sy = _step(ys, image_hw[0])
        sx = _step(xs, image_hw[1])
        stride = (sy, sx)
        grid = (max(1, math.ceil(image_hw[0] / sy - 1e-6)), max(1, math.ceil(image_hw[1] / sx - 1e-6)))
    positions = []
    for w in range(nw):
        row = []
        for t in range(tag.shape[1]):
            k = int(tag[w, t])
            if k == IMAGE:
                r = min(grid[0] - 1, int(float(f["y"][w, t]) // stride[0]))
                c = min(grid[1] - 1, int(float(f["x"][w, t]) // stride[1]))
                box = (int(round(r * stride[0])), int(round(c * stride[1])),
                       min(image_hw[0], int(round((r + 1) * stride[0]))),
                       min(image_hw[1], int(round((c + 1) * stride[1]))))
                row.append(TokenPosition("patch", r, c, grid, stride, box, None,
                                         w if nw > 1 else None))
            elif k > 0:
                src = tracer.param_name(k)
                if prefix and src.startswith(prefix):
                    src = src[len(prefix):]
                row.append(TokenPosition(_special_kind(src), source=src, window=w if nw > 1 else None))
            else:
                row.append(TokenPosition("pad", window=w if nw > 1 else None))
        positions.append(row)
    return AttentionTokens(nw, positions, grid)


def _step(coords: torch.Tensor, extent: int) -> float:
    u = torch.unique(torch.round(coords * 1000) / 1000)
    if u.numel() < 2:
        return float(extent)
    return float((u[1:] - u[:-1]).min())


def attention_values(walk) -> dict[Node, Node]:
    """Attention node -> the node holding its values V, for every attention the walk found."""
    out = {}
    for n, plan in walk.plans.items():
        form = plan.attention
        if plan.kind is not PlanKind.ATTENTION or form is None:
            continue
        if form.form == "sdpa":
            out[n] = n.args[2]
        elif form.values is not None:          # P @ V as a matmul or a '...qk,...kd' einsum
            out[n] = form.values
    return out


def token_tables_for(gm: GraphModule, walk, example: torch.Tensor, dynamic: bool,
                     prefix: str = "") -> dict[Node, AttentionTokens]:
    """``token_tables`` for every attention of ``walk``, run at a batch the graph accepts (two
    images where the batch is dynamic, so the window folding b' = b·windows + w is checked).
    Never raises: a failure is recorded in each table's ``error`` (labels then carry no
    position, and whatever needs positions reports that error)."""
    values = attention_values(walk)
    if not values:
        return {}
    x = example
    if dynamic and x.shape[0] == 1:
        x = x.expand(2, *x.shape[1:]).contiguous()
    try:
        return token_tables(gm, x.detach(), values, prefix)
    except Exception as e:  # positions are an annotation: never break the decomposition
        err = f"token positions could not be derived: {type(e).__name__}: {e}"
        return {a: AttentionTokens(1, [], None, err) for a in values}
