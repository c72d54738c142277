"""Token heatmaps: where on the image a component (or a set of them) reads from.

In tokens mode every attention head's contribution is split per source token,
c_{h}(x) = Σ_t c_{h,t}(x), and every token label carries its ``TokenPosition`` (the grid cell it
sits on, derived from the graph by ``fxdecomp.analyse.positions``). Projecting each token
component on a direction u (a text embedding through CompAlign, or any vector in model space)
gives one number per source token, v_t(x) = ⟨c_{h,t}(x), u⟩, and placing v_t on its cell gives a
map. Summing the selected heads per cell keeps it exact: Σ_cells map + Σ_special = ⟨Σ_sel c, u⟩.

Non-spatial tokens (CLS, registers, distillation tokens, padding) are reported apart
(``Heatmap.special``), never spread over the image.

>>> dm = fxdecomp.decompose(model, x, granularity="tokens")          # doctest: +SKIP
>>> hm = token_heatmap(dm(x), direction, layer=[10, 11])              # doctest: +SKIP
>>> hm.grids[(14, 14)].shape, hm.pixels.shape                         # doctest: +SKIP
(torch.Size([B, 14, 14]), torch.Size([B, 224, 224]))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from fxdecomp.errors import FxDecompError, InputError
from fxdecomp.run.decomposition import ComponentLabel, Decomposition

__all__ = ["Heatmap", "PositionUnavailableError", "token_heatmap", "token_values",
           "head_directions", "save_overlay"]


class PositionUnavailableError(FxDecompError):
    """A token component has no position on the image (see the message for the op)."""


@dataclass
class Heatmap:
    """Per-token contributions placed back on the image.

    grids:   (rows, cols) -> [B, rows, cols]: summed contribution of the selected token
             components whose source token sits on that cell (one entry per grid: a
             hierarchical model's stages have different grids)
    pixels:  [B, H, W]: every grid painted on its pixel boxes as a density (a cell's value / its
             area in pixels), summed over grids; Σ pixels = Σ over all spatial cells
    special: name -> [B]: non-spatial tokens (``cls_token[0]``, ``reg_token[2]``, ``pad``)
    image_size: (H, W)
    """

    grids: dict[tuple[int, int], torch.Tensor]
    pixels: torch.Tensor
    special: dict[str, torch.Tensor] = field(default_factory=dict)
    image_size: tuple[int, int] = (0, 0)

    def total(self) -> torch.Tensor:
        """[B]: the projection of the sum of all selected components (cells + special)."""
        out = sum(g.sum((-2, -1)) for g in self.grids.values())
        for v in self.special.values():
            out = out + v
        return out

    def upsampled(self, mode: str = "bilinear") -> torch.Tensor:
        """[B, H, W]: the finest grid resized to the image with ``mode`` (for segmentation and
        display, where a smooth map is wanted; ``pixels`` is the exact painted density)."""
        if not self.grids:
            raise InputError("the heatmap has no spatial cells")
        key = max(self.grids, key=lambda g: g[0] * g[1])
        g = self.grids[key].unsqueeze(1).float()
        kw = {} if mode == "nearest" else {"align_corners": False}
        return torch.nn.functional.interpolate(g, size=self.image_size, mode=mode, **kw)[:, 0]

    def peak(self) -> torch.Tensor:
        """[B, 2]: (row, col) pixel of each image's maximum of ``pixels``."""
        flat = self.pixels.flatten(1).argmax(1)
        W = self.pixels.shape[-1]
        return torch.stack([flat // W, flat % W], 1)


def head_directions(aligner, labels: Sequence[ComponentLabel], text: torch.Tensor
                    ) -> torch.Tensor:
    """[C, d_model]: for each token component, the model-space direction whose inner product
    with it equals the projection of its aligned value on ``text`` [E]:
    ⟨f_h(c), t⟩ = ⟨c, W_h t⟩ with W_h the CompAlign map of its head (``module.h{head}``), or of
    its attention block (``module``) where the aligner was fitted per block, or the shared map."""
    text = torch.as_tensor(text, dtype=aligner.weight.dtype).flatten()
    if text.numel() != aligner.d_clip:
        raise InputError(f"text direction has {text.numel()} dims; the aligner maps to "
                         f"{aligner.d_clip}")
    w = aligner.weight.detach()
    if aligner.shared:
        u = w[0] @ text
        return u.expand(len(labels), -1)
    index = {n: i for i, n in enumerate(aligner.names)}
    rows = []
    for lab in labels:
        for key in (f"{lab.module}.h{lab.head}", lab.module, lab.name):
            if key in index:
                rows.append(index[key])
                break
        else:
            raise InputError(f"the aligner has no map for {lab.name} (looked for "
                             f"{lab.module}.h{lab.head} and {lab.module}); fit it on a heads- or "
                             "blocks-mode decomposition of the same model")
    return torch.einsum("cde,e->cd", w[torch.tensor(rows)], text)


def token_values(d: Decomposition, direction: torch.Tensor | None = None, *,
                 kind: str = "attn_head_token", **criteria) -> tuple[torch.Tensor, list[ComponentLabel]]:
    """[C_sel, B] projections of the selected token components and their labels.

    direction: [E] (one vector for all), [C_sel, E] (one per selected component, e.g. from
    ``head_directions``), None: the unit vector of each image's own output (how much each
    token adds along the representation), or "norm": each component's norm (a magnitude map;
    not additive). ``criteria`` select as ``Decomposition.select``
    (layer=, head=, module=).
    """
    sel = d.select(kind=kind, **criteria)
    if not sel.labels:
        kinds = sorted({l.kind for l in d.labels})
        raise InputError(f"no {kind} components match {criteria or 'the selection'} (kinds in "
                         f"this decomposition: {kinds}); heatmaps need granularity='tokens'")
    comps = sel.components.float()
    if comps.dim() != 3:
        raise InputError(f"heatmaps need a pooled representation: components [C, B, E], got "
                         f"{tuple(comps.shape)}")
    if isinstance(direction, str):
        if direction != "norm":
            raise InputError(f"direction must be a tensor, None or 'norm', got {direction!r}")
        return comps.norm(dim=-1), sel.labels            # magnitude map (not additive)
    if direction is None:
        out = d.output.float()
        u = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)           # [B, E]
        return torch.einsum("cbe,be->cb", comps, u), sel.labels
    direction = torch.as_tensor(direction, dtype=comps.dtype, device=comps.device)
    if direction.dim() == 1 and direction.numel() == comps.shape[-1]:
        return comps @ direction, sel.labels
    if direction.dim() == 2 and tuple(direction.shape) == (comps.shape[0], comps.shape[-1]):
        return torch.einsum("cbe,ce->cb", comps, direction), sel.labels
    raise InputError(f"direction must be [E={comps.shape[-1]}] or [C={comps.shape[0]}, E], got "
                     f"{tuple(direction.shape)}")


def _missing_position(lab: ComponentLabel) -> PositionUnavailableError:
    why = lab.position.source if lab.position is not None and lab.position.source else \
        "the label carries no position (was it made in tokens mode by this fxdecomp?)"
    return PositionUnavailableError(
        f"token component {lab.name} has no position on the image: {why}")


def place(values: torch.Tensor, labels: Sequence[ComponentLabel],
          image_size: tuple[int, int] | None = None) -> Heatmap:
    """Put per-token values [C, B] on their cells (summing tokens that share a cell)."""
    B = values.shape[1]
    grids: dict[tuple[int, int], torch.Tensor] = {}
    special: dict[str, torch.Tensor] = {}
    strides: dict[tuple[int, int], tuple[float, float]] = {}
    cells: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, lab in enumerate(labels):
        pos = lab.position
        if pos is None or pos.kind == "unknown":
            raise _missing_position(lab)
        if pos.kind == "patch":
            grids.setdefault(pos.grid, values.new_zeros((B,) + tuple(pos.grid)))
            strides[pos.grid] = pos.stride
            cells.setdefault(pos.grid, []).append((i, pos.row * pos.grid[1] + pos.col))
        else:
            key = pos.source or pos.kind
            special[key] = special.get(key, values.new_zeros(B)) + values[i]
    for g, pairs in cells.items():
        idx = torch.tensor([p[0] for p in pairs], device=values.device)
        flat = torch.tensor([p[1] for p in pairs], device=values.device)
        m = values.new_zeros(B, g[0] * g[1])
        m.index_add_(1, flat, values[idx].t())
        grids[g] = m.view(B, g[0], g[1])
    if image_size is None:
        if not strides:
            raise InputError("no spatial token selected and no image_size given")
        g, s = next(iter(strides.items()))
        image_size = (int(round(g[0] * s[0])), int(round(g[1] * s[1])))
    H, W = image_size
    pixels = values.new_zeros(B, H, W)
    for g, m in grids.items():
        sy, sx = strides[g]
        rows = (torch.arange(H, device=values.device).float() / sy).floor().long().clamp_max(g[0] - 1)
        cols = (torch.arange(W, device=values.device).float() / sx).floor().long().clamp_max(g[1] - 1)
        area = torch.bincount(rows, minlength=g[0]).view(-1, 1) * torch.bincount(cols, minlength=g[1]).view(1, -1)
        density = m / area.clamp_min(1).to(m.dtype)
        pixels += density[:, rows][:, :, cols]
    return Heatmap(grids, pixels, special, (H, W))


def token_heatmap(d: Decomposition, direction: torch.Tensor | None = None, *, aligner=None,
                  image_size: tuple[int, int] | None = None, **criteria) -> Heatmap:
    """Heatmap of the selected token components of ``d`` (tokens-mode decomposition) projected
    on ``direction``.

    direction: [E] in model space; with ``aligner`` (CompAlign) a [E_clip] direction in CLIP
        space (a text embedding), mapped to each head's model-space direction W_h·t; None: each
        image's own output direction.
    criteria: which components (``layer=[10, 11]``, ``head=3``, ``module="blocks.11.attn"``).
    image_size: (H, W) of the input; default: inferred from the grid and its stride.
    """
    if aligner is not None:
        if direction is None:
            raise InputError("with an aligner, give the CLIP-space direction (a text embedding)")
        sel = d.select(kind="attn_head_token", **criteria)
        direction = head_directions(aligner, sel.labels, direction)
    values, labels = token_values(d, direction, **criteria)
    return place(values, labels, image_size)


def save_overlay(image, heat: torch.Tensor, path: str | Path, title: str | None = None,
                 alpha: float = 0.5, cmap: str = "jet") -> Path:
    """Write a PNG: ``image`` ([3, H, W] tensor in [0, 1], PIL image or HxWx3 array) with
    ``heat`` [H, W] (min-max normalised) over it, and a colour bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    if isinstance(image, torch.Tensor):
        img = image.detach().float().cpu()
        img = img.permute(1, 2, 0).numpy() if img.dim() == 3 and img.shape[0] in (1, 3) else img.numpy()
    else:
        img = np.asarray(image, dtype=np.float32)
        img = img / 255.0 if img.max() > 1.5 else img
    h = heat.detach().float().cpu()
    if tuple(h.shape) != tuple(img.shape[:2]):
        h = torch.nn.functional.interpolate(h[None, None], size=img.shape[:2], mode="nearest")[0, 0]
    h = h.numpy()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    ax.imshow(np.clip(img, 0, 1))
    im = ax.imshow(h, cmap=cmap, alpha=alpha)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
