"""
Choosing tokens from logits, shared by both models' `generate`: greedy, temperature, top-k and nucleus (top-p)
sampling, and the loop that feeds each new token back and streams it out.
"""
import torch
from torch.nn import functional as F


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Pick the next token from logits (B, V): greedy when temperature == 0, else sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens and to the smallest set of tokens whose
    probability adds up to top_p (nucleus sampling, Holtzman et al. 2019). A temperature so small that the scaled
    logits overflow is greedy (its limit). Returns (B, 1). Non-finite logits (a model that overflowed) are an error:
    no token can be read from them."""
    scaled = logits if temperature == 0 else logits.float() / temperature
    if not torch.isfinite(scaled).all():  # one check (one host sync) per token
        if not torch.isfinite(logits).all():
            raise ValueError("the model's logits are not finite (NaN or inf): its weights or activations overflowed; "
                             "check the checkpoint (or run in float32 instead of float16)")
        return torch.argmax(logits, dim=-1, keepdim=True)  # overflowed by a tiny temperature: its limit, greedy
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = scaled
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('inf')
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the strictly more likely tokens
        sorted_probs[before >= top_p] = 0.0  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1)


def generate_tokens(advance, logits, idx, max_new_tokens, temperature, top_k, top_p, on_token, stop_token):
    """The sampling loop of both models' generate: logits (B, V) predict the token after idx (B, T);
    advance(idx) returns the logits that follow idx's newly appended last token."""
    stopped = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        idx_next = sample_logits(logits, temperature, top_k, top_p)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
        if on_token is not None:
            on_token(idx_next[0, 0].item())
        if stop_token is not None:
            stopped |= idx_next[:, 0] == stop_token
        if i == max_new_tokens - 1 or stopped.all():
            break
        logits = advance(idx)
    return idx
