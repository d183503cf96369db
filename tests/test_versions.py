"""RWKV-5 (5.2), 5.1 (x051a), 6 and 7 in model_rwkv.py: the modes agree (chunked parallel, prefill in uneven pieces,
the per-token RNN step; values and gradients) in float64 and float32, the rwkv pip package (the format's own library)
gives the same logits and state on our .pth and on an official-layout .pth written here from RWKV-LM's key names, the
inits are RWKV-LM's formulas, training and sampling run, and every bad input is one line."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import args, loss_lines, official_pth, one_line_error, run, tiny_rwkv
from model_rwkv import RWKV, RWKVConfig, MatrixState

VERSIONS = ['5', '5.1', '6', '7']


def model(version, dtype=torch.float64, **kw):
    return tiny_rwkv(dtype, version=version, head_size=4, **kw)  # n_embd 12: 3 heads of 4


def random_state(m, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return MatrixState(*(torch.randn(s.shape, generator=g, dtype=s.dtype) for s in m.initial_state(B)))


def tokens(B, T, V=37, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------------
# the modes agree

@pytest.mark.parametrize('backend', ['torch', 'cpu'])  # the pure-PyTorch ops, the compiled kernels
@pytest.mark.parametrize('T', [64, 37])
@pytest.mark.parametrize('version', VERSIONS)
def test_step_by_step_equals_forward(version, T, backend):
    m, idx = model(version, wkv_backend=backend), tokens(2, T)
    s0 = random_state(m, 2)
    with torch.no_grad():
        logits, state = m.prefill(idx, s0)
        s, steps = s0, []
        for t in range(T):
            out, s = m.step(idx[:, t], s)
            steps.append(out)
    assert (torch.stack(steps, 1) - logits).abs().max() <= 1e-10
    assert all((a - b).abs().max() <= 1e-10 for a, b in zip(s, state))


@pytest.mark.parametrize('backend', ['torch', 'cpu'])
@pytest.mark.parametrize('version', VERSIONS)
def test_prefill_in_uneven_pieces_equals_whole(version, backend):
    m, idx = model(version, wkv_backend=backend), tokens(2, 37)
    s = s0 = random_state(m, 2)
    with torch.no_grad():
        whole, s_whole = m.prefill(idx, s0)
        pieces = []
        for lo, hi in [(0, 5), (5, 6), (6, 23), (23, 37)]:  # no piece a multiple of the chunk length
            out, s = m.prefill(idx[:, lo:hi], s)
            pieces.append(out)
    assert (torch.cat(pieces, 1) - whole).abs().max() <= 1e-10
    assert all((a - b).abs().max() <= 1e-10 for a, b in zip(s, s_whole))


@pytest.mark.parametrize('backend', ['torch', 'cpu'])
@pytest.mark.parametrize('version', VERSIONS)
def test_gradients_chunked_equal_the_recurrence(version, backend):
    """The loss of a parallel-mode forward (the chunked ops, or the kernels) and of the same tokens one RNN step at
    a time (the per-token recurrence, or the kernels at T = 1) have the same gradient for every parameter and for
    the incoming state."""
    m, idx = model(version, n_layer=2, wkv_backend=backend), tokens(2, 19)
    s0 = random_state(m, 2)

    def grads(run_steps):
        state = MatrixState(*(x.clone().requires_grad_() for x in s0))
        if run_steps:
            s, outs = state, []
            for t in range(idx.shape[1]):
                out, s = m.step(idx[:, t], s)
                outs.append(out)
            logits = torch.stack(outs, 1)
        else:
            logits, s = m.prefill(idx, state)
        loss = torch.sin(logits).sum() + sum((x ** 2).sum() for x in s)
        return torch.autograd.grad(loss, [*m.parameters(), *state])
    for a, b in zip(grads(False), grads(True)):
        assert (a - b).abs().max() <= 1e-8 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize('version,tol,strong', [('5', 1e-5, False), ('5.1', 1e-5, False), ('6', 1e-5, False),
                                                ('6', 1e-4, True), ('7', 1e-5, False)])
def test_float32_against_float64(version, tol, strong):
    m64 = model(version)
    if strong:  # RWKV-6 decays down to exp(-exp(3)) = e^-20 per token
        with torch.no_grad():
            for block in m64.blocks:
                block.att.time_decay.add_(3.0)
    m32 = model(version, dtype=torch.float32)
    m32.load_state_dict(m64.state_dict())
    idx = tokens(2, 64)
    with torch.no_grad():
        want, s_want = m64.prefill(idx)
        got, s_got = m32.prefill(idx)
    assert s_got.wkv.dtype == torch.float32
    assert max_rel(got, want) <= tol and max_rel(s_got.wkv, s_want.wkv) <= tol


def test_bf16_autocast_keeps_the_state_fp32():
    m = model(7, dtype=torch.float32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        logits, state = m.prefill(tokens(2, 20))
    assert logits.dtype == torch.bfloat16 and state.wkv.dtype == torch.float32 and state.x_att.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# the rwkv pip package, both directions

PIP = '''
import os, sys, torch
os.environ.update(RWKV_JIT_ON='0', RWKV_CUDA_ON='0', RWKV_V7_ON='1' if sys.argv[1] == '7' else '0')
import rwkv.model
idx, out = [int(t) for t in sys.argv[2].split(',')], {}
for path in sys.argv[3:]:
    quiet = {} if sys.argv[1] == '7' else {'verbose': False}  # its RWKV-7 class takes no verbose
    model = rwkv.model.RWKV(model=path[:-len('.pth')], strategy='cpu fp32', **quiet)
    logits, state = model.forward(idx, None)  # its sequence mode, the last token's logits
    out[path] = (logits, state)
torch.save(out, os.environ['PIP_OUT'])
'''


@pytest.mark.slow
@pytest.mark.parametrize('version', VERSIONS)
def test_rwkv_pip_package_agrees_both_ways(version, tmp_path):
    ours = model(version, dtype=torch.float32)
    ours.save_pth(tmp_path / 'ours.pth')
    official_pth(version, tmp_path / 'official.pth')
    idx = tokens(1, 23)[0].tolist()
    env = dict(os.environ, PIP_OUT=str(tmp_path / 'pip.pt'))
    r = subprocess.run([sys.executable, '-c', PIP, str(version), ','.join(map(str, idx)),
                        str(tmp_path / 'ours.pth'), str(tmp_path / 'official.pth')],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pip = torch.load(tmp_path / 'pip.pt', weights_only=False)
    loaded = RWKV.from_pretrained(tmp_path / 'official.pth', wkv_backend='torch').eval()
    assert loaded.config.version == version and loaded.config.n_embd == 16 and loaded.config.head_size == 4
    for name, m in (('ours.pth', ours), ('official.pth', loaded)):
        want_logits, want_state = pip[str(tmp_path / name)]
        with torch.no_grad():
            logits, state = m.prefill(torch.tensor([idx]))
        assert max_rel(logits[0, -1], want_logits) <= 1e-4, name
        for i in range(m.config.n_layer):  # the package's state: per layer x_att, the matrix, x_ffn
            for got, want in zip((state.x_att[i, 0], state.wkv[i, 0], state.x_ffn[i, 0]), want_state[3 * i:3 * i + 3]):
                assert max_rel(got, want) <= 1e-4, name
    # our .pth comes back as the same model, and an official file's key set is what save_pth writes
    again = RWKV.from_pretrained(tmp_path / 'ours.pth', wkv_backend='torch')
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values())) or \
        version == '5.1'  # 5.1 goes through time_mix = 1 - time_maa and back
    loaded.save_pth(tmp_path / 'again.pth')
    assert set(torch.load(tmp_path / 'again.pth')) == set(torch.load(tmp_path / 'official.pth'))


def test_squeezed_tensors_load_as_the_package_holds_them(tmp_path):
    official_pth(6, tmp_path / 'official.pth')
    torch.save({k: v.squeeze() for k, v in torch.load(tmp_path / 'official.pth').items()}, tmp_path / 'squeezed.pth')
    a = RWKV.from_pretrained(tmp_path / 'official.pth', wkv_backend='torch').state_dict()
    b = RWKV.from_pretrained(tmp_path / 'squeezed.pth', wkv_backend='torch').state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# RWKV-LM's initialisation, written out here as its loops

def ramp(C):
    ddd = torch.ones(1, 1, C)
    for i in range(C):
        ddd[0, 0, i] = i / C
    return ddd


@pytest.mark.parametrize('version', VERSIONS)
def test_init_is_rwkv_lm(version):
    L, C, N, V = 3, 16, 4, 40
    H = C // N
    torch.manual_seed(0)
    m = RWKV(RWKVConfig(version=version, n_layer=L, n_embd=C, head_size=N, vocab_size=V))
    sd = m.state_dict()
    for i in range(L):
        r01, r10 = i / (L - 1), 1.0 - i / L
        ddd, a = ramp(C), f'blocks.{i}.att.'
        assert torch.allclose(sd[a + 'ln_x.weight'], torch.full((C,), ((1 + i) / L) ** 0.7))
        if version in ('5', '5.1', '6'):
            decay = torch.tensor([-6 + 5 * (n / (C - 1)) ** (0.7 + 1.3 * r01) for n in range(C)])
            faaaa = torch.tensor([r01 * (1 - n / (C - 1)) + ((n + 1) % 3 - 1) * 0.1 for n in range(C)])
            mix = {'k': ddd ** r10, 'v': ddd ** r10 + 0.3 * r01, 'r': ddd ** (0.5 * r10), 'g': ddd ** (0.5 * r10)}
        if version == '5':
            assert torch.allclose(sd[a + 'time_decay'], decay.view(H, N))
            assert torch.allclose(sd[a + 'time_faaaa'], faaaa.view(H, N))
            for k, want in mix.items():
                assert torch.allclose(sd[a + f'time_mix_{k}'], want)
            assert torch.allclose(sd[f'blocks.{i}.ffn.time_mix_k'], ddd ** r10)
        if version == '5.1':  # BlinkDL/nanoRWKV model.py RWKV_TimeMix_x051a
            assert torch.allclose(sd[a + 'time_decay'], torch.tensor(
                [[-6 + 5 * (h / (H - 1)) ** (0.7 + 1.3 * r01)] for h in range(H)]))
            assert torch.allclose(sd[a + 'time_faaaa'], torch.tensor([[r01 * (1 - h / (H - 1))] for h in range(H)]))
            for k, want in mix.items():
                assert torch.allclose(sd[a + f'time_maa_{k}'], 1 - want)
            assert torch.allclose(sd[f'blocks.{i}.ffn.time_maa_r'], 1 - ddd ** r10)
        if version == '6':
            assert torch.allclose(sd[a + 'time_decay'], decay.view(1, 1, C))
            assert torch.allclose(sd[a + 'time_faaaa'], faaaa.view(H, N))
            assert torch.allclose(sd[a + 'time_maa_x'], 1 - ddd ** r10)
            assert torch.allclose(sd[a + 'time_maa_v'], 1 - (ddd ** r10 + 0.3 * r01))
            assert torch.allclose(sd[a + 'time_maa_g'], 1 - ddd ** (0.5 * r10))
            assert sd[a + 'time_maa_w1'].shape == (C, 32 * 5) and not sd[a + 'time_maa_w1'].any()
            assert sd[a + 'time_maa_w2'].shape == (5, 32, C) and 0 < sd[a + 'time_maa_w2'].abs().max() <= 0.01
            assert sd[a + 'time_decay_w1'].shape == (C, 64) and not sd[a + 'time_decay_w1'].any()
            assert 0 < sd[a + 'time_decay_w2'].abs().max() <= 0.01
        if version == '7':
            for k, p in (('r', 0.2), ('w', 0.9), ('k', 0.7), ('v', 0.7), ('a', 0.9), ('g', 0.2)):
                assert torch.allclose(sd[a + f'x_{k}'], 1.0 - ddd ** (p * r10))
            www, zig, lin = torch.zeros(C), torch.zeros(C), torch.zeros(C)
            for n in range(C):
                lin[n] = n / (C - 1) - 0.5
                zig[n] = ((n % N) - ((N - 1) / 2)) / ((N - 1) / 2)
                zig[n] = zig[n] * abs(zig[n])
                www[n] = -6 + 6 * (n / (C - 1)) ** (1 + 1 * r01 ** 0.3)
            assert torch.allclose(sd[a + 'w0'], (www + 0.5 + zig * 2.5).view(1, 1, C), atol=1e-6)
            assert torch.allclose(sd[a + 'a0'], (-0.19 + zig * 0.3 + lin * 0.4).view(1, 1, C))
            assert torch.allclose(sd[a + 'k_k'], (0.71 - lin * 0.1).view(1, 1, C))
            assert torch.allclose(sd[a + 'k_a'], torch.full((1, 1, C), 1.02))
            assert torch.allclose(sd[a + 'r_k'], torch.full((H, N), -0.04))
            if i > 0:
                assert torch.allclose(sd[a + 'v0'], (0.73 - lin * 0.4).view(1, 1, C))
            d = max(32, int(round((2.5 * (C ** 0.5)) / 32) * 32))
            assert sd[a + 'w1'].shape == (C, d) and not sd[a + 'w1'].any()
            w2 = sd[a + 'w2']  # ortho_init(.., 0.1): a (d, C) orthogonal matrix of gain 0.1 * sqrt(d / C) when tall
            gain = 0.1 * (math.sqrt(d / C) if d > C else 1)
            assert torch.allclose(w2.T @ w2 if d > C else w2 @ w2.T, gain ** 2 * torch.eye(min(d, C)), atol=1e-5)
            assert torch.allclose(sd[f'blocks.{i}.ffn.x_k'], 1.0 - ddd ** (r10 ** 4))
        # generate_init_weight: zeros, orthogonal of gain 0.1 (key, gate) or 1, the head 0.5 sqrt(V / C)
        for name in ('att.output', 'ffn.value') + (() if version == '7' else ('ffn.receptance',)):
            assert not sd[f'blocks.{i}.{name}.weight'].any()
        for name, gain in (('att.key', 0.1), ('att.receptance', 1.0), ('att.value', 1.0), ('ffn.key', 1.0)) + \
                (() if version == '7' else (('att.gate', 0.1),)):
            w = sd[f'blocks.{i}.{name}.weight']
            small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            assert torch.allclose(small, gain ** 2 * torch.eye(min(w.shape)), atol=1e-5), name
    head = sd['head.weight']
    assert torch.allclose(head.T @ head, (0.5 * math.sqrt(V / C)) ** 2 * torch.eye(C), atol=1e-4)
    assert 0 < sd['emb.weight'].abs().max() <= 1e-4


@pytest.mark.parametrize('version', VERSIONS)
def test_optimizer_groups_follow_rwkv_lm(version):
    m = model(version)
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    names = {id(p): n for n, p in m.named_parameters()}
    groups = {(g['lr_scale'], g['weight_decay']): sorted(names[id(p)] for p in g['params']) for g in opt.param_groups}
    decayed = groups[(1.0, 0.1)]
    assert decayed and all(n.endswith('.weight') and m.get_parameter(n).dim() == 2 for n in decayed)
    assert 'emb.weight' in decayed and not any('_w1' in n or 'time_' in n or 'ln' in n for n in decayed)
    doubled = groups[(2.0, 0.0)]
    assert doubled == sorted(f'blocks.{i}.att.{"w0" if version == "7" else "time_decay"}' for i in range(3))
    assert sum(len(v) for v in groups.values()) == len(list(m.parameters()))


@pytest.mark.parametrize('version', VERSIONS)
def test_flops_per_token_matches_flop_counter(version):
    """flops_per_token against torch's FlopCounterMode over a training forward and backward: with the compiled WKV
    kernel (a custom op the counter does not see, as it does not count the recurrence) every counted FLOP is a
    weight's matmul, the LoRAs of 6 and 7 included."""
    from test_models import measured_train_flops
    m = model(version, torch.float32, wkv_backend='cpu')
    B, T = 2, 16
    assert m.flops_per_token() * B * T == measured_train_flops(m, B, T)
    if version == '7':  # and from the shapes: layer 0 has no value-residual LoRA (v1, v2)
        cfg = m.config
        C, F_, V, L = cfg.n_embd, cfg.dim_ffn, cfg.vocab_size, cfg.n_layer
        lora = sum(C * d * 2 for d in cfg.lora_dims)
        assert m.flops_per_token() == 6 * (L * (4 * C * C + 2 * C * F_ + lora) - 2 * C * cfg.lora_dims[2] + V * C)


# ---------------------------------------------------------------------------------------------------------------------
# scripts and errors

@pytest.mark.slow
@pytest.mark.parametrize('version', VERSIONS)
def test_train_runs_and_resume_refuses_another_version(version, dataset, tmp_path):
    r = run('train.py', *args('rwkv', dataset, tmp_path, 6, f'--rwkv_version={version}', '--head_size=8'))
    assert r.returncode == 0, r.stderr[-2000:]
    losses = loss_lines(r.stdout)
    assert len(losses) == 6 and losses[5] < losses[0]
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=False)
    assert ckpt['model_args']['version'] == version and ckpt['model_args']['head_size'] == 8
    other = '4' if version != '4' else '7'
    r = run('train.py', *args('rwkv', dataset, tmp_path, 8, f'--rwkv_version={other}', '--init_from=resume'))
    one_line_error(r, 'train.py', f'was trained with rwkv_version={version!r}')


@pytest.mark.slow
def test_sample_runs_a_rwkv7_world_pth(tmp_path):
    m = RWKV(RWKVConfig(version=7, n_layer=2, n_embd=16, head_size=8, vocab_size=65536))
    m.save_pth(tmp_path / 'RWKV-x070-World-tiny.pth')
    r = run('sample.py', f'--init_from={tmp_path / "RWKV-x070-World-tiny.pth"}', '--start=Hello',
            '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith('Hello')


@pytest.mark.parametrize('kw,fragment', [
    (dict(version=7, n_embd=12, head_size=5), 'n_embd=12 must be a multiple of head_size=5'),
    (dict(version=4.5), 'version=4.5 must be one of 4, 5, 5.1, 6, 7'),
    (dict(version=6, moe_experts=4), 'options of RWKV-4'),
    (dict(version=7, lora_dims=(32, 32)), 'version 7 takes 4 positive widths'),
])
def test_bad_configs_are_one_line(kw, fragment):
    with pytest.raises(ValueError, match=fragment.replace('(', r'\(').replace(')', r'\)')):
        RWKVConfig(**kw)


@pytest.mark.slow
def test_bad_files_and_exports_are_one_line(tmp_path):
    official_pth(7, tmp_path / 'de.pth')
    state = torch.load(tmp_path / 'de.pth')
    state['blocks.0.ffn.s_emb.weight'] = torch.zeros(37, 32)  # RWKV-7 "DeepEmbed", not in x070
    torch.save(state, tmp_path / 'de.pth')
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.ffn.s_emb.weight'\]"):
        RWKV.from_pretrained(tmp_path / 'de.pth')
    official_pth(5, tmp_path / 'v50.pth')
    state = {k: v for k, v in torch.load(tmp_path / 'v50.pth').items() if '.gate.' not in k}
    torch.save(state, tmp_path / 'v50.pth')
    with pytest.raises(ValueError, match='RWKV-5.0 \\(no gate\\)'):
        RWKV.from_pretrained(tmp_path / 'v50.pth')
    with pytest.raises(ValueError, match='transformers has no class for RWKV-6'):
        model(6).save_pretrained(tmp_path / 'hf')
    r = run('train.py', 'config/train_shakespeare_char.py', '--rwkv_version=7', '--head_size=48', '--max_iters=1')
    one_line_error(r, 'train.py', 'n_embd=128 must be a multiple of head_size=48')
    r = run('train.py', 'config/train_shakespeare_char.py', '--rwkv_version=8')
    one_line_error(r, 'train.py', 'rwkv_version')


@pytest.mark.parametrize('version', ['4'] + VERSIONS)
def test_layout_for_decoding_keeps_every_value(version, tmp_path):
    """layout_for_decoding_ keeps every value: every parameter keeps its value, steps and prefill give the same
    logits and state, the Linears become DecodeLinear, each low-rank matrix is stored along its longer side, a second
    call copies nothing, training gives the same gradients and save_pth afterwards writes the same weights."""
    kw = {} if version == '4' else dict(head_size=4)
    m = tiny_rwkv(torch.float64, version=version, **kw)
    ref = copy.deepcopy(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    idx = tokens(2, 9)
    with torch.no_grad():
        want, s_want = m.prefill(idx)
    with torch.inference_mode():  # as generate may run; the model still trains afterwards
        assert m.layout_for_decoding_() is m
    after = dict(m.named_parameters())
    assert all(torch.equal(before[n], p) and p.shape == before[n].shape for n, p in after.items())
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert len(linears) > 3 * m.config.n_layer and all(type(mod).__name__ == 'DecodeLinear' for mod in linears)
    assert all(mod.weight.is_contiguous() for mod in linears)  # (O, I) rows, as the one-row product reads them
    for M in (getattr(mod, n) for mod in m.modules() for n in getattr(mod, 'low_rank', ()) if hasattr(mod, n)):
        assert M.stride(1 if M.shape[1] >= M.shape[0] else 0) == 1, M.shape  # (in, out): along the longer side
    ptrs = [p.data_ptr() for p in m.parameters()]
    m.layout_for_decoding_()
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    with torch.no_grad():
        got, s_got = m.prefill(idx)
        s, steps = None, []
        for t in range(idx.shape[1]):
            out, s = m.step(idx[:, t], s)
            steps.append(out)
    assert (got - want).abs().max() <= 1e-12 and (torch.stack(steps, 1) - want).abs().max() <= 1e-10
    assert all((a - b).abs().max() <= 1e-10 for a, b in zip(s_got, s_want))
    for model in (m, ref):  # training: the same gradients
        model.train()
        model(idx, targets=idx)[1].backward()
    assert all((p.grad - q.grad).abs().max() <= 1e-10 for p, q in zip(m.parameters(), ref.parameters()))
    m.save_pth(tmp_path / 'm.pth')  # the official layout, written from the new strides
    back = RWKV.from_pretrained(tmp_path / 'm.pth', wkv_backend='torch')
    assert all(torch.equal(before[n].float(), p) for n, p in back.named_parameters())
