"""
Causal softmax self-attention with the two options that bound a KV cache, shared by GPT (model_gpt.py) and the
attention layers of an RWKV hybrid (model_rwkv.py):
- a sliding window: each token sees the last `window` tokens, itself included (Mistral 7B, Jiang et al. 2023,
  arXiv:2310.06825); in inference the cache is then a ring buffer of `window` entries, constant memory per token;
- grouped-query attention: the n_head query heads share n_kv_head key/value heads, n_head / n_kv_head queries per
  K/V head (Ainslie et al. 2023, arXiv:2305.13245; Llama 2), which divides the cache by that factor.
No positional encoding happens here (GPT adds learned positions to its input; an RWKV hybrid's recurrent layers carry
order, as in Jamba, arXiv:2403.19887). Hence the ring buffer's slot order does not matter: softmax attention is the
same for any order of its keys, and the mask is built from each slot's absolute position.

In training the window is a mask over the T x T scores (the same compute as full attention: the saving is memory at
inference). Positions are 0-based; query position t sees key position s iff s <= t and t - s < window.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F


class KVCache(NamedTuple):
    """One attention layer's keys and values of the positions seen so far."""
    k: torch.Tensor  # (B, n_kv_head, S, head_size): S = window slots (a ring buffer) if windowed, else every position
    v: torch.Tensor  # (B, n_kv_head, S, head_size)
    pos: int  # how many positions have been seen


def check_attention(n_embd, n_head, n_kv_head, window):
    """The one-line errors of impossible attention settings (the model configs call this)."""
    if n_head < 1 or n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head} (each head gets n_embd / n_head "
                         f"channels)")
    if n_kv_head < 0 or (n_kv_head and n_head % n_kv_head):
        raise ValueError(f"attn_kv_heads={n_kv_head} must divide n_head={n_head} (each K/V head serves n_head / "
                         f"attn_kv_heads query heads); 0 means n_head")
    if window < 0:
        raise ValueError(f"attn_window={window} must be >= 0 (0 = full causal attention, W = the last W tokens)")


class CausalSelfAttention(nn.Module):

    def __init__(self, n_embd, n_head, n_kv_head=0, window=0, bias=False, dropout=0.0):
        super().__init__()
        check_attention(n_embd, n_head, n_kv_head, window)
        self.n_head, self.n_kv_head, self.window = n_head, n_kv_head or n_head, window
        self.head_size = n_embd // n_head
        kv_dim = self.n_kv_head * self.head_size
        self.c_attn = nn.Linear(n_embd, n_embd + 2 * kv_dim, bias=bias)  # q, then k and v of the K/V heads
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x, cache=None, use_cache=True):
        """x (B, T, C) at positions cache.pos .. cache.pos + T - 1 (cache None: from position 0). Returns the output
        (B, T, C) and the KVCache after x (None when use_cache is False: training needs none)."""
        B, T, C = x.size()
        hs, kv_dim = self.head_size, self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv, T, hs)
        past = cache.pos if cache is not None else 0
        dropout = self.dropout if self.training else 0.0
        if cache is not None and T == 1 and (not self.window or past >= self.window):
            # a decoding step once the cache is full: the new token sees exactly the updated cache (its window), so
            # it is written first and attended to whole, with no mask
            new_cache = self.update_cache(cache, k, v, past + 1)
            y = self.attend(q, new_cache.k, new_cache.v, 'all', dropout)  # (B, nh, 1, hs)
        else:
            q_pos = torch.arange(past, past + T, device=x.device)  # (T,)
            if cache is None:
                keys, values, k_pos = k, v, q_pos
            else:
                keys = torch.cat([cache.k, k.to(cache.k.dtype)], dim=2)  # (B, n_kv, S + T, hs)
                values = torch.cat([cache.v, v.to(cache.v.dtype)], dim=2)
                k_pos = torch.cat([self.slot_positions(cache, x.device), q_pos])  # (S + T,)
            if cache is None and not self.window:
                mask = 'causal'  # SDPA's is_causal: flash attention where the device has it
            else:
                delta = q_pos[:, None] - k_pos[None, :]  # (T, S + T): how far back each key is; unwritten slots < 0
                mask = (delta >= 0) & (k_pos[None, :] >= 0)
                if self.window:
                    mask &= delta < self.window
            y = self.attend(q, keys, values, mask, dropout)  # (B, nh, T, hs)
            if not use_cache:
                new_cache = None
            elif not self.window:  # keys, values: the cache and x's, joined above already
                new_cache = KVCache(keys, values, past + T)
            else:
                new_cache = self.update_cache(cache, k, v, past + T)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y)), new_cache

    def attend(self, q, keys, values, mask, dropout):
        """Softmax attention of q (B, nh, T, hs) over keys, values (B, n_kv, S, hs); mask: 'causal' (S = T), 'all'
        or a (T, S) boolean of what each query may see."""
        group = self.n_head // self.n_kv_head
        if group > 1:  # each K/V head serves `group` consecutive query heads
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if isinstance(mask, str):
            return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout, is_causal=mask == 'causal')
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout)

    def slot_positions(self, cache, device):
        """The absolute position held in each slot of the cache, -1 for a ring slot not written yet."""
        S = cache.k.size(2)
        if not self.window:
            return torch.arange(S, device=device)
        # ring slot j holds the latest position p < pos with p % window == j
        j = torch.arange(S, device=device)
        return cache.pos - 1 - torch.remainder(cache.pos - 1 - j, self.window)

    def update_cache(self, cache, k, v, pos):
        """The cache (None: empty) after appending k, v (B, n_kv, T, hs), whose last position is pos - 1. Out of place:
        an earlier state stays valid (generation can branch from it)."""
        if not self.window:
            return KVCache(torch.cat([cache.k, k.to(cache.k.dtype)], 2), torch.cat([cache.v, v.to(cache.v.dtype)], 2),
                           pos)
        B, n_kv, T, hs = k.shape
        if cache is None:
            ring_k = k.new_zeros(B, n_kv, self.window, hs)
            ring_v = v.new_zeros(B, n_kv, self.window, hs)
        else:
            ring_k, ring_v = cache.k, cache.v
        m = min(T, self.window)  # only the last `window` positions are ever needed again
        slots = torch.arange(pos - m, pos, device=k.device) % self.window
        return KVCache(ring_k.index_copy(2, slots, k[:, :, -m:].to(ring_k.dtype)),
                       ring_v.index_copy(2, slots, v[:, :, -m:].to(ring_v.dtype)), pos)

    def flops_per_token(self, T):
        """Training FLOPs per token of the scores and the weighted sum (PaLM appendix B: 6 per multiply-add forward
        and backward, 2 matmuls), over the keys a token sees on average in a sequence of T (a window caps them)."""
        seen = T if not self.window else min(T, self.window)
        return 12 * self.n_head * self.head_size * seen

