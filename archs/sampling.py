"""Autoregressive sampling with a KV cache, for any family that implements `new_cache`.

A model supports cached decoding if `forward(tokens, cache=..., pos=...)` takes positions
[pos, pos+T) and `new_cache(batch, max_len)` returns a cache it understands.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def filter_logits(logits_BV: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus of mass top_p to -inf."""
    if top_k is not None and 0 < top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token if the mass strictly before it already reaches top_p (the first always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    probs = filter_logits(logits_BV.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompt_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             eos_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue `prompt_BT` by up to `max_new_tokens` tokens; returns [B, T + new].

    With `use_cache=False` every step reruns the whole sequence (the reference the cache is
    tested against). Stops early once every row has produced `eos_id`.
    """
    B, T = prompt_BT.shape
    limit = model.cfg.max_seq_len
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len={limit}; shorten the prompt or ask for fewer tokens")
    model.eval()
    cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
    tokens = prompt_BT
    logits = model(tokens, cache=cache, pos=0)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=prompt_BT.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
        if cache is not None:
            logits = model(nxt[:, None], cache=cache, pos=tokens.shape[1] - 1)[:, -1]
        else:
            logits = model(tokens)[:, -1]
    return tokens
