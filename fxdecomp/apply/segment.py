"""Zero-shot segmentation from heatmaps, scored against masks the way the paper does.

The paper follows the protocol of Chefer et al. (*Transformer Interpretability Beyond Attention
Visualization*, CVPR 2021; their ``imagenet_seg_eval.py``), which we reproduce exactly:

1. Each image's heatmap h [H, W] (already at the mask's resolution) is min-max normalised to
   [0, 1]: h' = (h − min h) / (max h − min h) (a constant map becomes all zeros).
2. **Prediction**: foreground where h' > mean(h') (the per-image threshold is the mean of the
   normalised heatmap); background elsewhere.
3. **Pixel accuracy**: correctly labelled pixels / all pixels, pooled over the whole set.
4. **mIoU**: for each class (background, foreground) IoU = Σ_images |pred ∩ mask| /
   Σ_images |pred ∪ mask| (intersections and unions pooled over the set), then the mean of the
   two classes.
5. **mAP**: per image, the average precision of ranking its 2·H·W class scores — h' for the
   foreground of every pixel, 1 − h' for its background — against the one-hot truth (sklearn's
   step-wise AP, Σ_n (R_n − R_{n−1}) P_n over distinct thresholds); the mean over images.

``center_blob`` is the baseline that ignores the image: an isotropic Gaussian centred on the
image with σ = ``sigma`` · min(H, W).
"""
from __future__ import annotations

import torch

from fxdecomp.errors import InputError

__all__ = ["segmentation_metrics", "average_precision", "center_blob", "pointing_accuracy",
           "normalise_heatmaps"]


def _check(heatmaps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.as_tensor(heatmaps).detach().double()
    m = torch.as_tensor(masks).detach()
    if h.dim() == 2:
        h, m = h[None], m[None]
    if h.dim() != 3 or tuple(h.shape) != tuple(m.shape):
        raise InputError(f"heatmaps and masks must both be [N, H, W] of the same shape, got "
                         f"{tuple(h.shape)} and {tuple(m.shape)}; resize heatmaps to the masks "
                         "first (Heatmap.upsampled)")
    if not bool(torch.isfinite(h).all()):
        raise InputError("heatmaps contain NaN or inf")
    return h, m.bool()


def normalise_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation to [0, 1] (constant maps become 0)."""
    h = torch.as_tensor(heatmaps).double()
    lo = h.flatten(1).min(1).values.view(-1, 1, 1)
    hi = h.flatten(1).max(1).values.view(-1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (h - lo) / span.clamp_min(1e-300), torch.zeros_like(h))


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Step-wise average precision Σ_n (R_n − R_{n−1}) P_n over distinct score thresholds (as
    sklearn.metrics.average_precision_score). NaN when there is no positive."""
    s = torch.as_tensor(scores).double().flatten()
    y = torch.as_tensor(labels).flatten().double()
    n_pos = float(y.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(s, descending=True, stable=True)
    s, y = s[order], y[order]
    # last index of each run of equal scores: the distinct thresholds
    last = torch.cat([(s[1:] != s[:-1]).nonzero().flatten(), torch.tensor([s.numel() - 1])])
    tp = torch.cumsum(y, 0)[last]
    precision = tp / (last + 1).double()
    recall = tp / n_pos
    prev = torch.cat([torch.zeros(1, dtype=recall.dtype), recall[:-1]])
    return float(((recall - prev) * precision).sum())


def segmentation_metrics(heatmaps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """{"pixel_accuracy", "miou", "map"} of heatmaps [N, H, W] against boolean masks [N, H, W]
    (protocol in the module docstring)."""
    h, m = _check(heatmaps, masks)
    h = normalise_heatmaps(h)
    pred = h > h.flatten(1).mean(1).view(-1, 1, 1)
    correct = int((pred == m).sum())
    acc = correct / m.numel()
    ious = []
    for p_c, m_c in ((~pred, ~m), (pred, m)):
        inter = int((p_c & m_c).sum())
        union = int((p_c | m_c).sum())
        ious.append(inter / union if union else 1.0)
    aps = []
    for hi, mi in zip(h, m):
        scores = torch.cat([hi.flatten(), 1 - hi.flatten()])
        truth = torch.cat([mi.flatten(), ~mi.flatten()])
        aps.append(average_precision(scores, truth))
    return {"pixel_accuracy": acc, "miou": sum(ious) / 2, "map": sum(aps) / len(aps)}


def center_blob(n: int, size: tuple[int, int], sigma: float = 0.25) -> torch.Tensor:
    """[n, H, W] Gaussian blobs centred on the image, σ = sigma · min(H, W) (the baseline)."""
    H, W = size
    y = torch.arange(H, dtype=torch.float64) + 0.5 - H / 2
    x = torch.arange(W, dtype=torch.float64) + 0.5 - W / 2
    s = sigma * min(H, W)
    blob = torch.exp(-(y.view(-1, 1) ** 2 + x.view(1, -1) ** 2) / (2 * s * s))
    return blob.expand(n, H, W).clone()


def pointing_accuracy(heatmaps: torch.Tensor, masks: torch.Tensor) -> float:
    """Share of images whose heatmap maximum (first in row-major order on ties) lies in the
    mask."""
    h, m = _check(heatmaps, masks)
    peak = h.flatten(1).argmax(1)
    return float(m.flatten(1).gather(1, peak.view(-1, 1)).float().mean())
