"""Both models: shapes and loss, RWKV's initialisation against RWKV-v4neo's formulas, parallel = chunked = RNN mode,
causality, optimizer groups, L2Wrap, and the FLOP counts behind MFU against torch's own FLOP counter."""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model_gpt import GPT, GPTConfig
from helpers import tiny_gpt, tiny_rwkv
from model_rwkv import RWKV, RWKVConfig, L2Wrap


@pytest.mark.parametrize("make", [tiny_gpt, lambda: tiny_rwkv(torch.float32)])
def test_shapes_and_loss(make):
    model = make()
    idx = torch.randint(0, 37, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 37)
    # the loss is the mean negative log-likelihood of the targets, computed here from its definition in float64
    z = logits.detach().double()
    nll = [math.log(sum(math.exp(v) for v in z[b, t].tolist())) - z[b, t, idx[b, t]].item()
           for b in range(3) for t in range(16)]
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 37) and loss is None


@pytest.mark.parametrize("model_type", ['gpt', 'rwkv'])
def test_initial_loss_is_near_uniform(model_type):
    torch.manual_seed(0)
    if model_type == 'gpt':
        model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=64))
    else:
        model = RWKV(RWKVConfig(block_size=32, vocab_size=65, n_layer=2, n_embd=64, emb_init=1e-3))
    idx, targets = torch.randint(0, 65, (2, 4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.3


def test_rwkv_init_follows_v4neo_formulas():
    # the formulas of RWKV-v4neo/src/model.py (RWKV_TimeMix, RWKV_ChannelMix, generate_init_weight), in plain Python
    L, C, V, emb_init = 3, 7, 11, 5e-4
    torch.manual_seed(0)
    model = RWKV(RWKVConfig(block_size=8, vocab_size=V, n_layer=L, n_embd=C, emb_init=emb_init))
    for i, block in enumerate(model.blocks):
        r01, r10 = i / (L - 1), 1 - i / L
        decay = [-5 + 8 * (h / (C - 1)) ** (0.7 + 1.3 * r01) for h in range(C)]
        first = [math.log(0.3) + 0.5 * ((h + 1) % 3 - 1) for h in range(C)]
        ramp = [h / C for h in range(C)]
        expect = {
            'att.time_decay': decay, 'att.time_first': first,
            'att.time_mix_k': [x ** r10 for x in ramp], 'att.time_mix_v': [x ** r10 + 0.3 * r01 for x in ramp],
            'att.time_mix_r': [x ** (0.5 * r10) for x in ramp],
            'ffn.time_mix_k': [x ** r10 for x in ramp], 'ffn.time_mix_r': [x ** r10 for x in ramp],
        }
        params = dict(block.named_parameters())
        for name, values in expect.items():
            got = params[name].detach().flatten().double()
            torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64), rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"layer {i} {name}: {m}")
        assert params['att.time_mix_k'].shape == (1, 1, C)  # RWKV-LM's checkpoint shape
        for name in ['att.key', 'att.receptance', 'att.output', 'ffn.value', 'ffn.receptance']:
            assert torch.count_nonzero(params[name + '.weight']) == 0, name
        for name, gain in [('att.value', 1.0), ('ffn.key', 2.0)]:  # ffn.key is (4C, C): gain sqrt(4C / C)
            W = params[name + '.weight'].detach().double()
            eye = torch.eye(min(W.shape), dtype=torch.float64)
            gram = W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T
            torch.testing.assert_close(gram, gain ** 2 * eye, rtol=1e-5, atol=1e-5)
        for ln in ['ln1', 'ln2']:
            assert torch.all(params[ln + '.weight'] == 1) and torch.all(params[ln + '.bias'] == 0)
    H = model.head.weight.detach().double()  # (V, C), V > C: tall, gain 0.5 * sqrt(V / C)
    torch.testing.assert_close(H.T @ H, 0.25 * V / C * torch.eye(C, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    E = model.emb.weight.detach()
    assert E.abs().max() <= emb_init and E.abs().max() > 0.5 * emb_init


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_rwkv_parallel_chunked_and_rnn_modes_agree(dtype, tol):
    model = tiny_rwkv(dtype)
    B, T = 2, 13
    idx = torch.randint(0, 37, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx, idx)  # the training path
        whole, state_whole = model.prefill(idx)
        state, chunks = None, []
        for lo, hi in [(0, 5), (5, 6), (6, 13)]:
            logits, state = model.prefill(idx[:, lo:hi], state)
            chunks.append(logits)
        chunked = torch.cat(chunks, dim=1)
        state_rnn, steps = None, []
        for t in range(T):
            logits, state_rnn = model.step(idx[:, t], state_rnn)
            steps.append(logits)
        rnn = torch.stack(steps, dim=1)
    assert whole.abs().max() > 1.0  # non-trivial logits
    assert all(s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) for s in state)
    assert state._fields == ('x_att', 'aa', 'bb', 'pp', 'x_ffn')
    assert all(s.shape == (3, B, 12) for s in state)  # (n_layer, B, C) per slot
    for name, got in [('forward', full), ('chunked prefill', chunked), ('token-by-token step', rnn)]:
        diff = (got - whole).abs().max().item()
        assert diff <= tol, f"{name} differs from whole-sequence prefill by {diff}"
    for got in (state, state_rnn):
        for name, a, b in zip(state._fields, got, state_whole):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_bf16_state_stays_fp32():
    model = tiny_rwkv(torch.float32)
    idx = torch.randint(0, 37, (2, 5))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        _, state = model.prefill(idx)
        logits, state = model.step(idx[:, 0], state)
    assert all(s.dtype == torch.float32 for s in state) and torch.isfinite(logits).all()


@pytest.mark.parametrize("make", [tiny_gpt, lambda: tiny_rwkv(torch.float64)])
def test_causal(make):
    # changing a future token must not change any earlier logits
    model = make()
    idx = torch.randint(0, 37, (1, 12), generator=torch.Generator().manual_seed(3))
    idx2 = idx.clone()
    idx2[0, 8] = (idx[0, 8] + 1) % 37
    with torch.no_grad():
        a, _ = model(idx, idx)
        b, _ = model(idx2, idx2)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_rwkv_generate_rnn_equals_parallel_greedy():
    model = tiny_rwkv(torch.float64)
    idx = torch.randint(0, 37, (2, 4), generator=torch.Generator().manual_seed(4))
    a = model.generate(idx, 20, temperature=0, mode='rnn')
    b = model.generate(idx, 20, temperature=0, mode='parallel')
    assert a.shape == (2, 24)
    assert torch.equal(a, b)


def test_rwkv_optimizer_groups():
    model = tiny_rwkv(torch.float32)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', lr_scale=True)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in opt.param_groups for p in g['params']]
    assert sorted(seen) == sorted(names.values())  # every parameter exactly once
    for g in opt.param_groups:
        group = [names[id(p)] for p in g['params']]
        if g['weight_decay'] > 0:
            assert all(n.endswith('.weight') and 'ln' not in n for n in group)
            assert {n for n in names.values() if n.endswith(('key.weight', 'head.weight', 'emb.weight'))} <= set(group)
        if g['lr_scale'] == 2.0:
            assert all(n.endswith('time_decay') for n in group) and len(group) == 3
        if g['lr_scale'] == 3.0:
            assert all(n.endswith('time_first') for n in group) and len(group) == 3
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', lr_scale=False)
    assert {g['lr_scale'] for g in opt.param_groups} == {1.0}


def test_l2wrap_gradient():
    # RWKV-v4neo L2Wrap: d/dlogits gets 1e-4 / (B*T) * max at each position's argmax, on top of the loss gradient
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    loss = (logits ** 3).sum()
    g_plain, = torch.autograd.grad(loss, logits, retain_graph=True)
    g_wrap, = torch.autograd.grad(L2Wrap.apply(loss, logits), logits)
    extra = g_wrap - g_plain
    m, i = logits.detach().max(-1)
    want = torch.zeros_like(extra).scatter_(-1, i.unsqueeze(-1), (1e-4 / 6 * m).unsqueeze(-1))
    torch.testing.assert_close(extra, want)


def measured_train_flops(model, B, T):
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    counter = FlopCounterMode(display=False)
    # the math SDPA backend is made of matmuls the counter sees; the fused CPU kernel is not counted
    with counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = model(idx, idx)
        loss.backward()
    return counter.get_total_flops()


def test_rwkv_flops_per_token_matches_flop_counter():
    torch.manual_seed(0)
    B, T = 2, 16
    model = RWKV(RWKVConfig(block_size=T, vocab_size=37, n_layer=2, n_embd=24, wkv_backend='torch'))
    assert model.flops_per_token() * B * T == measured_train_flops(model, B, T)
    # an independent count from the shapes: per layer 4 C^2 (att) + 2 C F + C^2 (ffn), plus the head V C
    C, F_, V, L = 24, 96, 37, 2
    assert model.flops_per_token() == 6 * (L * (4 * C * C + 2 * C * F_ + C * C) + V * C)


def test_gpt_flops_per_token_matches_flop_counter():
    torch.manual_seed(0)
    B, T = 2, 16
    model = GPT(GPTConfig(block_size=T, vocab_size=37, n_layer=2, n_head=2, n_embd=24, bias=False))
    measured = measured_train_flops(model, B, T)
    # 6N counts LayerNorm gains as if they were matmul weights; they are 0.5% here
    assert measured == pytest.approx(model.flops_per_token() * B * T, rel=0.01)


def test_gpt_kv_cache_prefill_and_step_match_full_forward():
    model = tiny_gpt().double()
    B, T = 2, 13
    idx = torch.randint(0, 37, (B, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = model(idx, idx)  # (B, T, V), no cache involved
        whole, cache = model.prefill(idx)
        chunks, cache_c = [], None
        for lo, hi in [(0, 4), (4, 5), (5, 13)]:
            logits, cache_c = model.prefill(idx[:, lo:hi], cache_c)
            chunks.append(logits)
        steps, cache_s = [], None
        for t in range(T):
            logits, cache_s = model.step(idx[:, t], cache_s)
            steps.append(logits)
    assert cache[0][0].shape == (B, 2, T, 6)
    for name, got in [('prefill', whole), ('chunked prefill', torch.cat(chunks, 1)),
                      ('step', torch.stack(steps, 1))]:
        assert (got - full).abs().max().item() <= 1e-10, name
    with pytest.raises(ValueError, match='block_size is 16'):
        model.prefill(idx[:, :4], cache)  # 13 + 4 positions > block_size


def test_gpt_cached_generate_equals_recompute():
    model = tiny_gpt()
    idx = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(6))
    got = model.generate(idx, 20, temperature=0)  # 25 > block_size 16: the sliding window takes over
    want = idx
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(want[:, -16:])  # nanoGPT's generate: recompute the cropped context
            want = torch.cat([want, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, want)


def test_top_p_keeps_only_the_nucleus():
    from sampling import sample_logits
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    torch.manual_seed(0)
    draws = torch.cat([sample_logits(probs.log(), 1.0, None, 0.7) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.7; 2 and 3 never drawn
    draws = torch.cat([sample_logits(probs.log(), 1.0, None, 0.1) for _ in range(50)])
    assert set(draws.flatten().tolist()) == {0}  # the most likely token always stays


@pytest.mark.parametrize('make', [tiny_gpt, lambda: tiny_rwkv(torch.float32)])
def test_generate_streams_tokens_and_stops(make):
    model = make()
    idx = torch.randint(0, 37, (1, 3), generator=torch.Generator().manual_seed(8))
    seen = []
    full = model.generate(idx, 12, temperature=0, on_token=seen.append)
    assert seen == full[0, 3:].tolist()
    stop = seen[4]
    stopped = model.generate(idx, 12, temperature=0, stop_token=stop)
    assert stopped[0, 3:].tolist() == seen[:seen.index(stop) + 1]
