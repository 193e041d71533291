"""DICE-E's curvature term through nn.LayerNorm: forward-over-reverse over nodes (the form the
tangent recursion uses) must equal finite differences of the gradient (torch 2.13's fused
layer_norm gets this wrong under vmap; models.FunctionalModel evaluates LayerNorm by formula)."""

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from dice_influence.models import FunctionalModel


def test_hvp_through_layer_norm_over_nodes_matches_finite_differences():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1),
                           nn.Flatten(0)).double()
    fm = FunctionalModel(module, loss="mse")
    x, y = torch.randn(3, 6, 5, dtype=torch.double), torch.randn(3, 6, dtype=torch.double)
    theta = 0.5 * torch.randn(3, fm.dim, dtype=torch.double)
    tan = torch.randn(3, fm.dim, dtype=torch.double)
    g = vmap(grad(fm.loss))
    hv = jvp(lambda v: g(v, x, y), (theta,), (tan,))[1]
    eps = 1e-6
    fd = (g(theta + eps * tan, x, y) - g(theta - eps * tan, x, y)) / (2 * eps)
    assert (hv - fd).abs().max() < 1e-6 * fd.abs().max()
    # the module computes what nn.LayerNorm computes
    ref = nn.LayerNorm(8).double()
    ref.load_state_dict(module[1].state_dict())
    z = torch.randn(4, 8, dtype=torch.double)
    assert torch.allclose(module[1](z), ref(z), atol=1e-12)
