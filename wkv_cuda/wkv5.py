"""
The WKV operator of RWKV-5 and RWKV-6 (matrix-valued state per head), in pure PyTorch: a per-token reference loop
and an exact chunked form for training and prefill (model_rwkv.py's versions 5, 5.1 and 6).

Per head, with head size N, key/receptance/decay channels i and value channels j (RWKV-LM RWKV-v5/src/model.py
RWKV_Tmix_x052 / x060 and their CUDA kernels; the rwkv pip package's state layout (H, K, V)):

    y_t[j] = sum_i r_t[i] * (u[i] * k_t[i] * v_t[j] + S_{t-1}[i, j])
    S_t[i, j] = w_t[i] * S_{t-1}[i, j] + k_t[i] * v_t[j]

w_t = exp(logw_t) is the decay, one per key channel and, in RWKV-6, per token (RWKV-5: the same at every token);
u is the "bonus" (time_faaaa) of the current token. Inputs r, k, v, logw are (B, T, H, N), u (H, N); the state is
(B, H, N, N) [key, value], fp32 (fp64 for fp64 inputs) whatever the input dtype.

The chunked form (chunk length L, a power of two) splits T into chunks. Inside a chunk, with c_t the inclusive and
e_t the exclusive cumulative log-decay (e built by shifting c, never as c - logw, which loses accuracy when decays are
strong), token t sees token s < t through sum_i r_t[i] k_s[i] exp(e_t[i] - c_s[i]), every exponent a sum of
log-decays, <= 0, so decays of e^-20 per token cannot overflow: pairwise inside sub-blocks of 4 tokens, and across
them split at the end of s's sub-block into two such exponents, whose factors multiply in a matmul. The state enters
as (r_t * exp(e_t)) S and leaves as exp(c_L) S + sum_s (k_s * exp(c_L - c_s)) v_s^T: one hand-off per chunk, no loop
over tokens.
Gradients (also of the incoming state) come from autograd through either form.
"""
import functools

import torch


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def without_autocast(op):
    """Run op with autocast off: under bf16 autocast its matmuls would otherwise round the fp32 state and decays."""
    @functools.wraps(op)
    def wrapped(r, *args, **kwargs):
        with torch.autocast(r.device.type, enabled=False):
            return op(r, *args, **kwargs)
    return wrapped


@without_autocast
def wkv5_loop(r, k, v, logw, u, state=None):
    """The recurrence one token at a time (the test oracle). Returns y (B, T, H, N) in r's dtype and the state."""
    B, T, H, N = r.shape
    acc = _acc(r)
    r, k, v, logw, u = (x.to(acc) for x in (r, k, v, logw, u))
    S = torch.zeros(B, H, N, N, dtype=acc, device=r.device) if state is None else state.to(acc)
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, K, V)
        ys.append(((S + u[None, :, :, None] * kv) * r[:, t, :, :, None]).sum(-2))  # (B, H, V)
        S = torch.exp(logw[:, t])[..., None] * S + kv
    return torch.stack(ys, dim=1).to(r.dtype), S


@without_autocast
def wkv5_chunked(r, k, v, logw, u, state=None, chunk_len=16):
    """The same function, chunk by chunk (see the module docstring). Any T: the last chunk is padded with tokens that
    neither decay nor write (logw = 0, k = 0)."""
    if chunk_len < 1 or chunk_len & (chunk_len - 1):
        raise ValueError(f"chunk_len={chunk_len} must be a power of two (16 is the default)")
    B, T, H, N = r.shape
    acc, L = _acc(r), chunk_len
    dtype = r.dtype
    r, k, v, logw, u = (x.to(acc) for x in (r, k, v, logw, u))
    S = torch.zeros(B, H, N, N, dtype=acc, device=r.device) if state is None else state.to(acc)
    pad = (-T) % L
    if pad:
        r, k, v, logw = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, k, v, logw))
    n = (T + pad) // L
    # (B, T, H, N) -> (B, H, n, L, N): chunks of L tokens
    r, k, v, logw = (x.view(B, n, L, H, N).permute(0, 3, 1, 2, 4) for x in (r, k, v, logw))
    c = logw.cumsum(dim=3)  # inclusive cumulative log-decay, (B, H, n, L, N)
    e = torch.cat([torch.zeros_like(c[:, :, :, :1]), c[:, :, :, :-1]], dim=3)  # exclusive, by shifting
    # intra-chunk: A[t, s] = sum_i r_t[i] k_s[i] exp(e_t[i] - c_s[i]) for s < t, every exponent <= 0. The chunk is
    # cut into sub-blocks of Q tokens. For s in an earlier sub-block than t, the exponent splits at the last token m
    # of s's sub-block into (e_t - c_m) + (c_m - c_s), both <= 0: a product of two factors in [0, 1], so a matmul.
    # Inside a sub-block the Q(Q-1)/2 pairs are formed one by one.
    Q = min(4, L)
    nb = L // Q
    c_end = c[:, :, :, Q - 1::Q]  # (B, H, n, nb, N): c at each sub-block's last token
    k_end = k * torch.exp(c_end.repeat_interleave(Q, dim=3) - c)  # (B, H, n, L, K): k_s decayed to its block's end
    # r_t seen from the end of every sub-block J; the exponent is > 0 only where t is not after J: clamped, masked
    r_from = r[:, :, :, None] * torch.exp((e[:, :, :, None] - c_end[..., None, :]).clamp(max=0))  # (B,H,n,nb,L,K)
    A = r_from @ k_end.view(B, H, n, nb, Q, N).transpose(-1, -2)  # (B, H, n, nb, L, Q): column s = J * Q + j
    A = A.permute(0, 1, 2, 4, 3, 5).reshape(B, H, n, L, L)
    block = torch.arange(L, device=r.device) // Q
    A = A.masked_fill(block[:, None] <= block[None, :], 0)  # only pairs whose sub-blocks differ, s before t
    rq, kq, eq, cq = (x.view(B, H, n, nb, Q, N) for x in (r, k, e, c))
    below = torch.ones(Q, Q, dtype=torch.bool, device=r.device).tril(-1)  # (Q, Q): s < t
    gap = (eq[..., :, None, :] - cq[..., None, :, :]).masked_fill(~below[..., None], float('-inf'))  # (..,Q,Q,N)
    A_in = torch.einsum('bhnjti,bhnjsi,bhnjtsi->bhnjts', rq, kq, torch.exp(gap))  # (B, H, n, nb, Q, Q)
    y_in = (A_in @ v.view(B, H, n, nb, Q, N)).view(B, H, n, L, N)
    y = A @ v + y_in + (r * u[None, :, None, None, :] * k).sum(-1, keepdim=True) * v  # (B, H, n, L, V)
    # inter-chunk: the state seen by each token, and the state after each chunk
    r_in = r * torch.exp(e)  # (B, H, n, L, K): the incoming state decayed to token t
    k_out = k * torch.exp(c[:, :, :, -1:] - c)  # (B, H, n, L, K): token s decayed to the chunk's end
    decay = torch.exp(c[:, :, :, -1])  # (B, H, n, K): the whole chunk's decay
    ys = []  # unbind, not [:, :, j]: backward stacks the chunks' gradients once instead of filling n full tensors
    for r_j, k_j, v_j, d_j in zip(r_in.unbind(2), k_out.unbind(2), v.unbind(2), decay.unbind(2)):
        ys.append(r_j @ S)  # (B, H, L, V)
        S = d_j[..., None] * S + k_j.transpose(-1, -2) @ v_j
    y = y + torch.stack(ys, dim=2)  # (B, H, n, L, V)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]  # (B, T, H, N)
    return y.to(dtype), S


# ---------------------------------------------------------------------------------------------------------------------
# the compiled kernels (wkv5_cpu.cpp, wkv5_cuda.cu)

def wkv5(r, k, v, logw, u, state=None, backend='auto'):
    """The RWKV-5/6 WKV op on the backend of `wkv_backend` (wkv_cuda.resolve_backend): the compiled kernel of the
    tensors' device, or 'torch', the chunked form (the per-token loop for T = 1). Same arguments and results as
    wkv5_loop; gradients flow to every input and the incoming state."""
    from wkv_cuda import run_matrix_op
    return run_matrix_op('wkv5', dict(r=r, k=k, v=v, logw=logw, u=u), state, backend,
                         wkv5_loop if r.shape[1] == 1 else wkv5_chunked)
