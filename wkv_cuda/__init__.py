"""
The WKV operator of RWKV-4 behind one entry point, used by model_rwkv.py:

    y, new_state = wkv(time_decay, time_first, k, v, state=None, backend='auto')

Shapes: time_decay, time_first (C,); k, v (B, T, C); state = (aa, bb, pp), each (B, C). y is (B, T, C) in k's dtype;
the state is fp32 (fp64 for fp64 inputs) whatever the input dtype. Gradients flow to all inputs, the incoming state
included, so training can carry the state across chunks with full backprop.

Math (RWKV-LM RWKV-v4neo/cuda/wkv_cuda.cu, paper eq. 14), per channel, with w = -exp(time_decay) < 0, u = time_first:

    y_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u + k_t})

computed as an RNN over (aa, bb, pp): aa and bb are the numerator and denominator sums scaled by e^{-pp}, and pp is
the largest exponent seen so far. Every exp() then has an argument <= 0, so keys in the hundreds cannot overflow.
The initial state is aa = bb = 0, pp = -1e38 (RWKV-LM's "minus infinity" that stays finite under + w).

Backends (config `wkv_backend`):
- 'torch': the pure-PyTorch reference below (Python loop over T, vectorised over B x C, hand-written backward);
- 'cpu':   wkv_cpu.cpp, compiled on first use (at::parallel_for over B x C, SIMD over channels);
- 'cuda':  wkv_cuda.cu, compiled on first use (one thread per channel; fp32/fp64/bf16 inputs, fp32 state);
- 'auto':  the compiled kernel for the tensors' device; if it cannot be built, says why once and uses 'torch'.
An explicitly requested compiled backend that cannot be built is an error. The compiled kernels are registered as
the custom ops torch.ops.nanorwkv.wkv_forward / wkv_backward, so torch.compile keeps them in its graph.

This module also builds every op's extension (build_extension: 'cpu', 'cuda', or 'shim', the .cu run on CPU threads
through cuda_shim/) and runs the matrix-state ops of RWKV-5/6 (wkv5.py) and RWKV-7 (wkv7.py) on their kernels
(run_matrix_op), with the same backend rules.
"""
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BACKENDS = ('auto', 'cuda', 'cpu', 'torch')
_extensions = {}  # 'cpu' / 'cuda' -> the loaded module, or the exception its build raised
_announced = set()


def initial_state(B, C, device=None, dtype=torch.float32):
    """(aa, bb, pp) for an empty history."""
    aa = torch.zeros(B, C, device=device, dtype=dtype)
    bb = torch.zeros(B, C, device=device, dtype=dtype)
    pp = torch.full((B, C), -1e38, device=device, dtype=dtype)
    return aa, bb, pp


# ---------------------------------------------------------------------------------------------------------------------
# the pure-PyTorch reference

def wkv_step(w, u, k, v, aa, bb, pp):
    """One token of the recurrence (the same as wkv_math.h). w = -exp(time_decay); tensors broadcast to (B, C).
    Returns y, aa, bb, pp."""
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
    """The reference: a Python loop over T with a hand-written backward (3-4x faster than autograd through the loop),
    every quantity max-shifted like the forward. Inputs w = -exp(time_decay) and u in the accumulator dtype.

    Gradients, with D_t = e1 * bb_t + e2 the shifted denominator of y_t and (f1, f2) the factors of the state update
    aa_{t+1} = f1 * aa_t + f2 * v_t (see wkv_step), and gaa_t = dL/daa_t at fixed pp_t, gbb_t likewise:
        gk_t = gy_t * e2 * (v_t - y_t) / D_t + f2 * (gaa_{t+1} * v_t + gbb_{t+1})
        gv_t = gy_t * e2 / D_t + f2 * gaa_{t+1}
        gu   = sum_t gy_t * e2 * (v_t - y_t) / D_t
        gw   = sum_t f1 * (aa_t * gaa_{t+1} + bb_t * gbb_{t+1})
        gaa_t = gy_t * e1 / D_t + f1 * gaa_{t+1},   gbb_t = -gy_t * y_t * e1 / D_t + f1 * gbb_{t+1}
    The factors e1, e2, f1, f2 are all <= 1 and bb_t >= 1 after the first token, so nothing here can overflow.
    pp is only a shift (the state means aa * e^pp, bb * e^pp), so the gradient that flows into the incoming pp is
    gaa_0 * aa_0 + gbb_0 * bb_0, and a gradient arriving on the outgoing pp is implied by those on aa and bb: the
    consumer of a state must depend on it only through aa * e^pp and bb * e^pp, as the next chunk's WKV does."""

    @staticmethod
    def forward(ctx, w, u, k, v, aa, bb, pp):
        B, T, C = k.shape
        kf, vf = k.to(w.dtype), v.to(w.dtype)  # (B, T, C)
        ys, states = [], []
        for t in range(T):
            states.append((aa, bb, pp))
            y, aa, bb, pp = wkv_step(w, u, kf[:, t], vf[:, t], aa, bb, pp)
            ys.append(y)
        y = torch.stack(ys, dim=1)  # (B, T, C)
        saa, sbb, spp = (torch.stack(s, dim=1) for s in zip(*states))  # each (B, T, C): the state before token t
        ctx.save_for_backward(w, u, kf, vf, y, saa, sbb, spp)
        ctx.in_dtype = k.dtype
        return y.to(k.dtype), aa, bb, pp

    @staticmethod
    def backward(ctx, gy, gaa, gbb, gpp):
        w, u, k, v, y, saa, sbb, spp = ctx.saved_tensors
        B, T, C = k.shape
        gy = gy.to(w.dtype)
        gaa = torch.zeros_like(saa[:, 0]) if gaa is None else gaa
        gbb = torch.zeros_like(saa[:, 0]) if gbb is None else gbb
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        gw, gu = torch.zeros_like(gaa), torch.zeros_like(gaa)  # per batch row, (B, C)
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
        gpp = gaa * saa[:, 0] + gbb * sbb[:, 0]
        return gw.sum(0), gu.sum(0), gk.to(ctx.in_dtype), gv.to(ctx.in_dtype), gaa, gbb, gpp


# ---------------------------------------------------------------------------------------------------------------------
# the compiled kernels

# the sources of each op's extension; the CUDA build adds the .cu. RWKV-4's also holds the quantized products.
SOURCES = {'wkv4': ('wkv_op.cpp', 'wkv_cpu.cpp', 'qlinear_cpu.cpp'), 'wkv5': ('wkv5_op.cpp', 'wkv5_cpu.cpp'),
           'wkv7': ('wkv7_op.cpp', 'wkv7_cpu.cpp')}
CUDA_SOURCES = {'wkv4': 'wkv_cuda.cu', 'wkv5': 'wkv5_cuda.cu', 'wkv7': 'wkv7_cuda.cu'}
EXTENSION_NAMES = {'wkv4': 'nanorwkv_wkv', 'wkv5': 'nanorwkv_wkv5', 'wkv7': 'nanorwkv_wkv7'}


def build_extension(kind, build_directory=None, verbose=False, simd=True, op='wkv4', extra_cflags=()):
    """Compile (or load from torch's extension cache) an op's 'cpu', 'cuda' or 'shim' kernels: wkv4 (RWKV-4, with
    the quantized products), wkv5 (RWKV-5/6) or wkv7. Sources are found next to this file, so any working directory
    works. The CUDA build also contains the CPU kernel. 'shim' compiles the .cu with the host compiler against
    cuda_shim/ and runs its kernels on CPU threads (the tests check the CUDA source that way). simd=False leaves AVX2
    out (the portable paths, which the tests build to check them on an AVX2 machine)."""
    load = _cpp_extension(quiet=kind != 'cuda').load
    sources = [HERE / f for f in SOURCES[op]]
    # -ffast-math lets gcc vectorise exp() through glibc's libmvec; the recurrences never produce inf or NaN
    cflags = ['-O3', '-fopenmp', '-ffast-math', *extra_cflags]
    name = extension_name(kind, op, simd)
    if name.endswith('_avx2'):  # 8-wide SIMD where this CPU has it
        cflags += ['-mavx2', '-mfma']
    kwargs = {}
    if kind == 'cuda':
        sources.append(HERE / CUDA_SOURCES[op])
        cflags.append('-DWKV_WITH_CUDA')
        kwargs['extra_cuda_cflags'] = ['-O3', '-res-usage', '-Xptxas=-O3']
    elif kind == 'shim':
        # the .cu as C++: a one-line file that includes it, built with the shim's cuda_runtime.h / cuda_bf16.h
        wrapper = Path(build_directory or _default_build_dir(name)) / f'{op}_cuda_as_cpp.cpp'
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        text = f'#include "{HERE / CUDA_SOURCES[op]}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            tmp = wrapper.with_name(wrapper.name + '.tmp')  # written whole, then renamed: a build never sees half
            tmp.write_text(text)
            tmp.replace(wrapper)
        sources.append(wrapper)
        cflags += ['-DWKV_WITH_CUDA', '-DCUDA_SHIM', f'-I{HERE / "cuda_shim"}', f'-I{HERE}']
    return load(name=name, sources=[str(s) for s in sources], extra_cflags=cflags,
                extra_ldflags=['-fopenmp'], build_directory=build_directory, verbose=verbose, **kwargs)


def extension_name(kind, op='wkv4', simd=True):
    """The name torch caches a build under; it keeps builds for different CPUs apart."""
    name = f'{EXTENSION_NAMES[op]}_{kind}'
    if not simd:
        return name + '_scalar'
    return name + '_avx2' if torch.backends.cpu.get_cpu_capability() in ('AVX2', 'AVX512') else name


def _cpp_extension(quiet=True):
    """torch.utils.cpp_extension; quiet: without its import-time "No CUDA runtime is found, using CUDA_HOME=...",
    which concerns CUDA builds only."""
    import logging
    log = logging.getLogger('torch.utils.cpp_extension')
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _default_build_dir(name):
    return _cpp_extension()._get_build_directory(name, verbose=False)


def get_extension(kind, op='wkv4'):
    """The op's compiled extension for 'cpu' or 'cuda', built once per machine (torch caches it) and loaded once per
    process; an Exception if it cannot build. A build says so before and after (it takes about a minute); a cached
    load is silent."""
    key = kind if op == 'wkv4' else (op, kind)
    if key not in _extensions:
        what = f"the '{kind}' {op} kernel" + (' and the quantized matrix products' if op == 'wkv4' else '')
        name = extension_name(kind, op)
        cached = (Path(_default_build_dir(name)) / f'{name}.so').is_file()
        if not cached:
            print(f"wkv: building {what} (about a minute, once: torch caches it)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            _extensions[key] = build_extension(kind, op=op)
        except Exception as e:  # compilers fail in many ways (missing ninja, nvcc, headers): keep the reason
            _extensions[key] = e
            return e
        dt = time.perf_counter() - t0
        if not cached or dt > 10:  # a cached build whose sources changed is rebuilt
            print(f"wkv: built {what} in {dt:.0f} s" + (' (its sources changed)' if cached else ''), file=sys.stderr)
    return _extensions[key]


def build_hint(kind, error):
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    hint = "pip install ninja and make sure a C++ compiler (g++) is on PATH"
    if kind == 'cuda':
        hint += ", nvcc is installed and CUDA_HOME points at it (e.g. export CUDA_HOME=/usr/local/cuda)"
    return f"{first} (hint: {hint})"


Tensor = torch.Tensor


def _kernel_forward_impl(w: Tensor, u: Tensor, k: Tensor, v: Tensor, aa: Tensor, bb: Tensor,
                         pp: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ext = get_extension('cuda' if k.is_cuda else 'cpu')
    return tuple(ext.forward(w, u, k, v, aa, bb, pp))


def _kernel_backward_impl(w: Tensor, u: Tensor, k: Tensor, v: Tensor, aa: Tensor, bb: Tensor, pp: Tensor,
                          gy: Tensor, gaa: Tensor, gbb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                          Tensor, Tensor]:
    ext = get_extension('cuda' if k.is_cuda else 'cpu')
    return tuple(ext.backward(w, u, k, v, aa, bb, pp, gy, gaa, gbb))


wkv_forward = torch.library.custom_op('nanorwkv::wkv_forward', mutates_args=())(_kernel_forward_impl)
wkv_backward = torch.library.custom_op('nanorwkv::wkv_backward', mutates_args=())(_kernel_backward_impl)


@wkv_forward.register_fake
def _(w, u, k, v, aa, bb, pp):
    return torch.empty_like(k), torch.empty_like(aa), torch.empty_like(bb), torch.empty_like(pp)


@wkv_backward.register_fake
def _(w, u, k, v, aa, bb, pp, gy, gaa, gbb):
    return (torch.empty_like(w), torch.empty_like(u), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(aa), torch.empty_like(bb), torch.empty_like(pp))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, gy, gaa, gbb, gpp):
    w, u, k, v, aa, bb, pp = ctx.saved_tensors
    gaa = torch.zeros_like(aa) if gaa is None else gaa.contiguous()
    gbb = torch.zeros_like(bb) if gbb is None else gbb.contiguous()
    return wkv_backward(w, u, k, v, aa, bb, pp, gy.contiguous(), gaa, gbb)


wkv_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# the entry point

def resolve_backend(backend, device, op='wkv4'):
    """The backend that runs op for tensors on `device`. An explicit compiled backend that cannot build is an error;
    'auto' announces its choice once per op and device type, with the build error if it fell back."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == 'torch':
        return 'torch'
    kind = 'cuda' if device.type == 'cuda' else 'cpu'
    if backend != 'auto' and backend != kind:
        raise RuntimeError(f"wkv_backend={backend!r} but the tensors are on {device.type}; use wkv_backend='auto' "
                           f"or move the model to {backend}")
    ext = get_extension(kind, op)
    name = '' if op == 'wkv4' else f' {op}'
    if isinstance(ext, Exception):
        if backend != 'auto':
            raise RuntimeError(f"wkv_backend={backend!r}: the{name} kernel failed to build: {build_hint(kind, ext)}")
        chosen = 'torch'
        note = f"the '{kind}'{name} kernel failed to build: {build_hint(kind, ext)}; using the pure-PyTorch reference"
    else:
        chosen = kind
        note = f"using the compiled '{kind}'{name} kernel"
    key = kind if op == 'wkv4' else (op, kind)
    if backend == 'auto' and key not in _announced:
        print(f"wkv: backend 'auto' on {device.type}: {note}", file=sys.stderr)
        _announced.add(key)
    return chosen


def wkv(time_decay, time_first, k, v, state=None, backend='auto'):
    B, T, C = k.shape
    chosen = resolve_backend(backend, k.device)
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32  # accumulator: fp32 unless fp64 inputs
    w = -torch.exp(time_decay.to(acc))  # (C,) per-step log-decay
    u = time_first.to(acc)  # (C,)
    aa, bb, pp = initial_state(B, C, k.device, acc) if state is None else (s.to(acc) for s in state)
    if T == 1 and not (torch.is_grad_enabled() and any(t.requires_grad for t in (time_decay, time_first, k, v))):
        # one token, no gradient (RNN decoding): the recurrence itself, a few elementwise ops on (B, C)
        y, aa, bb, pp = wkv_step(w, u, k[:, 0].to(acc), v[:, 0].to(acc), aa, bb, pp)
        return y[:, None].to(k.dtype), (aa, bb, pp)
    if chosen == 'torch':
        y, aa, bb, pp = WKVTorch.apply(w, u, k, v, aa, bb, pp)
    else:
        kk, vv = k, v
        if kk.dtype not in (torch.float32, torch.float64) and not (chosen == 'cuda' and kk.dtype == torch.bfloat16):
            kk, vv = kk.float(), vv.float()  # fp16 anywhere, bf16 on the CPU: the kernel reads fp32
        y, aa, bb, pp = wkv_forward(w, u, kk.contiguous(), vv.contiguous(), aa.contiguous(), bb.contiguous(),
                                    pp.contiguous())
    return y.to(k.dtype), (aa, bb, pp)


# ---------------------------------------------------------------------------------------------------------------------
# the matrix-state ops of RWKV-5/6 (wkv5.py) and RWKV-7 (wkv7.py) on their compiled kernels

# each op's inputs in the kernels' order, and those that stay in the accumulator dtype (the rest may be bf16 on CUDA)
MATRIX_INPUTS = {'wkv5': ('r', 'k', 'v', 'logw', 'u'), 'wkv7': ('r', 'logw', 'k', 'v', 'a', 'b')}
ACC_INPUTS = ('logw', 'u')
CUDA_HEAD_SIZES = (8, 16, 32, 64)  # the sizes wkv5_cuda.cu and wkv7_cuda.cu are compiled for
SEG = 16  # WKV5_SEG / WKV7_SEG: the forward keeps the state at the start of every SEG tokens for the backward
_matrix_ops = {}


def _matrix_op(op):
    """The custom ops nanorwkv::{op}_forward / _backward (torch.compile keeps them in its graph), with autograd.
    forward(*inputs, s0, keep) -> (y, state, checkpoints); backward(*inputs, checkpoints, gy, gstate) -> the
    gradients of the inputs and of s0."""
    if op in _matrix_ops:
        return _matrix_ops[op]
    names = MATRIX_INPUTS[op]
    args = ', '.join(f'Tensor {n}' for n in names)
    ext = lambda r: get_extension('cuda' if r.is_cuda else 'cpu', op)  # noqa: E731
    fwd = torch.library.custom_op(f'nanorwkv::{op}_forward', lambda *a: tuple(ext(a[0]).forward(*a)),
                                  mutates_args=(), schema=f'({args}, Tensor s0, bool keep) -> (Tensor, Tensor, Tensor)')
    bwd = torch.library.custom_op(f'nanorwkv::{op}_backward', lambda *a: tuple(ext(a[0]).backward(*a)),
                                  mutates_args=(), schema=f"({args}, Tensor ckpt, Tensor gy, Tensor gs) -> "
                                                          f"({', '.join(['Tensor'] * (len(names) + 1))})")

    @fwd.register_fake
    def _(*a):
        r, s0, keep = a[0], a[-2], a[-1]
        B, T, H, N = r.shape
        return torch.empty_like(r), torch.empty_like(s0), s0.new_empty(B if keep else 0, H, (T + SEG - 1) // SEG, N, N)

    @bwd.register_fake
    def _(*a):
        return tuple(torch.empty_like(x) for x in a[:len(names)] + (a[-1],))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:len(names)], output[2])

    def backward(ctx, gy, gs, _):
        *inputs, ckpt = ctx.saved_tensors
        if ckpt.shape[0] == 0:
            raise RuntimeError(f"{op}: backward through a forward run with keep=False; run_matrix_op sets keep when a "
                               "gradient is needed")
        gs = ckpt.new_zeros(ckpt[:, :, 0].shape) if gs is None else gs.contiguous()
        gy = torch.zeros_like(inputs[0]) if gy is None else gy.contiguous()
        return *bwd(*inputs, ckpt, gy, gs), None

    fwd.register_autograd(backward, setup_context=setup_context)
    _matrix_ops[op] = fwd
    return fwd


def run_matrix_op(op, inputs, state, backend, reference):
    """y, state of the 'wkv5' or 'wkv7' op for inputs (a dict in MATRIX_INPUTS order) on the backend chosen by
    resolve_backend; reference(*inputs, state) is the pure-PyTorch form run for 'torch' (and for a head size the
    CUDA kernel is not compiled for, under 'auto'). y comes back in r's dtype, the state in fp32 (fp64)."""
    r = inputs['r']
    B, T, H, N = r.shape
    chosen = resolve_backend(backend, r.device, op)
    if chosen == 'cuda' and N not in CUDA_HEAD_SIZES:
        if backend == 'cuda':
            raise ValueError(f"wkv_backend='cuda': the {op} kernel is compiled for head sizes {CUDA_HEAD_SIZES}, not "
                             f"{N}; use wkv_backend='torch' or one of those head sizes")
        chosen = 'torch'
    if chosen == 'torch':
        return reference(*inputs.values(), state)
    acc, dtype = (torch.float64 if r.dtype == torch.float64 else torch.float32), r.dtype
    # the CPU kernel reads the accumulator dtype; the CUDA one also bf16 (fp16 goes through fp32)
    inp = dtype if chosen == 'cuda' and dtype in (torch.bfloat16, acc) else acc
    with torch.autocast(r.device.type, enabled=False):
        xs = [x.to(acc if name in ACC_INPUTS else inp).contiguous() for name, x in inputs.items()]
        s0 = torch.zeros(B, H, N, N, dtype=acc, device=r.device) if state is None else state.to(acc).contiguous()
        keep = torch.is_grad_enabled() and any(x.requires_grad for x in xs + [s0])
        if keep or torch.compiler.is_compiling():
            y, S, _ = _matrix_op(op)(*xs, s0, keep)
        else:  # inference: the extension itself, without the custom op's dispatch (~0.1 ms a call: RNN mode's T = 1)
            y, S, _ = get_extension(chosen, op).forward(*xs, s0, False)
    return y.to(dtype), S
