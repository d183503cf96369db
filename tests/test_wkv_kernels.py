"""The compiled WKV kernels (wkv_cuda/) against the same oracle as the reference: the O(T^2) softmax form in
float64 (tests/test_wkv.py), and the pure-PyTorch reference for float32/bfloat16 at realistic sizes. The CPU kernel
runs here; the CUDA kernel is compiled and linked here (no GPU needed) and run wherever a GPU is present."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wkv_cuda
from helpers import (REPO, args, check_chunked_equals_whole, check_gradcheck, grads, loss_lines, make_inputs,
                     nonlinear_loss, oracle, random_state, tiny_rwkv)
from wkv_cuda import wkv
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def to(device, xs):
    return [x.detach().to(device).requires_grad_() for x in xs]


def compare_with_oracle(backend, device, B, T, C, with_state, kscale=1.0, tol=1e-10):
    inputs = make_inputs(B, T, C, kscale=kscale)
    state = random_state(B, C) if with_state else None
    y_ref, a_ref, b_ref = oracle(*inputs, state=state)
    want = grads(nonlinear_loss(y_ref, a_ref, b_ref), inputs + (state or []))

    x = to(device, inputs)
    s = to(device, state) if state else None
    y, (aa, bb, pp) = wkv(*x, state=s, backend=backend)
    a, b = aa * torch.exp(pp), bb * torch.exp(pp)
    got = grads(nonlinear_loss(y.cpu(), a.cpu(), b.cpu()), x + (s or []))
    torch.testing.assert_close(y.cpu(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(a.cpu(), a_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(b.cpu(), b_ref, rtol=tol, atol=tol)
    for name, g_got, g_want in zip(['time_decay', 'time_first', 'k', 'v', 'aa', 'bb', 'pp'], got, want):
        torch.testing.assert_close(g_got.cpu(), g_want, rtol=10 * tol, atol=10 * tol,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('B,T,C', [(3, 11, 5), (1, 1, 4), (2, 64, 67), (5, 3, 33)])
@pytest.mark.parametrize('with_state', [False, True])
def test_kernel_matches_oracle_float64(device, B, T, C, with_state):
    compare_with_oracle(device, device, B, T, C, with_state)


@pytest.mark.parametrize('device', DEVICES)
def test_kernel_long_sequence_float64(device):
    # T = 4096 with one build: no T_MAX. Moderate decays keep the oracle's e^{(T-1-i) w} in float64 range.
    compare_with_oracle(device, device, 1, 4096, 3, with_state=True, tol=1e-9)


@pytest.mark.parametrize('device', DEVICES)
def test_kernel_large_keys(device):
    inputs = make_inputs(2, 24, 8, kscale=20.0)
    with torch.no_grad():
        inputs[2].clamp_(-60, 60)
    y_ref, _, _ = oracle(*inputs)
    x = to(device, [t.float() for t in inputs])
    y, (aa, bb, pp) = wkv(*x, backend=device)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-4, atol=1e-4)
    gs = grads((torch.sin(y) + y ** 2).sum(), x)
    assert all(torch.isfinite(g).all() for g in gs)
    x = to(device, make_inputs(2, 16, 8, dtype=torch.float32, kscale=300.0))
    y, _ = wkv(*x, backend=device)
    gs = grads((y ** 2).sum(), x)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in gs)


@pytest.mark.parametrize('device', DEVICES)
def test_kernel_float32_matches_reference_realistic(device):
    B, T, C = 4, 256, 96
    inputs = [t.float() for t in make_inputs(B, T, C)]
    state = [t.float() for t in random_state(B, C)]
    ref_x, ref_s = to('cpu', inputs), to('cpu', state)
    y_ref, s_ref = wkv(*ref_x, state=ref_s, backend='torch')
    g_ref = grads(nonlinear_loss(y_ref, s_ref[0] * torch.exp(s_ref[2]), s_ref[1] * torch.exp(s_ref[2])),
                  ref_x + ref_s)
    x, s = to(device, inputs), to(device, state)
    y, st = wkv(*x, state=s, backend=device)
    g = grads(nonlinear_loss(y, st[0] * torch.exp(st[2]), st[1] * torch.exp(st[2])), x + s)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(g, g_ref):
        # gw and gu sum B*T terms: their absolute error grows with the sum's size
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('device', DEVICES)
def test_kernel_chunked_equals_whole(device):
    check_chunked_equals_whole(device, device, T=40, cuts=((0, 13), (13, 14), (14, 40)))


def test_gradcheck_cpu_kernel():
    check_gradcheck('cpu')


@pytest.mark.parametrize('device', DEVICES)
def test_kernel_bfloat16(device):
    inputs = make_inputs(2, 32, 8)
    y_ref, _, _ = oracle(*inputs)
    x = to(device, [t.to(torch.bfloat16) for t in inputs])
    y, (aa, bb, pp) = wkv(*x, backend=device)
    assert y.dtype == torch.bfloat16 and aa.dtype == torch.float32
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=0.05, atol=0.05)
    gs = grads((y.float() ** 2).sum(), x)
    assert [g.dtype for g in gs] == [torch.bfloat16] * 4 and all(torch.isfinite(g).all() for g in gs)


def test_binding_checks_inputs():
    ext = wkv_cuda.get_extension('cpu')
    w, u = torch.zeros(4), torch.zeros(4)
    k = torch.zeros(2, 3, 4)
    aa, bb, pp = wkv_cuda.initial_state(2, 4)
    with pytest.raises(RuntimeError, match=r"wkv: v has shape \[2, 3, 5\], expected \[2, 3, 4\]"):
        ext.forward(w, u, k, torch.zeros(2, 3, 5), aa, bb, pp)
    with pytest.raises(RuntimeError, match=r"wkv: v must be contiguous"):
        ext.forward(w, u, k, torch.zeros(2, 4, 3).transpose(1, 2), aa, bb, pp)
    with pytest.raises(RuntimeError, match=r"wkv: u has dtype Double, expected Float"):
        ext.forward(w, u.double(), k, k, aa, bb, pp)
    with pytest.raises(RuntimeError, match=r"wkv: k has dtype Half"):
        ext.forward(w, u, k.half(), k.half(), aa, bb, pp)
    with pytest.raises(RuntimeError, match=r"wkv: k must be \(B, T, C\)"):
        ext.forward(w, u, k[0], k[0], aa, bb, pp)


def test_auto_uses_compiled_kernel_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(wkv_cuda, '_announced', set())
    assert wkv_cuda.resolve_backend('auto', torch.device('cpu')) == 'cpu'
    assert wkv_cuda.resolve_backend('auto', torch.device('cpu')) == 'cpu'
    err = capsys.readouterr().err
    assert err.count("wkv: backend 'auto' on cpu: using the compiled 'cpu' kernel") == 1


def test_build_failure_auto_falls_back_explicit_errors(capsys, monkeypatch):
    def broken(kind, **kw):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")
    monkeypatch.setattr(wkv_cuda, 'build_extension', broken)
    monkeypatch.setattr(wkv_cuda, '_extensions', {})
    monkeypatch.setattr(wkv_cuda, '_announced', set())
    x = make_inputs(1, 3, 2)
    y, _ = wkv(*x, backend='auto')  # runs, on the reference
    y_ref, _ = wkv(*x, backend='torch')
    torch.testing.assert_close(y, y_ref)
    err = capsys.readouterr().err
    assert "the 'cpu' kernel failed to build: Ninja is required to load C++ extensions (hint: pip install ninja" in err
    assert "using the pure-PyTorch reference" in err
    with pytest.raises(RuntimeError, match=r"wkv_backend='cpu': the kernel failed to build: Ninja is required"):
        wkv(*x, backend='cpu')


def test_backend_for_wrong_device_is_an_error():
    with pytest.raises(RuntimeError, match=r"wkv_backend='cuda' but the tensors are on cpu"):
        wkv(*make_inputs(1, 2, 2), backend='cuda')


@pytest.mark.slow
def test_kernel_under_torch_compile_has_no_graph_break():
    inputs = [t.float() for t in make_inputs(2, 9, 6)]

    def f(td, tf, k, v):
        y, (aa, bb, pp) = wkv(td, tf, k, v, backend='cpu')
        return (y ** 2).sum() + aa.sum()

    x_eager, x_comp = to('cpu', inputs), to('cpu', inputs)
    loss = f(*x_eager)
    g_eager = grads(loss, x_eager)
    compiled = torch.compile(f, backend='aot_eager', fullgraph=True)  # fullgraph: a graph break is an error
    loss_c = compiled(*x_comp)
    g_comp = grads(loss_c, x_comp)
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


def test_rwkv_model_modes_agree_with_cpu_kernel():
    model = tiny_rwkv(torch.float64, wkv_backend='cpu')
    idx = torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, _ = model.prefill(idx)
        state, steps = None, []
        for t in range(13):
            logits, state = model.step(idx[:, t], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), whole, rtol=1e-8, atol=1e-8)


def find_nvcc():
    home = os.environ.get('CUDA_HOME') or '/usr/local/cuda'
    return home if Path(home, 'bin', 'nvcc').is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason='a CPU-only build of torch cannot link CUDA extensions')
@pytest.mark.skipif(find_nvcc() is None, reason='nvcc not found (set CUDA_HOME)')
@pytest.mark.parametrize('op', ['wkv4', 'wkv7'])  # wkv5's binding is wkv7's pattern on binding.h; its .cu: ptxas test
def test_cuda_extension_compiles_and_links(op, tmp_path):
    # a fresh build directory, so this really compiles the op's .cu and its binding (with the CUDA stream and device
    # guard) and links them against torch, GPU or not: a broken kernel fails here, in CI, before it reaches a GPU
    env = dict(os.environ, CUDA_HOME=find_nvcc(), TORCH_CUDA_ARCH_LIST=os.environ.get('TORCH_CUDA_ARCH_LIST', '9.0'),
               MAX_JOBS='2')
    code = ("import wkv_cuda; m = wkv_cuda.build_extension('cuda', build_directory=%r, op=%r); "
            "print('built', m.forward.__doc__)" % (str(tmp_path), op))
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=1500, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'WKV forward' in r.stdout
    assert list(tmp_path.glob(f'{wkv_cuda.EXTENSION_NAMES[op]}_cuda*.so'))


@pytest.mark.slow
def test_cpu_kernel_under_ddp_matches_one_process(dataset, tmp_path):
    # two gloo processes train the RWKV with the compiled kernel through DDP: the same losses as one process that
    # accumulates both micro-batches (the data order depends on the iteration alone)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    one = subprocess.run([sys.executable, str(REPO / 'train.py'), *args('rwkv', dataset, tmp_path / 'one', 6),
                          '--wkv_backend=cpu'], capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          str(REPO / 'train.py'), *args('rwkv', dataset, tmp_path / 'two', 6), '--wkv_backend=cpu'],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a, b = loss_lines(one.stdout), loss_lines(two.stdout)
    assert sorted(a) == sorted(b) == list(range(6))
    for i in a:
        assert b[i] == pytest.approx(a[i], rel=1e-5), i


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path):
    # end to end on a tiny setting; no timing is asserted
    r = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_wkv.py'), '--shapes=[(2, 9, 5)]',
                        '--repeats=1', '--wkv5_shapes=[(2, 37, 16, 8)]', '--chunk_len=8'], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines()
            if line.startswith('| ') and not line.startswith(('| backend', '| op'))]
    cells = [row.split(' | ') for row in rows]
    assert [c[:5] for c in cells[:2]] == [['| torch', 'float32', '2', '9', '5'], ['| cpu', 'float32', '2', '9', '5']]
    assert [(c[0], c[5]) for c in cells[2:]] == [(f'| {op}', contender) for op in ('wkv5', 'wkv7')
                                                for contender in ('kernel (cpu)', 'chunked (torch)', 'loop (torch)')]
    assert all(c[1:5] == ['2', '37', '16', '8'] for c in cells[2:])
