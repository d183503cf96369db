"""Quantized CPU inference (quantize.py, wkv_cuda/qlinear_cpu.cpp): the quantizers against ggml's reference formulas
written out here block by block in float32 scalars, the kernels against a float matmul of the dequantized weights,
quantized models in every mode, files in and out, and the refusals."""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from configurator import ConfigError
from helpers import args, one_line_error, run, tiny_gpt, tiny_rwkv
from model_gpt import GPT
from model_rwkv import RWKV
from quantize import FORMATS, QLinear, dequantize, kernel, quantize

f32 = np.float32


def ref_block(x, fmt):
    """One block of 32 floats quantized as ggml-quants.c's quantize_row_*_ref (and our int4) do it, in float32
    scalars: (values as stored, d, m), with C's casts: (int8_t) / (uint8_t) truncate, roundf rounds half away."""
    x = [f32(v) for v in x]
    if fmt == 'q8_0':
        amax = max(abs(v) for v in x)
        d = f32(amax / f32(127))
        inv = f32(1) / d if d else f32(0)
        # roundf of the float32 product, in double (exact here): half away from zero
        return [int(math.copysign(math.floor(abs(float(f32(v * inv))) + 0.5), v)) for v in x], np.float16(d), None
    if fmt == 'q4_0':
        amax, mx = f32(0), f32(0)
        for v in x:
            if amax < abs(v):
                amax, mx = abs(v), v
        d = f32(mx / f32(-8))
        inv = f32(1) / d if d else f32(0)
        return [min(15, int(f32(f32(v * inv) + f32(8.5)))) for v in x], np.float16(d), None
    lo, hi = min(x), max(x)
    levels = 31 if fmt == 'q5_1' else 15
    d = f32(f32(hi - lo) / f32(levels))
    inv = f32(1) / d if d else f32(0)
    q = [int(f32(f32(f32(v - lo) * inv) + f32(0.5))) for v in x]
    if fmt == 'q5_1':
        return q, np.float16(d), np.float16(lo)
    return [min(15, v) for v in q], d, lo


def blocks_of(t, fmt, O, nb):
    """The stored tensors of quantize(), read back per block as (values, d, m) - independent of dequantize()."""
    out = []
    for o in range(O):
        for b in range(nb):
            if fmt == 'q8_0':
                vals = t['q'][o, b * 32:(b + 1) * 32].tolist()
            else:
                byte = t['q'][o, b * 16:(b + 1) * 16].tolist()
                vals = [v & 15 for v in byte] + [v >> 4 for v in byte]
                if fmt == 'q5_1':
                    qh = int(t['qh'][o, b]) & 0xFFFFFFFF
                    vals = [v | (((qh >> j) & 1) << 4) for j, v in enumerate(vals)]
            d = t['d'][o, b].item()
            m = t['m'][o, b].item() if 'm' in t else None
            out.append((vals, d, m))
    return out


def test_roundf_rounds_halves_away_from_zero():
    from quantize import roundf
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4999998])
    assert roundf(v).tolist() == [1, 2, 3, -1, -3, 0, 2]  # torch.round would give 0, 2, 2, -0, -2


@pytest.mark.parametrize('fmt', ['q8_0', 'q4_0', 'q5_1', 'int4'])
def test_quantizers_match_the_reference_formulas(fmt):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 96, generator=g) * torch.tensor([0.01, 1.0, 30.0]).repeat_interleave(32)  # three scales
    W[0, :32] = 0  # an all-zero block: d = 0
    W[1, 32:64] = 0.25  # a constant block
    W[2, :32] = torch.arange(32) / 31 * 3 - 1.5  # an evenly spread one: many exact halves
    W[3, 5] = -W[3, :32].abs().max() * 2  # a negative extreme for q4_0's signed max
    t = quantize(W, fmt)
    got = blocks_of(t, fmt, 5, 3)
    for i, (vals, d, m) in enumerate(got):
        o, b = divmod(i, 3)
        want_vals, want_d, want_m = ref_block(W[o, b * 32:(b + 1) * 32].tolist(), fmt)
        assert vals == want_vals, (fmt, o, b)
        assert d == float(want_d) and (m is None or m == float(want_m)), (fmt, o, b)


def test_int8_is_per_row_symmetric():
    W = torch.randn(7, 64)
    t = quantize(W, 'int8')
    d = W.abs().amax(1, keepdim=True) / 127
    assert torch.equal(t['d'], d)
    assert torch.equal(t['q'].float(), torch.round(W / d))  # no exact halves in random data
    assert (dequantize(t, 'int8') - W).abs().max() <= d.max() / 2 + 1e-6


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('B,O,I', [(1, 37, 32), (3, 64, 320), (8, 129, 96)])
def test_kernel_equals_float_matmul_of_the_dequantized_weights(fmt, B, O, I):
    g = torch.Generator().manual_seed(B * O)
    W = torch.randn(O, I, generator=g)
    bias = torch.randn(O, generator=g)
    x = torch.randn(B, I, generator=g) * 3
    t = quantize(W, fmt)
    layer = QLinear(fmt, I, O, t, bias).eval()
    want = F.linear(x.double(), dequantize(t, fmt).double(), bias.double())
    got = layer(x)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 1e-5
    # the quantization itself is what its bit width allows (the test can fail: a wrong layout is far off)
    err = ((dequantize(t, fmt) - W).abs().mean() / W.abs().mean()).item()
    assert err < {'int8': 0.01, 'q8_0': 0.01, 'q5_1': 0.05, 'q4_0': 0.12, 'int4': 0.1}[fmt]
    assert got.shape == (B, O) and layer(x[None]).shape == (1, B, O)


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('O,I', [(1, 5), (3, 37), (37, 3), (129, 96), (96, 129), (2000, 64), (64, 640)])
def test_fp32_one_row_product_equals_float64(O, I, threads):
    """flinear (DecodeLinear's kernel): x @ W^T to fp32 rounding, for sizes that are no multiple of its 32-element
    steps or of the rows a thread takes, on 1 and 2 threads."""
    g = torch.Generator().manual_seed(O * I)
    W, x = torch.randn(O, I, generator=g), torch.randn(1, I, generator=g)
    want = x.double() @ W.double().T
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel().flinear(x, W)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (1, O)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 1e-6


def test_decode_linear_runs_the_kernel_for_one_row_only():
    """DecodeLinear: one row without a gradient goes through flinear; a batch or a gradient through F.linear, with
    the same values; a strided weight the kernel cannot read is a one-line error."""
    from quantize import DecodeLinear
    lin = nn.Linear(48, 40, bias=True)
    dec = DecodeLinear(48, 40, bias=True)
    dec.load_state_dict(lin.state_dict())
    calls = []
    ext = kernel()

    class Spy:
        def flinear(self, x, w):
            calls.append(x.shape)
            return ext.flinear(x, w)
    import wkv_cuda
    saved = wkv_cuda._extensions['cpu']
    wkv_cuda._extensions['cpu'] = Spy()
    try:
        x = torch.randn(3, 1, 48)
        with torch.no_grad():
            assert (dec(x[:1]) - lin(x[:1])).abs().max() <= 1e-5 and calls == [(1, 48)]
            assert (dec(x) - lin(x)).abs().max() <= 1e-6 and len(calls) == 1  # a batch: F.linear
        out = dec(x[:1])  # a gradient wanted: F.linear, differentiable
        out.sum().backward()
        assert len(calls) == 1 and dec.weight.grad is not None
    finally:
        wkv_cuda._extensions['cpu'] = saved
    with pytest.raises(RuntimeError, match=r'the weight must be a contiguous float32 \(O, 8\) CPU tensor'):
        kernel().flinear(torch.randn(1, 8), torch.randn(8, 16).t())


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('model_type', ['rwkv', 'gpt'])
def test_quantized_model_modes_agree_and_equal_dequantized_float(fmt, model_type):
    if model_type == 'rwkv':
        make = lambda: tiny_rwkv(dtype=torch.float32, n_embd=64, vocab_size=40)  # noqa: E731
    else:
        make = lambda: tiny_gpt(n_embd=64, vocab_size=40)  # noqa: E731
    model, reference = make().quantize_(fmt, head=True), make()
    # the float model with every quantized matrix replaced by its dequantized value: the same function
    with torch.no_grad():
        if model_type == 'gpt':  # the quantized head no longer shares the (float) embedding's tensor
            reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.clone())
        for name, mod in model.named_modules():
            if isinstance(mod, QLinear):
                ref = reference.get_submodule(name)
                ref.weight.copy_(dequantize({k: getattr(mod, k) for k in ('q', 'd', 'm', 'qh') if hasattr(mod, k)},
                                            fmt))
    idx = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, _ = model.prefill(idx)
        want, _ = reference.prefill(idx)
        steps, state = [], None
        for t in range(idx.shape[1]):
            logits, state = model.step(idx[:, t], state)
            steps.append(logits)
    scale = want.abs().max()
    assert (whole - want).abs().max() / scale <= 1e-5
    assert (torch.stack(steps, 1) - whole).abs().max() / scale <= 1e-4  # step = prefill, the target


def test_qlinear_sees_buffers_loaded_after_a_forward():
    g = torch.Generator().manual_seed(9)
    W1, W2, x = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g), torch.randn(2, 64, generator=g)
    a = QLinear('q5_1', 64, 8, quantize(W1, 'q5_1')).eval()
    b = QLinear('q5_1', 64, 8, quantize(W2, 'q5_1')).eval()
    before = a(x)  # converts its fp16 scales once and keeps them
    a.load_state_dict(b.state_dict())  # in place
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), before)


def test_quantized_model_refuses_training():
    model = tiny_rwkv(dtype=torch.float32, n_embd=32).quantize_('int8')
    idx = torch.zeros(1, 4, dtype=torch.long)
    model.train()
    with pytest.raises(RuntimeError, match='for inference only'):
        model(idx, idx)
    with pytest.raises(ValueError, match='already quantized'):
        model.quantize_('q4_0')
    with pytest.raises(ValueError, match='unknown quantization format'):
        tiny_rwkv(dtype=torch.float32, n_embd=32).quantize_('q3_k')
    with pytest.raises(ValueError, match='export the float model'):
        model.save_pth('never-written.pth')
    with pytest.raises(ValueError, match='export the float model'):
        tiny_gpt(n_embd=32).quantize_('int8').save_pretrained('never-written')


@pytest.mark.slow
def test_export_load_sample_and_refusals(dataset, tmp_path):
    r = run('train.py', *args('rwkv', dataset, tmp_path / 'o', 4, '--n_embd=64'))
    assert r.returncode == 0, r.stderr
    from checkpoint import load_latest_checkpoint, model_from_checkpoint
    from interop import load_pretrained
    float_model = model_from_checkpoint(load_latest_checkpoint(tmp_path / 'o', 'cpu')[0]).eval()
    idx = torch.randint(0, 10, (1, 9), generator=torch.Generator().manual_seed(4))
    for fmt in ('int8', 'q4_0'):
        path = tmp_path / f'model-{fmt}.safetensors'
        r = run('export.py', f'--out_dir={tmp_path / "o"}', f'--format={fmt}', f'--dest={path}')
        assert r.returncode == 0, r.stderr
        loaded, model_type, spec = load_pretrained(str(path))  # without the checkpoint it came from
        assert model_type == 'rwkv' and spec['tokenizer'] == 'char' and loaded.quantized[0] == fmt
        assert torch.equal(RWKV.from_pretrained(path).prefill(idx)[0], loaded.prefill(idx)[0])
        in_memory = model_from_checkpoint(load_latest_checkpoint(tmp_path / 'o', 'cpu')[0]).quantize_(fmt)
        with torch.no_grad():
            assert torch.equal(loaded.prefill(idx)[0], in_memory.prefill(idx)[0])
            assert (loaded.prefill(idx)[0] - float_model.prefill(idx)[0]).abs().max() > 0  # it is quantized
        r = run('sample.py', f'--init_from={path}', '--device=cpu', '--num_samples=1', '--max_new_tokens=20',
                '--start=abc')
        assert r.returncode == 0 and len(r.stdout) > 20, r.stderr
    r = run('sample.py', f'--out_dir={tmp_path / "o"}', '--quantize=q5_1', '--device=cpu', '--num_samples=1',
            '--max_new_tokens=20', '--start=abc', '--temperature=0')
    assert r.returncode == 0 and len(r.stdout) > 20, r.stderr
    bad = run('train.py', *args('rwkv', dataset, tmp_path / 'p', 4, '--n_embd=64',
                                f'--init_from={tmp_path / "model-int8.safetensors"}'))
    one_line_error(bad, 'train.py', 'is a quantized model, for inference only')
    bad = run('sample.py', f'--out_dir={tmp_path / "o"}', '--quantize=q4_0', '--device=cuda')
    assert bad.returncode != 0 and 'Traceback' not in bad.stderr


def test_quantized_gpt_file_round_trip(tmp_path):
    from interop import save_quantized
    for head in (True, False):  # a float head stays tied to the embedding; a quantized one is saved apart
        model = tiny_gpt(n_embd=64, vocab_size=40).quantize_('q8_0', head=head)
        save_quantized(model, tmp_path / 'g.safetensors', 'gpt', {'tokenizer': 'gpt2'})
        loaded = GPT.from_pretrained(tmp_path / 'g.safetensors')
        idx = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert torch.equal(loaded.prefill(idx)[0], model.prefill(idx)[0]), head
        with pytest.raises(ValueError, match='not an RWKV'):
            RWKV.from_pretrained(tmp_path / 'g.safetensors')


def test_file_size_is_the_formats_arithmetic(tmp_path):
    """int8 with the head quantized: 1 byte per matrix weight plus a float per row; the embedding and vectors fp32."""
    from interop import save_quantized
    model = tiny_rwkv(dtype=torch.float32, n_embd=64, vocab_size=40).quantize_('int8', head=True)
    path = tmp_path / 'm.safetensors'
    save_quantized(model, path, 'rwkv')
    matrices = sum(m.q.numel() for m in model.modules() if isinstance(m, QLinear))
    rows = sum(m.d.numel() for m in model.modules() if isinstance(m, QLinear))
    floats = sum(p.numel() for p in model.parameters())  # what is not quantized: embedding, LayerNorms, time_*
    payload = matrices + 4 * rows + 4 * floats
    assert payload <= path.stat().st_size <= payload + 16384  # + the header (names, shapes, metadata)


# ---------------------------------------------------------------------------------------------------------------------
# rwkv.cpp files

def read_rwkvcpp(path):
    """An rwkv.cpp model file read from its specification (rwkv.cpp docs/FILE_FORMAT.md), independently of the
    writer: header, then per tensor its name, type, shape and values (quantized blocks decoded here)."""
    import struct
    data = open(path, 'rb').read()
    magic, version, V, C, L, dtype = struct.unpack_from('<6i', data, 0)
    pos, tensors = 24, {}
    sizes = {2: 18, 8: 24, 9: 34}  # bytes per block of 32: Q4_0, Q5_1, Q8_0
    while pos < len(data):
        n_dims, key_len, kind = struct.unpack_from('<3i', data, pos)
        shape = list(reversed(struct.unpack_from(f'<{n_dims}i', data, pos + 12)))
        pos += 12 + 4 * n_dims
        key = data[pos:pos + key_len].decode()
        pos += key_len
        n = math.prod(shape)
        if kind in (0, 1):
            width = 4 if kind == 0 else 2
            values = np.frombuffer(data, '<f4' if kind == 0 else '<f2', n, pos).astype(np.float64)
            pos += width * n
        else:
            nblocks = n // 32
            raw = np.frombuffer(data, np.uint8, nblocks * sizes[kind], pos).reshape(nblocks, sizes[kind])
            pos += raw.size
            d = raw[:, 0:2].copy().view('<f2').astype(np.float64)  # (nblocks, 1)
            if kind == 9:
                q = raw[:, 2:].view(np.int8).astype(np.float64)
                values = q * d
            else:
                qs = raw[:, -16:]
                q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float64)  # elements j, j + 16
                if kind == 2:
                    values = (q - 8) * d
                else:
                    m = raw[:, 2:4].copy().view('<f2').astype(np.float64)
                    qh = raw[:, 4:8].copy().view('<u4').astype(np.int64)  # (nblocks, 1)
                    q += ((qh >> np.arange(32)) & 1) * 16
                    values = q * d + m
        tensors[key] = (kind, torch.from_numpy(np.asarray(values, dtype=np.float64).reshape(shape)))
    return (magic, version, V, C, L, dtype), tensors


@pytest.mark.parametrize('data_type', ['FP32', 'FP16', 'Q8_0', 'Q5_1', 'Q4_0'])
def test_rwkvcpp_file_read_back_by_an_independent_reader(data_type, tmp_path):
    from interop import save_rwkvcpp
    model = tiny_rwkv(dtype=torch.float32, n_embd=64, vocab_size=40)
    save_rwkvcpp(model, tmp_path / 'm.bin', data_type)
    header, tensors = read_rwkvcpp(tmp_path / 'm.bin')
    kind_id = {'FP32': 0, 'FP16': 1, 'Q4_0': 2, 'Q5_1': 8, 'Q8_0': 9}[data_type]
    assert header == (0x67676d66, 100 if data_type in ('FP32', 'FP16') else 101, 40, 64, 3, kind_id)
    state = model.state_dict()
    assert list(tensors) == list(state)  # every tensor, RWKV-LM's names and order
    for k, (kind, got) in tensors.items():
        want = state[k].float()
        if '.time_' in k:
            want = want.reshape(-1)
        if k.endswith('time_decay'):
            want = -torch.exp(want)  # in float32, as the writer
        want = want.double()
        quantized = want.dim() == 2 and data_type not in ('FP32', 'FP16') and k not in ('emb.weight', 'head.weight')
        if want.dim() == 1 or data_type == 'FP32' or (want.dim() == 2 and not quantized and data_type != 'FP16'):
            assert kind == 0 and torch.equal(got, want.float().double()), k
        elif data_type == 'FP16':
            assert kind == 1 and torch.equal(got, want.half().double()), k
        else:  # decoded by the reader above = our dequantize(), and near the weights
            fmt = data_type.lower()
            assert kind == kind_id and torch.equal(got.float(), dequantize(quantize(state[k], fmt), fmt)), k
            assert (got - want).abs().mean() < 0.12 * want.abs().mean(), k


@pytest.mark.parametrize('data_type', ['FP32', 'FP16', 'Q8_0', 'Q5_1', 'Q4_0'])
def test_rwkvcpp_file_loads_back_and_runs_as_written(data_type, tmp_path):
    # our reader of rwkv.cpp files: FP32 is the model itself, FP16 its matrices rounded to fp16, a quantized file a
    # model quantized to that format with the embedding and head kept (as rwkv.cpp keeps them), run from the file's
    # own blocks: the same logits in each case; the tokenizer comes from the sidecar, training from it is refused
    import copy
    from interop import load_pretrained, save_rwkvcpp
    model = tiny_rwkv(dtype=torch.float32, n_embd=64, vocab_size=40).eval()
    save_rwkvcpp(model, tmp_path / 'm.bin', data_type, {'tokenizer': 'char', 'itos': [chr(65 + i) for i in range(40)]})
    got, kind, spec = load_pretrained(str(tmp_path / 'm.bin'), wkv_backend='torch')
    assert kind == 'rwkv' and spec['itos'][:3] == ['A', 'B', 'C']
    want = copy.deepcopy(model)
    if data_type == 'FP16':
        with torch.no_grad():
            for p in want.parameters():
                if p.dim() == 2:
                    p.copy_(p.half().float())
    elif data_type != 'FP32':
        want.quantize_(data_type.lower(), head=False)
    assert getattr(got, 'quantized', None) == getattr(want, 'quantized', None)
    idx = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got.prefill(idx)[0], want.prefill(idx)[0])
    if data_type not in ('FP32', 'FP16'):
        with pytest.raises(ConfigError, match='for inference only'):
            load_pretrained(str(tmp_path / 'm.bin'), wkv_backend='torch', for_training=True)


def test_rwkvcpp_library_runs_our_files(tmp_path):
    """Where rwkv.cpp's library loads (see benchmarks/rwkvcpp.py), it runs our FP32 file to our step's logits and
    state."""
    from benchmarks.rwkvcpp import RwkvCpp
    from interop import save_rwkvcpp
    try:
        lib = RwkvCpp()
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"rwkv.cpp's library is not on this machine: {e}")
    model = tiny_rwkv(dtype=torch.float32, n_embd=64, vocab_size=40)
    fp16 = tiny_rwkv(dtype=torch.float32, n_embd=64, vocab_size=40)
    with torch.no_grad():
        for p in fp16.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())  # what an FP16 file holds
    # FP16: ggml's fp16 dot product also rounds the activations to fp16, hence 3e-3
    for data_type, ours, tol in [('FP32', model, 1e-5), ('FP16', fp16, 3e-3)]:
        save_rwkvcpp(model, tmp_path / f'{data_type}.bin', data_type)
        ctx = lib.load(tmp_path / f'{data_type}.bin')
        state_out, logits = lib.buffers(ctx)
        state_in, state = None, None
        for token in [3, 7, 1, 30, 2, 2, 19]:
            lib.eval(ctx, token, state_in, state_out, logits)
            state_in = state_out.clone()
            with torch.no_grad():
                want, state = ours.step(torch.tensor([token]), state)
            assert (logits - want[0]).abs().max() / want.abs().max() <= tol, (data_type, token)
        lib.free(ctx)


@pytest.mark.slow
def test_portable_scalar_kernel_equals_dequantized_matmul(tmp_path):
    """The kernels' path for CPUs without AVX2, built here without -mavx2 (a fresh build directory): the same results
    as a float matmul of the dequantized weights, for every format, batch 1 and 5."""
    import subprocess
    import sys
    from helpers import REPO
    code = f"""
import torch, wkv_cuda
from quantize import FMT_ID, FORMATS, dequantize, quantize
ext = wkv_cuda.build_extension('cpu', build_directory={str(tmp_path)!r}, simd=False)
g = torch.Generator().manual_seed(0)
for fmt in FORMATS:
    W = torch.randn(45, 96, generator=g)
    t = quantize(W, fmt)
    f = lambda n: t[n].float() if n in t else torch.empty(0)
    for B in (1, 5):
        x = torch.randn(B, 96, generator=g)
        y = ext.qlinear(x, FMT_ID[fmt], t['q'], f('d'), f('m'), t.get('qh', torch.empty(0, dtype=torch.int32)))
        want = x.double() @ dequantize(t, fmt).double().T
        err = ((y.double() - want).abs().max() / want.abs().max()).item()
        assert err <= 1e-5, (fmt, B, err)
W = torch.randn(45, 99, generator=g)
x = torch.randn(1, 99, generator=g)
err = ((ext.flinear(x, W).double() - x.double() @ W.double().T).abs().max()).item()  # the fp32 one-row product
assert err <= 1e-4, err
print('scalar ok')
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=1200, cwd=REPO,
                       env={**os.environ, 'MAX_JOBS': '2'})
    assert r.returncode == 0 and 'scalar ok' in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert list(tmp_path.glob('*_scalar*.so'))
