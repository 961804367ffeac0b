"""Portable backend: the reference math in fp32, a chunk of rows at a time, on any device.

Only ``[chunk, V]`` logits exist at once; gradients are formed chunk by chunk during the forward with
autograd. It is the fallback where neither the C++ op nor Triton applies, and a second opinion in tests.
Like every backend it forms per-token losses; sequence-level ratios run through :mod:`.sequence_level`.
It has no knobs: ``options`` is accepted and unused.
"""

from __future__ import annotations

import torch

from .backend_api import FusedResult
from .config import LossConfig
from .inputs import TokenInputs
from .options import KernelOptions
from .reference import active_token_losses, logprobs_and_entropy

CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk (autograd keeps a few tensors of that size)


def _row_chunks(n: int, vocab: int):
    """Row slices whose ``[rows, V]`` fp32 logits fit the byte budget, whatever V is."""
    step = max(1, CHUNK_BYTES // (4 * vocab))
    return (slice(start, min(start + step, n)) for start in range(0, n, step))


def _chunk_loss(logits_of, targets: torch.Tensor, tok: TokenInputs, rows: slice, config: LossConfig):
    """The chunk's share of the loss (to back-propagate), and every row's log-prob and entropy."""
    chunk = tok.select(rows)
    act = active_token_losses(logits_of, targets[rows], chunk, config)
    return (act.loss * chunk.agg_weight[act.index]).sum(), act.logprobs, act.entropy


def linear_loss(hidden, weight, targets, tok: TokenInputs, config: LossConfig, *, bias, need_entropy, grad_hidden,
                grad_weight, grad_bias, options: KernelOptions):
    n = hidden.shape[0]
    w32 = weight.detach().float().requires_grad_(grad_weight)
    b32 = torch.zeros(weight.shape[0], device=weight.device) if bias is None else bias.detach().float()
    b32.requires_grad_(grad_bias)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if need_entropy else None
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = torch.zeros_like(w32) if grad_weight else None
    d_bias = torch.zeros_like(b32) if grad_bias else None
    for rows in _row_chunks(n, weight.shape[0]):
        with torch.enable_grad():
            h = hidden[rows].detach().float().requires_grad_(grad_hidden)
            chunk_loss, chunk_lp, chunk_ent = _chunk_loss(lambda i: h[i] @ w32.T + b32, targets, tok, rows, config)
            wanted = [t for t, need in ((h, grad_hidden), (w32, grad_weight), (b32, grad_bias)) if need]
            # A chunk without unmasked tokens does not depend on h: its gradient is zero (materialised).
            grads = list(torch.autograd.grad(chunk_loss, wanted, materialize_grads=True)) if wanted else []
        if grad_hidden:
            d_hidden[rows] = grads.pop(0).to(hidden.dtype)
        if grad_weight:
            d_weight += grads.pop(0)
        if grad_bias:
            d_bias += grads.pop(0)
        loss += chunk_loss.detach()
        lp[rows] = chunk_lp
        if need_entropy:
            entropy[rows] = chunk_ent
    cast = lambda g: None if g is None else g.to(weight.dtype)  # noqa: E731
    return FusedResult(loss, lp, entropy, d_hidden, cast(d_weight), cast(d_bias))


def logits_loss(logits, targets, tok: TokenInputs, config: LossConfig, *, need_entropy, grad_logits):
    n = logits.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=logits.device)
    lp = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device) if need_entropy else None
    d_logits = torch.empty_like(logits) if grad_logits else None
    for rows in _row_chunks(n, logits.shape[1]):
        with torch.enable_grad():
            z = logits[rows].detach().float().requires_grad_(grad_logits)
            chunk_loss, chunk_lp, chunk_ent = _chunk_loss(lambda i: z[i], targets, tok, rows, config)
            if grad_logits:
                d_logits[rows] = torch.autograd.grad(chunk_loss, z, materialize_grads=True)[0].to(logits.dtype)
        loss += chunk_loss.detach()
        lp[rows] = chunk_lp
        if need_entropy:
            entropy[rows] = chunk_ent
    return FusedResult(loss, lp, entropy, d_logits, None)


@torch.no_grad()
def linear_logprobs(hidden, weight, targets, temperature: float, return_entropy: bool, options: KernelOptions,
                    bias=None):
    n = hidden.shape[0]
    lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if return_entropy else None
    w32 = weight.float()
    b32 = 0.0 if bias is None else bias.float()
    for rows in _row_chunks(n, weight.shape[0]):
        logits = hidden[rows].float() @ w32.T + b32
        lp[rows], chunk_entropy = logprobs_and_entropy(logits, targets[rows], temperature)
        if return_entropy:
            entropy[rows] = chunk_entropy
    return lp, entropy
