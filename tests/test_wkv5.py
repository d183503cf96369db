"""The RWKV-5/6 WKV operator (wkv_cuda/wkv5.py): the per-token loop against the definition written as a sum over the
history, the chunked form against the loop (outputs, final state, every gradient, the incoming state's included),
in float64 and float32, with constant (RWKV-5) and per-token (RWKV-6) decays, strong ones included."""
import pytest
import torch

from helpers import check_chunked_equals_loop
from helpers import wkv5_inputs as inputs
from wkv_cuda.wkv5 import wkv5_chunked, wkv5_loop


def definition(r, k, v, logw, u, state):
    """y_t = sum_{s<t} (r_t . k_s . prod_{s<q<t} w_q) v_s + (r_t . u . k_t) v_t + (r_t . prod_{q<t} w_q) S_0, summed
    over key channels, straight from the recurrence unrolled (O(T^2), float64)."""
    B, T, H, N = r.shape
    c = torch.cat([torch.zeros_like(logw[:, :1]), logw.cumsum(1)], dim=1)  # c[t] = sum_{q<t} log w_q, (B, T+1, H, N)
    y = torch.zeros(B, T, H, N, dtype=r.dtype)
    for t in range(T):
        for s in range(t):
            weight = (r[:, t] * k[:, s] * torch.exp(c[:, t] - c[:, s + 1])).sum(-1, keepdim=True)  # (B, H, 1)
            y[:, t] += weight * v[:, s]
        y[:, t] += (r[:, t] * u * k[:, t]).sum(-1, keepdim=True) * v[:, t]
        y[:, t] += ((r[:, t] * torch.exp(c[:, t]))[..., None] * state).sum(-2)
    return y


def test_loop_is_the_definition():
    x = inputs(T=11)
    y, _ = wkv5_loop(*x)
    assert (y - definition(*x)).abs().max() <= 1e-10


@pytest.mark.parametrize('T', [64, 37, 1])
@pytest.mark.parametrize('kind', ['v5', 'v6', 'v6 strong'])
def test_chunked_equals_loop_float64(T, kind):
    x = inputs(T=T, per_token=kind != 'v5', strong='strong' in kind)
    check_chunked_equals_loop(wkv5_loop, wkv5_chunked, x, ['r', 'k', 'v', 'logw', 'u', 'state'])


@pytest.mark.parametrize('chunk_len', [1, 2, 8, 32])
def test_chunk_lengths_and_pieces_carrying_the_state(chunk_len):
    x = inputs(T=45)
    whole, s_whole = wkv5_loop(*x)
    r, k, v, logw, u, state = x
    ys = []
    for lo, hi in [(0, 13), (13, 14), (14, 45)]:  # uneven pieces, one of a single token
        y, state = wkv5_chunked(r[:, lo:hi], k[:, lo:hi], v[:, lo:hi], logw[:, lo:hi], u, state, chunk_len)
        ys.append(y)
    assert (torch.cat(ys, 1) - whole).abs().max() <= 1e-10 and (state - s_whole).abs().max() <= 1e-10


@pytest.mark.parametrize('kind,tol', [('v5', 1e-5), ('v6', 1e-5), ('v6 strong', 1e-4)])
def test_float32_against_float64(kind, tol):
    x = inputs(T=64, per_token=kind != 'v5', strong='strong' in kind)
    want, s_want = wkv5_loop(*x)
    y, s = wkv5_chunked(*(t.detach().float() for t in x))
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert ((y.double() - want).abs().max() / want.abs().max()).item() <= tol
    assert ((s.double() - s_want).abs().max() / s_want.abs().max()).item() <= tol


def test_gradcheck():
    x = inputs(B=1, T=5, H=2, N=3)
    assert torch.autograd.gradcheck(lambda *a: wkv5_chunked(*a, chunk_len=2), x)


def test_bad_chunk_len_is_one_line():
    with pytest.raises(ValueError, match='chunk_len=12 must be a power of two'):
        wkv5_chunked(*inputs(T=4), chunk_len=12)
