// The WKV recurrence of RWKV-4 for one channel and one time step, shared by the CPU kernel (wkv_cpu.cpp) and the
// CUDA kernels (wkv_cuda.cu), so the code CI tests on the CPU is the code the GPU runs.
//
// State (aa, bb, pp): the numerator and denominator sums of the WKV average, both scaled by e^-pp, where pp is the
// largest exponent seen so far (RWKV-LM RWKV-v4neo/cuda/wkv_cuda.cu). Every exp() below takes an argument <= 0,
// so no input can overflow it; bb >= 1 after the first token, so no denominator can vanish.
// w = -exp(time_decay) is the per-step log-decay, u = time_first the bonus of the current token.
//
// Backward (derivation in wkv_cuda/__init__.py, WKV): gaa, gbb are dL/daa, dL/dbb of the state after step t at
// fixed pp; the step turns them into those of the state before it and emits gk, gv and the gw, gu contributions.
#pragma once
#include <math.h>

#ifdef __CUDACC__
#define WKV_HD __host__ __device__ __forceinline__
#else
#define WKV_HD inline
#endif

WKV_HD float wkv_exp(float x) { return expf(x); }
WKV_HD double wkv_exp(double x) { return exp(x); }
WKV_HD float wkv_max(float a, float b) { return fmaxf(a, b); }
WKV_HD double wkv_max(double a, double b) { return fmax(a, b); }
WKV_HD float wkv_abs(float x) { return fabsf(x); }
WKV_HD double wkv_abs(double x) { return fabs(x); }

// ea = e^(a - max(a, b)), eb = e^(b - max(a, b)): one of them is exactly 1, so one exp() gives both (the same
// values as two exp() calls, bit for bit, at half the cost)
template <typename F>
WKV_HD void wkv_exp_pair(F a, F b, F &ea, F &eb) {
    const F e = wkv_exp(-wkv_abs(a - b));
    ea = a >= b ? F(1) : e;
    eb = a >= b ? e : F(1);
}

// the state after absorbing token (k, v): decay the sums by e^w, add e^k * (v, 1)
template <typename F>
WKV_HD void wkv_state_step(F w, F k, F v, F &aa, F &bb, F &pp) {
    const F ww = w + pp;
    F e1, e2;
    wkv_exp_pair(ww, k, e1, e2);
    aa = e1 * aa + e2 * v;
    bb = e1 * bb + e2;
    pp = wkv_max(ww, k);
}

// y_t from the state before token t and the token itself with its bonus u; then the state update
template <typename F>
WKV_HD F wkv_forward_step(F w, F u, F k, F v, F &aa, F &bb, F &pp) {
    F e1, e2;
    wkv_exp_pair(pp, u + k, e1, e2);
    const F y = (e1 * aa + e2 * v) / (e1 * bb + e2);
    wkv_state_step(w, k, v, aa, bb, pp);
    return y;
}

// one step of the reverse pass; (aa, bb, pp) is the state before token t (recomputed by the forward)
template <typename F>
WKV_HD void wkv_backward_step(F w, F u, F k, F v, F aa, F bb, F pp, F gy, F &gaa, F &gbb, F &gw, F &gu,
                              F &gk, F &gv) {
    F e1, e2, f1, f2;
    wkv_exp_pair(pp, u + k, e1, e2);  // the output's weights, as in wkv_forward_step
    wkv_exp_pair(w + pp, k, f1, f2);  // the state update's, as in wkv_state_step
    const F den = e1 * bb + e2;
    const F y = (e1 * aa + e2 * v) / den;
    const F gd = gy / den;
    const F gyu = gd * e2 * (v - y);
    gk = gyu + f2 * (gaa * v + gbb);
    gv = gd * e2 + f2 * gaa;
    gu += gyu;
    gw += f1 * (aa * gaa + bb * gbb);
    const F gaa_prev = gd * e1 + f1 * gaa;
    gbb = -gd * y * e1 + f1 * gbb;
    gaa = gaa_prev;
}
