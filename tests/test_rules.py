"""One tiny module per rule: a residual block feeding the op under test, then a check that the
components sum to the module's output (and that the rule actually decomposed: several
components, not one root holding everything)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp


class Residual(nn.Module):
    """x -> proj(x) -> h + mlp(h) -> tail(.)  (so the tail sees terms from several roots)."""

    def __init__(self, tail, dim=8):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
        self.tail = tail

    def forward(self, x):
        h = self.proj(x)
        return self.tail(h + self.mlp(h))


class Lambda(nn.Module):
    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            self.register_parameter(k, nn.Parameter(v))

    def forward(self, x):
        return self.fn(self, x)


def _img(m, x):  # [B, N, 8] -> [B, 8, 4, 4] when N = 16
    return x.transpose(1, 2).reshape(x.shape[0], 8, 4, 4)


TAILS = {
    "layer_norm": lambda: nn.LayerNorm(8),
    "rms_norm": lambda: nn.RMSNorm(8),
    "pad_value": lambda: Lambda(lambda m, x: F.pad(x, (1, 2), value=0.5)),
    "where": lambda: Lambda(lambda m, x: torch.where(x.detach() > 0, x, 2 * x)),
    "masked_fill": lambda: Lambda(lambda m, x: x.masked_fill(x.detach() < -0.5, 0.25)),
    "cat_stack": lambda: Lambda(lambda m, x: torch.stack([torch.cat([x, 2 * x], -1), torch.cat([x, x], -1)], 1)),
    "einsum": lambda: Lambda(lambda m, x: torch.einsum("bnd,de->bne", x, m.w), w=torch.randn(8, 5)),
    "max_pool": lambda: Lambda(lambda m, x: F.max_pool2d(_img(m, x), 2)),
    "amax": lambda: Lambda(lambda m, x: x.amax(dim=1)),
    "group_norm": lambda: nn.Sequential(Lambda(_img), nn.GroupNorm(2, 8)),
    "batch_norm": lambda: nn.Sequential(Lambda(_img), nn.BatchNorm2d(8)),
    "conv_pool": lambda: nn.Sequential(Lambda(_img), nn.Conv2d(8, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1)),
    "normalize": lambda: Lambda(lambda m, x: F.normalize(x, dim=-1)),
    "mean_sub_scalar": lambda: Lambda(lambda m, x: (x.mean(1) - 3.0) * 0.5),
    "split_unbind": lambda: Lambda(lambda m, x: torch.cat(x.split(4, dim=-1)[::-1], -1)
                                   + x.unbind(1)[3].unsqueeze(1)),
}


@pytest.mark.parametrize("name", list(TAILS))
def test_rule_exact(name):
    torch.manual_seed(0)
    model = Residual(TAILS[name]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(3, 16, 8)
    dm = fxdecomp.decompose(model, x, granularity="blocks")
    with torch.no_grad():
        d, ref = dm(x), model(x)
    err = float((d.components.double().sum(0) - ref.double()).abs().max() / ref.double().abs().max())
    assert err <= 1e-5, f"{name}: relative error {err:.2e}"
    kinds = {lab.kind for lab in d.labels}
    assert "mlp" in kinds and "embed" in kinds, f"{name}: not decomposed ({[l.name for l in d.labels]})"
