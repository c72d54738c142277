"""CompAlign: one linear map per component into CLIP's image-embedding space, plus one bias.

f_i(c) = W_iᵀ c with W_i [d_model, d_clip]; the aligned representation of an image is
Σ_i f_i(c_i(x)) + b, and training makes it point where CLIP's image embedding of x points:

    L = mean_x [1 − cos(Σ_i f_i(c_i(x)) + b, clip(x))] + λ · Σ_i ‖G_i − I_r‖²_F / (C · r)

Orthogonality penalty. The paper writes G_i = W_iᵀW_i (d_clip × d_clip). That can reach I only
when d_model ≥ d_clip (W_i with orthonormal columns: a co-isometry). When d_model < d_clip (e.g.
DeiT-tiny 192 -> CLIP 512) W_iᵀW_i has rank ≤ d_model and the penalty could never vanish, so there
we use G_i = W_iW_iᵀ (d_model × d_model): W_i with orthonormal rows, f_i an isometry (‖f_i(c)‖ =
‖c‖). In general r = min(d_model, d_clip) and G_i is the Gram matrix of that side; dividing by
C · r makes the penalty a per-dimension mean (it equals the paper's C · d_clip when d_model ≥
d_clip). Either way it keeps the maps near-orthogonal so the relative sizes of contributions
survive the mapping.

The bias b is its own term: ``aligner(components)`` [C, N, E] excludes it, and the exact aligned
representation is ``aligner(components).sum(0) + aligner.bias`` (= ``aligner.total(components)``;
``aligner.with_bias(components)`` returns the C + 1 terms with the bias as the last one).

>>> al = CompAlign(["a", "b", "c"], d_model=16, d_clip=8)
>>> al(torch.randn(3, 5, 16)).shape
torch.Size([3, 5, 8])
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxdecomp.errors import FxDecompError, InputError
from fxdecomp.run.decomposition import ComponentLabel

__all__ = ["CompAlign", "AlignmentMismatchError", "BIAS_LABEL", "MAX_STEPS"]

_META_KEY = "fxdecomp.compalign"
_FORMAT = 1
#: Name given to the bias term by ``CompAlign.with_bias``.
BIAS_LABEL = "compalign.bias"
#: warm starts of ``CompAlign.fit`` ("auto": the one with the lowest held-out loss)
STARTS = ("auto", "least_squares", "polar", "tied")
#: default cap on refinement batches: a safety net, convergence (``patience``) normally stops
#: first (the ground-truth world converges after 280-560 batches; 200 used to cut it short;
#: without validation data, e.g. under 50 samples, it may run to the cap)
MAX_STEPS = 1000

Labels = Sequence["ComponentLabel | str | dict"]


class AlignmentMismatchError(FxDecompError, ValueError):
    """A saved aligner does not belong to the components or subject it is being used with."""


def _label_dict(label) -> dict:
    if isinstance(label, ComponentLabel):
        return label.to_dict()
    if isinstance(label, dict):
        if "name" not in label:
            raise InputError(f"label dict without a 'name': {label}")
        return dict(label)
    if isinstance(label, str):
        return {"name": label}
    raise InputError(f"a component label must be a ComponentLabel, dict or str, got {label!r}")


def _label_object(d: dict):
    try:
        return ComponentLabel(**d)
    except TypeError:
        return d["name"]


def _labels_of(labels) -> list[dict]:
    """Accepts a list of labels or anything with ``.labels`` (a Decomposition)."""
    if hasattr(labels, "labels") and not isinstance(labels, (list, tuple)):
        labels = labels.labels
    return [_label_dict(l) for l in labels]


def _describe_label_difference(saved: list[dict], given: list[dict]) -> str | None:
    s_names = [d["name"] for d in saved]
    g_names = [d["name"] for d in given]
    if s_names != g_names:
        lines = [f"component labels differ: the aligner was trained on {len(s_names)} "
                 f"components, {len(g_names)} were given"]
        missing = [n for n in s_names if n not in set(g_names)]
        extra = [n for n in g_names if n not in set(s_names)]
        if missing:
            lines.append(f"  in the aligner but not given ({len(missing)}): "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if extra:
            lines.append(f"  given but not in the aligner ({len(extra)}): "
                         f"{extra[:6]}{' ...' if len(extra) > 6 else ''}")
        if not missing and not extra:
            i = next(i for i, (a, b) in enumerate(zip(s_names, g_names)) if a != b)
            lines.append(f"  same names in a different order; first difference at index {i}: "
                         f"aligner has {s_names[i]!r}, given {g_names[i]!r}")
        return "\n".join(lines)
    for i, (a, b) in enumerate(zip(saved, given)):
        shared = (set(a) & set(b)) - {"name"}
        diff = sorted(f for f in shared if a[f] != b[f])
        if diff:
            f = diff[0]
            return (f"component {a['name']!r} (index {i}) differs in field {f!r}: aligner has "
                    f"{a[f]!r}, given {b[f]!r}")
    return None


class CompAlign(nn.Module):
    """Per-component linear maps into CLIP space (see the module docstring for the objective).

    labels: the components' labels (ComponentLabel, dict or name), or an int for anonymous ones.
    d_model, d_clip: component width and CLIP embedding width.
    subject, clip_model: free-form ids (e.g. "timm:deit_base_patch16_224") recorded on save and
        checked on load.
    shared: one map for every component (used by ``identity_from_projection``).

    Attributes: ``weight`` [C, d_model, d_clip] (or [1, ...] when shared), ``bias`` [d_clip],
    ``history`` (per-batch training losses), ``stats`` (training summary).
    """

    def __init__(self, labels: Labels | int, d_model: int, d_clip: int, *,
                 subject: str | None = None, clip_model: str | None = None,
                 shared: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(labels, int):
            labels = [f"c{i}" for i in range(labels)]
        self._labels = _labels_of(labels)
        names = [d["name"] for d in self._labels]
        if not names:
            raise InputError("CompAlign needs at least one component")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise InputError(f"component names must be unique; repeated: {dup[:6]}")
        self.d_model, self.d_clip = int(d_model), int(d_clip)
        self.subject, self.clip_model, self.shared = subject, clip_model, bool(shared)
        n_maps = 1 if shared else len(names)
        self.weight = nn.Parameter(self._orthogonal_init(n_maps, seed, dtype))
        self.bias = nn.Parameter(torch.zeros(self.d_clip, dtype=dtype))
        self.history: dict[str, list] = {"loss": [], "cos": [], "ortho": [], "val": []}
        self.stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ basics
    def _orthogonal_init(self, n: int, seed: int, dtype) -> torch.Tensor:
        """n random (semi-)orthogonal [d_model, d_clip] maps, batched QR (no per-map loop)."""
        g = torch.Generator().manual_seed(seed)
        big, small = max(self.d_model, self.d_clip), min(self.d_model, self.d_clip)
        q, r = torch.linalg.qr(torch.randn(n, big, small, generator=g, dtype=torch.float64))
        q = q * torch.sign(r.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)
        w = q if self.d_model >= self.d_clip else q.transpose(-1, -2)
        return w.to(dtype).contiguous()

    @property
    def labels(self) -> list:
        """ComponentLabel objects where the saved fields allow, else names."""
        return [_label_object(d) for d in self._labels]

    @property
    def names(self) -> list[str]:
        return [d["name"] for d in self._labels]

    @property
    def n_components(self) -> int:
        return len(self._labels)

    def extra_repr(self) -> str:
        return (f"C={self.n_components}, d_model={self.d_model}, d_clip={self.d_clip}, "
                f"shared={self.shared}, subject={self.subject!r}, clip_model={self.clip_model!r}")

    def _check_components(self, components: torch.Tensor, n: int | None = None) -> None:
        n = self.n_components if n is None else n
        if components.ndim < 2 or components.shape[0] != n or components.shape[-1] != self.d_model:
            raise InputError(f"CompAlign expects components [C={n}, ..., d={self.d_model}], "
                             f"got {tuple(components.shape)}")

    # ------------------------------------------------------------------ mapping
    def forward(self, components: torch.Tensor,
                indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """[C, ..., d_model] -> [C, ..., d_clip]: f_i applied to component i (bias excluded).

        With ``indices`` the input holds only those components ([len(indices), ..., d_model]),
        e.g. ``aligner(comps[[5]], indices=[5])`` maps component 5 alone.
        """
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        self._check_components(components, None if indices is None else indices.numel())
        x = components.to(device=self.weight.device, dtype=self.weight.dtype)
        if self.shared:
            return torch.einsum("c...d,de->c...e", x, self.weight[0])
        w = self.weight if indices is None else self.weight[indices.to(self.weight.device)]
        return torch.einsum("c...d,cde->c...e", x, w)

    def total(self, components: torch.Tensor) -> torch.Tensor:
        """The aligned representation [..., d_clip] = Σ_i f_i(c_i) + bias."""
        return self(components).sum(0) + self.bias

    def with_bias(self, components: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """The C + 1 aligned terms (bias last, broadcast) and their names; they sum to ``total``."""
        aligned = self(components)
        bias = self.bias.expand_as(aligned[0]).unsqueeze(0)
        return torch.cat([aligned, bias]), self.names + [BIAS_LABEL]

    def orthogonality_penalty(self) -> torch.Tensor:
        """Σ_i ‖G_i − I_r‖²_F / (C · r), G_i the Gram matrix of W_i's smaller side."""
        w = self.weight
        if self.d_model >= self.d_clip:
            gram = torch.einsum("cde,cdf->cef", w, w)                # W_iᵀW_i [C, E, E]
        else:
            gram = torch.einsum("cde,cfe->cdf", w, w)                # W_iW_iᵀ [C, d, d]
        r = gram.shape[-1]
        eye = torch.eye(r, dtype=w.dtype, device=w.device)
        return ((gram - eye) ** 2).sum() / (w.shape[0] * r)

    def loss(self, components: torch.Tensor, targets: torch.Tensor,
             lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total loss, mean(1 − cos), orthogonality penalty) on one batch."""
        pred = self.total(components)
        targets = targets.to(device=pred.device, dtype=pred.dtype)
        if targets.shape != pred.shape:
            raise InputError(f"CLIP targets must be {tuple(pred.shape)} to match the components, "
                             f"got {tuple(targets.shape)}")
        cos_loss = (1 - F.cosine_similarity(pred, targets, dim=-1, eps=1e-8)).mean()
        ortho = self.orthogonality_penalty() if lam else pred.new_zeros(())
        return cos_loss + lam * ortho, cos_loss, ortho

    # ------------------------------------------------------------------ training
    def fit(self, data, targets: torch.Tensor | None = None, *, lam: float = 1.0,
            warm_start: bool = True, start: str = "auto", ridge: float | None = None,
            max_warm_start_dim: int = 8192,
            lr: float = 1e-3, weight_decay: float = 1e-6, epochs: int | None = None,
            max_steps: int | None = MAX_STEPS, batch_size: int = 256, patience: int | None = 50,
            min_delta: float = 0.0, rel_tol: float = 1e-3, val=None,
            val_fraction: float | None = None, eval_every: int = 10, ema: float = 0.9,
            seed: int = 0, progress: bool = True) -> "CompAlign":
        """Fit the maps and bias; returns self. The defaults fit any data size.

        1. Warm start (``warm_start``): the closed-form ridge least-squares solution of the joint
           map [C·d -> E] plus bias (``fxdecomp.interpret.warm_start``), its relative strength
           ``ridge`` chosen on held-out cosine from a grid when None and validation data exist,
           then rescaled globally (the cosine is scale-invariant) to be as orthogonal as possible.
           Skipped with a warning when C·d exceeds ``max_warm_start_dim`` (for tensor data only
           if N does too: the dual form is used otherwise). ``start``: "auto" keeps whichever of
           three starts has the lowest paper loss on held-out data — the rescaled least-squares
           maps (best cosine, far from orthogonal), each map's nearest orthogonal matrix (polar
           factor; penalty 0), or "tied": every component gets the same map, the polar factor of
           the least-squares map of their sum (penalty 0; the split of the joint map between
           correlated components is not identified, the total's map is); "least_squares",
           "polar" or "tied" force one. On the ground-truth world (2000 images, heads of the
           shipped subject) the starts' paper losses were 1.12 / 0.74 / 0.89 (least squares /
           polar / tied) on world seed 1 and 1.13 / 0.90 / 0.83 on seed 2: "auto" picked polar,
           then tied; refinement reaches held-out cosine 0.81-0.82 from either.
        2. Refinement: Adam on the paper's loss 1 − cos + λ‖G − I‖²/(C·r) (``lam``; see the
           module docstring), until convergence: training stops once the monitored loss has
           not improved by more than max(``min_delta``, ``rel_tol`` · |best|) for ``patience``
           consecutive batches, after ``epochs`` passes (None: no limit) or after ``max_steps``
           batches (None: no limit), whichever comes first.

        Least squares fixes only the sum Σ_i W_iᵀc_i on the data: with correlated components
        (or C·d ≥ N) the split between maps is not identified and ridge returns the minimum-norm
        one. The orthogonality term of step 2 is what makes each W_i meaningful (near an
        isometry, so every component keeps its geometry and relative size); with ``lam=0`` the
        per-component maps carry no meaning beyond their sum.

        Data, either
          - ``data`` = components [C, N, d_model] and ``targets`` = CLIP image embeddings [N, E]
            (shuffled each epoch with ``seed``; ``val_fraction`` of N held out first; None means
            0.1 when N >= 50, else 0), or
          - ``data`` = an iterable of (components [C, B, d], targets [B, E]) batches (streaming;
            ``batch_size`` is then the iterable's). The warm start takes one pass (accumulating
            XᵀX and XᵀY); refinement needs it to be re-iterable (a list, a DataLoader) or a
            callable returning a fresh iterable per pass.
        Validation data: ``val`` = (components, targets) tensors or an iterable of batches.

        The monitored loss is the held-out loss when there is validation data (evaluated every
        ``eval_every`` batches; the best weights, the warm start included, are restored at the
        end), else a bias-corrected exponential moving average (``ema``) of the batch losses.

        The paper's settings: ``warm_start=False, epochs=2, lr=3e-4, batch_size=32,
        patience=50, rel_tol=0, val_fraction=0, max_steps=None`` (they assume ImageNet-size
        data; on a few thousand images they leave the maps untrained).

        ``self.history`` keeps every batch's loss, cosine term and penalty (and (step, val loss)
        pairs); ``self.stats`` summarises the run (``warm_start``, ``heldout_cos`` when there is
        validation data, steps, why it stopped).
        """
        try:
            from tqdm.auto import tqdm
        except ImportError:                                          # pragma: no cover
            tqdm = None
        if (epochs is not None and epochs < 1) or batch_size < 1:
            raise InputError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        if max_steps is not None and max_steps < 0:
            raise InputError(f"max_steps must be >= 0 or None, got {max_steps}")
        if epochs is None and max_steps is None and patience is None:
            raise InputError("with epochs=None and max_steps=None, patience is the only stop: "
                             "give at least one of them")
        started = time.perf_counter()
        if val_fraction is None:
            val_fraction = 0.1 if (isinstance(data, torch.Tensor) and val is None
                                   and data.ndim == 3 and data.shape[1] >= 50) else 0.0
        passes = None if epochs is None else epochs
        train_batches, n_per_epoch, val_batches = self._prepare_data(
            data, targets, batch_size, val, val_fraction, seed,
            (passes or 2) + (1 if warm_start else 0))
        monitor = "val" if val_batches is not None else "running"

        warm = self._warm_start(train_batches, val_batches, ridge, max_warm_start_dim, data,
                                targets, lam, start) if warm_start else {"used": False}
        self.__dict__.pop("_train_index", None)
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)

        best, best_state, since_best = math.inf, None, 0
        if monitor == "val":
            best = self._evaluate(val_batches, lam)
            self.history["val"].append([0, best])
            best_state = copy.deepcopy(self.state_dict())
        ema_value, step, seen, stopped, epoch, passes = 0.0, 0, 0, None, -1, 0
        total = None
        if n_per_epoch and epochs is not None:
            total = n_per_epoch * epochs
        if max_steps is not None:
            total = max_steps if total is None else min(total, max_steps)
        bar = (tqdm(total=total, disable=not progress, desc="CompAlign", unit="batch",
                    leave=False) if tqdm else None)
        self.train()
        try:
            while stopped is None:
                epoch += 1
                if epochs is not None and epoch >= epochs:
                    stopped = "epochs"
                    break
                if max_steps is not None and step >= max_steps:
                    stopped = "max_steps"
                    break
                n_this_epoch = 0
                passes += 1
                for comps, tgt in train_batches(epoch + (1 if warm_start else 0)):
                    opt.zero_grad(set_to_none=True)
                    loss, cos_loss, ortho = self.loss(comps, tgt, lam)
                    loss.backward()
                    opt.step()
                    step += 1
                    n_this_epoch += 1
                    seen += int(tgt.shape[0])
                    value = loss.item()
                    self.history["loss"].append(value)
                    self.history["cos"].append(cos_loss.item())
                    self.history["ortho"].append(ortho.item())
                    if monitor == "running":
                        ema_value = ema * ema_value + (1 - ema) * value
                        current = ema_value / (1 - ema ** step)
                        checked = True
                    else:
                        checked = step % eval_every == 0
                        if checked:
                            current = self._evaluate(val_batches, lam)
                            self.history["val"].append([step, current])
                    margin = max(min_delta, rel_tol * abs(best)) if math.isfinite(best) else 0.0
                    if checked and current < best - margin:
                        best, since_best = current, 0
                        if monitor == "val":
                            best_state = copy.deepcopy(self.state_dict())
                    else:
                        since_best += 1
                        if checked and monitor == "val" and current < best:
                            best, best_state = current, copy.deepcopy(self.state_dict())
                    if bar is not None:
                        bar.update(1)
                        if step % 10 == 0:
                            bar.set_postfix(loss=f"{value:.4f}", best=f"{best:.4f}")
                    if patience is not None and since_best >= patience:
                        stopped = "converged"
                        break
                    if max_steps is not None and step >= max_steps:
                        stopped = "max_steps"
                        break
                if n_this_epoch == 0 and stopped is None:
                    raise InputError(f"pass {epoch + 1} received no batches: a one-shot "
                                     "iterator can only feed one pass; pass a list, a DataLoader "
                                     "or a callable returning a fresh iterable")
        finally:
            if bar is not None:
                bar.close()
            self.eval()
        heldout = None
        if monitor == "val":
            if step % eval_every != 0:                             # score the final weights too
                final = self._evaluate(val_batches, lam)
                self.history["val"].append([step, final])
                if final < best:
                    best, best_state = final, None
            if best_state is not None:
                self.load_state_dict(best_state)
            heldout = self.mean_cosine(val_batches)
        self.stats = {
            "warm_start": warm, "steps": step, "epochs_started": passes,
            "samples_seen": seen, "stopped": stopped,
            "stopped_early": stopped == "converged", "monitor": monitor,
            "best_monitored_loss": best, "heldout_cos": heldout,
            "final_batch_loss": self.history["loss"][-1] if self.history["loss"] else None,
            "lam": lam, "lr": lr, "weight_decay": weight_decay, "epochs": epochs,
            "max_steps": max_steps, "batch_size": batch_size, "patience": patience,
            "min_delta": min_delta, "rel_tol": rel_tol, "val_fraction": val_fraction,
            "seconds": round(time.perf_counter() - started, 3),
        }
        return self

    def _warm_start(self, train_batches, val_batches, ridge, max_dim, data, targets,
                    lam: float, start: str = "auto") -> dict:
        """Set weight and bias to the (orthogonally rescaled) ridge solution; a summary dict."""
        from fxdecomp.interpret.warm_start import orthogonal_scale, ridge_warm_start
        tensor = isinstance(data, torch.Tensor)
        train_x = train_y = None
        if tensor:
            idx = self.__dict__["_train_index"]
            train_x, train_y = data[:, idx], targets[idx]
        sol = ridge_warm_start(train_batches(0), self.shared, val=val_batches, ridge=ridge,
                               max_dim=max_dim, tensor_data=train_x, tensor_targets=train_y)
        if isinstance(sol, str):
            warnings.warn(f"CompAlign: {sol}; refining from the orthogonal initialisation "
                          "(raise max_warm_start_dim, or give more steps)", stacklevel=3)
            return {"used": False, "reason": sol}
        w = sol.weight.reshape(self.weight.shape[0], self.d_model, self.d_clip)
        alpha = orthogonal_scale(w)
        # Starts for the paper's loss: the rescaled least-squares maps; each map's nearest
        # (semi-)orthogonal matrix (polar factor U Vᵀ, penalty 0); and "tied": one map for every
        # component, the polar factor of the least-squares map of their sum (the components
        # live in one residual space, and the total's map is identified where the split of the
        # joint map between correlated components is not). The lowest held-out loss wins.
        if start not in STARTS:
            raise InputError(f"start must be one of {STARTS}, got {start!r}")
        if self.shared and start == "tied":
            start = "polar"                   # one map already: tied is the polar start
        starts = {"least_squares": (w * alpha, sol.bias * alpha)}
        if start != "least_squares":
            u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
            starts["polar"] = ((u @ vh).float(), sol.bias * alpha)
        if start in ("auto", "tied") and not self.shared:
            tied = ridge_warm_start(train_batches(0), True, val=val_batches, ridge=ridge,
                                    max_dim=max_dim, tensor_data=train_x, tensor_targets=train_y)
            if not isinstance(tied, str):
                wt = tied.weight.reshape(1, self.d_model, self.d_clip)
                u, _, vh = torch.linalg.svd(wt.double(), full_matrices=False)
                starts["tied"] = ((u @ vh).float().expand_as(self.weight),
                                  tied.bias * orthogonal_scale(wt))
        if start != "auto":           # ("tied" falls back to polar if its solve was refused)
            starts = {start: starts[start]} if start in starts else {"polar": starts["polar"]}
        check = val_batches if val_batches is not None else list(
            itertools.islice(train_batches(0), 8))
        losses = {}
        with torch.no_grad():
            for name, (weight, bias) in starts.items():
                self.weight.copy_(weight)
                self.bias.copy_(bias)
                losses[name] = self._evaluate(check, lam)
            chosen = min(losses, key=losses.get)
            self.weight.copy_(starts[chosen][0])
            self.bias.copy_(starts[chosen][1])
        out = {"used": True, "form": sol.form, "ridge": sol.ridge, "scale": alpha,
               "start": chosen, "start_losses": losses}
        if val_batches is not None:
            out["heldout_cos"] = self.mean_cosine(val_batches)
        return out

    @torch.no_grad()
    def mean_cosine(self, data, targets: torch.Tensor | None = None) -> float:
        """Mean cos(total(components), target) over images: tensors [C, N, d] and [N, E], or an
        iterable of (components, targets) batches."""
        batches = [(data, targets)] if isinstance(data, torch.Tensor) else data
        total, count = 0.0, 0
        for comps, tgt in batches:
            if tgt is None:
                raise InputError("mean_cosine(components, targets): targets are missing")
            pred = self.total(comps)
            total += float(F.cosine_similarity(pred, tgt.to(pred), dim=-1, eps=1e-8).sum())
            count += tgt.shape[0]
        return total / max(count, 1)

    def _prepare_data(self, data, targets, batch_size, val, val_fraction, seed, epochs):
        """-> (epoch -> iterable of batches, batches per epoch or None, val batches or None)."""
        val_batches = None
        if val is not None:
            val_batches = self._as_batches(val, batch_size)
        if isinstance(data, torch.Tensor):
            if targets is None:
                raise InputError("fit(components, targets): targets [N, E] are missing")
            self._check_components(data)
            if data.ndim != 3 or targets.ndim != 2 or targets.shape[0] != data.shape[1]:
                raise InputError(f"fit expects components [C, N, d] and targets [N, E], got "
                                 f"{tuple(data.shape)} and {tuple(targets.shape)}")
            n = data.shape[1]
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            n_val = int(round(val_fraction * n)) if val_fraction else 0
            if n_val and val_batches is not None:
                raise InputError("give either val or val_fraction, not both")
            if n_val:
                if n_val >= n:
                    raise InputError(f"val_fraction={val_fraction} leaves no training samples")
                vi = perm[n - n_val:]
                val_batches = self._as_batches((data[:, vi], targets[vi]), batch_size)
                perm = perm[:n - n_val]
            train_idx = perm
            self._train_index = train_idx
            n_train = train_idx.numel()

            def batches(epoch: int):
                g = torch.Generator().manual_seed(seed + 1 + epoch)
                order = train_idx[torch.randperm(n_train, generator=g)]
                for s in range(0, n_train, batch_size):
                    idx = order[s:s + batch_size]
                    yield data[:, idx], targets[idx]

            return batches, math.ceil(n_train / batch_size), val_batches
        if targets is not None:
            raise InputError("targets are only given with a components tensor; a batch iterable "
                             "yields (components, targets) pairs itself")
        if val_fraction:
            raise InputError("val_fraction needs tensor data; with an iterable pass val=...")
        if callable(data) and not hasattr(data, "__iter__"):
            return (lambda epoch: data()), None, val_batches
        if epochs > 1 and iter(data) is data:
            raise InputError("epochs > 1 with a one-shot iterator: pass a list, a DataLoader or "
                             "a callable returning a fresh iterable per epoch")
        n = len(data) if hasattr(data, "__len__") else None
        return (lambda epoch: data), n, val_batches

    @staticmethod
    def _as_batches(val, batch_size):
        if isinstance(val, tuple) and len(val) == 2 and all(isinstance(v, torch.Tensor)
                                                           for v in val):
            comps, tgt = val
            return [(comps[:, s:s + batch_size], tgt[s:s + batch_size])
                    for s in range(0, tgt.shape[0], batch_size)]
        val = list(val)
        if not val:
            raise InputError("validation data is empty")
        return val

    @torch.no_grad()
    def _evaluate(self, batches, lam: float) -> float:
        total, count = 0.0, 0
        ortho = float(self.orthogonality_penalty()) if lam else 0.0
        for comps, tgt in batches:
            pred = self.total(comps)
            cos = F.cosine_similarity(pred, tgt.to(pred), dim=-1, eps=1e-8)
            total += float((1 - cos).sum())
            count += tgt.shape[0]
        return total / max(count, 1) + lam * ortho

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity_from_projection(cls, labels: Labels | int, proj: torch.Tensor | None = None,
                                 d_model: int | None = None, *, subject: str | None = None,
                                 clip_model: str | None = None) -> "CompAlign":
        """The alignment of a CLIP image tower's own components: no training.

        If the components are taken before CLIP's projection, ``proj`` [d_model, d_clip] (e.g.
        open_clip's ``model.visual.proj``) maps every one of them: f_i(c) = projᵀ c (one shared
        map). If they are already in the embedding space, pass ``proj=None`` and ``d_model``:
        f_i = identity. The bias is zero, so Σ_i f_i(c_i) is exactly the projected output.
        """
        source = "projection" if proj is not None else "identity"
        if proj is None:
            if d_model is None:
                raise InputError("identity_from_projection needs proj or d_model")
            proj = torch.eye(d_model)
        proj = torch.as_tensor(proj).detach()
        if proj.ndim != 2:
            raise InputError(f"proj must be [d_model, d_clip], got {tuple(proj.shape)}")
        al = cls(labels, proj.shape[0], proj.shape[1], subject=subject, clip_model=clip_model,
                 shared=True, dtype=proj.dtype if proj.is_floating_point() else torch.float32)
        with torch.no_grad():
            al.weight.copy_(proj.unsqueeze(0))
        al.stats = {"trained": False, "source": source}
        return al

    # ------------------------------------------------------------------ persistence
    def metadata(self) -> dict:
        return {"format": _FORMAT, "subject": self.subject, "clip_model": self.clip_model,
                "d_model": self.d_model, "d_clip": self.d_clip, "shared": self.shared,
                "labels": self._labels, "stats": self.stats}

    def save(self, path: str | Path) -> Path:
        """One .safetensors file: weight, bias, loss history; JSON metadata in its header."""
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().cpu().contiguous(),
                   "bias": self.bias.detach().cpu().contiguous()}
        for key in ("loss", "cos", "ortho"):
            if self.history[key]:
                tensors[f"history.{key}"] = torch.tensor(self.history[key], dtype=torch.float32)
        if self.history["val"]:
            tensors["history.val"] = torch.tensor(self.history["val"], dtype=torch.float64)
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(self.metadata())})
        return path

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        """The JSON metadata of a saved aligner, without loading its tensors."""
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if _META_KEY not in meta:
            raise AlignmentMismatchError(f"{path} is a safetensors file but not a saved CompAlign "
                                         f"(no {_META_KEY!r} metadata)")
        return json.loads(meta[_META_KEY])

    @classmethod
    def load(cls, path: str | Path, labels=None, subject: str | None = None,
             clip_model: str | None = None, map_location: str | torch.device = "cpu"
             ) -> "CompAlign":
        """Load a saved aligner; if ``labels`` / ``subject`` / ``clip_model`` are given they must
        match what it was trained on, else AlignmentMismatchError names the difference."""
        from safetensors.torch import load_file
        meta = cls.read_metadata(path)
        if meta.get("format") != _FORMAT:
            raise AlignmentMismatchError(f"{path}: CompAlign format {meta.get('format')} "
                                         f"(this fxdecomp reads {_FORMAT})")
        tensors = load_file(str(path), device=str(map_location))
        al = cls(meta["labels"], meta["d_model"], meta["d_clip"], subject=meta["subject"],
                 clip_model=meta["clip_model"], shared=meta["shared"],
                 dtype=tensors["weight"].dtype)
        with torch.no_grad():
            al.weight.copy_(tensors["weight"])
            al.bias.copy_(tensors["bias"])
        al.to(map_location)
        for key in ("loss", "cos", "ortho"):
            if f"history.{key}" in tensors:
                al.history[key] = tensors[f"history.{key}"].tolist()
        if "history.val" in tensors:
            al.history["val"] = tensors["history.val"].tolist()
        al.stats = meta.get("stats") or {}
        try:
            al.check(labels=labels, subject=subject, clip_model=clip_model)
        except AlignmentMismatchError as err:
            raise AlignmentMismatchError(f"{path}: {err}") from None
        return al

    def check(self, labels=None, subject: str | None = None,
              clip_model: str | None = None) -> None:
        """Raise AlignmentMismatchError unless the given labels/subject/CLIP id (those not None)
        are the ones this aligner was built for. ``labels`` may be a Decomposition."""
        if subject is not None and self.subject is not None and subject != self.subject:
            raise AlignmentMismatchError(f"subject model differs: the aligner was trained for "
                                         f"{self.subject!r}, given {subject!r}")
        if clip_model is not None and self.clip_model is not None \
                and clip_model != self.clip_model:
            raise AlignmentMismatchError(f"CLIP model differs: the aligner maps into "
                                         f"{self.clip_model!r}, given {clip_model!r}")
        if labels is not None:
            diff = _describe_label_difference(self._labels, _labels_of(labels))
            if diff:
                raise AlignmentMismatchError(diff)
