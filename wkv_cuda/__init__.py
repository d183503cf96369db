"""
The WKV operator of RWKV-4 behind one entry point, used by model_rwkv.py:

    y, new_state = wkv(time_decay, time_first, k, v, state=None, backend='auto')

Shapes: time_decay, time_first (C,); k, v (B, T, C); state = (aa, bb, pp), each (B, C). y is (B, T, C) in k's dtype;
the state is kept in fp32 (fp64 when the inputs are fp64) whatever the input dtype.

Math (RWKV-LM RWKV-v4neo/cuda/wkv_cuda.cu, paper eq. 14), per channel, with w = -exp(time_decay) < 0, u = time_first:

    y_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u + k_t})

computed as an RNN over (aa, bb, pp): aa and bb are the numerator and denominator sums scaled by e^{-pp}, and pp is
the largest exponent seen so far. Every exp() then has an argument <= 0, so keys in the hundreds cannot overflow.
The initial state is aa = bb = 0, pp = -1e38 (RWKV-LM's "minus infinity" that stays finite under + w).

Backends: 'torch' is the pure-PyTorch reference below (a Python loop over T, vectorised over B x C, with a
hand-written backward); tests/test_wkv.py checks it against the O(T^2) softmax form and autograd.
"""
import torch

BACKENDS = ('auto', 'cuda', 'cpu', 'torch')
_announced = False


def initial_state(B, C, device=None, dtype=torch.float32):
    """(aa, bb, pp) for an empty history."""
    aa = torch.zeros(B, C, device=device, dtype=dtype)
    bb = torch.zeros(B, C, device=device, dtype=dtype)
    pp = torch.full((B, C), -1e38, device=device, dtype=dtype)
    return aa, bb, pp


def wkv_step(w, u, k, v, aa, bb, pp):
    """One token of the recurrence. w = -exp(time_decay); all tensors broadcast to (B, C). Returns y, aa, bb, pp."""
    # output: the running sums plus the current token with its "first" bonus u
    ww = u + k
    p = torch.maximum(pp, ww)
    e1 = torch.exp(pp - p)
    e2 = torch.exp(ww - p)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    # state: decay the sums by e^w, then add the current token without the bonus
    ww = w + pp
    p = torch.maximum(ww, k)
    e1 = torch.exp(ww - p)
    e2 = torch.exp(k - p)
    return y, e1 * aa + e2 * v, e1 * bb + e2, p


class WKVTorch(torch.autograd.Function):
    """Pure-PyTorch reference: a Python loop over T, vectorised over B x C, with a hand-written backward (about 4x
    faster than autograd through the loop). The backward keeps every quantity max-shifted like the forward.

    Gradients, with D_t = e1 * bb_t + e2 the shifted denominator of y_t and (f1, f2) the factors of the state update
    aa_{t+1} = f1 * aa_t + f2 * v_t (see wkv_step), and gaa_t = dL/daa_t at fixed pp_t, gbb_t likewise:
        gk_t = gy_t * e2 * (v_t - y_t) / D_t + f2 * (gaa_{t+1} * v_t + gbb_{t+1})
        gv_t = gy_t * e2 / D_t + f2 * gaa_{t+1}
        gu   = sum_t gy_t * e2 * (v_t - y_t) / D_t
        gw   = sum_t f1 * (aa_t * gaa_{t+1} + bb_t * gbb_{t+1})          (then g_time_decay = gw * w)
        gaa_t = gy_t * e1 / D_t + f1 * gaa_{t+1},   gbb_t = -gy_t * y_t * e1 / D_t + f1 * gbb_{t+1}
    The factors e1, e2, f1, f2 are all <= 1 and bb_t >= 1 after the first token, so nothing here can overflow.
    pp is only a shift (the state means aa * e^pp, bb * e^pp), so the gradient that flows into the incoming pp is
    gaa_0 * aa_0 + gbb_0 * bb_0, and a gradient arriving on the outgoing pp is implied by those on aa and bb."""

    @staticmethod
    def forward(ctx, time_decay, time_first, k, v, aa, bb, pp):
        B, T, C = k.shape
        acc = aa.dtype
        w = -torch.exp(time_decay.to(acc))  # (C,)
        u = time_first.to(acc)  # (C,)
        kf, vf = k.to(acc), v.to(acc)  # (B, T, C)
        ys, states = [], []
        for t in range(T):
            states.append((aa, bb, pp))
            y, aa, bb, pp = wkv_step(w, u, kf[:, t], vf[:, t], aa, bb, pp)
            ys.append(y)
        y = torch.stack(ys, dim=1)  # (B, T, C)
        saa, sbb, spp = (torch.stack(s, dim=1) for s in zip(*states))  # each (B, T, C): the state before token t
        ctx.save_for_backward(w, u, kf, vf, y, saa, sbb, spp)
        ctx.in_dtypes = (time_decay.dtype, time_first.dtype, k.dtype, v.dtype)
        return y.to(k.dtype), aa, bb, pp

    @staticmethod
    def backward(ctx, gy, gaa, gbb, gpp):
        w, u, k, v, y, saa, sbb, spp = ctx.saved_tensors
        B, T, C = k.shape
        acc = w.dtype
        gy = gy.to(acc)
        gaa = torch.zeros(B, C, dtype=acc, device=k.device) if gaa is None else gaa.to(acc)
        gbb = torch.zeros(B, C, dtype=acc, device=k.device) if gbb is None else gbb.to(acc)
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        gw = torch.zeros(B, C, dtype=acc, device=k.device)
        gu = torch.zeros(B, C, dtype=acc, device=k.device)
        for t in reversed(range(T)):
            kt, vt, yt, gyt = k[:, t], v[:, t], y[:, t], gy[:, t]
            aa, bb, pp = saa[:, t], sbb[:, t], spp[:, t]
            ww = u + kt  # output at t, as in wkv_step
            p = torch.maximum(pp, ww)
            e1 = torch.exp(pp - p)
            e2 = torch.exp(ww - p)
            gd = gyt / (e1 * bb + e2)
            ww = w + pp  # state update t -> t+1
            p = torch.maximum(ww, kt)
            f1 = torch.exp(ww - p)
            f2 = torch.exp(kt - p)
            gyu = gd * e2 * (vt - yt)
            gk[:, t] = gyu + f2 * (gaa * vt + gbb)
            gv[:, t] = gd * e2 + f2 * gaa
            gu += gyu
            gw += f1 * (aa * gaa + bb * gbb)
            gaa, gbb = gd * e1 + f1 * gaa, -gd * yt * e1 + f1 * gbb
        g_decay = (gw.sum(0) * w)  # dw/dtime_decay = -exp(time_decay) = w; per-batch sums reduced here
        aa0, bb0 = saa[:, 0], sbb[:, 0]
        gpp0 = gaa * aa0 + gbb * bb0
        td, tf, kd, vd = ctx.in_dtypes
        return g_decay.to(td), gu.sum(0).to(tf), gk.to(kd), gv.to(vd), gaa, gbb, gpp0


def wkv_torch(time_decay, time_first, k, v, state=None):
    B, T, C = k.shape
    acc = torch.promote_types(k.dtype, torch.float32)  # accumulate in fp32 (fp64 stays fp64)
    aa, bb, pp = initial_state(B, C, k.device, acc) if state is None else (s.to(acc) for s in state)
    y, aa, bb, pp = WKVTorch.apply(time_decay, time_first, k, v, aa, bb, pp)
    return y, (aa, bb, pp)


def resolve_backend(backend, device):
    """The backend that will run for tensors on `device`; an unknown or unavailable explicit choice is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv_backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ('cuda', 'cpu'):
        raise RuntimeError(f"wkv_backend={backend!r}: the compiled WKV kernels are not part of this version; "
                           f"use wkv_backend='torch' (or 'auto')")
    return 'torch'


def wkv(time_decay, time_first, k, v, state=None, backend='auto'):
    global _announced
    chosen = resolve_backend(backend, k.device)
    if backend == 'auto' and not _announced:
        print(f"wkv: backend 'auto' runs '{chosen}' on {k.device.type} (the pure-PyTorch reference)")
        _announced = True
    return wkv_torch(time_decay, time_first, k, v, state)
