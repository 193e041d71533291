"""A small causal transformer language model, written for the functional core.

:class:`CausalLM` maps token ids ``x`` of shape ``(B, L)`` (integer, or float holding whole
numbers) to next-token logits ``(B, L, V)``: token embedding + learned positions, ``layers``
pre-LayerNorm blocks (causal multi-head self-attention, then a GELU MLP), a final LayerNorm
and an untied output layer. Parameters only (no buffers: the causal mask is built in the
forward pass), no dropout and no data-dependent Python control flow, so one node's loss is a
pure function of its flat parameter row and works under ``torch.func`` ``vmap`` / ``grad`` /
``jvp`` / ``vjp`` (attention is written out as an explicit softmax, which forward-mode AD
differentiates; PyTorch's fused attention kernels do not all support it).

Every sub-module has ``reset_parameters``, so :meth:`FunctionalModel.init_params` draws a
seeded initialisation of every parameter. The loss for next-token prediction is the per-sequence
mean token cross-entropy (``loss: {kind: token_cross_entropy}``; targets ``(B, L)``).

``make_model`` is the factory the configs name (``model: {kind: python, factory:
"dice_influence.lm:make_model"}``); ``configs/lm-*.yaml`` train it on the fortunes corpus of
:mod:`dice_influence.data.text`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 256
"""Byte-level vocabulary (:mod:`dice_influence.data.text` tokenizes UTF-8 bytes)."""


class _Embedding(nn.Module):
    """Token embedding ``(V, D)``, initialised N(0, 1) (``nn.Embedding``'s default): tokens then
    dominate the small learned positions in the first LayerNorm, so plain SGD finds the
    bigram path (embedding → head) within tens of rounds instead of sitting at the unigram
    loss (measured on the fortunes corpus, 16 nodes, lr 0.1, momentum 0.9:
    test loss 2.83 after 150 rounds, against 3.28 with N(0, 0.02²))."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.round().long() if x.is_floating_point() else x.long()
        return F.embedding(ids, self.weight)


class _Positions(nn.Module):
    """Learned absolute positions ``(context, D)``, initialised N(0, 0.02²)."""

    def __init__(self, context: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(context, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, length: int) -> torch.Tensor:
        return self.weight[:length]


class LayerNorm(nn.Module):
    """LayerNorm over the last axis written out (mean, variance, ``rsqrt``), with a weight and a
    bias. Same numbers as ``nn.LayerNorm``; written out because forward-mode AD of ``vmap``-ed
    gradients through ``F.layer_norm`` with a learned weight is wrong in torch 2.13 (DICE-E's
    ``jvp`` of the nodes' batch gradients would silently be off; ``tests/test_lm.py`` checks)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        c = h - h.mean(-1, keepdim=True)
        return c * torch.rsqrt((c * c).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an explicit masked softmax."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, L, D = h.shape
        hd = D // self.heads
        q, k, v = self.qkv(h).view(B, L, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # (B, H, L, L)
        future = torch.ones(L, L, dtype=torch.bool, device=h.device).triu(1)
        att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = (att @ v).transpose(1, 2).reshape(B, L, D)
        return self.proj(out)


class Block(nn.Module):
    """Pre-LN transformer block: ``h + attn(LN(h))``, then ``h + MLP(LN(h))`` (GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln1 = LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = LayerNorm(dim)
        self.fc = nn.Linear(dim, mlp_ratio * dim)
        self.out = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class CausalLM(nn.Module):
    """Causal transformer LM: ids ``(B, L)`` with ``L <= context`` → logits ``(B, L, vocab)``."""

    def __init__(self, vocab: int = VOCAB, context: int = 64, dim: int = 64, layers: int = 2,
                 heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.context = context
        self.tok = _Embedding(vocab, dim)
        self.pos = _Positions(context, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(layers)])
        self.ln_f = LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(x.shape[-1])
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))


def make_model(vocab: int = VOCAB, context: int = 64, dim: int = 64, layers: int = 2,
               heads: int = 4, mlp_ratio: int = 4) -> CausalLM:
    """The factory named by ``configs/lm-*.yaml``: a :class:`CausalLM` (defaults: byte vocabulary,
    context 64, width 64, 2 blocks, 4 heads: about 0.13 M parameters)."""
    for name, v in (("vocab", vocab), ("context", context), ("dim", dim), ("layers", layers),
                    ("heads", heads), ("mlp_ratio", mlp_ratio)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"make_model: {name}={v!r} must be a positive integer")
    return CausalLM(vocab, context, dim, layers, heads, mlp_ratio)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
