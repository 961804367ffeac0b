"""Portable backend: the reference math in fp32, a chunk of rows at a time, on any device.

Only ``[chunk, V]`` logits exist at once; gradients are formed chunk by chunk during the forward with
autograd. It is the fallback where neither the C++ op nor Triton applies, and a second opinion in tests.
"""

from __future__ import annotations

import torch

from .backend_api import FusedResult
from .config import LossConfig
from .inputs import TokenInputs
from .reference import token_losses

CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk (autograd keeps a few tensors of that size)


def _row_chunks(n: int, vocab: int):
    """Row slices whose ``[rows, V]`` fp32 logits fit the byte budget, whatever V is."""
    step = max(1, CHUNK_BYTES // (4 * vocab))
    return (slice(start, min(start + step, n)) for start in range(0, n, step))


def _chunk_loss(z: torch.Tensor, targets: torch.Tensor, tok: TokenInputs, rows: slice, config: LossConfig):
    logp = torch.log_softmax(z / config.temperature, dim=-1)
    lp = logp.gather(-1, targets[rows].long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    pick = lambda t: None if t is None else t[rows]  # noqa: E731
    loss_t, _ = token_losses(
        lp, entropy, advantages=tok.advantages[rows], is_expert=tok.is_expert[rows], old_logprobs=pick(tok.old_logprobs),
        ref_logprobs=pick(tok.ref_logprobs), behavior_logprobs=pick(tok.behavior_logprobs), config=config,
    )
    return (loss_t * tok.agg_weight[rows]).sum(), lp, entropy


def linear_loss(hidden, weight, targets, tok: TokenInputs, config: LossConfig, *, need_entropy, grad_hidden, grad_weight):
    n = hidden.shape[0]
    w32 = weight.detach().float().requires_grad_(grad_weight)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if need_entropy else None
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = torch.zeros_like(w32) if grad_weight else None
    for rows in _row_chunks(n, weight.shape[0]):
        with torch.enable_grad():
            h = hidden[rows].detach().float().requires_grad_(grad_hidden)
            chunk_loss, chunk_lp, chunk_ent = _chunk_loss(h @ w32.T, targets, tok, rows, config)
            wanted = [t for t, need in ((h, grad_hidden), (w32, grad_weight)) if need]
            grads = list(torch.autograd.grad(chunk_loss, wanted)) if wanted else []
        if grad_hidden:
            d_hidden[rows] = grads.pop(0).to(hidden.dtype)
        if grad_weight:
            d_weight += grads.pop(0)
        loss += chunk_loss.detach()
        lp[rows] = chunk_lp.detach()
        if need_entropy:
            entropy[rows] = chunk_ent.detach()
    return FusedResult(loss, lp, entropy, d_hidden, None if d_weight is None else d_weight.to(weight.dtype))


def logits_loss(logits, targets, tok: TokenInputs, config: LossConfig, *, need_entropy, grad_logits):
    n = logits.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=logits.device)
    lp = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device) if need_entropy else None
    d_logits = torch.empty_like(logits) if grad_logits else None
    for rows in _row_chunks(n, logits.shape[1]):
        with torch.enable_grad():
            z = logits[rows].detach().float().requires_grad_(grad_logits)
            chunk_loss, chunk_lp, chunk_ent = _chunk_loss(z, targets, tok, rows, config)
            if grad_logits:
                d_logits[rows] = torch.autograd.grad(chunk_loss, z)[0].to(logits.dtype)
        loss += chunk_loss.detach()
        lp[rows] = chunk_lp.detach()
        if need_entropy:
            entropy[rows] = chunk_ent.detach()
    return FusedResult(loss, lp, entropy, d_logits, None)


@torch.no_grad()
def linear_logprobs(hidden, weight, targets, temperature: float, return_entropy: bool):
    n = hidden.shape[0]
    lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device) if return_entropy else None
    w32 = weight.float()
    for rows in _row_chunks(n, weight.shape[0]):
        logp = torch.log_softmax(hidden[rows].float() @ w32.T / temperature, dim=-1)
        lp[rows] = logp.gather(-1, targets[rows].long().unsqueeze(-1)).squeeze(-1)
        if return_entropy:
            entropy[rows] = -(logp.exp() * logp).sum(-1)
    return lp, entropy
