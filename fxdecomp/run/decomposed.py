"""The user-facing module: decompose(model, x) -> DecomposedModel; dm(x) -> Decomposition."""
from __future__ import annotations

import warnings
from typing import Literal, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from ..analyse.collapse import BlockCoverage, block_coverage
from ..analyse.facts import GraphFacts
from ..analyse.structure import Site, Structure
from ..analyse.stream import walk_through_stream
from ..analyse.walk import Walk
from ..capture.export import capture, check_input, check_model, export_friendly, model_tensor
from ..errors import CollapseError, FxDecompError, InputError, UnsupportedGraphError
from ..graph.ops import op_name
from ..graph.plan import PlanKind
from ..rewrite.emit import Emitter, Policy
from ..rewrite.rules import RULES
from .decomposition import ComponentLabel, Decomposition

Granularity = Literal["blocks", "heads", "tokens"]
GRANULARITIES = ("blocks", "heads", "tokens")


def _build(model: nn.Module, example: torch.Tensor, granularity: str, layers, dynamic_batch=True,
           backend: str = "auto", captured=None, allow_collapse: bool = False,
           project: bool = False):
    captured = captured or capture(model, example, dynamic_batch)
    gm, dynamic = captured
    facts = GraphFacts(gm, RULES, granularity, prefix=getattr(model, "module_prefix", ""))
    w = walk_through_stream(gm, facts)
    structure = Structure(w)
    blocks = structure.blocks
    if not blocks:
        roots = [n for n in w.order if w.plans[n].kind in (PlanKind.ROOT, PlanKind.ATTENTION)]
        raise UnsupportedGraphError(
            "no residual block was found on the path to the output: nothing to decompose. The "
            "output depends on everything upstream through this nonlinear op; decompose a "
            "representation taken before it (e.g. another `output=` of the adapters)",
            roots[-1] if roots else w.output)
    coverage = block_coverage(w, structure)
    if coverage.collapsed and not allow_collapse:
        raise CollapseError(
            coverage.describe() + ". Decompose a representation taken before that op (another "
            "`output=` of the adapters), or pass allow_collapse=True to decompose anyway",
            coverage.absorber)
    selected = _resolve_layers(layers, len(blocks))
    expanded = {blocks[i] for i in selected}
    first = min(selected)
    if first > 0:
        cut = _init_cut(w, structure, blocks[first])
        w = walk_through_stream(gm, facts, cut=frozenset(cut))
        structure = Structure(w, block_order=blocks)
    first_merge = min((facts.index[m] for m in w.merges if facts.module_path(m) == blocks[first]),
                      default=None)

    def expand(site: Site, node) -> str:
        if site.layer is None:
            if first > 0 and (first_merge is None or facts.index[node] < first_merge):
                return "init"
            return "blocks"
        if site.layer < first:
            return "init"
        return granularity if site.block in expanded else "blocks"

    tables = None
    if granularity == "tokens":
        from ..analyse.positions import token_tables_for
        tables = token_tables_for(gm, w, example, dynamic, prefix=facts.prefix)
    root_heads = None
    if granularity in ("heads", "tokens"):
        from ..analyse.channel_heads import channel_heads
        root_heads = channel_heads(gm, w, structure, example)
    emitter = Emitter(gm, w, structure, Policy(expand), backend, tables, root_heads,
                      project=project)
    graph_module, labels = emitter.run()
    if emitter.window_splits:
        warnings.warn(_window_split_message(emitter.window_splits), WindowSplitWarning,
                      stacklevel=3)
    whole = {}
    if granularity in ("heads", "tokens"):
        whole = _whole_attention(w, structure, expand, root_heads or {}, labels)
        if whole:
            warnings.warn(f"{len(whole)} attention block(s) stay whole in {granularity} mode: "
                          + "; ".join(f"{k}: {v}" for k, v in list(whole.items())[:3])
                          + (" ..." if len(whole) > 3 else "") + " (dm.whole_attention)",
                          stacklevel=3)
    return graph_module, labels, blocks, captured, (coverage, whole)


class WindowSplitWarning(UserWarning):
    """Tokens mode through window attention: an op the windowed path does not pass made the
    per-window terms split into one full-size term per window (exact, but memory and time grow
    with the number of windows)."""


def _window_split_message(splits: dict[tuple[str, str], int]) -> str:
    where = "; ".join(f"{op} at {module or '<root>'} ({windows} windows)"
                      for (op, module), windows in list(splits.items())[:3])
    more = f" and {len(splits) - 3} more" if len(splits) > 3 else ""
    return (f"tokens mode: window-attention terms are split per window before {len(splits)} "
            f"op(s) the windowed path does not pass: {where}{more}. Each component is then as "
            "large as the whole value (memory and time x the number of windows, also with "
            "project=); decompose fewer layers (layers=), a smaller batch, or heads mode")


def _whole_attention(w: Walk, structure: Structure, expand, root_heads: dict,
                     labels: list[ComponentLabel]) -> dict[str, str]:
    """Attention components left unsplit in heads mode -> the op that prevents the split."""
    unsplit = {lab.name for lab in labels if lab.kind == "attn"}
    out: dict[str, str] = {}
    for n in w.order:
        plan = w.plans[n]
        if plan.kind not in (PlanKind.ROOT, PlanKind.ATTENTION) or n in root_heads:
            continue
        site = structure.site(n)
        if site.name not in unsplit or site.name in out or expand(site, n) not in ("heads", "tokens"):
            continue   # blocks outside `layers=` are expanded per block on purpose
        where = structure.facts.module_path(n) or "<root>"
        if plan.kind == PlanKind.ATTENTION:
            out[site.name] = f"the attention output {op_name(n)!r} at {where} has no head dimension"
        else:
            out[site.name] = (f"{plan.reason} at {where} acts on the sum of the heads (no channel "
                              "groups per head stay disjoint from a head source to it)")
    return out


def _resolve_layers(layers, n_blocks: int) -> list[int]:
    if layers is None:
        return list(range(n_blocks))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        j = i + n_blocks if i < 0 else i
        if not 0 <= j < n_blocks:
            raise InputError(f"layers=: layer {i} out of range: the model has {n_blocks} residual "
                             f"blocks (layers 0..{n_blocks - 1}, or -{n_blocks}..-1 from the end)")
        out.append(j)
    if not out:
        raise InputError("layers= selects no block")
    return sorted(set(out))


def _init_cut(w: Walk, structure: Structure, block: str) -> set:
    """The stream value entering ``block``: the stream side of its first merge."""
    merges = [m for m in w.merges if structure.facts.module_path(m) == block]
    for m in merges:
        if w.stream_sides.get(m):
            return set(w.stream_sides[m])
    raise UnsupportedGraphError(f"cannot find the residual stream entering block {block!r}",
                                merges[0] if merges else None)


class DecomposedModel(nn.Module):
    """A model rewritten so one forward returns its output split into additive components.

    >>> dm = fxdecomp.decompose(model, torch.randn(2, 3, 224, 224))   # doctest: +SKIP
    >>> d = dm(x); d.components.shape                                 # [C, B, E]
    >>> print(dm.graph_module.code)                                   # the rewritten graph
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, granularity: str = "heads",
                 layers=None, backend: str = "auto", _captured=None, allow_collapse: bool = False):
        super().__init__()
        if granularity not in GRANULARITIES:
            hint = " (did you mean 'heads'?)" if granularity == "head" else ""
            raise InputError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}{hint}")
        if backend not in ("auto", "torch", "triton"):
            raise InputError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        check_model(model)
        check_input(example, what="example_input", like=model_tensor(model))
        if backend == "triton":  # the kernels' own errors (no triton, no CUDA) are RuntimeErrors
            from fxdecomp_kernels import resolve_backend
            try:
                resolve_backend("triton", example)
            except RuntimeError as err:
                raise InputError(str(err)) from err
        self.granularity, self.layers, self.backend = granularity, layers, backend
        self.allow_collapse = allow_collapse
        self.input_shape = tuple(example.shape[1:])
        self.input_dtype, self.input_device = example.dtype, example.device
        self.model = model
        gm, labels, blocks, captured, (coverage, whole) = _build(
            model, example, granularity, layers, backend=backend, captured=_captured,
            allow_collapse=allow_collapse)
        dynamic = captured[1]
        self._captured = captured     # the export, reused for the project= graph
        self.graph_module: GraphModule = gm
        self.labels: list[ComponentLabel] = labels
        self.blocks: list[str] = blocks
        self.dynamic_batch = dynamic
        #: how many of the model's residual blocks were expanded (and which were absorbed)
        self.block_coverage: BlockCoverage = coverage
        #: attention components left whole in heads/tokens mode -> the op that prevents the split
        self.whole_attention: dict[str, str] = whole
        self._static: dict[tuple, GraphModule] = {(int(example.shape[0]), False): gm}
        self._projected: GraphModule | None = None   # built on the first call with project=
        self.expanded_layers: list[int] = _resolve_layers(layers, len(blocks))
        self._compiled = None

    def _graph_for(self, batch: int, project: bool = False) -> GraphModule:
        if self.dynamic_batch and not project:
            return self.graph_module
        if self.dynamic_batch and self._projected is not None:
            return self._projected
        key = (batch, project)
        if key not in self._static:
            ex = torch.zeros((batch,) + self.input_shape, dtype=self.input_dtype,
                             device=self.input_device)
            gm, labels, *_ = _build(self.model, ex, self.granularity, self.layers,
                                    dynamic_batch=self.dynamic_batch, backend=self.backend,
                                    allow_collapse=self.allow_collapse, project=project,
                                    captured=self._captured if self.dynamic_batch else None)
            if [l.name for l in labels] != [l.name for l in self.labels]:
                raise FxDecompError(f"re-capture at batch {batch} gave different components")
            if self.dynamic_batch:
                self._projected = gm
                return gm
            self._static[key] = gm
        return self._static[key]

    def forward(self, x: torch.Tensor, project: torch.Tensor | None = None) -> Decomposition:
        """Decompose ``x``. ``project``: output directions D [E, k] (e.g. k text embeddings
        mapped to the output space): the components come back as [C, B, k] =
        ``dm(x).components @ D`` (to fp32 rounding), computed with D folded into every
        per-head projection, so the [C, B, E] tensor is never formed; ``output`` is then
        ``model(x) @ D``. The first call with ``project`` builds a second graph (once)."""
        check_input(x, self.input_shape, dtype=self.input_dtype, device=self.input_device)
        if project is not None:
            _check_project(project, x, _output_dim(self.graph_module))
            out, components = self._graph_for(int(x.shape[0]), project=True)(x, project)
            return Decomposition(out, components, self.labels)
        gm = self._compiled if self._compiled is not None else self._graph_for(int(x.shape[0]))
        out, components = gm(x)
        return Decomposition(out, components, self.labels)

    def compile(self, **kwargs) -> "DecomposedModel":
        """torch.compile the rewritten graph (kwargs go to torch.compile); returns self."""
        self._compiled = torch.compile(self.graph_module, **kwargs)
        return self

    @torch.no_grad()
    def verify(self, x: torch.Tensor) -> float:
        """Max relative error of Σ components against the original model's own output."""
        d = self(x)
        with export_friendly():  # eager fast paths (fused MHA) round differently
            ref = self.model(x)
        diff = (d.components.double().sum(0) - ref.double()).abs().max()
        return float(diff / ref.double().abs().max().clamp_min(1e-30))

    @property
    def code(self) -> str:
        return self.graph_module.code

    def extra_repr(self) -> str:
        kinds = {}
        for lab in self.labels:
            kinds[lab.kind] = kinds.get(lab.kind, 0) + 1
        return f"granularity={self.granularity}, components={len(self.labels)}, kinds={kinds}"


def _output_dim(gm: GraphModule) -> int | None:
    """The last dim of the graph's (first) output, from the export's metadata."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    val = out.meta.get("val") if hasattr(out, "meta") else None
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else None


def _check_project(project, x: torch.Tensor, out_dim: int | None) -> None:
    if not isinstance(project, torch.Tensor) or project.dim() != 2 or \
            (out_dim is not None and int(project.shape[0]) != out_dim):
        raise InputError(f"project must be a 2-D tensor D [E, k] with E = {out_dim} (the "
                         f"output's last dim), k directions; got "
                         f"{tuple(getattr(project, 'shape', ())) or type(project).__name__}")
    if not project.is_floating_point() or project.device != x.device:
        raise InputError(f"project must be a floating tensor on {x.device}; got "
                         f"{project.dtype} on {project.device}")


def decompose(model: nn.Module, example_input: torch.Tensor, granularity: Granularity = "heads",
              layers: int | Sequence[int] | None = None, backend: str = "auto",
              allow_collapse: bool = False) -> DecomposedModel:
    """Rewrite ``model`` so that ``dm(x).components.sum(0) == model(x)``.

    granularity: "blocks" (one component per residual branch), "heads" (attention split per head)
    or "tokens" (per head and per source token). layers: indices of the residual blocks to expand
    (negative counts from the end); everything upstream of the first becomes one ``init`` term.
    allow_collapse: by default a decomposition in which residual blocks of the model reach the
    output only through one nonlinear op (so they are absorbed into one component) raises
    ``CollapseError`` naming that op; True accepts it (``dm.block_coverage`` says what was lost).
    """
    return DecomposedModel(model, example_input, granularity, layers, backend,
                           allow_collapse=allow_collapse)


def decompose_in_groups(model: nn.Module, example_input: torch.Tensor,
                        granularity: Granularity = "tokens", group_size: int = 4,
                        backend: str = "auto") -> list[DecomposedModel]:
    """Bound memory by expanding a few residual blocks at a time.

    Returns one ``DecomposedModel`` per group of ``group_size`` consecutive blocks (the model is
    exported once). Each expands only its own blocks (``dm.expanded_layers``); upstream is one
    ``init`` term and later blocks are block-level components, so each is exact on its own, and
    the union over groups of ``d.select(layer=dm.expanded_layers)`` is the full fine-grained
    decomposition of every block — with only one group's components in memory at a time.

    >>> for dm in fxdecomp.decompose_in_groups(model, x, "tokens", group_size=4):  # doctest: +SKIP
    ...     d = dm(x); keep(d.select(layer=dm.expanded_layers))
    """
    check_model(model)
    check_input(example_input, what="example_input", like=model_tensor(model))
    captured = capture(model, example_input)
    facts = GraphFacts(captured[0], RULES, granularity)
    n = len(Structure(walk_through_stream(captured[0], facts)).blocks)
    return [DecomposedModel(model, example_input, granularity,
                            list(range(start, min(start + group_size, n))), backend,
                            _captured=captured)
            for start in range(0, n, group_size)]
