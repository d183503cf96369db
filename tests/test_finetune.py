"""Fine-tuning: state tuning of RWKV-5/6/7 (each layer's initial WKV state learned, the weights frozen). Its
gradient against one full-length backward (float64, also through segments), the state file against the rwkv pip
package started from it, train.py / export.py / sample.py end to end, and the refusals."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import interop
from bptt import forward_backward
from helpers import args, eval_lines, one_line_error, run, tiny_gpt, tiny_rwkv
from model_rwkv import RWKVConfig

VERSIONS = ['5', '5.1', '6', '7']


def tuned(version, dtype=torch.float64, seed=0):
    """A tiny random model of `version` (tiny_rwkv's weights of that seed) with a random learned initial state."""
    model = tiny_rwkv(dtype, seed=seed, version=version, head_size=4, state_tuning=True)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            block.att.time_state.copy_(torch.randn(block.att.time_state.shape, generator=g))
    return model


def tokens(B, T, V=37, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('version', VERSIONS)
def test_state_gradient_is_the_full_length_gradient_and_reaches_only_the_state(version):
    # what train.py --finetune=state computes, whole or in segments of 8 (bptt.py), against autograd through one
    # full-length forward; with the weights frozen nothing else gets a gradient
    model = tuned(version).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith('.att.time_state'))
    idx, targets = tokens(3, 29), tokens(3, 29, seed=1)
    _, loss = model(idx, targets)
    want = torch.autograd.grad(loss, [b.att.time_state for b in model.blocks])
    assert all(g.abs().max() > 0 for g in want)
    for block_size in (29, 8):
        model.zero_grad(set_to_none=True)
        forward_backward(model, model.initial_state(3), idx, targets, block_size=block_size)
        for block, w in zip(model.blocks, want):
            err = ((block.att.time_state.grad - w).abs().max() / w.abs().max()).item()
            assert err <= 1e-10, (block_size, err)
        assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith('.att.time_state'))


@pytest.mark.parametrize('version', ['5', '7'])
def test_a_zero_state_is_the_base_model_and_the_state_file_round_trips(version, tmp_path):
    base = tiny_rwkv(torch.float64, version=version, head_size=4).eval()
    idx = tokens(2, 11)
    with torch.no_grad():
        want = base.prefill(idx)[0]
        base.enable_state_tuning()  # zeros: the same function
        assert torch.equal(base.prefill(idx)[0], want)
        model = tuned(version).eval()
        interop.save_state(model, tmp_path / 'state.pth')
        assert sorted(torch.load(tmp_path / 'state.pth')) == [f'blocks.{i}.att.time_state' for i in range(3)]
        other = tuned(version).eval()  # the same weights (seed 0), its own state overwritten by the file's
        for b in other.blocks:
            b.att.time_state.zero_()
        interop.load_state(other, tmp_path / 'state.pth')
        assert torch.equal(other.prefill(idx)[0], model.prefill(idx)[0])
        assert torch.equal(model.generate(idx, 5, temperature=0), other.generate(idx, 5, temperature=0))
        # a .pth of a state-tuned model: RWKV-LM's key set, the state beside it, both read back together
        interop.save_pth(model, tmp_path / 'm.pth', {'tokenizer': 'char', 'itos': [chr(65 + i) for i in range(37)]})
        assert not any('time_state' in k for k in torch.load(tmp_path / 'm.pth'))
        assert (tmp_path / 'm.state.pth').is_file()
        again = interop.load_pretrained(str(tmp_path / 'm.pth'), wkv_backend='torch')[0].double().eval()
        want = model.prefill(idx)[0]  # a .pth holds fp32: the same function to fp32 rounding
        assert ((again.prefill(idx)[0] - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_state_files_and_options_that_cannot_work_are_one_line(tmp_path):
    model = tuned('7').eval()
    interop.save_state(model, tmp_path / 'state.pth')
    with pytest.raises(ValueError, match=r"has shape \(3, 4, 4\), this model's heads need \(2, 6, 6\)"):
        interop.load_state(tiny_rwkv(torch.float64, version='7', head_size=6), tmp_path / 'state.pth')
    with pytest.raises(ValueError, match=r"not a state of this 2-layer model"):
        interop.load_state(tiny_rwkv(torch.float64, version='7', head_size=4, n_layer=2), tmp_path / 'state.pth')
    with pytest.raises(ValueError, match='an initial state for RWKV-5/6/7; this model is not one'):
        interop.load_state(tiny_rwkv(torch.float64), tmp_path / 'state.pth')
    with pytest.raises(ValueError, match='has no learned initial state'):
        interop.save_state(tiny_rwkv(torch.float64, version='7', head_size=4), tmp_path / 'x.pth')
    with pytest.raises(ValueError, match="RWKV-4's state is running sums"):
        RWKVConfig(state_tuning=True)


PIP = '''
import os, sys, torch
version, idx, pth, state_file, out = sys.argv[1], [int(t) for t in sys.argv[2].split(',')], *sys.argv[3:]
os.environ.update(RWKV_JIT_ON='0', RWKV_CUDA_ON='0', RWKV_V7_ON='1' if version == '7' else '0')
import rwkv.model
model = rwkv.model.RWKV(model=pth[:-len('.pth')], strategy='cpu fp32', **({} if version == '7' else {'verbose': False}))
learned = torch.load(state_file)
C = model.args.n_embd
state = []
for i in range(model.args.n_layer):  # the package's state per layer: x_att, the matrix, x_ffn
    state += [torch.zeros(C), learned[f'blocks.{i}.att.time_state'].clone(), torch.zeros(C)]
logits, _ = model.forward(idx, state)
torch.save(logits, out)
'''


@pytest.mark.slow
@pytest.mark.parametrize('version', VERSIONS)
def test_rwkv_pip_package_started_from_our_state_file_agrees(version, tmp_path):
    # the state file's layout is the rwkv package's: its model, started from our learned state, scores a prompt as
    # our state-tuned model does
    model = tuned(version, torch.float32).eval()
    base = tiny_rwkv(torch.float32, version=version, head_size=4).eval()  # seed 0: the same weights, no state
    base.save_pth(tmp_path / 'base.pth')
    interop.save_state(model, tmp_path / 'state.pth')
    idx = tokens(1, 2)[0].tolist()  # short: random tiny models forget their start within a few tokens
    r = subprocess.run([sys.executable, '-c', PIP, version, ','.join(map(str, idx)), str(tmp_path / 'base.pth'),
                        str(tmp_path / 'state.pth'), str(tmp_path / 'logits.pt')], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    want = torch.load(tmp_path / 'logits.pt')
    with torch.no_grad():
        got = model.prefill(torch.tensor([idx]))[0][0, -1]
        untuned = base.prefill(torch.tensor([idx]))[0][0, -1]
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
    assert (untuned - want).abs().max() > 1e-2  # the state matters: without it the logits differ


def markov_dataset(path, seed, n=40000):
    """A char dataset of a random Markov chain over the conftest dataset's 10 characters (another seed, another
    chain: a new task for a model trained on the first)."""
    rng = np.random.default_rng(seed)
    itos = list('abcdefgh \n')
    trans = rng.dirichlet(np.full(len(itos), 0.2), size=len(itos))
    ids = [0]
    for _ in range(n):
        ids.append(rng.choice(len(itos), p=trans[ids[-1]]))
    ids = np.array(ids, dtype=np.uint16)
    path.mkdir(parents=True, exist_ok=True)
    ids[:36000].tofile(path / 'train.bin')
    ids[36000:].tofile(path / 'val.bin')
    import json
    (path / 'meta.json').write_text(json.dumps({'tokenizer': 'char', 'vocab_size': len(itos), 'itos': itos}))
    return path


@pytest.mark.slow
def test_train_py_state_tuning_end_to_end(dataset, tmp_path):
    # a base RWKV-7 trained on one chain, exported; state tuning on another chain lowers the val loss with every
    # weight unchanged bit for bit; its exported state runs the base .pth to the checkpoint's own text; resume keeps
    # finetune='state'; the refusals are one line
    v7 = ['--rwkv_version=7', '--head_size=8']
    r = run('train.py', *args('rwkv', dataset, tmp_path / 'base', 40, *v7))
    assert r.returncode == 0, r.stderr[-2000:]
    assert run('export.py', f'--out_dir={tmp_path / "base"}', '--format=pth',
               f'--dest={tmp_path / "base.pth"}').returncode == 0
    task = markov_dataset(tmp_path / 'task', seed=7)
    tune = [*args('rwkv', task, tmp_path / 'tuned', 30, *v7, '--eval_interval=15', '--eval_iters=10'),
            f'--init_from={tmp_path / "base.pth"}', '--finetune=state', '--learning_rate=0.05', '--warmup_iters=0']
    r = run('train.py', *tune)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'state tuning: 512 parameters trained' in r.stdout  # 2 layers x 4 heads x 8 x 8
    evals = eval_lines(r.stdout)
    assert [s for s, _, _ in evals] == [0, 15, 30] and evals[-1][2] < evals[0][2] - 0.01, evals
    base = torch.load(tmp_path / 'base' / 'ckpt.pt', weights_only=True)['model']
    after = torch.load(tmp_path / 'tuned' / 'ckpt.pt', weights_only=True)
    assert after['model_args']['state_tuning'] and after['config']['finetune'] == 'state'
    assert all(torch.equal(after['model'][k], v) for k, v in base.items())
    # the state alone, on the base .pth: the same text as the checkpoint
    assert run('export.py', f'--out_dir={tmp_path / "tuned"}', '--format=state',
               f'--dest={tmp_path / "state.pth"}').returncode == 0
    sample = ['--start=abc', '--max_new_tokens=40', '--temperature=0', '--device=cpu']
    a = run('sample.py', f'--out_dir={tmp_path / "tuned"}', *sample)
    b = run('sample.py', f'--init_from={tmp_path / "base.pth"}', f'--init_state={tmp_path / "state.pth"}', *sample)
    plain = run('sample.py', f'--init_from={tmp_path / "base.pth"}', *sample)
    assert a.returncode == b.returncode == plain.returncode == 0, a.stderr + b.stderr + plain.stderr
    assert a.stdout == b.stdout
    # resume: the checkpoint's finetune is kept; another one given is refused
    r = run('train.py', *args('rwkv', task, tmp_path / 'tuned', 32, *v7), '--init_from=resume')
    assert r.returncode == 0 and 'state tuning:' in r.stdout, r.stderr[-2000:]
    one_line_error(run('train.py', *args('rwkv', task, tmp_path / 'tuned', 34, *v7), '--init_from=resume',
                       '--finetune=full'), 'train.py', "was trained with finetune='state'")
    # the checkpoint as one .pth: the base weights, the learned state beside it (x.state.pth), found by sample.py
    assert run('export.py', f'--out_dir={tmp_path / "tuned"}', '--format=pth',
               f'--dest={tmp_path / "x.pth"}').returncode == 0
    assert run('sample.py', f'--init_from={tmp_path / "x.pth"}', *sample).stdout == a.stdout
    one_line_error(run('train.py', *args('gpt', task, tmp_path / 'g', 2), '--finetune=state'), 'train.py',
                   "finetune='state' learns the initial matrix state of RWKV-5, 5.1, 6 or 7; this model is a GPT")
    one_line_error(run('sample.py', f'--init_from={tmp_path / "base.pth"}', f'--init_state={tmp_path / "base.pth"}',
                       *sample), 'sample.py', 'is not a state of this 2-layer model')


# ---------------------------------------------------------------------------------------------------------------------
# LoRA

def with_random_adapters(model, seed=3, **kw):
    """model with adapters (lora.add_lora) whose B is random too, so that they change the function."""
    from lora import LoRALinear, add_lora
    add_lora(model, **{'r': 4, 'alpha': 8.0, **kw})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=g))
    return model


MAKERS = {'rwkv4': lambda: tiny_rwkv(torch.float64, n_embd=16), 'rwkv7': lambda: tuned_free('7'),
          'gpt': lambda: tiny_gpt(vocab_size=37, block_size=32).double()}


def tuned_free(version):
    return tiny_rwkv(torch.float64, version=version, head_size=4)


@pytest.mark.parametrize('kind', MAKERS)
def test_lora_starts_as_the_base_trains_only_adapters_and_merges_exactly(kind):
    import copy
    from lora import add_lora, merge_lora
    base = MAKERS[kind]().eval()
    model = copy.deepcopy(base)
    names = add_lora(model, r=4, alpha=8.0)
    assert names and all('head' not in n for n in names)
    idx = tokens(2, 11)
    with torch.no_grad():
        assert torch.equal(model(idx, idx)[0], base(idx, idx)[0])  # B = 0: the base model exactly
    model = with_random_adapters(copy.deepcopy(base))
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.endswith(('lora_A', 'lora_B')) for n in trained)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    model.eval()
    with torch.no_grad():
        want = model(idx, idx)[0]
        merged = merge_lora(copy.deepcopy(model))
        assert not any('lora' in n for n, _ in merged.named_parameters())
        assert set(merged.state_dict()) == set(base.state_dict())
        got = merged(idx, idx)[0]
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-10  # float64
    assert (want - base(idx, idx)[0]).abs().max() > 1e-3


def test_lora_refusals_are_one_line():
    from lora import add_lora
    with pytest.raises(ValueError, match='LoRA trains on the float model'):
        add_lora(tiny_rwkv(torch.float32, n_embd=32).quantize_('int8'), r=4, alpha=8.0)
    with pytest.raises(ValueError, match=r"lora_targets=\['nothing'\] match none"):
        add_lora(tiny_rwkv(torch.float32), r=4, alpha=8.0, targets=['nothing'])
    assert len(__import__('lora').lora_names(tiny_rwkv(torch.float32), ['att.key'])) == 3  # one per layer


MERGED_PIP = '''
import os, sys, torch
version, idx, pth, out = sys.argv[1], [int(t) for t in sys.argv[2].split(',')], sys.argv[3], sys.argv[4]
os.environ.update(RWKV_JIT_ON='0', RWKV_CUDA_ON='0', RWKV_V7_ON='1' if version == '7' else '0')
import rwkv.model
model = rwkv.model.RWKV(model=pth[:-len('.pth')], strategy='cpu fp32', **({} if version == '7' else {'verbose': False}))
torch.save(model.forward(idx, None)[0], out)
'''


@pytest.mark.slow
@pytest.mark.parametrize('version', ['4', '5', '6', '7'])
def test_rwkv_pip_package_reads_the_merged_lora_pth(version, tmp_path):
    # adapters merged and written as RWKV-LM's .pth: the rwkv pip package scores a prompt as our unmerged model does
    from lora import merge_lora
    kw = {} if version == '4' else {'version': version, 'head_size': 4}
    model = with_random_adapters(tiny_rwkv(torch.float32, **kw)).eval()
    idx = tokens(1, 13)[0].tolist()
    with torch.no_grad():
        want = model.prefill(torch.tensor([idx]))[0][0, -1]
    merge_lora(model).save_pth(tmp_path / 'merged.pth')
    r = subprocess.run([sys.executable, '-c', MERGED_PIP, version, ','.join(map(str, idx)),
                        str(tmp_path / 'merged.pth'), str(tmp_path / 'logits.pt')], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / 'logits.pt')
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


@pytest.mark.slow
def test_train_py_lora_end_to_end(dataset, tmp_path):
    # LoRA from an exported base .pth on another chain: the val loss falls, only the adapters change (every base
    # weight bit for bit), resume rebuilds the adapters, and the exported .pth (adapters merged) samples the
    # checkpoint's own text
    r = run('train.py', *args('rwkv', dataset, tmp_path / 'base', 40))
    assert r.returncode == 0, r.stderr[-2000:]
    assert run('export.py', f'--out_dir={tmp_path / "base"}', '--format=pth',
               f'--dest={tmp_path / "base.pth"}').returncode == 0
    task = markov_dataset(tmp_path / 'task', seed=7)
    tune = [*args('rwkv', task, tmp_path / 'lora', 30, '--eval_interval=15', '--eval_iters=10'),
            f'--init_from={tmp_path / "base.pth"}', '--finetune=lora', '--lora_r=4', '--warmup_iters=0']
    r = run('train.py', *tune)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'LoRA r=4 alpha=16:' in r.stdout
    evals = eval_lines(r.stdout)
    assert [s for s, _, _ in evals] == [0, 15, 30] and evals[-1][2] < evals[0][2] - 0.05, evals
    base = torch.load(tmp_path / 'base' / 'ckpt.pt', weights_only=True)['model']
    after = torch.load(tmp_path / 'lora' / 'ckpt.pt', weights_only=True)
    assert after['lora'] == {'r': 4, 'alpha': 16.0, 'dropout': 0.0, 'targets': []}
    for k, v in after['model'].items():
        plain = k.replace('.base.', '.')
        assert k.endswith(('lora_A', 'lora_B')) or torch.equal(v, base[plain]), k
    r = run('train.py', *args('rwkv', task, tmp_path / 'lora', 32), '--init_from=resume')
    assert r.returncode == 0 and 'LoRA r=4' in r.stdout, r.stderr[-2000:]
    assert run('export.py', f'--out_dir={tmp_path / "lora"}', '--format=pth',
               f'--dest={tmp_path / "merged.pth"}').returncode == 0
    sample = ['--start=abc', '--max_new_tokens=40', '--temperature=0', '--device=cpu']
    a = run('sample.py', f'--out_dir={tmp_path / "lora"}', *sample)
    b = run('sample.py', f'--init_from={tmp_path / "merged.pth"}', *sample)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout


def test_lora_and_state_tuning_together_train_both_and_nothing_else():
    from types import SimpleNamespace
    from train import apply_finetune
    model = tuned_free('7')
    cfg = SimpleNamespace(finetune='lora+state', fsdp=False, model_type='rwkv', lora_r=4, lora_alpha=8.0,
                          lora_dropout=0.0, lora_targets=[])
    lora = apply_finetune(model, cfg, None, set(), master=False)
    assert lora == {'r': 4, 'alpha': 8.0, 'dropout': 0.0, 'targets': []}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(n.endswith('.att.time_state') for n in trained) == 3
    assert sum(n.endswith('.lora_A') for n in trained) == sum(n.endswith('.lora_B') for n in trained) > 0
    assert all(n.endswith(('.lora_A', '.lora_B', '.att.time_state')) for n in trained)


# ---------------------------------------------------------------------------------------------------------------------
# instruction data: a loss mask

@pytest.mark.parametrize('kind', ['rwkv7', 'rwkv4', 'gpt'])
def test_masked_targets_count_for_nothing_whole_and_in_segments(kind):
    # targets of -1 (what train.py makes of a 0 in the mask) are left out of the loss: the loss and every gradient
    # equal the cross-entropy over the unmasked positions alone, computed from the logits; the same through
    # segments of 8 (bptt.py) for RWKV. Eval mode: L2Wrap, a regulariser on every position's logits, is off
    model = MAKERS[kind]().eval()
    idx, targets = tokens(3, 29), tokens(3, 29, seed=1)
    keep = torch.rand(3, 29, generator=torch.Generator().manual_seed(2)) < 0.6
    masked = targets.masked_fill(~keep, -1)
    logits, _ = model(idx, targets)
    want_loss = F.cross_entropy(logits[keep], targets[keep])
    want = torch.autograd.grad(want_loss, list(model.parameters()), allow_unused=True)
    _, loss = model(idx, masked)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-12)
    got = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None) and (g is None or torch.allclose(g, w, rtol=1e-10, atol=1e-13))
    if kind.startswith('rwkv'):
        model.zero_grad(set_to_none=True)
        seg = forward_backward(model, model.initial_state(3), idx, masked, block_size=8)
        assert seg.item() == pytest.approx(want_loss.item(), rel=1e-12)
        for p, w in zip(model.parameters(), want):
            assert w is None or torch.allclose(p.grad, w, rtol=1e-10, atol=1e-13)
    _, none = model(idx, torch.full_like(targets, -1))  # nothing to learn: zero, not nan
    assert none.item() == 0.0


def char_tokenizer_json(path, chars):
    """A tokenizer.json of one token per character plus <|endoftext|> (tokenizer.hf_tokenizer_json's char form)."""
    from tokenizers import Tokenizer
    from tokenizer import hf_tokenizer_json
    tok = Tokenizer.from_str(hf_tokenizer_json({'tokenizer': 'char', 'itos': list(chars)})[0])
    tok.add_special_tokens(['<|endoftext|>'])
    tok.save(str(path))
    return path


@pytest.mark.slow
def test_instruct_data_masks_the_prompts_and_train_py_reads_it(tmp_path):
    # prompt tokens masked, response and its end learned, 'text' records learned whole, the split by val_every;
    # train.py trains on it (whole and in segments); a mask of the wrong length and bad records are one line
    import json
    chars = 'abcdefgh :\n'
    tok = char_tokenizer_json(tmp_path / 'tok.json', chars)
    eot = len(chars)
    records = [{'prompt': 'ab: ', 'response': 'cd'}, {'text': 'hh'}, {'prompt': 'e: ', 'response': 'fgh'}] * 30
    (tmp_path / 'd.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    out = tmp_path / 'data'
    r = run('data/instruct/prepare.py', f'--source={tmp_path / "d.jsonl"}', f'--tokenizer={tok}', f'--out_dir={out}',
            '--val_every=3')
    assert r.returncode == 0, r.stderr[-2000:]
    ids = {s: np.fromfile(out / f'{s}.bin', dtype=np.uint16).tolist() for s in ('train', 'val')}
    mask = {s: np.fromfile(out / f'{s}.mask.bin', dtype=np.uint8).tolist() for s in ('train', 'val')}
    enc = {c: i for i, c in enumerate(chars)}
    one = [enc[c] for c in 'ab: cd'] + [eot]
    assert ids['val'][:7] == one and mask['val'][:7] == [0, 0, 0, 0, 1, 1, 1]  # record 0: val
    assert ids['train'][:3] == [enc['h'], enc['h'], eot] and mask['train'][:3] == [1, 1, 1]  # record 1: text
    assert mask['train'][3:10] == [0, 0, 0, 1, 1, 1, 1]  # record 2: 'e: ' masked, 'fgh' + eot learned
    assert len(ids['train']) == len(mask['train']) and json.loads((out / 'meta.json').read_text())['mask']
    common = ['--model_type=rwkv', f'--data_dir={out}', '--device=cpu', '--n_layer=2', '--n_embd=32',
              '--block_size=16', '--batch_size=4', '--max_iters=2', '--eval_iters=1', '--wkv_backend=torch',
              '--peak_flops=1e11']
    r = run('train.py', *common, f'--out_dir={tmp_path / "o"}')
    assert r.returncode == 0, r.stderr[-2000:]
    r = run('train.py', *common, f'--out_dir={tmp_path / "o2"}', '--block_size=8', '--ctx_len=16')
    assert r.returncode == 0, r.stderr[-2000:]
    (out / 'val.mask.bin').write_bytes((out / 'val.mask.bin').read_bytes()[:-3])
    one_line_error(run('train.py', *common, f'--out_dir={tmp_path / "o3"}'), 'train.py',
                   'val.mask.bin has')
    (tmp_path / 'bad.jsonl').write_text(json.dumps({'question': 'x'}) + '\n')
    one_line_error(run('data/instruct/prepare.py', f'--source={tmp_path / "bad.jsonl"}', f'--tokenizer={tok}',
                       f'--out_dir={tmp_path / "bad"}'), 'prepare.py', "record 0 has neither 'prompt' and 'response'")
