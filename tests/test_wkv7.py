"""The RWKV-7 WKV operator (wkv_cuda/wkv7.py): the per-token loop against the definition written as matrices (the
transition products), the chunked form against the loop (outputs, final state, every gradient, the incoming state's
included), in float64 and float32, with RWKV-7's range of decays and in-context learning rates."""
import pytest
import torch

from helpers import check_chunked_equals_loop
from helpers import wkv7_inputs as inputs
from wkv_cuda.wkv7 import wkv7_chunked, wkv7_loop


def definition(r, logw, k, v, a, b, state):
    """S_t = S_{t-1} G_t + v_t k_t^T with G_t = diag(w_t) + a_t b_t^T, unrolled as S_t = S_0 G_1..G_t +
    sum_s v_s k_s^T G_{s+1}..G_t with explicit (N, N) transition matrices; y_t = S_t r_t."""
    B, T, H, N = r.shape
    G = torch.diag_embed(torch.exp(logw)) + a[..., :, None] * b[..., None, :]  # (B, T, H, N, N)
    y = torch.zeros(B, T, H, N, dtype=r.dtype)
    for t in range(T):
        P = torch.eye(N, dtype=r.dtype).expand(B, H, N, N)
        S = torch.zeros(B, H, N, N, dtype=r.dtype)
        for s in range(t, -1, -1):  # P = G_{s+1} ... G_t, built from the right
            S = S + (v[:, s, :, :, None] * k[:, s, :, None, :]) @ P
            P = G[:, s] @ P
        S = S + state @ P
        y[:, t] = (S @ r[:, t, :, :, None])[..., 0]
    return y


def test_loop_is_the_definition():
    x = inputs(T=9)
    y, _ = wkv7_loop(*x)
    assert (y - definition(*x)).abs().max() <= 1e-10


@pytest.mark.parametrize('T', [64, 37, 1])
@pytest.mark.parametrize('strong', [False, True])
def test_chunked_equals_loop_float64(T, strong):
    x = inputs(T=T, strong=strong)
    check_chunked_equals_loop(wkv7_loop, wkv7_chunked, x, ['r', 'logw', 'k', 'v', 'a', 'b', 'state'])


@pytest.mark.parametrize('chunk_len', [1, 2, 8, 32])
def test_chunk_lengths_and_pieces_carrying_the_state(chunk_len):
    x = inputs(T=45)
    whole, s_whole = wkv7_loop(*x)
    r, logw, k, v, a, b, state = x
    ys = []
    for lo, hi in [(0, 13), (13, 14), (14, 45)]:  # uneven pieces, one of a single token
        y, state = wkv7_chunked(*(t[:, lo:hi] for t in (r, logw, k, v, a, b)), state, chunk_len)
        ys.append(y)
    assert (torch.cat(ys, 1) - whole).abs().max() <= 1e-10 and (state - s_whole).abs().max() <= 1e-10


@pytest.mark.parametrize('strong', [False, True])
def test_float32_against_float64(strong):
    x = inputs(T=64, strong=strong)
    want, s_want = wkv7_loop(*x)
    y, s = wkv7_chunked(*(t.detach().float() for t in x))
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert ((y.double() - want).abs().max() / want.abs().max()).item() <= 1e-5
    assert ((s.double() - s_want).abs().max() / s_want.abs().max()).item() <= 1e-5


def test_bfloat16_inputs_keep_an_fp32_state():
    x = [t.detach() for t in inputs(T=20)]
    y, s = wkv7_chunked(*(t.bfloat16() for t in x[:-1]), x[-1].float())
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32


def test_gradcheck():
    x = inputs(B=1, T=5, H=2, N=3)
    assert torch.autograd.gradcheck(lambda *t: wkv7_chunked(*t, chunk_len=2), x)


def test_bad_chunk_len_is_one_line():
    with pytest.raises(ValueError, match='chunk_len=12 must be a power of two'):
        wkv7_chunked(*inputs(T=4), chunk_len=12)
