"""The WKV op against an independent oracle: the O(T^2) causal softmax-weighted average (RWKV paper eq. 14),
evaluated directly in float64 with autograd for the gradients."""
import pytest
import torch

from wkv_cuda import wkv


def oracle(time_decay, time_first, k, v, state=None):
    """y_t = sum_j s_tj * v_j / sum_j s_tj over the history j <= t (plus the incoming state as one extra 'token'),
    with log-weights (t-1-j) * w + k_j for j < t and u + k_t for j = t, w = -exp(time_decay). Also returns the
    outgoing state as true sums (a, b) = (aa * e^pp, bb * e^pp). float64; moderate |k| only (no shifting)."""
    B, T, C = k.shape
    w, u = -torch.exp(time_decay), time_first
    t = torch.arange(T, dtype=k.dtype).view(T, 1, 1)  # (T, 1, 1) query time
    j = torch.arange(T, dtype=k.dtype).view(1, T, 1)  # (1, T, 1) key time
    logw = (t - 1 - j) * w + k.unsqueeze(1)  # (B, T, T, C): weight of token j seen from t
    logw = torch.where(t == j, u + k.unsqueeze(1), logw)
    logw = torch.where(j > t, torch.full_like(logw, -float('inf')), logw)
    s = torch.exp(logw)  # (B, T, T, C)
    num = (s * v.unsqueeze(1)).sum(2)  # (B, T, C)
    den = s.sum(2)
    if state is not None:
        aa, bb, pp = state
        decay = torch.exp(pp.unsqueeze(1) + t.view(1, T, 1) * w)  # (B, T, C): the history, t steps later
        num = num + aa.unsqueeze(1) * decay
        den = den + bb.unsqueeze(1) * decay
    y = num / den
    # outgoing state: every token decayed to time T (with its last step not yet applied: (T-1-j) * w)
    s_end = torch.exp((T - 1 - j.view(1, T, 1)) * w + k)  # (B, T, C)
    a, b = (s_end * v).sum(1), s_end.sum(1)
    if state is not None:
        a = a + aa * torch.exp(pp + T * w)
        b = b + bb * torch.exp(pp + T * w)
    return y, a, b


def make_inputs(B, T, C, dtype=torch.float64, kscale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.randn(C, generator=g, dtype=dtype) - 1  # decays exp(-exp(.)) spread over (0, 1)
    time_first = torch.randn(C, generator=g, dtype=dtype)
    k = kscale * torch.randn(B, T, C, generator=g, dtype=dtype)
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (time_decay, time_first, k, v)]


def random_state(B, C, dtype=torch.float64, seed=1):
    """A plausible state: positive bb (>= 1 as after real tokens), any aa, moderate pp."""
    g = torch.Generator().manual_seed(seed)
    aa = torch.randn(B, C, generator=g, dtype=dtype)
    bb = 1 + torch.rand(B, C, generator=g, dtype=dtype)
    pp = 3 * torch.randn(B, C, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (aa, bb, pp)]


def nonlinear_loss(y, a, b, seed=2):
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    return (torch.sin(y) * wy).sum() + (y ** 2).sum() + torch.tanh(a).sum() + torch.log(b).sum()


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=False)


@pytest.mark.parametrize("B,T,C", [(3, 11, 5), (1, 1, 4), (2, 64, 16)])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_backend_matches_oracle_float64(B, T, C, with_state):
    inputs = make_inputs(B, T, C)
    state = random_state(B, C) if with_state else None
    leaves = inputs + (state or [])

    y, (aa, bb, pp) = wkv(*inputs, state=state, backend='torch')
    a, b = aa * torch.exp(pp), bb * torch.exp(pp)  # true sums, comparable whatever the shift
    got = grads(nonlinear_loss(y, a, b), leaves)

    y_ref, a_ref, b_ref = oracle(*inputs, state=state)
    want = grads(nonlinear_loss(y_ref, a_ref, b_ref), leaves)

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b, b_ref, rtol=1e-10, atol=1e-10)
    for name, g_got, g_want in zip(['time_decay', 'time_first', 'k', 'v', 'aa', 'bb', 'pp'], got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


def test_large_keys_stay_finite_and_match_oracle():
    # |k| up to 60: e^60 ~ 1e26 is fine for the float64 oracle but overflows a naive float32 evaluation
    inputs = make_inputs(2, 24, 8, kscale=20.0)
    with torch.no_grad():
        inputs[2].clamp_(-60, 60)
        inputs[2][0, 0, :] = 60.0
        inputs[2][1, 5, :] = -60.0
    y_ref, _, _ = oracle(*inputs)
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        x = [t.detach().to(dtype).requires_grad_() for t in inputs]
        y, (aa, bb, pp) = wkv(*x, backend='torch')
        assert torch.isfinite(y).all() and torch.isfinite(aa).all() and torch.isfinite(bb).all()
        torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
        gs = grads((torch.sin(y) + y ** 2).sum(), x)
        assert all(torch.isfinite(g).all() for g in gs)
    # keys far beyond anything exp() could take directly still give finite outputs and gradients
    x = make_inputs(2, 16, 8, dtype=torch.float32, kscale=300.0)
    y, _ = wkv(*x, backend='torch')
    gs = grads((y ** 2).sum(), x)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in gs)


def check_chunked_equals_whole(backend, device='cpu', T=20, cuts=((0, 7), (7, 8), (8, 20))):
    """Forward and backward over uneven chunks carrying the state (one chunk of length 1) equal one whole pass."""
    inputs = [x.detach().to(device).requires_grad_() for x in make_inputs(3, T, 6)]
    y_whole, s_whole = wkv(*inputs, backend=backend)
    g_whole = grads(nonlinear_loss(y_whole, *s_whole[:2]), inputs)
    state, ys = None, []
    for lo, hi in cuts:
        y, state = wkv(inputs[0], inputs[1], inputs[2][:, lo:hi], inputs[3][:, lo:hi], state=state, backend=backend)
        ys.append(y)
    y_chunks = torch.cat(ys, dim=1)
    # the chunked state has the same shift pp as the whole run, so aa and bb compare directly
    g_chunks = grads(nonlinear_loss(y_chunks, *state[:2]), inputs)
    torch.testing.assert_close(y_chunks, y_whole, rtol=1e-12, atol=1e-12)
    for s_c, s_w in zip(state, s_whole):
        torch.testing.assert_close(s_c, s_w, rtol=1e-12, atol=1e-12)
    for g_c, g_w in zip(g_chunks, g_whole):
        torch.testing.assert_close(g_c, g_w, rtol=1e-10, atol=1e-10)


def check_gradcheck(backend):
    """torch.autograd.gradcheck through the op with an incoming state, on the true sums of the outgoing state."""
    def f(td, tf, k, v, aa, bb, pp):
        y, (aa2, bb2, pp2) = wkv(td, tf, k, v, state=(aa, bb, pp), backend=backend)
        return y, aa2 * torch.exp(pp2), bb2 * torch.exp(pp2)

    assert torch.autograd.gradcheck(f, make_inputs(2, 5, 3) + random_state(2, 3))


def test_chunked_equals_whole_forward_and_backward():
    check_chunked_equals_whole('torch')


def test_gradcheck_reference():
    check_gradcheck('torch')


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = make_inputs(2, 32, 8)
    y_ref, _, _ = oracle(*inputs)
    x = [t.detach().to(torch.bfloat16).requires_grad_() for t in inputs]
    y, (aa, bb, pp) = wkv(*x, backend='torch')
    assert y.dtype == torch.bfloat16 and aa.dtype == torch.float32
    # inputs rounded to bf16 (8 bits of mantissa) move y by a few 1e-2 at most
    torch.testing.assert_close(y.double(), y_ref, rtol=0.05, atol=0.05)
    gs = grads((y.float() ** 2).sum(), x)
    assert [g.dtype for g in gs] == [torch.bfloat16] * 4


def test_unknown_backend_is_an_error():
    inputs = make_inputs(1, 2, 2)
    with pytest.raises(ValueError, match="wkv_backend must be one of"):
        wkv(*inputs, backend='triton')
