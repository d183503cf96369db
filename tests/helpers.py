"""What the tests share: running the scripts as a user does, tiny models with every path exercised, and the WKV
oracle (the O(T^2) causal softmax-weighted average of RWKV paper eq. 14, float64, autograd for the gradients)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_gpt import GPT, GPTConfig
from model_rwkv import RWKV, RWKVConfig, version_name
from wkv_cuda import wkv

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# scripts

def run(script, *args, cwd=None):
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=600)


def tiny_args(model_type, data_dir, out_dir, max_iters):
    return [f'--model_type={model_type}', f'--data_dir={data_dir}', f'--out_dir={out_dir}', '--device=cpu',
            '--n_layer=2', '--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=8',
            '--gradient_accumulation_steps=2', f'--max_iters={max_iters}', '--eval_interval=30', '--eval_iters=5',
            '--learning_rate=3e-3', '--warmup_iters=5', '--lr_decay_iters=90', '--min_lr=3e-4', '--log_interval=10',
            '--always_save_checkpoint=True', '--wkv_backend=torch', '--peak_flops=1e11']


def eval_lines(stdout):
    return [(int(s), float(t), float(v)) for s, t, v in
            re.findall(r'step (\d+): train loss ([\d.]+), val loss ([\d.]+)', stdout)]


def one_line_error(r, script, fragment):
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith(f'{script}: error:') and fragment in lines[-1], r.stderr


def loss_lines(stdout):
    """{iteration: logged loss} from train.py's output."""
    return {int(i): float(v) for i, v in re.findall(r'iter (\d+)/\d+: loss ([-\d.naif]+)', stdout)}


def args(model_type, data, out, max_iters, *extra):
    return [*tiny_args(model_type, data, out, max_iters), '--log_interval=1', '--eval_interval=6', *extra]


def word_tokenizer(path, words):
    tokenizers = pytest.importorskip('tokenizers')
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    vocab = {'<|endoftext|>': 0, '[UNK]': 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return vocab



# ---------------------------------------------------------------------------------------------------------------------
# tiny models

def tiny_rwkv(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(block_size=16, vocab_size=37, n_layer=3, n_embd=12, wkv_backend='torch')
    args.update(kw)
    model = RWKV(RWKVConfig(**args))
    # v4neo's init zeroes several matrices, which would hide bugs in the paths they feed: randomise everything
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'time_' not in n or n.endswith(('_w1', '_w2')):  # RWKV-6's LoRAs start at zero too
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype).eval()


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=12, bias=True)
    args.update(kw)
    return GPT(GPTConfig(**args)).eval()



# ---------------------------------------------------------------------------------------------------------------------
# the WKV oracle

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




# ---------------------------------------------------------------------------------------------------------------------
# the matrix-state ops (wkv_cuda/wkv5.py, wkv7.py)

def check_chunked_equals_loop(loop, chunked, x, names):
    """chunked(*x) = loop(*x) in float64: output and final state <= 1e-10, and the gradient of a nonlinear loss of
    both for every input (the incoming state's included; `names` label them) <= 1e-8 relative to its size."""
    y_loop, s_loop = loop(*x)
    y, s = chunked(*x)
    assert (y - y_loop).abs().max() <= 1e-10 and (s - s_loop).abs().max() <= 1e-10
    g = torch.Generator().manual_seed(1)
    wy, ws = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(s.shape, generator=g, dtype=y.dtype)

    def loss(y, s):
        return (torch.sin(y) * wy).sum() + (s * ws).sum() + (y ** 2).sum()
    grads_loop = torch.autograd.grad(loss(y_loop, s_loop), x)
    grads = torch.autograd.grad(loss(y, s), x)
    for name, a, b in zip(names, grads, grads_loop, strict=True):
        assert (a - b).abs().max() <= 1e-8 * max(1.0, b.abs().max().item()), name


# ---------------------------------------------------------------------------------------------------------------------
# the matrix-state WKV ops (RWKV-5/6, RWKV-7)

def wkv5_inputs(B=2, T=64, H=3, N=8, per_token=True, strong=False, dtype=torch.float64, seed=0):
    """Inputs (r, k, v, logw, u, state) of the RWKV-5/6 op, leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    if per_token:  # RWKV-6: data-dependent decay, log w = -exp(.) as x060's w = exp(-exp(w))
        logw = -torch.exp(torch.randn(B, T, H, N, generator=g, dtype=dtype) - 1 + (2.5 if strong else 0))
    else:  # RWKV-5: one decay per channel, the same at every token
        logw = (-torch.exp(torch.randn(H, N, generator=g, dtype=dtype) - 1)).expand(B, T, H, N)
    if strong:
        logw = logw.clamp(min=-20)  # decays down to e^-20 per token, as v6 reaches
    u = torch.randn(H, N, generator=g, dtype=dtype)
    state = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return [x.clone().requires_grad_() for x in (r, k, v, logw, u, state)]


def wkv7_inputs(B=2, T=64, H=3, N=8, dtype=torch.float64, seed=0, strong=False):
    """Inputs (r, logw, k, v, a, b, state) of the RWKV-7 op, leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=dtype) for _ in range(3))
    # RWKV-7's decay: log w = -e^-0.5 sigmoid(.), in (-0.607, 0); strong = every decay near that bound
    z = torch.randn(B, T, H, N, generator=g, dtype=dtype) + (6.0 if strong else 0.0)
    logw = -torch.exp(torch.tensor(-0.5, dtype=dtype)) * torch.sigmoid(z)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g, dtype=dtype), dim=-1)
    iclr = torch.sigmoid(torch.randn(B, T, H, N, generator=g, dtype=dtype))  # "in-context learning rate" in (0, 1)
    state = torch.randn(B, H, N, N, generator=g, dtype=dtype)
    return [x.clone().requires_grad_() for x in (r, logw, k, v, -kk, kk * iclr, state)]


# ---------------------------------------------------------------------------------------------------------------------
# files of other programs

def official_pth(version, path, L=3, C=16, H=4, F=40, V=37, seed=0, dtype=torch.float32):
    """A .pth in RWKV-LM's layout, written here from its key names and shapes (RWKV-v4neo/src/model.py: time_mix_*
    (1, 1, C), time_decay / time_first (C,), no biases; RWKV-v5/src/model.py RWKV_Tmix_x052 / x060 and RWKV_CMix_x052
    / x060, BlinkDL/nanoRWKV's x051a as the rwkv pip package reads 5.1, RWKV-v7/train_temp/src/model.py
    RWKV_Tmix_x070 / RWKV_CMix_x070; ln0 in block 0 only), random values, not our model's state_dict; saved in dtype
    (the released RWKV-4-Pile files are bf16)."""
    version = version_name(version)
    g = torch.Generator().manual_seed(seed)
    N = C // H

    def r(*shape, scale=0.3):
        return scale * torch.randn(*shape, generator=g)

    def u(*shape):
        return torch.rand(*shape, generator=g)
    state = {'emb.weight': r(V, C), 'ln_out.weight': 1 + r(C, scale=0.1), 'ln_out.bias': r(C, scale=0.1),
             'head.weight': r(V, C)}
    for i in range(L):
        p = f'blocks.{i}.'
        for ln in (['ln0', 'ln1', 'ln2'] if i == 0 else ['ln1', 'ln2']):
            state[p + ln + '.weight'], state[p + ln + '.bias'] = 1 + r(C, scale=0.1), r(C, scale=0.1)
        if version != '4':
            state[p + 'att.ln_x.weight'], state[p + 'att.ln_x.bias'] = 1 + r(C, scale=0.1), r(C, scale=0.1)
        for name in ('receptance', 'key', 'value', 'output') + (() if version in ('4', '7') else ('gate',)):
            state[p + f'att.{name}.weight'] = r(C, C)
        state[p + 'ffn.key.weight'], state[p + 'ffn.value.weight'] = r(F, C), r(C, F)
        if version != '7':
            state[p + 'ffn.receptance.weight'] = r(C, C)
        if version == '4':
            state[p + 'att.time_decay'], state[p + 'att.time_first'] = r(C, scale=1.0), r(C, scale=1.0)
            for name in ('att.time_mix_k', 'att.time_mix_v', 'att.time_mix_r', 'ffn.time_mix_k', 'ffn.time_mix_r'):
                state[p + name] = u(1, 1, C)
        elif version in ('5', '5.1'):
            for name in ('att.time_mix_k', 'att.time_mix_v', 'att.time_mix_r', 'att.time_mix_g', 'ffn.time_mix_k',
                         'ffn.time_mix_r'):
                state[p + name] = u(1, 1, C)
            shape = (H, N) if version == '5' else (H,)
            state[p + 'att.time_decay'], state[p + 'att.time_faaaa'] = r(*shape, scale=1.0) - 1, r(*shape)
        elif version == '6':
            for name in ('x', 'w', 'k', 'v', 'r', 'g'):
                state[p + f'att.time_maa_{name}'] = u(1, 1, C)
            state[p + 'ffn.time_maa_k'], state[p + 'ffn.time_maa_r'] = u(1, 1, C), u(1, 1, C)
            state[p + 'att.time_maa_w1'], state[p + 'att.time_maa_w2'] = r(C, 5 * 8), r(5, 8, C)
            state[p + 'att.time_decay'] = r(1, 1, C, scale=1.0) - 1
            state[p + 'att.time_decay_w1'], state[p + 'att.time_decay_w2'] = r(C, 12), r(12, C)
            state[p + 'att.time_faaaa'] = r(H, N)
        else:
            for name in ('x_r', 'x_w', 'x_k', 'x_v', 'x_a', 'x_g'):
                state[p + 'att.' + name] = u(1, 1, C)
            for name, d in (('w', 8), ('a', 12), ('v', 4), ('g', 16)):
                if name != 'g':
                    state[p + f'att.{name}0'] = r(1, 1, C, scale=1.0)
                state[p + f'att.{name}1'], state[p + f'att.{name}2'] = r(C, d), r(d, C)
            state[p + 'att.k_k'], state[p + 'att.k_a'] = u(1, 1, C), 1 + r(1, 1, C, scale=0.1)
            state[p + 'att.r_k'] = r(H, N)
            state[p + 'ffn.x_k'] = u(1, 1, C)
    torch.save({k: t.to(dtype) for k, t in state.items()}, path)
