"""train.py and sample.py end to end, as a user runs them (subprocesses), on a tiny generated dataset."""
import re
import subprocess
import sys

import pytest
import torch

from checkpoint import model_from_checkpoint
from helpers import REPO, eval_lines, one_line_error, run, tiny_args

pytestmark = pytest.mark.slow  # every test here runs the scripts in subprocesses


@pytest.fixture(scope='module', params=['gpt', 'rwkv'])
def trained(request, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp(f'out-{request.param}')
    r = run('train.py', *tiny_args(request.param, dataset, out, 60))
    assert r.returncode == 0, r.stderr
    return request.param, out, r.stdout


def test_train_loss_goes_down(trained):
    model_type, out, stdout = trained
    evals = eval_lines(stdout)
    assert [s for s, _, _ in evals] == [0, 30, 60]
    assert evals[-1][2] < evals[0][2] - 0.4, evals  # val loss from ~ln(10) = 2.3 down towards the chain's entropy
    assert re.search(r'iter 50/60: loss [\d.]+, time [\d.]+ms, tok/s [\d,]+, mfu [\d.]+%, eta \d+s', stdout)
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['model_type'] == model_type and ckpt['iter_num'] == 60  # saved at the last eval: 0..59 are done
    assert sorted(f.name for f in out.glob('ckpt*.pt')) == ['ckpt-00000030.pt', 'ckpt-00000060.pt', 'ckpt.pt']
    assert (out / 'ckpt.pt').read_bytes() == (out / 'ckpt-00000060.pt').read_bytes()
    assert ckpt['config']['model_type'] == model_type and ckpt['tokenizer']['tokenizer'] == 'char'
    assert not list(out.glob('*.tmp'))  # the atomic write left nothing behind


def test_resume_continues_from_saved_iteration(trained, dataset, tmp_path):
    model_type, out, _ = trained
    resumed = tmp_path / 'out'
    resumed.mkdir()
    (resumed / 'ckpt.pt').write_bytes((out / 'ckpt.pt').read_bytes())  # ckpt.pt alone is enough to resume
    before = torch.load(resumed / 'ckpt.pt', weights_only=True)
    r = run('train.py', *tiny_args(model_type, dataset, resumed, 90), '--init_from=resume')
    assert r.returncode == 0, r.stderr
    assert [s for s, _, _ in eval_lines(r.stdout)] == [90]
    assert f'resuming from {resumed / "ckpt.pt"} at iteration 60' in r.stdout
    after = torch.load(resumed / 'ckpt.pt', weights_only=True)
    assert after['iter_num'] == 90 and after['model_type'] == model_type
    assert after['optimizer']['state'][0]['step'] == before['optimizer']['state'][0]['step'] + 30


@pytest.mark.parametrize('mode', ['rnn', 'parallel'])
def test_sample_both_modes(trained, mode):
    model_type, out, _ = trained
    if model_type == 'gpt' and mode == 'rnn':
        r = run('sample.py', f'--out_dir={out}', '--mode=rnn', '--device=cpu')
        assert r.returncode != 0 and 'Traceback' not in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("sample.py: error: mode='rnn' needs an RWKV model")
        return
    r = run('sample.py', f'--out_dir={out}', f'--mode={mode}', '--start=abc', '--num_samples=2',
            '--max_new_tokens=40', '--device=cpu')
    assert r.returncode == 0, r.stderr
    samples = r.stdout.split('---------------\n')
    texts = [s for s in samples if s.strip()]
    assert len(texts) == 2
    for text in texts:
        body = text[:-1] if text.endswith('\n') else text  # print() adds one newline
        assert body.startswith('abc') and len(body) == 43 and set(body) <= set('abcdefgh \n')


def test_sample_rwkv_rnn_and_parallel_greedy_agree(trained, tmp_path):
    model_type, out, _ = trained
    if model_type != 'rwkv':
        pytest.skip('RNN mode is RWKV only')
    (tmp_path / 'prompt.txt').write_text('hgfe dcba')
    outs = []
    for mode in ('rnn', 'parallel'):
        r = run('sample.py', f'--out_dir={out}', f'--mode={mode}', f'--start=FILE:{tmp_path / "prompt.txt"}',
                '--num_samples=1', '--max_new_tokens=30', '--temperature=0', '--device=cpu')
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] and outs[0].startswith('hgfe dcba')


def test_sample_bad_inputs(trained, tmp_path):
    _, out, _ = trained
    one_line_error(run('sample.py', f'--out_dir={tmp_path}'), 'sample.py', 'no checkpoint at')
    one_line_error(run('sample.py', f'--out_dir={out}', '--start=xyz'), 'sample.py', "not in the model's vocabulary")
    one_line_error(run('sample.py', f'--out_dir={out}', '--max_new_tokens=0'), 'sample.py',
                   'max_new_tokens must be >= 1')
    one_line_error(run('sample.py', f'--out_dir={out}', '--start=FILE:nope.txt'), 'sample.py', 'not found')
    (tmp_path / 'ckpt.pt').write_bytes(b'this is not a checkpoint')
    one_line_error(run('sample.py', f'--out_dir={tmp_path}'), 'sample.py', 'not a readable nanoRWKV checkpoint')
    (tmp_path / 'latin1.txt').write_bytes('café'.encode('latin-1'))
    one_line_error(run('sample.py', f'--out_dir={out}', f'--start=FILE:{tmp_path / "latin1.txt"}'), 'sample.py',
                   'is not UTF-8 text (byte 3: unexpected end of data); save it as UTF-8')
    # a model whose weights overflowed: no token can be read from its logits, greedy or sampled
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
    ckpt['model'] = {k: torch.full_like(v, float('nan')) if k.endswith(('head.weight', 'lm_head.weight')) else v
                     for k, v in ckpt['model'].items()}
    (tmp_path / 'nan').mkdir()
    torch.save(ckpt, tmp_path / 'nan' / 'ckpt.pt')
    for temperature in ('0', '0.8'):
        one_line_error(run('sample.py', f'--out_dir={tmp_path / "nan"}', f'--temperature={temperature}'),
                       'sample.py', "the model's logits are not finite")


def test_train_errors_are_one_line(tmp_path):
    one_line_error(run('train.py', '--n_layr=2'), 'train.py', "did you mean 'n_layer'?")
    one_line_error(run('train.py', f'--data_dir={tmp_path}', f'--out_dir={tmp_path / "out"}', '--device=cpu'),
                   'train.py', 'train.bin not found in')
    one_line_error(run('train.py', '--model_type=lstm'), 'train.py', "model_type must be one of 'rwkv', 'gpt'")
    assert not (REPO / 'out').exists()  # nothing written into the repository


def test_train_prepares_missing_dataset(tmp_path):
    # a dataset directory with a prepare.py but no train.bin: train.py runs prepare.py first and says so
    d = tmp_path / 'mini'
    d.mkdir()
    (d / 'prepare.py').write_text(
        "import json, numpy as np, pathlib\n"
        "d = pathlib.Path(__file__).parent\n"
        "ids = (np.arange(3000) % 7).astype(np.uint16)\n"
        "ids[:2700].tofile(d / 'train.bin'); ids[2700:].tofile(d / 'val.bin')\n"
        "(d / 'meta.json').write_text(json.dumps({'tokenizer': 'char', 'vocab_size': 7, 'itos': list('abcdefg')}))\n")
    r = run('train.py', *tiny_args('rwkv', d, tmp_path / 'out', 2))
    assert r.returncode == 0, r.stderr
    assert 'train.bin not found in' in r.stdout and 'running' in r.stdout
    assert (d / 'train.bin').is_file()


def test_block_size_larger_than_data(dataset, tmp_path):
    one_line_error(run('train.py', *tiny_args('gpt', dataset, tmp_path, 2), '--block_size=5000'), 'train.py',
                   'use a smaller --block_size')


def test_export_checkpoint(trained, tmp_path):
    model_type, out, _ = trained
    transformers = pytest.importorskip('transformers')
    r = run('export.py', f'--out_dir={out}', '--format=hf', f'--dest={tmp_path / "hf"}')
    assert r.returncode == 0, r.stderr
    cls = transformers.RwkvForCausalLM if model_type == 'rwkv' else transformers.GPT2LMHeadModel
    ref = cls.from_pretrained(tmp_path / 'hf').eval()
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    model = model_from_checkpoint(ckpt).eval()
    idx = torch.randint(0, 10, (1, 20))
    with torch.no_grad():
        assert (model.prefill(idx)[0] - ref(idx).logits).abs().max() <= 1e-4
    r = run('export.py', f'--out_dir={out}', '--format=pth', f'--dest={tmp_path / "m.pth"}')
    if model_type == 'rwkv':
        assert r.returncode == 0, r.stderr
        state = torch.load(tmp_path / 'm.pth', weights_only=True)
        assert set(state) == set(ckpt['model'])
    else:
        one_line_error(r, 'export.py', "format 'pth' is RWKV's official format")


def test_sample_from_exported_directory_streams_same_text(trained, tmp_path):
    model_type, out, _ = trained
    pytest.importorskip('transformers')
    assert run('export.py', f'--out_dir={out}', f'--dest={tmp_path / "hf"}').returncode == 0
    common = ['--start=abc', '--num_samples=1', '--max_new_tokens=30', '--temperature=0', '--device=cpu']
    from_dir = run('sample.py', f'--init_from={tmp_path / "hf"}', *common)
    from_ckpt = run('sample.py', f'--out_dir={out}', *common)
    assert from_dir.returncode == 0, from_dir.stderr
    assert from_dir.stdout == from_ckpt.stdout and from_dir.stdout.startswith('abc')
    if model_type == 'rwkv':  # the official .pth too: its char vocabulary travels beside it
        assert run('export.py', f'--out_dir={out}', '--format=pth', f'--dest={tmp_path / "m.pth"}').returncode == 0
        from_pth = run('sample.py', f'--init_from={tmp_path / "m.pth"}', *common)
        assert from_pth.returncode == 0, from_pth.stderr
        assert from_pth.stdout == from_ckpt.stdout


def test_sample_hub_name_offline_is_one_line(tmp_path):
    env_run = subprocess.run([sys.executable, str(REPO / 'sample.py'), '--init_from=RWKV/rwkv-4-169m-pile'],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300,
                             env={**__import__('os').environ, 'HF_HUB_OFFLINE': '1'})
    one_line_error(env_run, 'sample.py', 'could not download RWKV/rwkv-4-169m-pile')
    assert 'a local path works' in env_run.stderr
    one_line_error(run('sample.py', '--init_from=gpt3'), 'sample.py', "init_from='gpt3'")


def test_eval_only_from_pretrained_directory(trained, dataset, tmp_path):
    # the eval configs' path: init_from a pretrained model, evaluate once; the loss is the trained model's
    model_type, out, stdout = trained
    pytest.importorskip('safetensors')
    assert run('export.py', f'--out_dir={out}', f'--dest={tmp_path / "hf"}').returncode == 0
    args = tiny_args(model_type, dataset, tmp_path / 'eval', 1) + [f'--init_from={tmp_path / "hf"}',
                                                                   '--eval_only=True', '--eval_iters=20']
    r = run('train.py', *args)
    assert r.returncode == 0, r.stderr
    (step, _, val), = eval_lines(r.stdout)
    assert step == 0 and abs(val - eval_lines(stdout)[-1][2]) < 0.15
    # a directory without a recorded tokenizer reads GPT-2 BPE or NeoX, not this char dataset: refused
    for name in ('nanorwkv_tokenizer.json', 'tokenizer.json', 'tokenizer_config.json'):
        (tmp_path / 'hf' / name).unlink()
    one_line_error(run('train.py', *args), 'train.py', "is tokenized with 'char' but")
