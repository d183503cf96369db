"""The WKV op against an independent oracle: the O(T^2) causal softmax-weighted average (RWKV paper eq. 14),
evaluated directly in float64 with autograd for the gradients."""
import pytest
import torch

from helpers import (check_chunked_equals_whole, check_gradcheck, grads, make_inputs, nonlinear_loss, oracle,
                     random_state)
from wkv_cuda import wkv


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
