"""
The WKV operator of RWKV-7 ("Goose", the generalized delta rule), in pure PyTorch: a per-token reference loop and an
exact chunked form for training and prefill.

Per head, with head size N (RWKV-LM RWKV-v7/train_temp/src/model.py RWKV_Tmix_x070 and the rwkv pip package's
RWKV_x070_TMix_one, whose state layout (H, V, K) we keep):

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T        S is (V, K): value rows, key columns
    y_t = S_t r_t

w_t = exp(logw_t) is the per-token decay; in RWKV-7 a_t = -kk_t and b_t = kk_t * iclr_t (kk the L2-normalised key,
iclr the "in-context learning rate"), so S_{t-1} a_t b_t^T removes part of what the state held along kk_t before
v_t k_t^T writes. Inputs r, logw, k, v, a, b are (B, T, H, N); the state is (B, H, N, N) [value, key], fp32 (fp64
for fp64 inputs) whatever the input dtype.

The chunked form (chunk length L, a power of two). Inside a chunk, with c_t the inclusive and e_t the exclusive
cumulative log-decay (e by shifting c), and q_t = S_{t-1} a_t the (unknown) value the state returns along a_t:

    S_t = S_0 diag(e^{c_t}) + sum_{s<=t} (q_s b_s^T + v_s k_s^T) diag(e^{c_t - c_s})
    q_t = S_0 (a_t e^{e_t}) + sum_{s<t} q_s [(a_t e^{e_t}) . (b_s e^{-c_s})] + v_s [(a_t e^{e_t}) . (k_s e^{-c_s})]

so the rows q_t of Q solve (I - A) Q = (a e^e) S_0^T + A_k V with A, A_k strictly lower triangular (L, L). A is
nilpotent (A^L = 0), hence (I - A)^{-1} = (I + A)(I + A^2)(I + A^4)...(I + A^{L/2}): log2(L) batched matmuls for all
chunks at once instead of a triangular solve per chunk. Given Q, the outputs and the state after the chunk are
matmuls, and the state hands over once per chunk: S_L = S_0 M + N with M (K, K) and N (V, K) known before the loop.
RWKV-7's decay is bounded (log w > -e^{-0.5} per token), so e^{-c_s} <= e^{0.61 L} and the intra-chunk exponentials
factor into two (L, N) matrices without overflow (L = 16: at most e^{9.7}); RWKV-6's unbounded decays need the
pairwise form of wkv5.py instead. Gradients (also of the incoming state) come from autograd through either form.
"""
import torch

from wkv_cuda.wkv5 import _acc, without_autocast


@without_autocast
def wkv7_loop(r, logw, k, v, a, b, state=None):
    """The recurrence one token at a time (the test oracle). Returns y (B, T, H, N) in r's dtype and the state."""
    B, T, H, N = r.shape
    acc = _acc(r)
    r, logw, k, v, a, b = (x.to(acc) for x in (r, logw, k, v, a, b))
    S = torch.zeros(B, H, N, N, dtype=acc, device=r.device) if state is None else state.to(acc)
    ys = []
    for t in range(T):
        Sa = (S @ a[:, t, :, :, None])  # (B, H, V, 1): what the state returns along a_t
        S = S * torch.exp(logw[:, t, :, None, :]) + Sa * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None])[..., 0])  # (B, H, V)
    return torch.stack(ys, dim=1).to(r.dtype), S


@without_autocast
def wkv7_chunked(r, logw, k, v, a, b, state=None, chunk_len=16):
    """The same function, chunk by chunk (see the module docstring). Any T: the last chunk is padded with tokens
    that neither decay nor read nor write (logw = 0, k = v = a = b = 0)."""
    if chunk_len < 1 or chunk_len & (chunk_len - 1):
        raise ValueError(f"chunk_len={chunk_len} must be a power of two (16 is the default)")
    B, T, H, N = r.shape
    acc, L, dtype = _acc(r), chunk_len, r.dtype
    r, logw, k, v, a, b = (x.to(acc) for x in (r, logw, k, v, a, b))
    S = torch.zeros(B, H, N, N, dtype=acc, device=r.device) if state is None else state.to(acc)
    pad = (-T) % L
    if pad:
        r, logw, k, v, a, b = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (r, logw, k, v, a, b))
    n = (T + pad) // L
    # (B, T, H, N) -> (B, H, n, L, N): chunks of L tokens
    r, logw, k, v, a, b = (x.view(B, n, L, H, N).permute(0, 3, 1, 2, 4) for x in (r, logw, k, v, a, b))
    c = logw.cumsum(dim=3)  # inclusive cumulative log-decay, (B, H, n, L, N)
    e = torch.cat([torch.zeros_like(c[:, :, :, :1]), c[:, :, :, :-1]], dim=3)  # exclusive, by shifting
    ae, rc = a * torch.exp(e), r * torch.exp(c)  # (B, H, n, L, K)
    inv_c = torch.exp(-c)
    bc, kc = b * inv_c, k * inv_c
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)  # s < t
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0)  # s <= t
    A = (ae @ bc.transpose(-1, -2)).masked_fill(~strict, 0)  # (B, H, n, L, L)
    A_k = (ae @ kc.transpose(-1, -2)).masked_fill(~strict, 0)
    B_b = (rc @ bc.transpose(-1, -2)).masked_fill(~incl, 0)
    B_k = (rc @ kc.transpose(-1, -2)).masked_fill(~incl, 0)
    inv = torch.eye(L, dtype=acc, device=r.device) + A  # (I - A)^{-1} = prod_j (I + A^(2^j))
    power = A
    for _ in range(L.bit_length() - 2):
        power = power @ power
        inv = inv + inv @ power  # inv @ (I + power)
    W = inv @ ae  # (B, H, n, L, K): Q = W S_0^T + U
    U = inv @ (A_k @ v)  # (B, H, n, L, V)
    Y_in = rc + B_b @ W  # (B, H, n, L, K): y = Y_in S_0^T + Y_const
    Y_const = B_b @ U + B_k @ v  # (B, H, n, L, V)
    to_end = torch.exp(c[:, :, :, -1:] - c)  # (B, H, n, L, K): token s decayed to the chunk's end
    bd, kd = b * to_end, k * to_end
    # S_L = S_0 M + N:  M = diag(e^{c_L}) + W^T bd  (K, K),  N = U^T bd + V^T kd  (V, K)
    M = torch.diag_embed(torch.exp(c[:, :, :, -1])) + W.transpose(-1, -2) @ bd  # (B, H, n, K, K)
    N_ = U.transpose(-1, -2) @ bd + v.transpose(-1, -2) @ kd  # (B, H, n, V, K)
    ys = []  # unbind, not [:, :, j]: backward stacks the chunks' gradients once instead of filling n full tensors
    for Y_j, M_j, N_j in zip(Y_in.unbind(2), M.unbind(2), N_.unbind(2)):
        ys.append(Y_j @ S.transpose(-1, -2))  # (B, H, L, V)
        S = S @ M_j + N_j
    y = Y_const + torch.stack(ys, dim=2)  # (B, H, n, L, V)
    y = y.permute(0, 2, 3, 1, 4).reshape(B, n * L, H, N)[:, :T]  # (B, T, H, N)
    return y.to(dtype), S


# ---------------------------------------------------------------------------------------------------------------------
# the compiled kernels (wkv7_cpu.cpp, wkv7_cuda.cu)

def wkv7(r, logw, k, v, a, b, state=None, backend='auto'):
    """The RWKV-7 WKV op on the backend of `wkv_backend` (wkv_cuda.resolve_backend): the compiled kernel of the
    tensors' device, or 'torch', the chunked form (the per-token loop for T = 1). Same arguments and results as
    wkv7_loop; gradients flow to every input and the incoming state."""
    from wkv_cuda import run_matrix_op
    return run_matrix_op('wkv7', dict(r=r, logw=logw, k=k, v=v, a=a, b=b), state, backend,
                         wkv7_loop if r.shape[1] == 1 else wkv7_chunked)
