"""The matrix-state WKV operators in pure PyTorch, RWKV-5/6 (wkv_cuda/wkv5.py) and RWKV-7 (wkv_cuda/wkv7.py): each
per-token loop against its definition written another way (RWKV-5/6: a sum over the history; RWKV-7: products of
transition matrices), the chunked form against the loop (outputs, final state, every gradient, the incoming state's
included) in float64 and float32, over each version's range of decays (constant, per token, strong)."""
import pytest
import torch

from helpers import check_chunked_equals_loop, wkv5_inputs, wkv7_inputs
from wkv_cuda.wkv5 import wkv5_chunked, wkv5_loop
from wkv_cuda.wkv7 import wkv7_chunked, wkv7_loop


def wkv5_definition(r, k, v, logw, u, state):
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


def wkv7_definition(r, logw, k, v, a, b, state):
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


# op: (loop, chunked, inputs, definition, the inputs' names)
OPS = {'wkv5': (wkv5_loop, wkv5_chunked, wkv5_inputs, wkv5_definition, ['r', 'k', 'v', 'logw', 'u', 'state']),
       'wkv7': (wkv7_loop, wkv7_chunked, wkv7_inputs, wkv7_definition, ['r', 'logw', 'k', 'v', 'a', 'b', 'state'])}
# each op over its range of decays: RWKV-5's constant one, RWKV-6's per token, strong ones (RWKV-6 reaches e^-20 per
# token; RWKV-7's are near its bound e^-0.607); the float32 tolerance of each
CASES = [('wkv5', dict(per_token=False), 1e-5), ('wkv5', {}, 1e-5), ('wkv5', dict(strong=True), 1e-4),
         ('wkv7', {}, 1e-5), ('wkv7', dict(strong=True), 1e-5)]
CASE_IDS = ['v5', 'v6', 'v6-strong', 'v7', 'v7-strong']


def pieces(x, lo, hi):
    """The inputs (state aside) of tokens lo..hi-1: every (B, T, H, N) tensor sliced in time, the rest as they are."""
    T = x[0].shape[1]
    return [t[:, lo:hi] if t.dim() == 4 and t.shape[1] == T else t for t in x[:-1]]


@pytest.mark.parametrize('op', OPS)
def test_loop_is_the_definition(op):
    loop, _, inputs, definition, _ = OPS[op]
    x = inputs(T=9)
    y, _ = loop(*x)
    assert (y - definition(*x)).abs().max() <= 1e-10


@pytest.mark.parametrize('T', [64, 37, 1])
@pytest.mark.parametrize('op,kw,tol', CASES, ids=CASE_IDS)
def test_chunked_equals_loop_float64(T, op, kw, tol):
    loop, chunked, inputs, _, names = OPS[op]
    check_chunked_equals_loop(loop, chunked, inputs(T=T, **kw), names)


@pytest.mark.parametrize('chunk_len', [1, 2, 8, 32])
@pytest.mark.parametrize('op', OPS)
def test_chunk_lengths_and_pieces_carrying_the_state(op, chunk_len):
    loop, chunked, inputs, _, _ = OPS[op]
    x = inputs(T=45)
    whole, s_whole = loop(*x)
    state, ys = x[-1], []
    for lo, hi in [(0, 13), (13, 14), (14, 45)]:  # uneven pieces, one of a single token
        y, state = chunked(*pieces(x, lo, hi), state, chunk_len)
        ys.append(y)
    assert (torch.cat(ys, 1) - whole).abs().max() <= 1e-10 and (state - s_whole).abs().max() <= 1e-10


@pytest.mark.parametrize('op,kw,tol', CASES, ids=CASE_IDS)
def test_float32_against_float64(op, kw, tol):
    loop, chunked, inputs, _, _ = OPS[op]
    x = inputs(T=64, **kw)
    want, s_want = loop(*x)
    y, s = chunked(*(t.detach().float() for t in x))
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert ((y.double() - want).abs().max() / want.abs().max()).item() <= tol
    assert ((s.double() - s_want).abs().max() / s_want.abs().max()).item() <= tol


@pytest.mark.parametrize('op', OPS)
def test_bfloat16_inputs_keep_an_fp32_state(op):
    _, chunked, inputs, _, _ = OPS[op]
    x = [t.detach() for t in inputs(T=20)]
    y, s = chunked(*(t.bfloat16() for t in x[:-1]), x[-1].float())
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32


@pytest.mark.parametrize('op', OPS)
def test_gradcheck(op):
    _, chunked, inputs, _, _ = OPS[op]
    assert torch.autograd.gradcheck(lambda *t: chunked(*t, chunk_len=2), inputs(B=1, T=5, H=2, N=3))


@pytest.mark.parametrize('op', OPS)
def test_bad_chunk_len_is_one_line(op):
    _, chunked, inputs, _, _ = OPS[op]
    with pytest.raises(ValueError, match='chunk_len=12 must be a power of two'):
        chunked(*inputs(T=4), chunk_len=12)
