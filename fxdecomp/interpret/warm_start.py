"""Closed-form ridge warm start for CompAlign: the joint least-squares map [C·d -> E] plus bias.

Stack the components of one image into x = [c_1; ...; c_C] ∈ R^{C·d} (for a shared map, x = Σ_i
c_i ∈ R^d). The joint linear model y ≈ Wᵀx + b with W = [W_1; ...; W_C] is exactly CompAlign's
Σ_i W_iᵀc_i + b, so ridge regression of the CLIP targets on x gives every map at once:

    W(λ) = (S_xx + λI)⁻¹ S_xy,   b = ȳ − Wᵀx̄,

S_xx, S_xy the centred second moments (the bias is not penalised). They are accumulated in one
pass (float64), so the warm start works on streamed batches as well as on tensors. λ (relative to the
mean eigenvalue, tr S_xx / (C·d)) is picked from a grid by held-out *cosine* (the loss CompAlign
trains) when held-out data is given, one Cholesky solve per λ. For one tensor with fewer images
than the joint width (N < C·d) the same solution comes from the cheaper dual (kernel) form
W = X_cᵀ (X_cX_cᵀ + λI)⁻¹ Y_c; ``max_dim`` bounds the system size either way.

What the per-component maps mean. The least-squares fit determines only the *sum* Σ_i W_iᵀc_i on
the data. If components are correlated (c_j ≈ A c_i), mass can move between W_i and W_j with no
change in the fit, and when C·d ≥ N the system is underdetermined: ridge then returns the
minimum-norm split, which is a statement about the data's span, not about what component i
encodes. The orthogonality term of CompAlign's refinement is what removes this freedom (each W_i
must be near an isometry, so each component keeps its own geometry); the warm start only puts the
sum where CLIP's embedding is. Since the cosine loss is invariant to a global positive scale of
(W, b), the solution is finally rescaled by the α minimising Σ_i ‖α²G_i − I‖² (G_i the Gram
matrix of W_i's smaller side): α² = Σ tr G_i / Σ ‖G_i‖²_F.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from fxdecomp.errors import InputError

__all__ = ["NormalEquations", "RidgeSolution", "ridge_warm_start", "orthogonal_scale",
           "stack_features", "RIDGE_GRID", "DEFAULT_RIDGE"]

#: Relative ridge strengths tried on held-out data (λ = value · mean eigenvalue of S_xx).
RIDGE_GRID = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: The relative ridge used when there is no held-out data to choose one.
DEFAULT_RIDGE = 1e-4


def stack_features(components: torch.Tensor, shared: bool) -> torch.Tensor:
    """[C, N, d] -> [N, C·d] (the joint regressor), or [N, d] = Σ_i c_i for a shared map."""
    if shared:
        return components.sum(0)
    c, n, d = components.shape
    return components.permute(1, 0, 2).reshape(n, c * d)


@dataclass
class NormalEquations:
    """Running sums for ridge regression of y on x (float64)."""
    n: int = 0
    sx: torch.Tensor | None = None
    sy: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    xty: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        if self.sx is None:
            self.sx, self.sy = x.sum(0), y.sum(0)
            self.xtx, self.xty = x.T @ x, x.T @ y
        else:
            self.sx += x.sum(0)
            self.sy += y.sum(0)
            self.xtx += x.T @ x
            self.xty += x.T @ y
        self.n += x.shape[0]

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S_xx, S_xy, x̄, ȳ)."""
        mx, my = self.sx / self.n, self.sy / self.n
        return (self.xtx - self.n * torch.outer(mx, mx), self.xty - self.n * torch.outer(mx, my),
                mx, my)


@dataclass
class RidgeSolution:
    weight: torch.Tensor          # [D, E]
    bias: torch.Tensor            # [E]
    ridge: float                  # relative strength chosen
    heldout_cos: float | None     # mean held-out cosine of the chosen solution (None: no val)
    form: str                     # "primal" or "dual"


def _solve_on_grid(gram: torch.Tensor, rhs: torch.Tensor, scale: float, ridge: float | None,
                   val_pred: Callable[[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]
                   | None) -> tuple[torch.Tensor, float, float | None]:
    """Z(λ) = (gram + λ·scale·I)⁻¹ rhs by Cholesky, for ``ridge`` or each λ of the grid; with
    ``val_pred`` (Z -> [(prediction, target)] on held-out batches) λ maximises held-out cosine.
    Returns (Z, relative λ, held-out cosine or None)."""
    grid = [ridge] if ridge is not None else list(RIDGE_GRID)
    if val_pred is None and ridge is None:
        grid = [DEFAULT_RIDGE]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    best = (None, None, -math.inf)
    for lam in grid:
        chol, info = torch.linalg.cholesky_ex(gram + (lam * scale) * eye)
        if int(info) != 0:                                          # not positive definite
            continue
        z = torch.cholesky_solve(rhs, chol)
        if val_pred is None:
            return z, lam, None
        pairs = val_pred(z)
        cos = sum(float(F.cosine_similarity(p, y, dim=-1, eps=1e-12).sum()) for p, y in pairs)
        cos /= max(sum(y.shape[0] for _, y in pairs), 1)
        if cos > best[2]:
            best = (z, lam, cos)
    if best[0] is None:
        raise InputError("the ridge warm start found no positive definite system; the data may "
                         "hold non-finite values")
    return best


def ridge_warm_start(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], shared: bool, *,
                     val: list | None = None, ridge: float | None = None,
                     max_dim: int = 8192, tensor_data: torch.Tensor | None = None,
                     tensor_targets: torch.Tensor | None = None) -> RidgeSolution | str:
    """Ridge solution of the joint map, or a string saying why none was computed.

    batches: (components [C, B, d], targets [B, E]) training batches (one pass);
    val: held-out batches of the same form (λ chosen on them when ``ridge`` is None);
    tensor_data/tensor_targets: all training data at once, which enables the dual form when
    the training set is smaller than the joint width (cheaper) or the width exceeds ``max_dim``.
    """
    val_xy = None if not val else [(stack_features(c.double(), shared), y.double())
                                   for c, y in val]
    if tensor_data is not None:
        width = tensor_data.shape[-1] * (1 if shared else tensor_data.shape[0])
        n = tensor_data.shape[1]
        if n < width:
            if n > max_dim:
                return (f"joint width C·d = {width} and N = {n} both exceed max_dim = "
                        f"{max_dim}; no closed-form warm start")
            x = stack_features(tensor_data.double(), shared)           # [N, D]
            y = tensor_targets.double()
            mx, my = x.mean(0), y.mean(0)
            xc = x - mx
            gram = xc @ xc.T                                         # [N, N]
            cross = None if val_xy is None else [(xv - mx) @ xc.T for xv, _ in val_xy]
            val_pred = None if val_xy is None else (
                lambda z: [(k @ z + my, yv) for k, (_, yv) in zip(cross, val_xy)])
            z, lam, cos = _solve_on_grid(gram, y - my, float(gram.trace()) / width, ridge,
                                         val_pred)
            w = xc.T @ z
            return RidgeSolution(w.float(), (my - mx @ w).float(), lam, cos, "dual")
    eq = NormalEquations()
    for comps, tgt in batches:
        x = stack_features(comps, shared)
        if x.shape[1] > max_dim:
            return (f"joint width C·d = {x.shape[1]} exceeds max_dim = {max_dim} for streamed "
                    "data; no closed-form warm start")
        eq.add(x, tgt)
    if eq.n == 0:
        return "no training batches"
    sxx, sxy, mx, my = eq.centred()
    val_pred = None if val_xy is None else (
        lambda z: [((xv - mx) @ z + my, yv) for xv, yv in val_xy])
    w, lam, cos = _solve_on_grid(sxx, sxy, float(sxx.trace()) / sxx.shape[0], ridge, val_pred)
    return RidgeSolution(w.float(), (my - mx @ w).float(), lam, cos, "primal")


def orthogonal_scale(weight: torch.Tensor) -> float:
    """α > 0 minimising Σ_i ‖α²G_i − I‖²_F for maps ``weight`` [C, d, E] (G_i on the smaller
    side): α² = Σ tr G_i / Σ ‖G_i‖²_F (1.0 when every map is zero)."""
    w = weight.double()
    gram = (w.transpose(1, 2) @ w) if w.shape[1] >= w.shape[2] else (w @ w.transpose(1, 2))
    den = float((gram ** 2).sum())
    num = float(gram.diagonal(dim1=1, dim2=2).sum())
    if den <= 0 or num <= 0:
        return 1.0
    return (num / den) ** 0.5
