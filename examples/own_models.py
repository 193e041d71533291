"""Models of one's own for the config path (``model: {kind: python, factory:
"examples.own_models:make_regressor"}``), imported from the repository root.

Parameters only (no buffers), no dropout: a DICE round is a pure function of the parameters.
"""

from __future__ import annotations

from torch import nn


class Regressor(nn.Module):
    """An MLP with a LayerNorm and a smooth activation, one output per target value."""

    def __init__(self, in_dim: int = 10, hidden: int = 32, out: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.Tanh(),
                                 nn.Linear(hidden, out))
        self.out = out

    def forward(self, x):
        y = self.net(x)
        return y.squeeze(-1) if self.out == 1 else y


def make_regressor(in_dim: int = 10, hidden: int = 32, out: int = 1) -> nn.Module:
    return Regressor(in_dim, hidden, out)
