"""MicroRWKV's options done right (attention.py, moe.py and their use in both models): every option causal, every
inference mode equal to the training forward, MoE routing against a hand computation, KV caches of the size their
shapes say, and impossible settings as one-line errors."""
import math

import pytest
import torch

from attention import CausalSelfAttention
from helpers import args, eval_lines, one_line_error, run, tiny_gpt, tiny_rwkv, word_tokenizer
from model_gpt import GPT, GPTConfig
from model_rwkv import RWKV, RWKVConfig
from moe import MoE

V = 37
# (name, builder): every new option, alone and combined, on both models
VARIANTS = [
    ('rwkv moe k1', lambda: tiny_rwkv(moe_experts=4, moe_top_k=1)),
    ('rwkv moe k2', lambda: tiny_rwkv(moe_experts=3, moe_top_k=2)),
    ('rwkv hybrid full', lambda: tiny_rwkv(attn_layers=(1,), n_head=3)),
    ('rwkv hybrid window', lambda: tiny_rwkv(attn_layers=(0, 2), n_head=3, attn_window=4)),
    ('rwkv hybrid window gqa moe', lambda: tiny_rwkv(attn_layers=(1,), n_head=4, attn_kv_heads=2, attn_window=3,
                                                    moe_experts=2)),
    ('gpt window', lambda: tiny_gpt(attn_window=4).double()),
    ('gpt gqa', lambda: tiny_gpt(n_head=4, attn_kv_heads=1).double()),
    ('gpt window gqa moe', lambda: tiny_gpt(n_head=4, attn_kv_heads=2, attn_window=5, moe_experts=3,
                                            moe_top_k=2).double()),
]


def logits_of(model, idx):
    """All positions' logits of the training forward (the call train.py makes), in eval mode."""
    return model(idx, idx)[0]


@pytest.mark.parametrize('name,make', VARIANTS, ids=[v[0] for v in VARIANTS])
def test_causal(name, make):
    model = make()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (2, 14), generator=g)
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, V, (2, 5), generator=g)
    with torch.no_grad():
        a, b = logits_of(model, idx), logits_of(model, changed)
    # positions before 9 cannot see what changed (up to rounding: an expert's matmul over another set of rows)
    assert (a[:, :9] - b[:, :9]).abs().max() <= 1e-12
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # the test can fail: later positions do see it


@pytest.mark.parametrize('name,make', VARIANTS, ids=[v[0] for v in VARIANTS])
def test_prefill_in_pieces_and_step_equal_whole(name, make):
    """fp64: the training forward = prefill whole = prefill in uneven pieces carrying the state = one step per token,
    over more tokens than any window, so ring buffers wrap several times."""
    model = make()
    B, T = 2, 15
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = logits_of(model, idx)
        whole, _ = model.prefill(idx)
        pieces, state = [], None
        for lo, hi in [(0, 6), (6, 7), (7, 9), (9, 15)]:  # pieces longer and shorter than the windows
            logits, state = model.prefill(idx[:, lo:hi], state)
            pieces.append(logits)
        steps, state = [], None
        for t in range(T):
            logits, state = model.step(idx[:, t], state)
            steps.append(logits)
    for mode, got in [('prefill', whole), ('pieces', torch.cat(pieces, 1)), ('step', torch.stack(steps, 1))]:
        assert (got - want).abs().max().item() <= 1e-10, mode


def test_rwkv_hybrid_generate_rnn_equals_parallel():
    model = tiny_rwkv(attn_layers=(1,), n_head=2, attn_window=4, moe_experts=2)
    idx = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.generate(idx, 12, temperature=0, mode='rnn'),
                       model.generate(idx, 12, temperature=0, mode='parallel'))


def naive_attention(x, att, window):
    """Causal attention from its definition, one query at a time, K/V heads repeated by hand (float64)."""
    B, T, C = x.shape
    nh, nkv, hs = att.n_head, att.n_kv_head, att.head_size
    q, k, v = att.c_attn(x).split([C, nkv * hs, nkv * hs], dim=2)
    out = torch.zeros(B, T, C, dtype=x.dtype)
    for t in range(T):
        lo = max(0, t - window + 1) if window else 0
        for h in range(nh):
            kh = h // (nh // nkv)  # query head h reads K/V head h // group
            qt = q[:, t, h * hs:(h + 1) * hs]  # (B, hs)
            ks = k[:, lo:t + 1, kh * hs:(kh + 1) * hs]  # (B, n, hs)
            vs = v[:, lo:t + 1, kh * hs:(kh + 1) * hs]
            w = torch.softmax((ks @ qt[:, :, None])[..., 0] / math.sqrt(hs), dim=-1)  # (B, n)
            out[:, t, h * hs:(h + 1) * hs] = (w[:, :, None] * vs).sum(1)
    return att.c_proj(out)


@pytest.mark.parametrize('n_head,n_kv,window', [(4, 4, 0), (4, 2, 3), (4, 1, 5), (2, 1, 1)])
def test_attention_matches_its_definition(n_head, n_kv, window):
    torch.manual_seed(0)
    att = CausalSelfAttention(16, n_head, n_kv, window).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        got, cache = att(x)
        assert (got - naive_attention(x, att, window)).abs().max() <= 1e-12
    # window 1: a token sees only itself, so its output is its own value projected
    if window == 1:
        v = att.c_attn(x)[..., 16 + 8:]  # the one K/V head's values, read by both query heads
        assert torch.allclose(got, att.c_proj(torch.cat([v, v], dim=-1)), atol=1e-12)


@pytest.mark.parametrize('window,n_kv', [(0, 4), (0, 1), (5, 4), (5, 2)])
def test_kv_cache_bytes_are_the_shapes_arithmetic(window, n_kv):
    """After N tokens a layer's cache is 2 x B x n_kv x S x head_size numbers, S = N, or the window when windowed."""
    L, B, H, C, N = 2, 3, 4, 32, 9
    gpt = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=L, n_head=H, n_embd=C, attn_window=window,
                        attn_kv_heads=n_kv))
    rwkv = RWKV(RWKVConfig(block_size=16, vocab_size=V, n_layer=3, n_embd=C, attn_layers=(0, 2), n_head=H,
                           attn_window=window, attn_kv_heads=n_kv, wkv_backend='torch'))
    S = min(N, window) if window else N
    per_layer = 2 * B * n_kv * S * (C // H) * 4  # fp32
    for model, caches in [(gpt, lambda s: s), (rwkv, lambda s: s.kv)]:
        state = None
        with torch.no_grad():
            for t in range(N):
                _, state = model.step(torch.zeros(B, dtype=torch.long), state)
        got = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in caches(state))
        assert got == 2 * per_layer, type(model).__name__  # two attention layers in each model
        assert all(c.pos == N for c in caches(state))


# ---------------------------------------------------------------------------------------------------------------------
# mixture of experts

class Recorder(torch.nn.Module):
    """An expert that multiplies by its own matrix and remembers how many tokens it was given."""

    def __init__(self, W):
        super().__init__()
        self.W = torch.nn.Parameter(W)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return x @ self.W


@pytest.mark.parametrize('k', [1, 2])
def test_moe_routes_each_token_to_its_top_k_only(k):
    torch.manual_seed(0)
    E, C, N = 4, 6, 10
    experts = [Recorder(torch.randn(C, C, dtype=torch.float64)) for _ in range(E)]
    moe = MoE(C, experts, k).double()
    x = torch.randn(N, C, dtype=torch.float64)
    got = moe(x, x)
    # the definition, token by token: softmax over the router's scores, the k largest, their weights
    want = torch.zeros(N, C, dtype=torch.float64)
    chosen = []
    for n in range(N):
        p = torch.softmax(x[n] @ moe.router.weight.T, -1)
        top = sorted(range(E), key=lambda e: -p[e].item())[:k]
        chosen += top
        w = p[top] / (p[top].sum() if k > 1 else 1)  # Switch (k = 1): the raw probability; Mixtral: renormalised
        want[n] = sum(w[i] * (x[n] @ experts[e].W) for i, e in enumerate(top))
    assert torch.allclose(got, want, atol=1e-12)
    # every expert ran once, on exactly the tokens routed to it (0 rows for an expert nobody chose)
    assert [e.seen for e in experts] == [[chosen.count(i)] for i in range(E)]
    assert sum(sum(e.seen) for e in experts) == k * N  # the work scales with k, not with E


def test_moe_aux_loss_hand_computed():
    """Switch Transformer eq. 4: E * sum_i f_i * P_i, on 4 tokens whose router scores are chosen by hand."""
    moe = MoE(2, [torch.nn.Identity(), torch.nn.Identity()], 1).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))  # scores = x
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    moe(x, x)
    e = math.e
    p0 = [e / (e + 1), 1 / (1 + e), e ** 2 / (e ** 2 + 1), 1 / (1 + e ** 0.5)]  # P(expert 0) per token
    f = [2 / 4, 2 / 4]  # tokens 0 and 2 go to expert 0, tokens 1 and 3 to expert 1
    P = [sum(p0) / 4, sum(1 - p for p in p0) / 4]
    assert moe.aux_loss.item() == pytest.approx(2 * (f[0] * P[0] + f[1] * P[1]), rel=1e-12)


def test_moe_router_learns_from_the_loss_and_the_aux_loss():
    model = tiny_rwkv(moe_experts=4, moe_top_k=1, moe_aux_coef=0.0).train()
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(6))
    _, loss = model(idx, idx)
    loss.backward()
    router = model.blocks[1].ffn.moe.router.weight
    assert router.grad.abs().max() > 0  # through the router probability that scales the expert's output (k = 1)
    model.zero_grad()
    model.config.moe_aux_coef = 1.0
    model(idx, idx)  # the aux loss alone, with its own gradient
    aux = model.moe_aux_loss()
    assert aux.item() >= 1.0 - 1e-9  # E * sum f_i P_i is at least 1 (Cauchy-Schwarz, equality when balanced)
    aux.backward()
    assert router.grad.abs().max() > 0


def copy_into_plain(moe_model, plain_model):
    """The weights of a 1-expert model put where the plain model keeps them."""
    state = {}
    for n, t in moe_model.state_dict().items():
        if '.router.' in n:
            continue
        state[n.replace('ffn.moe.experts.0.', 'ffn.').replace('mlp.experts.0.', 'mlp.')] = t
    plain_model.load_state_dict(state)


@pytest.mark.parametrize('model_type', ['rwkv', 'gpt'])
def test_one_expert_top_1_is_the_plain_feed_forward(model_type):
    make = tiny_rwkv if model_type == 'rwkv' else (lambda **kw: tiny_gpt(**kw).double())
    moe_model, plain = make(moe_experts=1, moe_top_k=1), make(seed=1)
    copy_into_plain(moe_model, plain)
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = logits_of(moe_model, idx), logits_of(plain, idx)
    assert (a - b).abs().max() == 0  # a softmax over one expert is exactly 1


def test_moe_flops_count_the_experts_a_token_visits():
    dense = RWKV(RWKVConfig(block_size=16, vocab_size=V, n_layer=2, n_embd=24, wkv_backend='torch'))
    C, E = 24, 8
    for k in (1, 2):
        moe = RWKV(RWKVConfig(block_size=16, vocab_size=V, n_layer=2, n_embd=24, wkv_backend='torch',
                              moe_experts=E, moe_top_k=k))
        ffn = 4 * C * C * 2 + C * C  # one expert: key, value, receptance
        assert moe.flops_per_token() == dense.flops_per_token() + 6 * 2 * ((k - 1) * ffn + E * C)  # + the routers


# ---------------------------------------------------------------------------------------------------------------------
# dropout

def test_rwkv_dropout_acts_in_training_only():
    model = tiny_rwkv(dropout=0.3)
    idx = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        model.train()
        a, b = model.prefill(idx)[0], model.prefill(idx)[0]
        model.eval()
        c, d = model.prefill(idx)[0], model.prefill(idx)[0]
        plain = tiny_rwkv()
        e = plain.prefill(idx)[0]
    assert (a - b).abs().max() > 1e-3  # masks drawn anew
    assert torch.equal(c, d) and torch.equal(c, e)  # eval: no dropout, the same function as without the option


# ---------------------------------------------------------------------------------------------------------------------
# through train.py and sample.py

VARIANT_ARGS = {  # the options, and one that changes the architecture (a resume must refuse it)
    'rwkv moe': ('rwkv', ['--moe_experts=4', '--moe_top_k=1'], '--moe_experts=5'),
    'rwkv hybrid': ('rwkv', ['--attn_layers=[1]', '--attn_window=8', '--attn_kv_heads=1'], '--attn_layers=[0]'),
    'gpt window gqa moe': ('gpt', ['--attn_window=8', '--attn_kv_heads=1', '--moe_experts=2', '--moe_top_k=2'],
                           '--attn_window=4'),
}


@pytest.mark.slow
@pytest.mark.parametrize('variant', list(VARIANT_ARGS))
def test_train_resume_and_sample(variant, dataset, tmp_path):
    model_type, extra, other = VARIANT_ARGS[variant]
    r = run('train.py', *args(model_type, dataset, tmp_path / 'o', 6, *extra))
    assert r.returncode == 0, r.stderr
    evals = eval_lines(r.stdout)
    assert evals[-1][2] < evals[0][2]  # it learns
    if 'moe' in variant:
        assert all('moe aux' in line for line in r.stdout.splitlines() if line.startswith('iter '))
    # resuming with another architecture is refused; with the same one it continues
    bad = run('train.py', *args(model_type, dataset, tmp_path / 'o', 8, '--init_from=resume', other))
    one_line_error(bad, 'train.py', f"was trained with {other[2:].split('=')[0]}=")
    r = run('train.py', *args(model_type, dataset, tmp_path / 'o', 8, '--init_from=resume'))
    assert r.returncode == 0 and 'resuming from' in r.stdout, r.stderr
    r = run('sample.py', f'--out_dir={tmp_path / "o"}', '--device=cpu', '--num_samples=1', '--max_new_tokens=40',
            '--start=abc')
    assert r.returncode == 0 and len(r.stdout) > 40, r.stderr
    r = run('export.py', f'--out_dir={tmp_path / "o"}', '--format=hf', f'--dest={tmp_path / "hf"}')
    one_line_error(r, 'export.py', 'GPT2LMHeadModel has no' if model_type == 'gpt' else 'RWKV-4 do not')
    assert not (tmp_path / 'hf').exists()


BAD = [
    ('gpt', ['--n_head=4', '--attn_kv_heads=3'], 'attn_kv_heads=3 must divide n_head=4'),
    ('rwkv', ['--attn_layers=[1]', '--n_head=4', '--attn_kv_heads=3'], 'attn_kv_heads=3 must divide n_head=4'),
    ('gpt', ['--moe_experts=2', '--moe_top_k=3'], 'moe_top_k=3 must be between 1 and moe_experts=2'),
    ('rwkv', ['--moe_experts=2', '--moe_top_k=3'], 'moe_top_k=3 must be between 1 and moe_experts=2'),
    ('gpt', ['--attn_window=-1'], 'attn_window=-1'),
    ('rwkv', ['--attn_layers=[2]'], 'attn_layers=[2] must be distinct block indices in 0..1'),
    ('rwkv', ['--attn_layers=[1, 1]'], 'must be distinct block indices'),
    ('rwkv', ['--attn_layers=[-1]'], 'attn_layers'),
    ('rwkv', ['--attn_layers=[1]', '--n_head=5'], 'n_embd=32 must be a multiple of n_head=5'),
    ('gpt', ['--attn_layers=[1]'], 'attn_layers is an rwkv option'),
    ('rwkv', ['--attn_layers=[1]', '--block_size=16', '--ctx_len=32'], 'attention layers (attn_layers) keep a KV'),
    ('rwkv', ['--moe_aux_coef=-1'], 'moe_aux_coef'),
]


@pytest.mark.slow
@pytest.mark.parametrize('model_type,extra,message', BAD, ids=[' '.join(b[1]) for b in BAD])
def test_impossible_settings_are_one_line(model_type, extra, message, dataset, tmp_path):
    r = run('train.py', *args(model_type, dataset, tmp_path / 'o', 2, *extra))
    one_line_error(r, 'train.py', message)


def test_exports_refuse_what_the_formats_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match='GPT2LMHeadModel has no sliding window'):
        tiny_gpt(attn_window=4).save_pretrained(tmp_path / 'g')
    with pytest.raises(ValueError, match="RWKV-LM's and transformers' RWKV-4 do not"):
        tiny_rwkv(moe_experts=2).save_pth(tmp_path / 'r.pth')
    with pytest.raises(ValueError, match='attention layers'):
        tiny_rwkv(attn_layers=(0,), n_head=2).save_pretrained(tmp_path / 'r')


@pytest.mark.slow
def test_tinystories_configs_run_on_a_local_text_file(tmp_path):
    """The TinyStories configs (GPU-sized, and the CPU one on a local file) with their sizes shrunk: every key they set
    exists and their models train; the data comes from a local .txt through data/tinystories/prepare.py."""
    words = ['once', 'upon', 'a', 'time', 'there', 'was', 'cat', 'dog', 'happy', 'sad', 'the', 'end']
    rng = torch.Generator().manual_seed(0)
    stories = [' '.join(words[i] for i in torch.randint(0, len(words), (40,), generator=rng)) for _ in range(300)]
    (tmp_path / 'stories.txt').write_text('\n'.join(stories) + '\n')
    word_tokenizer(tmp_path / 'tok.json', words)
    data = tmp_path / 'ts'
    r = run('data/tinystories/prepare.py', f'--source={tmp_path / "stories.txt"}',
            f'--tokenizer={tmp_path / "tok.json"}',
            f'--out_dir={data}', '--val_every=10', '--num_proc=1')
    assert r.returncode == 0, r.stderr[-2000:]
    small = [f'--data_dir={data}', '--device=cpu', '--n_embd=32', '--block_size=32', '--batch_size=4',
             '--gradient_accumulation_steps=1', '--max_iters=4', '--eval_interval=4', '--eval_iters=2',
             '--compile=False', '--warmup_iters=1', '--log_interval=1']
    for config in ('rwkv', 'gpt', 'hybrid', 'cpu'):
        r = run('train.py', f'config/train_tinystories_{config}.py', *small, f'--out_dir={tmp_path / config}')
        assert r.returncode == 0, (config, r.stderr[-2000:])
        evals = eval_lines(r.stdout)
        assert evals[-1][2] < evals[0][2], config
