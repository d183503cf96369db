"""Checkpoints in and out, proven against the libraries that define each format: transformers (RwkvForCausalLM,
GPT2LMHeadModel) and the rwkv pip package (official RWKV-4 .pth). Tiny random models with odd sizes; no network."""
import os

import pytest
import torch

from model_gpt import GPT
from model_rwkv import RWKV
from helpers import official_pth, tiny_gpt, tiny_rwkv
from interop import plain_state_dict

transformers = pytest.importorskip('transformers')
V, T = 37, 11


def hf_rwkv(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.RwkvConfig(vocab_size=V, context_length=16, hidden_size=12, num_hidden_layers=3,
                                  attention_hidden_size=12, intermediate_size=40, rescale_every=0)
    model = transformers.RwkvForCausalLM(cfg)
    with torch.no_grad():  # transformers' init leaves some matrices tiny: randomise everything
        for n, p in model.named_parameters():
            if 'time_' not in n:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def hf_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=12, n_layer=3, n_head=3)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(seed=1):
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_rwkv_from_transformers_directory(tmp_path):
    ref = hf_rwkv()
    ref.save_pretrained(tmp_path)
    ours = RWKV.from_pretrained(tmp_path, wkv_backend='torch').eval()
    idx = tokens()
    with torch.no_grad():
        want = ref(idx).logits
        got, _ = ours.prefill(idx)
        steps, state = [], None
        for t in range(T):
            logits, state = ours.step(idx[:, t], state)
            steps.append(logits)
    assert max_diff(got, want) <= 1e-4  # our parallel mode
    assert max_diff(torch.stack(steps, 1), want) <= 1e-4  # our RNN mode


def test_rwkv_export_loads_in_transformers(tmp_path):
    ours = tiny_rwkv(torch.float32)
    ours.save_pretrained(tmp_path)
    ref = transformers.RwkvForCausalLM.from_pretrained(tmp_path).eval()
    idx = tokens(2)
    with torch.no_grad():
        got, _ = ours.prefill(idx)
        want = ref(idx).logits
    assert max_diff(got, want) <= 1e-4


def test_gpt_from_transformers_directory(tmp_path):
    ref = hf_gpt2()
    ref.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    idx = tokens(3)
    with torch.no_grad():
        want = ref(idx).logits
        got, _ = ours.prefill(idx)
    assert max_diff(got, want) <= 1e-4
    assert ours.lm_head.weight is ours.transformer.wte.weight


@pytest.mark.parametrize('bias', [True, False])
def test_gpt_export_loads_in_transformers(tmp_path, bias):
    ours = tiny_gpt(bias=bias, n_head=3)
    ours.save_pretrained(tmp_path)
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = tokens(4)
    with torch.no_grad():
        got, _ = ours.prefill(idx)
        want = ref(idx).logits
    assert max_diff(got, want) <= 1e-4
    # and back: greedy generation is the same token for token
    again = GPT.from_pretrained(tmp_path).eval()
    assert torch.equal(again.generate(idx[:, :3], 8, temperature=0), ours.generate(idx[:, :3], 8, temperature=0))


def rwkv_pip():
    os.environ.setdefault('RWKV_JIT_ON', '0')
    os.environ.setdefault('RWKV_CUDA_ON', '0')
    return pytest.importorskip('rwkv.model')


def test_pth_export_runs_in_rwkv_pip_package(tmp_path):
    ours = tiny_rwkv(torch.float32)
    ours.save_pth(tmp_path / 'tiny.pth')
    ref = rwkv_pip().RWKV(model=str(tmp_path / 'tiny'), strategy='cpu fp32', verbose=False)
    idx = tokens(5)[0].tolist()
    state, ref_logits = None, []
    for tok in idx:  # the package's RNN mode, one token at a time
        out, state = ref.forward([tok], state)
        ref_logits.append(out)
    with torch.no_grad():
        got, _ = ours.prefill(torch.tensor([idx]))
    assert max_diff(got[0], torch.stack(ref_logits)) <= 1e-4
    # and its parallel mode over the whole sequence gives the last logits
    out, _ = ref.forward(idx, None)
    assert max_diff(got[0, -1], out) <= 1e-4


def test_official_pth_loads_and_matches_rwkv_pip(tmp_path):
    official_pth('4', tmp_path / 'RWKV-4-Pile-tiny.pth', C=12, V=V, dtype=torch.bfloat16)  # as the released files
    ours = RWKV.from_pretrained(tmp_path / 'RWKV-4-Pile-tiny.pth', wkv_backend='torch').eval()
    assert (ours.config.n_layer, ours.config.n_embd, ours.config.dim_ffn, ours.config.vocab_size) == (3, 12, 40, V)
    # the oracle: the rwkv pip package (its own loader, its own RNN) on the same weights upcast to fp32 (given the bf16
    # file it layer-norms the embedding in bf16 at load time, 7e-3 away from exact)
    torch.save({k: v.float() for k, v in torch.load(tmp_path / 'RWKV-4-Pile-tiny.pth').items()}, tmp_path / 'fp32.pth')
    ref = rwkv_pip().RWKV(model=str(tmp_path / 'fp32'), strategy='cpu fp32', verbose=False)
    idx = tokens(6)[0].tolist()
    state, want = None, []
    for tok in idx:
        out, state = ref.forward([tok], state)
        want.append(out)
    with torch.no_grad():
        got, _ = ours.prefill(torch.tensor([idx]))
    assert max_diff(got[0], torch.stack(want)) <= 1e-4


def test_rescale_for_fp16_is_the_same_function():
    model = tiny_rwkv(torch.float64, n_layer=5)
    idx = tokens(7)
    with torch.no_grad():
        want, _ = model.prefill(idx)
        plain = plain_state_dict(model)
        model.rescale_for_fp16(every=2)
        got, _ = model.prefill(idx)
        rnn, state = [], None
        for t in range(T):
            logits, state = model.step(idx[:, t], state)
            rnn.append(logits)
    assert model.blocks[4].att.output.weight.abs().max() < plain['blocks.4.att.output.weight'].abs().max()
    # LayerNorm's epsilon is the only thing that sees the scale
    assert max_diff(got, want) <= 1e-4 and max_diff(torch.stack(rnn, 1), want) <= 1e-4
    for k, v in plain_state_dict(model).items():  # export undoes the rescaling
        torch.testing.assert_close(v, plain[k].float())


@pytest.mark.parametrize('content,fragment', [
    ({'emb.weight': torch.zeros(3, 4)}, 'not an RWKV checkpoint'),
    ({'emb.weight': torch.zeros(3, 4), 'blocks.0.ln1.weight': torch.zeros(4)},
     'incomplete RWKV-4 checkpoint: it has no blocks.0.ffn.key.weight'),
    ({'emb.weight': torch.zeros(3, 4), 'blocks.0.ln1.weight': torch.zeros(4),
      'blocks.0.ffn.key.weight': torch.zeros(8, 4), 'blocks.0.att.r_k': torch.zeros(2, 2)},
     'incomplete RWKV-7 checkpoint: it has no blocks.0.att.w1'),  # an RWKV-7 key without the rest
])
def test_foreign_pth_is_a_clear_error(tmp_path, content, fragment):
    torch.save(content, tmp_path / 'x.pth')
    with pytest.raises(ValueError, match=fragment):
        RWKV.from_pretrained(tmp_path / 'x.pth')


def test_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match='neither a local path nor a known model'):
        RWKV.from_pretrained('RWKV/rwkv-9-1m-pile')
    with pytest.raises(ValueError, match='neither a local path nor a known model'):
        GPT.from_pretrained(str(tmp_path / 'nope'))
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='is not a model file nanoRWKV reads'):
        RWKV.from_pretrained(tmp_path / 'junk.pth')
    hf_gpt2().save_pretrained(tmp_path / 'gpt')
    with pytest.raises(ValueError, match="is a 'gpt2' model, not RWKV"):
        RWKV.from_pretrained(tmp_path / 'gpt')


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 0.25), (torch.float16, 0.04)])  # measured 0.13, 0.019
def test_rwkv_half_precision_inference(dtype, tol):
    # 12 layers: with rescale_for_fp16(6) the activations halve after layers 6 and 12
    model = tiny_rwkv(torch.float32, n_layer=12)
    idx = tokens(9)
    with torch.no_grad():
        want, _ = model.prefill(idx)
        if dtype == torch.float16:
            model.rescale_for_fp16(6)
        half = model.to(dtype)
        got, state = half.prefill(idx)
        step, _ = half.step(idx[:, 0], None)
    assert got.dtype == dtype and all(s.dtype == torch.float32 for s in state)  # the state stays fp32
    assert torch.isfinite(got).all() and max_diff(got.float(), want) <= tol * want.abs().max().item()
    assert max_diff(step.float(), want[:, 0]) <= tol * want.abs().max().item()


@pytest.mark.parametrize('make', [tiny_rwkv, tiny_gpt])
def test_exported_directory_has_the_tokenizer_transformers_loads(make, tmp_path):
    # a char model's export: AutoTokenizer reads its tokenizer and encodes / decodes as the model was trained;
    # config.json names no special token the vocabulary lacks; transformers generates from it with that tokenizer
    import logging
    import interop
    from tokenizer import get_codec
    text = 'Hello, "world"!\n  é~ {x}\n'
    itos = sorted(set(text))
    itos += [c for c in map(chr, range(ord('A'), ord('z'))) if c not in itos][:V - len(itos)]
    spec = {'tokenizer': 'char', 'itos': itos}
    model = make(vocab_size=V) if make is tiny_gpt else make(torch.float32, vocab_size=V)
    interop.save_pretrained(model, tmp_path, spec)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger('transformers').addHandler(handler)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    finally:
        logging.getLogger('transformers').removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]
    encode, decode, _ = get_codec(spec)
    assert tok(text)['input_ids'] == encode(text) and tok.decode(encode(text)) == text
    assert hf.config.bos_token_id is None and hf.config.eos_token_id is None
    with torch.no_grad():
        ids = torch.tensor([encode('Hello')])
        want = model.generate(ids, 6, temperature=0)
        got = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got.tolist() == want.tolist()
