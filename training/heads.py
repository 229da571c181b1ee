"""DINOv2's projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes (no bias)."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """`x @ (g * v / |v|).T` without bias: the prototype layer, whose rows are normalised directions.

    Initialised as DINOv2's `weight_norm(nn.Linear(..., bias=False))` with `weight_g` filled with 1: `weight_v`
    keeps nn.Linear's default init (Kaiming-uniform, a = sqrt(5)), whose scale sets how fast the directions move.
    The parameter names match the official head's, so its state dict loads as it is.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """`[N, D]` tokens -> `[N, K]` prototype scores: MLP to the bottleneck, L2 norm, prototype layer."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, n_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)  # [N, bottleneck]
        return self.last_layer(x)  # [N, K]
