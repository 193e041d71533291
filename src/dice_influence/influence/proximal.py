"""Proximal influence between neighbours (SPEC §5, paper Def. 4).

``I_prox(j → k) = Σ_t q_k W^t[k, j] ∇L(θ_k^{t+1}; z'_k)ᵀ u_j^t`` — the one-hop term of sender
``j``'s whole update on receiver ``k``, measured with ``k``'s own test set. Sign: positive =
``j``'s update raised ``k``'s test loss (harmful).
"""

from __future__ import annotations

import torch


def proximal_matrix(
    G: torch.Tensor, W: torch.Tensor, U: torch.Tensor, q: torch.Tensor | None = None
) -> torch.Tensor:
    """One round's proximal influence of every sender on every receiver.

    ``G`` (n, d): receiver ``k``'s test-loss gradient (the read-out: ``pre`` ``∇L(θ_k^t)``,
    ``post`` ``∇L(θ_k^{t+1})``); ``W`` (n, n): ``W[k, j]`` = weight receiver ``k`` puts on
    sender ``j``; ``U`` (n, d): each sender's update ``u_j = θ_j^{t+½} − θ_j^t``; ``q`` (n,)
    node weights (default 1/n). Returns ``P`` (n, n) with ``P[k, j] = q_k W[k, j] G_kᵀ u_j``
    for ``j ≠ k`` and 0 on the diagonal and wherever ``W[k, j] = 0`` (non-finite updates of
    non-neighbours never leak in).
    """
    n = G.shape[0]
    if q is None:
        q = torch.full((n,), 1.0 / n, dtype=G.dtype, device=G.device)
    W = W.to(dtype=G.dtype, device=G.device)
    S = G @ U.T  # S[k, j] = G_k · u_j
    P = q.to(G.dtype)[:, None] * W * S
    mask = (W != 0) & ~torch.eye(n, dtype=torch.bool, device=G.device)
    return torch.where(mask, P, torch.zeros_like(P))
