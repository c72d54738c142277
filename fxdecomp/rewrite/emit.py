"""Build the decomposed GraphModule: the original forward, plus terms propagated along the path.

The new graph copies every original node (frozen values come from it) and, for each node on the
linear path in topological order, emits the ops of its rule on *chunks* of terms ([c, ...] tensors
with static labels). An add only joins chunk lists (no runtime op); other ops merge chunks into
one tensor first. Labels are static, so the graph has no Python loop over components at run time.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch.fx import Graph, GraphModule, Node

from ..analyse import demand
from ..analyse.structure import Site, Structure
from ..analyse.walk import Walk
from ..errors import UnsupportedGraphError
from ..graph.labels import ComponentLabel, TokenPosition
from ..graph.plan import Demand, Plan, PlanKind
from . import runtime as rt
from .rules.attention import is_pv_equation


@dataclass(frozen=True)
class Chunk:
    node: Node                 # new-graph node holding terms [c, *shape]
    labels: tuple[int, ...]    # raw label id of each of the c components
    # Head-blocked terms: (dim, H, per_head). Along value dim ``dim`` the full value is H equal
    # blocks (attention heads) and component c is zero outside block c // per_head, so the
    # tensor stores only that block ([c, ..., size/H, ...]): no zero padding, and a projection
    # consuming it is one batched per-head contraction.
    block: tuple | None = None
    # Pending per-head projection (W node [E, H·b], H): the terms are blocked_linear(node, W, H)
    # but are not computed yet. ``node`` holds the head-blocked input [c, *rest, b]; ops that act
    # on the rest dims apply to it, and linear maps on the last dim (a norm's centring and γ, a
    # layer scale, the output directions of ``project=``) fold into W, so each component's final
    # value is written once, where all terms of a value are gathered (``Emitter.write``).
    proj: tuple | None = None
    # The value dim holding a pending projection's channels (E) when it is not the last one
    # (NCHW stages, after a permute): ``node`` then holds the input with b in that dim instead
    # ([c, B, b, H, W]), so ops on the other dims (pooling, means, permutes) apply to it as is
    # and a 1x1 convolution folds into W. None: the last dim (the layout above).
    cdim: int | None = None
    # Windowed terms (window attention, tokens mode): (map, windows). The node holds terms for
    # len(labels) // windows components, component k·windows + w being term k on the positions
    # of window w only. ``map`` None: the window of a row is its index along the value's dim 0
    # modulo ``windows`` (straight from the attention, which folds windows into the batch);
    # else an int64 map [1, *rest, S] next to a pending input [c, *rest, S·b] (``rt.window_map``),
    # moved by the same layout ops. Reduced per window at the final mean (``rt.window_reduce``);
    # any rule that does not pass ``windows_ok`` gets the components split first (``unwindow``).
    win: tuple | None = None
    # Factored per-token terms (``rt.probe_factors``): ("rows", v) with ``win``: ``node`` holds
    # the scalar factor s [c, *rest, S] (the window map's shape) and v [c, B·windows, b] the
    # value rows; the pending input is rt.unfactor(s, v, map). ("probe", V, P) (what a window
    # attention's terms start as, ``rt.token_probe``): ``node`` holds weights ω [1, *rest, S]
    # and the map the attention's flat row b'·Q + q, so s = ω · P at those rows
    # (``rt.probe_factors`` gives the "rows" form; the window is row // Q). ("reduced", v)
    # after the per-window reduction: the pending input is rt.outer_terms(node, v), with the
    # channels last in memory even where ``cdim`` is set (then every value dim after ``cdim`` is
    # 1, as for [B, C, 1, 1] pooled to one position: the same memory; ``rt.reshape_reduced``).
    fac: tuple | None = None
    # Deferred moves of a pending projection: ``node`` still holds the input as it was before
    # them (channels last) and ``at`` the positions map [2, *rest, K] the moves and per-row
    # scales were applied to instead (``rt.gather_positions``: the input they give is
    # [c, *rest, K·b]); a permute that moved the channels to ``cdim`` moved K there in the map
    # too ([2, B, K, H, W]). ``Emitter.terms`` gathers it for every rule that does not pass
    # ``lazy_ok``. Never together with ``win`` (windowed chunks move eagerly).
    at: Node | None = None


@dataclass
class Policy:
    """How each root is expanded. ``expand(site) -> "blocks"|"heads"|"tokens"|"init"``."""
    expand: Callable[[Site, Node], str]


GROUP_INDEX = "_fxdecomp_group_index"


class Emitter:
    def __init__(self, gm: GraphModule, walk: Walk, structure: Structure, policy: Policy,
                 backend: str = "auto", token_tables: dict | None = None,
                 root_heads: dict | None = None, project: bool = False):
        self.gm, self.walk, self.structure, self.policy = gm, walk, structure, policy
        self.project = project     # the graph takes output directions D [E, k] as a 2nd input
        self.backend = backend
        self.token_tables = token_tables or {}   # attention node -> analyse.positions.AttentionTokens
        self.root_heads = root_heads or {}       # root -> (channel dim, heads): analyse.channel_heads
        self.facts = walk.facts
        self.graph = Graph()
        self.env: dict[Node, Node] = {}
        self.terms_of: dict[Node, list[Chunk]] = {}
        self.raw: list[ComponentLabel] = []
        self.anchor: Node | None = None
        self.demand, self.requests = demand.compute(walk)
        self._view: dict[Node, object] = {}
        self._taken: dict = {}
        self._positions: dict = {}   # (positions node, what moved it) -> moved positions node
        self._head_counter: dict[str, int] = {}
        # (op, module path) -> windows, where windowed terms were split per window (``unwindow``)
        self.window_splits: dict[tuple[str, str], int] = {}
        self._separate_heads: Counter = Counter(
            structure.site(n).name for n, p in walk.plans.items()
            if p.kind == PlanKind.ATTENTION and len(n.meta["val"].shape) < 4)

    # --------------------------------------------------------------------- helpers for rules
    def layout(self, n: Node) -> Demand:
        """The rows of ``n`` the rule being emitted works on (None: all)."""
        return self._view.get(n)

    def value_at(self, n: Node, layout) -> Node:
        """The original value of ``n`` narrowed to ``layout`` (cached)."""
        if layout is None:
            return self.env[n]
        key = (n, layout)
        if key not in self._taken:
            self._taken[key] = self.call(rt.take, self.env[n], *layout)
        return self._taken[key]

    def orig(self, n):
        """The new-graph node computing the original value of ``n`` (narrowed to the rows the
        current rule works on)."""
        return self.value_at(n, self._view.get(n)) if isinstance(n, Node) else n

    def orig_arg(self, a):
        return torch.fx.node.map_arg(a, self.orig)

    def call(self, fn, *args, **kwargs) -> Node:
        return self.graph.call_function(fn, args, kwargs)

    def chunk(self, node: Node, labels, block=None, win=None, fac=None) -> Chunk:
        return Chunk(node, tuple(labels), block, win=win, fac=fac)

    def pending(self, t: Node, weight: Node, heads: int, labels, cdim: int | None = None,
                win=None, fac=None) -> Chunk:
        """Terms blocked_linear(t, weight, heads), left unevaluated (see ``Chunk.proj``), with
        the channels in value dim ``cdim`` (None: the last; see ``Chunk.cdim``)."""
        return Chunk(t, tuple(labels), None, (weight, heads), cdim, win, fac)

    def channels_last(self, c: Chunk) -> Chunk:
        """A windowed or factored chunk with its channels in value dim ``cdim`` -> the same with
        them last: its input (or factor) and window map, whose channel slot holds the S·b (or
        S) sub-block entries, moved there as views. The per-window runtime functions take the
        channels-last layout; ``channels_at`` moves them back."""
        if c.cdim is None:
            return c
        mv = lambda n: self.call(torch.movedim, n, c.cdim + 1, -1)   # noqa: E731
        win = c.win if c.win is None or c.win[0] is None else (mv(c.win[0]), c.win[1])
        return replace(c, node=mv(c.node), win=win, cdim=None)

    def channels_at(self, c: Chunk, cdim: int | None) -> Chunk:
        """The inverse of ``channels_last``: a channels-last chunk with its channels (and its
        window map's sub-blocks) moved to value dim ``cdim`` (None: kept last)."""
        if cdim is None:
            return c
        mv = lambda n: self.call(torch.movedim, n, -1, cdim + 1)     # noqa: E731
        win = c.win if c.win is None or c.win[0] is None else (mv(c.win[0]), c.win[1])
        return replace(c, node=mv(c.node), win=win, cdim=cdim)

    def unfactor(self, c: Chunk) -> Chunk:
        """Factored terms (``Chunk.fac``) -> their pending input (windowed or not)."""
        if c.fac is None:
            return c
        if c.cdim is not None:   # reduced factors hold the channels last already (below)
            flat = replace(c, cdim=None) if c.fac[0] == "reduced" else self.channels_last(c)
            return self.channels_at(self.unfactor(flat), c.cdim)
        kind, v = c.fac[:2]
        if kind == "probe":    # s read from P at the moved rows; the window map r // Q
            got = self.call(rt.probe_factors, c.node, c.win[0], c.fac[2], v)
            v = self.call(operator.getitem, got, 2)
            c = Chunk(self.call(operator.getitem, got, 0), c.labels, None, c.proj, c.cdim,
                      (self.call(operator.getitem, got, 1), c.win[1]), ("rows", v))
            kind = "rows"
        if kind == "attn":     # the node already holds the terms
            return Chunk(c.node, c.labels, c.block, c.proj, c.cdim, c.win)
        fn = rt.unfactor if kind == "rows" else rt.outer_terms
        arg = c.win[0] if kind == "rows" else None
        node = self.call(fn, c.node, v, arg) if kind == "rows" else self.call(fn, c.node, v)
        return Chunk(node, c.labels, None, c.proj, c.cdim, c.win)

    def unwindow(self, c: Chunk) -> Chunk:
        """Windowed terms (``Chunk.win``) -> one term per component: split by the rows' window
        (``rt.split_windows``) or by the map (``rt.split_by_map``). Correct for any later op,
        but each term is as wide as all windows."""
        c = self.unfactor(c)
        if c.win is None:
            return c
        if c.cdim is not None and c.win[0] is not None:
            return self.channels_at(self.unwindow(self.channels_last(c)), c.cdim)
        wmap, windows = c.win
        if windows == 1:       # one window: the terms already are the components
            return Chunk(c.node, c.labels, c.block, c.proj, c.cdim)
        if self.anchor is not None:
            key = (str(self.anchor.target), self.facts.module_path(self.anchor))
            self.window_splits[key] = max(windows, self.window_splits.get(key, 0))
        if wmap is None:
            block = None if c.block is None else c.block[:2] + (c.block[2] * windows,)
            return Chunk(self.call(rt.split_windows, c.node, windows), c.labels, block, c.proj, c.cdim)
        assert c.cdim is None and c.block is None, "a window map goes with a pending input only"
        return Chunk(self.call(rt.split_by_map, c.node, wmap, windows), c.labels, None, c.proj)

    def refold(self, c: Chunk, weight: Node) -> Chunk:
        """A pending projection with its W replaced (a later linear map folded in); its input,
        deferred moves included, unchanged."""
        return replace(c, proj=(weight, c.proj[1]))

    def moved(self, c: Chunk, ref: Node, apply: Callable[[Node], Node], key) -> Chunk:
        """A pending projection (channels last) moved by an op that only moves rows of its input
        (``apply``: input node -> moved node): the move is deferred, applied to the positions
        map (``Chunk.at``, made from the value ``ref`` before the op when there is none yet).
        Chunks that share a map share its moves: ``key`` names the op. Not for windowed or
        factored chunks (``Chunk.win``/``fac``: their input and window map move eagerly)."""
        assert c.win is None and c.fac is None, "deferred moves of a windowed chunk"
        assert c.at is not None or c.cdim is None, "a positions map starts channels-last"
        at = c.at
        if at is None:
            at = self._cached(("home", ref), lambda: self.call(rt.home_positions, ref))
        return replace(c, at=self._cached((at, key), lambda: apply(at)))

    def as_pending(self, c: Chunk, ref: Node, width: int) -> Chunk:
        """Plain channels-last terms of the value ``ref`` (``width`` channels) as a pending
        projection with W = I and the home positions map: later linear maps of the channels
        fold into W, per-row scales and moves apply to the map, and the terms are read where
        they are needed."""
        c = self.densify(c)
        t = self.call(rt.expand_terms, c.node, ref)
        eye = self.call(rt.identity_weight, width, ref)
        home = self._cached(("home", ref), lambda: self.call(rt.home_positions, ref))
        return replace(self.pending(t, eye, 1, c.labels), at=home)

    def scaled_rows(self, c: Chunk, factor) -> Chunk:
        """A pending projection with deferred moves, its rows scaled by a frozen factor (size 1
        along the last dim): the positions' weights take it."""
        return replace(c, at=self._cached((c.at, "scale", factor),
                                          lambda: self.call(rt.scale_positions, c.at, factor)))

    def _cached(self, key, make: Callable[[], Node]) -> Node:
        if key not in self._positions:
            self._positions[key] = make()
        return self._positions[key]

    def settle(self, c: Chunk) -> Chunk:
        """A chunk with deferred moves -> the same chunk with them applied to its input (a map
        whose K sits at the channel dim ``cdim``: gathered channels-last, then moved there)."""
        if c.at is None:
            return c
        if c.cdim is not None:
            at = self.call(torch.movedim, c.at, c.cdim + 1, -1)
            node = self.call(rt.gather_positions, c.node, at)
            return replace(c, node=self.call(torch.movedim, node, -1, c.cdim + 1), at=None)
        return replace(c, node=self.call(rt.gather_positions, c.node, c.at), at=None)

    def materialize(self, c: Chunk) -> Chunk:
        """A pending projection -> its terms (other chunks unchanged)."""
        c = self.unwindow(c)
        if c.proj is None:
            return c
        c = self.settle(c)
        if c.cdim is not None:
            return Chunk(self.call(rt.blocked_linear_at, c.node, c.proj[0], c.proj[1], c.cdim,
                                   self.backend), c.labels)
        return Chunk(self.call(rt.blocked_linear, c.node, c.proj[0], c.proj[1], self.backend),
                     c.labels)

    def densify(self, c: Chunk) -> Chunk:
        """Head-blocked terms -> plain terms (each component's block placed among zeros)."""
        c = self.materialize(c)
        if c.block is None:
            return c
        return Chunk(self.call(rt.densify_heads, c.node, *c.block), c.labels)

    def _narrow(self, chunks: list[Chunk], have, want, rank: int | None = None) -> list[Chunk]:
        pos = demand.positions(have, want)
        if pos is None:
            return chunks
        out = []
        for c in chunks:
            if c.win is not None and c.win[0] is not None and c.proj is not None \
                    and c.cdim is None and rank is not None and pos[0] < rank - 1 \
                    and (c.fac is None or c.fac[0] in ("rows", "probe")):
                # rows of the positions (a crop after a pad): the window map keeps the same rows
                wmap = self.call(rt.take, c.win[0], pos[0] + 1, pos[1], pos[2])
                out.append(Chunk(self.call(rt.take, c.node, pos[0] + 1, pos[1], pos[2]), c.labels,
                                 None, c.proj, None, (wmap, c.win[1]), c.fac))
                continue
            c = self.unwindow(c)
            if c.block is not None and c.block[0] == pos[0] or c.proj is not None and (
                    rank is None or (pos[0] >= rank - 1 if c.cdim is None else pos[0] == c.cdim)):
                c = self.densify(c)
            if c.at is None and c.proj is not None and c.cdim is None and c.block is None \
                    and c.win is None and c.fac is None and rank is not None and pos[0] < rank - 1:
                # rows of a pending input: taken on a positions map (deferred), so that parts
                # sliced from one input keep reading it (a cat of them merges maps, not copies)
                c = replace(c, at=self._cached(("home", c.node), lambda: self.call(
                    rt.home_positions, self.call(operator.getitem, c.node, 0))))
            if c.at is not None:
                out.append(replace(c, at=self._cached(
                    (c.at, "take", pos), lambda: self.call(rt.take, c.at, pos[0] + 1, pos[1], pos[2]))))
                continue
            out.append(Chunk(self.call(rt.take, c.node, pos[0] + 1, pos[1], pos[2]), c.labels,
                             c.block, c.proj, c.cdim))
        return out

    def terms(self, n: Node, blocked_ok: bool = False, pending_ok: bool = False,
              channel_ok: bool = False, lazy_ok: bool = False,
              windows_ok: bool = False) -> list[Chunk]:
        """Terms of ``n``, at the rows the current rule asked for. Rules that understand
        head-blocked chunks pass ``blocked_ok``, pending projections ``pending_ok`` (with their
        channels last), and also with their channels in another dim ``channel_ok``
        (``Chunk.cdim``), with deferred moves ``lazy_ok`` (``Chunk.at``), windowed terms
        ``windows_ok`` (``Chunk.win``); others get them densified/evaluated/gathered/split."""
        chunks = self._narrow(self.terms_of[n], self.demand[n], self._view.get(n), _rank(n))
        if not windows_ok:
            chunks = [self.unwindow(c) for c in chunks]
        if not lazy_ok:
            chunks = [self.settle(c) for c in chunks]
        if not pending_ok:
            chunks = [self.materialize(c) for c in chunks]
        elif not channel_ok:
            chunks = [self.materialize(c) if c.cdim is not None else c for c in chunks]
        return chunks if blocked_ok else [self.densify(c) if c.proj is None else c for c in chunks]

    def write(self, chunks: list[Chunk], ref: Node) -> Chunk:
        """All ``chunks`` of one value as one terms tensor, each component written once into a
        preallocated slab (pending projections straight into it; ``rt.write_terms``)."""
        chunks = [c if _reduced_factors(c) else self.unwindow(self.settle(c)) for c in chunks]
        parts = [(c.node, c.proj[0], c.proj[1], c.fac[1]) if _reduced_factors(c)
                 else (c.node, c.proj[0], c.proj[1]) if c.proj is not None and c.cdim is None
                 else self.densify(c).node for c in chunks]
        return Chunk(self.call(rt.write_terms, parts, ref, self.backend),
                     sum((c.labels for c in chunks), ()))

    def merged(self, n: Node, blocked_ok: bool = False, windows_ok: bool = False) -> Chunk:
        chunks = self.terms_of[n]
        if len(chunks) > 1:
            chunks = self.terms_of[n] = [self.write(chunks, self.value_at(n, self.demand[n]))]
        c = self._narrow(chunks, self.demand[n], self._view.get(n), _rank(n))[0]
        if not windows_ok:
            c = self.unwindow(c)
        return c if blocked_ok and c.proj is None else self.densify(c)

    def scaled(self, c: Chunk, factor) -> Chunk:
        """``c`` times a scalar or a frozen factor that broadcasts along the last dim (size 1
        there): for a pending projection it applies to the head-blocked input (to the weights
        of its positions when its moves are deferred)."""
        if c.at is not None:
            return self.scaled_rows(c, factor)
        if c.fac is not None and c.fac[0] == "reduced":
            return replace(c, node=self.call(rt.scale_reduced, c.node, c.fac[1], factor))
        return Chunk(self.call(operator.mul, c.node, factor), c.labels, c.block, c.proj, c.cdim,
                     c.win, c.fac)

    def const_chunk(self, node: Node, source, suffix: str) -> Chunk:
        """A constant component (a bias, a shift) created by the rule of the current node."""
        name = _param_name(source, self.facts) or f"{self.structure.site(self.anchor).name}.{suffix}"
        return Chunk(node, (self._const_label(name, self.anchor),))

    # --------------------------------------------------------------------- labels
    def _label(self, **kw) -> int:
        self.raw.append(ComponentLabel(**kw))
        return len(self.raw) - 1

    def _const_label(self, name: str, anchor: Node) -> int:
        site = self.structure.site(anchor)
        if self.policy.expand(site, anchor) == "init":
            return self._label(name="init", module="", kind="init")
        if site.layer is None and self.structure.before_first_merge(anchor):
            kind = "embed"
        else:
            kind = "bias"
        return self._label(name=name, module=site.module if site.layer is not None else "",
                           kind=kind, layer=site.layer)

    def _root_terms(self, n: Node) -> list[Chunk]:
        plan = self.walk.plans[n]
        layout = self.demand[n]
        value = self.value_at(n, layout)
        site = self.structure.site(n)
        mode = self.policy.expand(site, n)
        if plan.kind == PlanKind.CONST:
            return [Chunk(self.call(rt.as_terms, value), (self._const_label(_param_name(n, self.facts) or n.name, n),))]
        if mode == "init" or plan.kind == PlanKind.INIT:
            return [Chunk(self.call(rt.as_terms, value), (self._label(name="init", module="", kind="init"),))]
        if plan.kind == PlanKind.INPUT:
            name = self.structure.embed_name(n)
            return [Chunk(self.call(rt.as_terms, value), (self._label(name=name, module=name, kind="embed"),))]
        if site.layer is None:
            kind = "embed" if self.structure.before_first_merge(n) else "other"
            name = site.name if site.name != "<root>" else n.name
            return [Chunk(self.call(rt.as_terms, value), (self._label(name=name, module=site.module, kind=kind),))]
        heads = self.root_heads.get(n)
        if (plan.kind == PlanKind.ROOT and heads is not None and mode in ("heads", "tokens")
                and (layout is None or layout[0] != heads[0])):
            ids = tuple(self._label(name=f"{site.name}.h{h}", module=site.module, kind="attn_head",
                                    layer=site.layer, head=h) for h in range(heads[1]))
            return [Chunk(self.call(rt.channel_head_blocks, value, *heads), ids, (heads[0], heads[1], 1))]
        if plan.kind == PlanKind.ROOT:
            kind = self.structure.classify(n, site)
            return [Chunk(self.call(rt.as_terms, value),
                          (self._label(name=site.name, module=site.module, kind=kind, layer=site.layer),))]
        shape = tuple(n.meta["val"].shape)
        rows = layout is not None and layout[0] == len(shape) - 2 and layout[2] is None
        if layout is None or rows or (mode != "tokens" and layout[0] != 1):
            return self._attention_terms(n, plan, site, mode, layout)
        # narrowed along another dim: expand the full value, then take the rows
        chunks = self._attention_terms(n, plan, site, mode, None)
        return self._narrow(chunks, None, layout, len(shape))

    def _attention_terms(self, n: Node, plan: Plan, site: Site, mode: str, layout) -> list[Chunk]:
        """Split an attention output per head (and per source token). ``layout``: None, or
        query rows only (heads: rows of the output; tokens: rows of P), or another dim for
        per-head splits (which commute with it)."""
        value = self.value_at(n, layout)
        shape = tuple(n.meta["val"].shape)
        head_dim = 1 if len(shape) >= 4 else None  # [B, H, ..., N, dh]
        heads = int(shape[head_dim]) if head_dim is not None else 1
        base = dict(module=site.module, layer=site.layer)
        if mode == "heads" and head_dim is None and self._separate_heads[site.name] > 1:
            # heads computed as separate attention ops (EfficientViT's cascaded heads)
            h = self._head_counter[site.name] = self._head_counter.get(site.name, -1) + 1
            return [Chunk(self.call(rt.as_terms, value),
                          (self._label(name=f"{site.name}.h{h}", kind="attn_head", head=h, **base),))]
        if mode == "blocks" or (mode == "heads" and head_dim is None):
            return [Chunk(self.call(rt.as_terms, value),
                          (self._label(name=site.name, kind="attn", **base),))]
        if mode == "heads":
            t = self.call(rt.head_blocks, value, head_dim)
            ids = tuple(self._label(name=f"{site.name}.h{h}", kind="attn_head", head=h, **base)
                        for h in range(heads))
            return [Chunk(t, ids, (head_dim, heads, 1))]
        # tokens: frozen probabilities P and values V, split per head and per source token
        form = plan.attention
        if form.form == "sdpa":
            q, k, v = n.args[:3]
            kw = dict(zip(("attn_mask", "dropout_p", "is_causal"), n.args[3:6]))
            kw.update(n.kwargs)
            if kw.get("dropout_p", 0.0):
                raise UnsupportedGraphError("attention dropout is active (dropout_p > 0)", n)
            probs = self.call(rt.attention_probs, self.env[q], self.env[k],
                              self.orig_arg(kw.get("attn_mask")), bool(kw.get("is_causal", False)),
                              kw.get("scale"), bool(kw.get("enable_gqa", False)))
            vals = self.env[v]
            if kw.get("enable_gqa"):
                vals = self.call(rt.repeat_kv, vals, self.env[q])
            n_tok = int(k.meta["val"].shape[-2])
            if n.meta["val"].dtype == torch.float32:
                # P is computed here anyway: the forward reads P @ V instead of running the
                # fused attention a second time (fp32 only: a half-precision forward keeps the
                # model's own kernel and rounding)
                fused, stale = self.env[n], value
                self.env[n] = self.call(torch.matmul, probs, vals)
                self._taken.pop((n, layout), None)
                value = self.value_at(n, layout)
                # (dead code elimination keeps a fused attention: it may draw dropout)
                for old in dict.fromkeys((stale, fused)):
                    if not old.users:
                        self.graph.erase_node(old)
        elif form.form == "matmul" or (form.form == "einsum" and is_pv_equation(form.equation)):
            probs, vals = self.env[form.probs], self.env[form.values]
            n_tok = int(form.probs.meta["val"].shape[-1])
        else:
            raise UnsupportedGraphError(
                f"einsum attention with equation {form.equation!r} cannot be split per source "
                "token: granularity='tokens' needs P @ V in the form '...qk,...kd->...qd' "
                "(use granularity='heads' for this model)", n)
        if layout is not None:
            probs = self.call(rt.take, probs, *layout)
        t = self.call(rt.split_heads_tokens, probs, vals, head_dim, value)
        # window attention folds windows into the batch: each key is a component per window
        # too, so every component is one source token on the image (analyse.positions derives
        # the layout); the terms stay [K, B·windows, ...], windowed (``Chunk.win``), and are
        # split by window only where an op needs it (at the latest, the final reduction)
        table = self.token_tables.get(n)
        ok = table is not None and table.error is None and len(table.positions) == table.windows
        windows = table.windows if ok else 1
        if ok:
            where = lambda w, tok: table.positions[w][tok]  # noqa: E731
        else:   # no position; keep the reason (which op mixes tokens) for whoever needs one
            unknown = None if table is None else _unknown_position(table.error)
            where = lambda w, tok: unknown  # noqa: E731
        ids = tuple(self._label(name=f"{site.name}.h{h}.t{tok}" + (f".w{w}" if windows > 1 else ""),
                                kind="attn_head_token", head=h, token=tok,
                                position=where(w, tok), **base)
                    for h in range(heads) for tok in range(n_tok) for w in range(windows))
        # the terms are rank one per source token: P and V travel along as their factors, for
        # the projection to take them (``Chunk.fac``; the layout [B', H, Q, dh] is tracked)
        fac = ("attn", probs, vals, "bhqd") if head_dim == 1 and len(shape) == 4 \
            and layout is None else None
        return [Chunk(t, ids, None if head_dim is None else (head_dim, heads, n_tok),
                      win=(None, windows) if windows > 1 or fac is not None else None, fac=fac)]

    def _project(self, chunks: list[Chunk], out_ref: Node) -> tuple[list[Chunk], Node]:
        """Map the output's terms through directions D [E, k] (a second graph input): pending
        projections fold D into their W (so they are written at width k), others are
        multiplied. The returned output is out @ D, so the terms still sum to it."""
        last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(last):   # forward(x, project)
            d = self.graph.placeholder("project")
        out = []
        for c in chunks:
            c = c if _reduced_factors(c) else self.unwindow(c)
            if c.proj is not None and c.cdim is None:
                out.append(self.refold(c, self.call(rt.fold_projection, c.proj[0], d)))
            else:
                out.append(self.chunk(self.call(rt.project_terms, self.densify(c).node, out_ref, d),
                                      c.labels))
        return out, self.call(torch.matmul, out_ref, d)

    def _dedupe(self, n: Node, chunks: list[Chunk]) -> list[Chunk]:
        """Keep each raw label once per node: where a component reaches a node along two paths
        (x + conv(x)), its terms are summed, not listed twice (which would grow exponentially
        along a chain of such blocks)."""
        seen = [i for c in chunks for i in c.labels]
        if len(seen) == len(set(seen)):
            return chunks
        unique = list(dict.fromkeys(seen))
        pos = {lab: k for k, lab in enumerate(unique)}
        cat = self.call(rt.cat_chunks, [self.densify(c).node for c in chunks], self.orig(n))
        index = self.call(rt.index_tensor, [pos[i] for i in seen], cat)
        out = self.call(rt.group_components, cat, index, len(unique))
        return [Chunk(out, tuple(unique))]

    # --------------------------------------------------------------------- the pass
    def run(self) -> tuple[GraphModule, list[ComponentLabel]]:
        for n in self.facts.nodes:
            if n.op == "output":
                continue
            self.env[n] = self.graph.node_copy(n, lambda a: self.env[a])
            if n not in self.walk.plans:
                continue
            self.anchor = n
            plan = self.walk.plans[n]
            layout = self.demand[n]
            if plan.is_root:
                self.terms_of[n] = self._root_terms(n)
            elif n in self.requests:      # the rule computes only the rows needed
                self._view = dict(self.requests[n])
                self._view[n] = layout
                self.terms_of[n] = self._dedupe(n, plan.emit(self, n))
                self._view = {}
            else:                         # full terms, then keep the rows needed
                chunks = self._dedupe(n, plan.emit(self, n))
                self.terms_of[n] = self._narrow(chunks, None, layout, _rank(n))
        target = self.walk.output
        out_ref = self.env[target]
        self.anchor = None     # a split at the output itself is what the output holds: not noted
        chunks = self.terms_of[target]
        if self.project:
            chunks, out_ref = self._project(chunks, out_ref)
        raw_terms = self.write(chunks, out_ref).node
        raw_ids = [i for c in chunks for i in c.labels]
        labels, index = _group_labels([self.raw[i] for i in raw_ids])
        if index == list(range(len(index))):
            components = raw_terms
        else:
            self.gm.register_buffer(GROUP_INDEX, torch.tensor(index, dtype=torch.long), persistent=False)
            idx = self.graph.get_attr(GROUP_INDEX)
            components = self.call(rt.group_components, raw_terms, idx, len(labels))
        _reduce_before_bias(self.graph)
        self.graph.output((out_ref, components))
        _common_calls(self.graph)
        new = GraphModule(self.gm, self.graph, class_name="DecomposedGraph")
        new.graph.eliminate_dead_code()
        new.recompile()
        return new, labels


def _reduce_before_bias(graph: Graph) -> None:
    """A linear map's output term, the forward's own output less the bias
    (``rt.linear_output_terms``: an MLP's, when its hidden activation is one component), that
    reaches nothing but a reduction over positions (``rt.reduce_positions``: e.g. a final mean
    through patch mergings, whose norms' 1/σ the positions map carries) through moves only:
    the reduction reads the forward's own output as it is, and the same moves and reduction of
    the bias are subtracted after,
        reduce(moves(out − b)) = reduce(moves(out)) − reduce(moves(b)),
    so the term is never written at full size. Moves keep the bias a broadcast row, so its
    share costs a weighted sum of weights; a per-row scale on the way (a norm applied to the
    terms themselves) would spread it to every row, and the term is then left as it is."""
    a = torch.ops.aten
    moves = {rt.expand_terms, rt.reshape_rest} | {rt.pusher(op) for op in (
        a.permute.default, a.reshape.default, a.view.default, a._unsafe_view.default,
        a.flatten.using_ints, a.transpose.int, a.contiguous.default, a.roll.default,
        a.select.int, a.slice.Tensor, a.unsqueeze.default)}
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not rt.linear_output_terms or n.args[1] is None:
            continue
        chain, cur = [], n
        while len(cur.users) == 1:
            (u,) = cur.users
            if u.op != "call_function" or u.args[0] is not cur or \
                    cur in u.args[1:] or cur in u.kwargs.values():
                break
            if u.target not in moves:
                chain.append(u)
                break
            chain.append(u)
            cur = u
        if not chain or chain[-1].target is not rt.reduce_positions:
            continue
        out, bias = n.args[:2]
        cdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("channel_dim", -1)
        with graph.inserting_before(n):
            whole = graph.call_function(rt.as_terms, (out,))
            b = graph.call_function(rt.bias_terms, (bias, out, cdim))
        for u in chain:
            with graph.inserting_before(u):
                b = graph.call_function(u.target, (b,) + tuple(u.args[1:]), dict(u.kwargs))
        chain[0].replace_input_with(n, whole)
        reduced = chain[-1]
        with graph.inserting_after(reduced):
            less = graph.call_function(torch.sub, (reduced, b))
        reduced.replace_all_uses_with(less, delete_user_cb=lambda user: user is not less)
        graph.erase_node(n)


def _common_calls(graph: Graph) -> None:
    """Calls of the runtime (all pure: each returns a new value from its arguments, nothing
    written into them) made twice with the same arguments are made once: rules that emit per
    chunk repeat shape-only constants (an identity W at a merge, for every chunk made pending
    there) and, after them, the same folds of those (``rt.fold_*``). In graph order, so a merge
    exposes the ones it makes equal downstream."""
    seen: dict = {}
    for n in list(graph.nodes):
        if n.op != "call_function" or not (n.target is operator.getitem or getattr(
                n.target, "__module__", None) == rt.__name__):
            continue
        try:
            key = (n.target, _frozen(n.args), _frozen(n.kwargs))
            hash(key)
        except TypeError:      # an argument that is not hashable (a slice before 3.12): kept
            continue
        first = seen.setdefault(key, n)
        if first is not n:
            n.replace_all_uses_with(first)
            graph.erase_node(n)


def _frozen(v):
    """Arguments as a hashable key: lists and tuples as tagged tuples, dicts as sorted items,
    numbers by value and type (1 and 1.0 differ), nodes by identity."""
    if isinstance(v, (list, tuple)):
        return (type(v).__name__,) + tuple(_frozen(x) for x in v)
    if isinstance(v, dict):
        return ("dict",) + tuple(sorted((k, _frozen(x)) for k, x in v.items()))
    if isinstance(v, torch.Tensor):      # (== is elementwise): such a call is kept
        raise TypeError("a tensor argument")
    return (type(v).__name__, v)


def _reduced_factors(c: Chunk) -> bool:
    """A pending chunk of factored terms already reduced per window (``Chunk.fac``)."""
    return c.fac is not None and c.fac[0] == "reduced" and c.proj is not None and c.cdim is None


def _rank(n: Node) -> int | None:
    val = n.meta.get("val") if isinstance(n, Node) else None
    return len(val.shape) if isinstance(val, torch.Tensor) else None


def _unknown_position(error) -> TokenPosition:
    return TokenPosition("unknown", source=error)


def _param_name(n, facts) -> str | None:
    """Qualified name of the parameter/buffer a constant comes from (first one found)."""
    seen = set()
    stack = [n] if isinstance(n, Node) else []
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.op == "get_attr":
            return facts.strip(str(x.target))
        stack.extend(reversed(x.all_input_nodes))
    return None


def _group_labels(raw: list[ComponentLabel]) -> tuple[list[ComponentLabel], list[int]]:
    """Merge raw labels with equal names (their terms are summed); keep first-seen order."""
    groups: dict[str, int] = {}
    labels: list[ComponentLabel] = []
    index = []
    for lab in raw:
        if lab.name not in groups:
            groups[lab.name] = len(labels)
            labels.append(lab)
        index.append(groups[lab.name])
    return labels, index
