"""Mean-ablate components and measure a linear head on what is left: the paper's remedy for
spurious cues.

The representation is r(x) = Σ_i c_i(x). Mean-ablating a set S replaces each c_i, i ∈ S, by
its mean over a reference set: r_S(x) = Σ_{i∉S} c_i(x) + Σ_{i∈S} μ_i, μ_i = mean_{x'∈ref} c_i(x').
A linear head on top (the model's own, or one fitted here on the full representation of the
reference set) is evaluated before and after: accuracy, per-group accuracy, worst-group accuracy
and the mean over groups.

The paper removes the top-k components for the spurious feature, ranked by
score_spurious − score_core (``fxdecomp.interpret.score_components`` for each feature's text
descriptions); ``ablate_spurious`` is that call.

>>> res = ablate_spurious(test_comps, y, g, score_spurious=s_bg, score_core=s_bird, k=10,
...                       reference=train_comps, reference_labels=y_train)   # doctest: +SKIP
>>> res.before["worst_group"], res.after["worst_group"]                     # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from fxdecomp.errors import InputError

__all__ = ["LinearHead", "fit_linear_head", "mean_ablate", "group_accuracy", "spurious_ranking",
           "ablate_spurious", "AblationResult"]


def _as_components(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 3:
        raise InputError(f"{what} must be components [C, N, d] (a pooled representation), got "
                         f"{tuple(t.shape)}")
    return t.detach().float()


def _as_index(idx, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx).long().flatten()
    if t.numel() and (int(t.min()) < -n or int(t.max()) >= n):
        raise InputError(f"{what} must index [0, {n}), got {t.tolist()[:8]}")
    return t % n if t.numel() else t


def mean_ablate(components: torch.Tensor, remove: Sequence[int] | torch.Tensor,
                means: torch.Tensor) -> torch.Tensor:
    """[N, d] = Σ_{i∉remove} c_i + Σ_{i∈remove} means[i] (components [C, N, d], means [C, d])."""
    comps = _as_components(components, "components")
    means = torch.as_tensor(means).float()
    if tuple(means.shape) != (comps.shape[0], comps.shape[2]):
        raise InputError(f"means must be [C={comps.shape[0]}, d={comps.shape[2]}], got "
                         f"{tuple(means.shape)}")
    idx = _as_index(remove, comps.shape[0], "remove")
    rep = comps.sum(0)
    if idx.numel():
        idx = torch.unique(idx)
        rep = rep - comps[idx].sum(0) + means[idx].sum(0)
    return rep


@dataclass
class LinearHead:
    """logits = reps @ weight.T + bias (weight [K, d], bias [K])."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, reps: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(reps).float() @ self.weight.T + self.bias

    def predict(self, reps: torch.Tensor) -> torch.Tensor:
        return self(reps).argmax(-1)


def fit_linear_head(reps: torch.Tensor, labels: torch.Tensor, l2: float = 1e-4,
                    max_iter: int = 500) -> LinearHead:
    """Multinomial logistic regression (L-BFGS, L2 penalty ``l2`` on the weights of
    standardised features), returned as a head on the raw representation."""
    x = torch.as_tensor(reps).detach().double()
    y = torch.as_tensor(labels).long().flatten()
    if x.dim() != 2 or x.shape[0] != y.numel():
        raise InputError(f"reps must be [N, d] with N = len(labels); got {tuple(x.shape)} and "
                         f"{y.numel()} labels")
    classes = int(y.max()) + 1
    if classes < 2 or len(torch.unique(y)) < 2:
        raise InputError("fitting a head needs at least two classes in the labels")
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mu) / sd
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = (w.detach() / sd)
    bias = b.detach() - weight @ mu
    return LinearHead(weight.float(), bias.float())


def group_accuracy(pred: torch.Tensor, labels: torch.Tensor,
                   groups: torch.Tensor | None = None) -> dict:
    """{"accuracy", "per_group" {group: accuracy}, "worst_group", "mean_group", "group_sizes"}.
    Without groups, the classes are the groups."""
    pred = torch.as_tensor(pred).long().flatten()
    labels = torch.as_tensor(labels).long().flatten()
    groups = labels if groups is None else torch.as_tensor(groups).long().flatten()
    if not (pred.numel() == labels.numel() == groups.numel()) or not pred.numel():
        raise InputError(f"pred, labels and groups must have the same non-zero length, got "
                         f"{pred.numel()}, {labels.numel()}, {groups.numel()}")
    ok = (pred == labels).float()
    per, sizes = {}, {}
    for g in torch.unique(groups).tolist():
        m = groups == g
        per[int(g)] = float(ok[m].mean())
        sizes[int(g)] = int(m.sum())
    return {"accuracy": float(ok.mean()), "per_group": per, "worst_group": min(per.values()),
            "mean_group": sum(per.values()) / len(per), "group_sizes": sizes}


def spurious_ranking(score_spurious: torch.Tensor, score_core: torch.Tensor) -> torch.Tensor:
    """[C] score_spurious − score_core: the paper's ranking of components to remove."""
    s = torch.as_tensor(score_spurious).float().flatten()
    c = torch.as_tensor(score_core).float().flatten()
    if s.shape != c.shape:
        raise InputError(f"score_spurious and score_core must both be [C], got {tuple(s.shape)} "
                         f"and {tuple(c.shape)}")
    return s - c


@dataclass
class AblationResult:
    """Metrics before and after removing ``removed`` (component indices, best first)."""

    removed: list[int]
    before: dict
    after: dict
    names: list[str] = field(default_factory=list)
    head: LinearHead | Callable | None = None

    @property
    def k(self) -> int:
        return len(self.removed)

    def summary(self) -> dict:
        """The demo's ``spurious`` record: worst-group and mean-group accuracy, before/after, k."""
        return {"worst_group_before": self.before["worst_group"],
                "worst_group_after": self.after["worst_group"],
                "average_before": self.before["mean_group"],
                "average_after": self.after["mean_group"],
                "accuracy_before": self.before["accuracy"],
                "accuracy_after": self.after["accuracy"], "k": self.k,
                "removed": self.names or self.removed}


def ablate_spurious(components: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                    *, score_spurious: torch.Tensor | None = None,
                    score_core: torch.Tensor | None = None, k: int = 10,
                    remove: Sequence[int] | None = None,
                    reference: torch.Tensor | None = None,
                    reference_labels: torch.Tensor | None = None,
                    head: LinearHead | Callable | None = None,
                    names: Sequence[str] | None = None) -> AblationResult:
    """Remove the top-k spurious components (by ``spurious_ranking``) or the given ``remove``,
    replacing each by its mean over ``reference`` (default: ``components`` itself), and evaluate
    ``head`` on ``components`` [C, N, d] before and after, per group.

    head: a callable reps [N, d] -> logits [N, K] (the model's own head), or None: a logistic
    regression fitted on the full representation of the reference set (``reference_labels``,
    default ``labels`` when the reference is the evaluation set itself).
    """
    comps = _as_components(components, "components")
    ref = comps if reference is None else _as_components(reference, "reference")
    if ref.shape[0] != comps.shape[0] or ref.shape[2] != comps.shape[2]:
        raise InputError(f"reference components {tuple(ref.shape)} do not match "
                         f"{tuple(comps.shape)} (same C and d needed)")
    C = comps.shape[0]
    if remove is None:
        if score_spurious is None or score_core is None:
            raise InputError("give score_spurious and score_core (to rank), or remove=[...]")
        margin = spurious_ranking(score_spurious, score_core)
        if margin.numel() != C:
            raise InputError(f"scores are for {margin.numel()} components; there are {C}")
        if not isinstance(k, int) or not 0 <= k <= C:
            raise InputError(f"k must be an int in [0, {C}], got {k!r}")
        removed = torch.topk(margin, k).indices.tolist() if k else []
    else:
        removed = _as_index(remove, C, "remove").tolist()
    if head is None:
        ref_labels = labels if (reference is None and reference_labels is None) else reference_labels
        if ref_labels is None:
            raise InputError("fitting a head on the reference set needs reference_labels")
        head = fit_linear_head(ref.sum(0), ref_labels)
    means = ref.mean(1)
    with torch.no_grad():
        before = group_accuracy(torch.as_tensor(head(comps.sum(0))).argmax(-1), labels, groups)
        after = group_accuracy(torch.as_tensor(head(mean_ablate(comps, removed, means))).argmax(-1),
                               labels, groups)
    label_names = [names[i] for i in removed] if names is not None else []
    return AblationResult(removed, before, after, label_names, head)
