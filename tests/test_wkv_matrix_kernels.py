"""The compiled WKV kernels of RWKV-5/6 and RWKV-7 (wkv_cuda/wkv5_*, wkv7_*), and the CUDA source of every op in the
repo run on CPU threads through wkv_cuda/cuda_shim, against the per-token float64 loops (which
test_wkv_matrix_ops.py checks against the definitions): output, outgoing state and every gradient, the incoming state's
included, in float64 (<= 1e-10), float32 (<= 1e-5 of the float64 result) and, for the CUDA source, bfloat16 inputs
(within bfloat16 rounding of its float32 result). Then: torch.compile, the binding's errors, which kernel a model
builds, ThreadSanitizer on the shim (and that it catches a missing __syncthreads), and ptxas for sm_80 / sm_90."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wkv_cuda
from helpers import REPO, wkv5_inputs, wkv7_inputs
from wkv_cuda.wkv5 import wkv5, wkv5_loop
from wkv_cuda.wkv7 import wkv7, wkv7_loop

# name -> (entry point, oracle, inputs(**kw), extension, input names)
OPS = {
    'rwkv5': (wkv5, wkv5_loop, lambda **kw: wkv5_inputs(per_token=False, **kw), 'wkv5', 'r k v logw u state'),
    'rwkv6': (wkv5, wkv5_loop, lambda **kw: wkv5_inputs(strong=True, **kw), 'wkv5', 'r k v logw u state'),
    'rwkv7': (wkv7, wkv7_loop, wkv7_inputs, 'wkv7', 'r logw k v a b state'),
}
IMPLS = ['cpu', 'cuda-shim'] + (['cuda'] if torch.cuda.is_available() else [])  # 'cuda': the .cu on a GPU
_shims = {}


def shim(op):
    """The op's CUDA source compiled by the host compiler against cuda_shim (cached by torch like any extension)."""
    if op not in _shims:
        _shims[op] = wkv_cuda.build_extension('shim', op=op)
    return _shims[op]


@pytest.fixture
def use(monkeypatch):
    """use(impl, op): make wkv_backend='cpu' run impl's kernel for the extension op ('cuda-shim': the .cu file)."""
    def f(impl, op):
        if impl == 'cuda-shim':
            monkeypatch.setitem(wkv_cuda._extensions, op if op == 'wkv4' else (op, 'cpu'), shim(op))
    return f


def loss_of(y, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    wy, ws = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(s.shape, generator=g, dtype=s.dtype)
    return (torch.sin(y) * wy).sum() + (s * ws).sum() + (y ** 2).sum()


def compare(name, impl, use, shape, dtype, tol):
    """The kernel on `dtype` inputs against the float64 loop: values and gradients within tol of their scale."""
    fn, loop, make, op, names = OPS[name]
    use(impl, op)
    device = 'cuda' if impl == 'cuda' else 'cpu'
    B, T, H, N = shape
    x64 = make(B=B, T=T, H=H, N=N)
    y_ref, s_ref = loop(*x64)
    want = torch.autograd.grad(loss_of(y_ref, s_ref), x64)
    x = [t.detach().to(device, dtype).requires_grad_() for t in x64]
    y, s = fn(*x, backend=device)
    assert y.dtype == dtype and s.dtype == dtype
    got = [g.cpu() for g in torch.autograd.grad(loss_of(y.double().cpu(), s.double().cpu()), x)]
    y, s = y.cpu(), s.cpu()
    for what, a, b in [('y', y, y_ref), ('state', s, s_ref)] + list(zip(names.split(), got, want)):
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
        assert err <= tol, f"{name} {impl} {shape}: {what} off by {err:.2e} (relative to its largest entry)"


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('name', OPS)
@pytest.mark.parametrize('shape', [(3, 37, 2, 8), (1, 1, 1, 8), (2, 33, 1, 16), (1, 20, 1, 64)])
def test_kernel_matches_loop_float64(impl, name, shape, use):
    compare(name, impl, use, shape, torch.float64, 1e-10)


@pytest.mark.parametrize('name', OPS)
def test_cpu_kernel_any_head_size(name, use):
    compare(name, 'cpu', use, (2, 9, 3, 5), torch.float64, 1e-10)  # N = 5: no SIMD-width or 4-row multiple


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('name', OPS)
def test_kernel_float32(impl, name, use):
    compare(name, impl, use, (2, 48, 2, 32) if impl == 'cuda-shim' else (2, 256, 2, 64), torch.float32, 1e-5)


@pytest.mark.parametrize('impl', [i for i in IMPLS if i != 'cpu'])
@pytest.mark.parametrize('name', OPS)
def test_cuda_source_bfloat16(name, impl):
    """bf16 r, k, v (and a, b) into the .cu: within bf16 rounding of its float32 result on the same rounded inputs;
    the state and logw stay float32, gradients come back in the inputs' dtypes."""
    _, _, make, op, names = OPS[name]
    ext = shim(op) if impl == 'cuda-shim' else wkv_cuda.get_extension('cuda', op)
    device = 'cuda' if impl == 'cuda' else 'cpu'
    x = [t.detach().float().to(device) for t in make(B=2, T=40, H=2, N=16)]
    acc = {'logw', 'u', 'state'}
    x_bf = [t if n in acc else t.bfloat16() for n, t in zip(names.split(), x)]
    x_32 = [t.float() for t in x_bf]  # the same values, in float32
    *inputs_bf, s_bf = x_bf
    *inputs_32, s_32 = x_32
    y_bf, S_bf, ck_bf = ext.forward(*inputs_bf, s_bf, True)
    y_32, S_32, ck_32 = ext.forward(*inputs_32, s_32, True)
    assert y_bf.dtype == torch.bfloat16 and S_bf.dtype == torch.float32
    scale = y_32.abs().max()
    assert (y_bf.float() - y_32).abs().max() <= 1e-2 * scale  # bf16 keeps 8 bits: 2^-8 = 3.9e-3 per rounding
    assert (S_bf - S_32).abs().max() <= 1e-5 * S_32.abs().max()  # the state never passes through bf16
    g = torch.Generator().manual_seed(3)
    gy, gs = (torch.randn(t.shape, generator=g).to(device) for t in (y_32, S_32))
    grads_bf = ext.backward(*inputs_bf, ck_bf, gy.bfloat16(), gs)
    grads_32 = ext.backward(*inputs_32, ck_32, gy, gs)
    for n, a, b, inp in zip(names.split(), grads_bf, grads_32, x_bf):
        assert a.dtype == (inp.dtype if n != 'u' else torch.float32), n
        assert (a.float() - b).abs().max() <= 2e-2 * b.abs().max(), n


@pytest.mark.parametrize('name', ['rwkv6', 'rwkv7'])
def test_gradcheck_cpu_kernel(name):
    fn, _, make, _, _ = OPS[name]
    x = make(B=2, T=6, H=1, N=3)
    assert torch.autograd.gradcheck(lambda *t: fn(*t, backend='cpu'), x)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['rwkv6', 'rwkv7'])
def test_kernel_under_torch_compile_has_no_graph_break(name):
    fn, _, make, _, _ = OPS[name]
    x = [t.detach().float().requires_grad_() for t in make(B=2, T=21, H=2, N=8)]
    eager_y, eager_s = fn(*x, backend='cpu')
    compiled = torch.compile(lambda *t: fn(*t, backend='cpu'), fullgraph=True, backend='aot_eager')
    y, s = compiled(*x)
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(s, eager_s)
    g = torch.autograd.grad((y ** 2).sum() + s.sum(), x)
    g_eager = torch.autograd.grad((eager_y ** 2).sum() + eager_s.sum(), x)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b)


def test_no_gradient_needed_keeps_no_checkpoints():
    ext = wkv_cuda.get_extension('cpu', 'wkv7')
    *x, s = [t.detach() for t in wkv7_inputs(B=1, T=40, H=1, N=8)]
    assert ext.forward(*x, s, False)[2].numel() == 0
    assert ext.forward(*x, s, True)[2].shape == (1, 1, 3, 8, 8)  # the state before tokens 0, 16, 32


def test_binding_checks_inputs():
    ext7, ext5 = wkv_cuda.get_extension('cpu', 'wkv7'), wkv_cuda.get_extension('cpu', 'wkv5')
    r, logw, k, v, a, b, s = [t.detach().float() for t in wkv7_inputs(B=2, T=3, H=1, N=4)]
    with pytest.raises(RuntimeError, match=r"wkv7: k has shape \[2, 3, 1, 5\], expected \[2, 3, 1, 4\]"):
        ext7.forward(r, logw, torch.zeros(2, 3, 1, 5), v, a, b, s, False)
    with pytest.raises(RuntimeError, match=r"wkv7: v must be contiguous; call .contiguous\(\) on it"):
        ext7.forward(r, logw, k, v.transpose(0, 1).contiguous().transpose(0, 1), a, b, s, False)
    with pytest.raises(RuntimeError, match=r"wkv7: logw has dtype Double, expected Float"):
        ext7.forward(r, logw.double(), k, v, a, b, s, False)
    with pytest.raises(RuntimeError, match=r"wkv7: r has dtype Half; the kernels take float32, float64, or bfloat16 "
                                           r"on CUDA"):
        ext7.forward(*(t.half() for t in (r, logw, k, v, a, b, s)), False)
    with pytest.raises(RuntimeError, match=r"wkv7: state has shape \[2, 1, 4\], expected \[2, 1, 4, 4\]"):
        ext7.forward(r, logw, k, v, a, b, s[..., 0], False)
    with pytest.raises(RuntimeError, match=r"wkv7: the checkpoints must come from forward\(\.\.\., keep=True\)"):
        ext7.backward(r, logw, k, v, a, b, torch.empty(0, 1, 1, 4, 4), r, s)
    r, k, v, logw, u, s = [t.detach().float() for t in wkv5_inputs(B=2, T=3, H=1, N=4)]
    with pytest.raises(RuntimeError, match=r"wkv5: u has shape \[4\], expected \[1, 4\]"):
        ext5.forward(r, k, v, logw, u[0], s, False)
    with pytest.raises(RuntimeError, match=r"wkv5: r must be \(B, T, H, N\), got shape \[2, 3, 4\]"):
        ext5.forward(r[:, :, 0], k, v, logw, u, s, False)


def test_backend_choice_and_announcement(capsys, monkeypatch):
    monkeypatch.setattr(wkv_cuda, '_announced', set())
    x = [t.detach() for t in wkv7_inputs(B=1, T=5, H=1, N=4)]
    y_auto, _ = wkv7(*x, backend='auto')
    y_auto2, _ = wkv7(*x, backend='auto')
    y_torch, _ = wkv7(*x, backend='torch')
    torch.testing.assert_close(y_auto, y_torch, rtol=1e-12, atol=1e-12)
    assert capsys.readouterr().err.count("wkv: backend 'auto' on cpu: using the compiled 'cpu' wkv7 kernel") == 1
    with pytest.raises(RuntimeError, match=r"wkv_backend='cuda' but the tensors are on cpu"):
        wkv7(*x, backend='cuda')


def test_build_failure_auto_falls_back_explicit_errors(capsys, monkeypatch):
    def broken(kind, **kw):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(wkv_cuda, 'build_extension', broken)
    monkeypatch.setattr(wkv_cuda, '_extensions', {})
    monkeypatch.setattr(wkv_cuda, '_announced', set())
    x = [t.detach() for t in wkv5_inputs(B=1, T=5, H=1, N=4)]
    y, _ = wkv5(*x, backend='auto')
    torch.testing.assert_close(y, wkv5_loop(*x)[0])
    assert "the 'cpu' wkv5 kernel failed to build: Ninja is required" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match=r"wkv_backend='cpu': the wkv5 kernel failed to build: Ninja is required"):
        wkv5(*x, backend='cpu')


@pytest.mark.slow
@pytest.mark.parametrize('version,key', [(7, ('wkv7', 'cpu')), (6, ('wkv5', 'cpu')), (4, 'cpu')])
def test_a_model_builds_only_its_kernel(version, key):  # RWKV-4's extension is keyed by its device alone
    code = ("import torch, wkv_cuda; from model_rwkv import RWKV, RWKVConfig; "
            f"m = RWKV(RWKVConfig(version={version}, n_layer=1, n_embd=16, head_size=8, vocab_size=11)); "
            "m(torch.zeros(1, 3, dtype=torch.long)); print(sorted(map(str, wkv_cuda._extensions)))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == str([str(key)])


def test_rwkv4_cuda_source_matches_cpu_kernel(use):
    """The RWKV-4 .cu through the shim against the CPU kernel and the float64 oracle, as test_wkv_kernels.py does
    for the CPU kernel (values, every gradient, the incoming state's)."""
    from test_wkv_kernels import compare_with_oracle
    use('cuda-shim', 'wkv4')
    for B, T, C in [(3, 11, 5), (2, 40, 67)]:
        compare_with_oracle('cpu', 'cpu', B, T, C, with_state=True)


# ---------------------------------------------------------------------------------------------------------------------
# the CUDA sources as a GPU would see them: races (ThreadSanitizer on the shim) and registers (ptxas)

def tsan_build(tmp_path, mutate=None):
    """tests/cuda_shim/race_driver.cpp linked with every .cu of wkv_cuda/ compiled by g++ -fsanitize=thread against
    the shim; mutate(name, text) may edit a source first. Returns the executable."""
    shim_dir, src = REPO / 'wkv_cuda' / 'cuda_shim', REPO / 'wkv_cuda'
    objects = []
    for name in ('wkv_cuda.cu', 'wkv5_cuda.cu', 'wkv7_cuda.cu', 'race_driver.cpp'):
        path = REPO / 'tests' / 'cuda_shim' / name if name.endswith('.cpp') else src / name
        if mutate:
            text = mutate(name, path.read_text())
            path = tmp_path / name
            path.write_text(text)
        obj = tmp_path / (name + '.o')
        r = subprocess.run(['g++', '-std=c++20', '-O1', '-g', '-fsanitize=thread', f'-I{shim_dir}', f'-I{src}',
                            '-x', 'c++', '-c', str(path), '-o', str(obj)], capture_output=True, text=True, timeout=600)
        if r.returncode and 'tsan' in r.stderr.lower():
            pytest.skip(f"no ThreadSanitizer runtime for g++ here: {r.stderr.strip().splitlines()[-1]}")
        assert r.returncode == 0, r.stderr
        objects.append(str(obj))
    exe = tmp_path / 'race_driver'
    r = subprocess.run(['g++', '-fsanitize=thread', *objects, '-o', str(exe)], capture_output=True, text=True,
                       timeout=600)
    if r.returncode and 'tsan' in r.stderr.lower():
        pytest.skip(f"no ThreadSanitizer runtime for g++ here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    return exe


def run_tsan(exe):
    env = dict(os.environ, TSAN_OPTIONS='halt_on_error=1 exitcode=66')
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_cuda_kernels_have_no_data_race(tmp_path):
    r = run_tsan(tsan_build(tmp_path))
    assert r.returncode == 0 and 'ThreadSanitizer' not in r.stderr, r.stderr[-3000:]
    assert r.stdout.strip() == 'ok'


@pytest.mark.slow
def test_threadsanitizer_catches_a_missing_syncthreads(tmp_path):
    # the barrier between staging a token's vectors in shared memory and reading them, in RWKV-7's forward
    old = "        __syncthreads();\n        ACC sa = 0;"

    def drop_barrier(name, text):
        if name != 'wkv7_cuda.cu':
            return text
        assert old in text
        return text.replace(old, "        ACC sa = 0;", 1)
    r = run_tsan(tsan_build(tmp_path, drop_barrier))
    assert r.returncode == 66 and 'ThreadSanitizer: data race' in r.stderr, r.stderr[-3000:]
    assert 'forward_kernel' in r.stderr


def find_nvcc():
    home = os.environ.get('CUDA_HOME') or '/usr/local/cuda'
    return home if Path(home, 'bin', 'nvcc').is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(find_nvcc() is None, reason='nvcc not found (set CUDA_HOME)')
def test_ptxas_forward_kernels_do_not_spill(tmp_path):
    out = tmp_path / 'ptxas.json'
    r = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'ptxas.py'), f'--out={out}'], capture_output=True,
                       text=True, timeout=1800, env=dict(os.environ, CUDA_HOME=find_nvcc()))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert {(row['source'], row['arch']) for row in rows} == {(s, a) for s in ('wkv_cuda.cu', 'wkv5_cuda.cu',
                                                                             'wkv7_cuda.cu') for a in ('sm_80', 'sm_90')}
    forward = [row for row in rows if row['kernel'].startswith('forward_kernel')]
    assert len(forward) == 2 * (3 + 2 * 4 * 3)  # RWKV-4: 3 dtypes; RWKV-5/6 and 7: 4 head sizes x 3 dtypes
    spilling = [row for row in forward if row['spill_stores'] or row['spill_loads']]
    assert not spilling, spilling
