"""The benchmark scripts end to end on tiny settings: their outputs exist, parse and hold what they should. No timing
is asserted (speed is reported by the scripts, not tested)."""
import csv
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here runs the scripts in subprocesses

REPO = Path(__file__).resolve().parents[1]
L, C, V = 2, 32, 17


def script(name, *args, cwd):
    r = subprocess.run([sys.executable, str(REPO / name), *args], capture_output=True, text=True, timeout=900, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def table(stdout, first_cell):
    """The rows of the markdown table whose header starts with first_cell, as lists of cells."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'| {first_cell} |'))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip('|').split('|')])
    return rows


def test_inference_time_benchmark(tmp_path):
    n, W = 40, 16
    out = script('benchmark_inference_time.py', f'--n_layer={L}', f'--n_embd={C}', '--n_head=2', f'--vocab_size={V}',
                 f'--n_tokens={n}', '--report_at=[8, 40]', '--window=4', '--hybrid_layers=[1]',
                 f'--attn_window={W}', '--device=cpu', cwd=tmp_path)
    # the default outputs: under out-bench/ of the working directory (git-ignored in the repository)
    assert sorted(f.name for f in (tmp_path / 'out-bench').iterdir()) == [
        'inference_time_cpu.csv', 'inference_time_cpu.json', 'inference_time_cpu.png']
    shutil.move(tmp_path / 'out-bench' / 'inference_time_cpu.png', tmp_path / 'it.png')
    for suffix in ('csv', 'json'):
        shutil.move(tmp_path / 'out-bench' / f'inference_time_cpu.{suffix}', tmp_path / f'it.{suffix}')
    rows = list(csv.DictReader(open(tmp_path / 'it.csv')))
    models = ('rwkv', 'gpt', 'hybrid', 'gpt_window')
    assert [(r['model'], int(r['tokens'])) for r in rows] == [(m, i) for m in models for i in range(1, n + 1)]
    for r in rows:  # memory from the shapes alone (fp32): RWKV (L, 5, 1, C); K and V of (1, C) per attention layer and
        # token kept: every token for GPT, a ring of W for the windowed ones (allocated whole at the first token)
        want = {'rwkv': L * 5 * C * 4, 'gpt': 2 * L * int(r['tokens']) * C * 4,
                'hybrid': L * 5 * C * 4 + 2 * 1 * W * C * 4, 'gpt_window': 2 * L * W * C * 4}[r['model']]
        assert float(r['cache_mb']) * 2 ** 20 == pytest.approx(want), r['model']
        assert float(r['ms_per_token']) > 0 and float(r['rss_mb']) > 0
    meta = json.loads((tmp_path / 'it.json').read_text())
    assert set(meta['summary']) == set(models) and len(meta['rows']) == 4 * n
    assert [row[-2] for row in table(out, 'model')] == ['constant', 'grows with the context', 'constant', 'constant']
    assert set(meta['summary']['gpt']['ms_per_token']) == {'8', '40'}
    assert table(out, 'model')[0][0] == 'rwkv'
    # the PNG is an image, and the figure behind it has the three panels
    from matplotlib.image import imread
    assert imread(tmp_path / 'it.png').ndim == 3
    fig = runpy.run_path(str(REPO / 'benchmark_inference_time.py'))['figure'](meta['rows'], 'test')
    assert [ax.get_title() for ax in fig.axes] == ['single-token latency', 'cumulative latency', 'memory']


def test_versions_benchmark(tmp_path):
    """Every version with the kernel and the torch op, eager: one row each, RWKV-4's kernel the reference."""
    out = script('benchmarks/bench_versions.py', f'--n_layer={L}', f'--n_embd={C}', '--head_size=8',
                 f'--vocab_size={V}', '--block_size=16', '--batch_size=2', '--rounds=2', '--warmup=1', cwd=tmp_path)
    rows = table(out, 'contender')
    assert [r[0] for r in rows] == [f'RWKV-{v} {b}' for v in ('4', '5', '5.1', '6', '7') for b in ('kernel', 'torch op')]
    assert rows[0][3] == '1.00x' and all(float(r[2].replace(',', '')) > 0 for r in rows)
    assert not list(tmp_path.iterdir())


def test_train_benchmark(tmp_path):
    out = script('benchmarks/bench_train.py', f'--n_layer={L}', f'--n_embd={C}', '--n_head=2', f'--vocab_size={V}',
                 '--block_size=16', '--batch_size=2', '--iters=1', '--warmup=1', '--device=cpu', cwd=tmp_path)
    rows = table(out, 'model')
    names = [r[0] for r in rows]
    assert names == ['gpt', 'rwkv', 'gpt compiled', 'rwkv compiled', 'transformers GPT2LMHeadModel',
                     'transformers RwkvForCausalLM']  # transformers is in requirements.txt
    assert 'rwkv / transformers RwkvForCausalLM: ' in out and 'rwkv compiled / rwkv: ' in out
    for r in rows:
        assert float(r[1]) > 0 and r[3].endswith('%') and float(r[3][:-1]) > 0


def test_decode_benchmark(tmp_path):
    """Every contender of every version measured on weights the package reads with the same logits, a compiled step
    included, and the prompt comparison."""
    pytest.importorskip('rwkv')
    out = script('benchmarks/bench_decode.py', '--versions=[4, 7]', f'--n_layer={L}', f'--n_embd={C}',
                 '--head_size=16', f'--vocab_size={V}', '--threads=[1]', '--n_tokens=2', '--rounds=1', '--warmup=1',
                 '--batch_size=2', '--prefill=8', cwd=tmp_path)
    decode, prompt = out.split('prompt of 8 tokens')
    rows = table(decode, 'version')
    assert [(r[0], r[3]) for r in rows] == [(v, c) for v in '47' for c in (
        'ours', 'ours, as loaded', 'ours compiled', 'rwkv pip', 'ours batch 2', 'memory read (torch.sum, 256 MB)')]
    assert all(float(r[5].replace(',', '')) > 0 and r[6].endswith('x') for r in rows if not r[3].startswith('memory'))
    assert all(float(r[7]) >= 0 for r in rows if r[7] != '-')  # GB/s (0.0 at this size)
    assert [(r[0], r[2]) for r in table(prompt, 'version')] == [(v, c) for v in '47' for c in (
        'ours prefill', 'rwkv pip forward')]
    diffs = re.findall(r'max logit diff vs rwkv pip ([0-9.e+-]+)', out)
    assert len(diffs) == 2 and all(float(d) <= 1e-4 for d in diffs)  # both ran the same weights


def test_options_benchmark(tmp_path):
    out = script('benchmarks/bench_options.py', f'--n_layer={L}', f'--n_embd={C}', '--n_head=2', f'--vocab_size={V}',
                 '--block_size=16', '--batch_size=2', '--rounds=1', '--iters=1', cwd=tmp_path)
    quick, scaling = out.split('MoE cost against E and k')
    rows = table(quick, 'model')
    assert [r[0].split(' ')[:3] for r in rows] == [['rwkv'], ['rwkv', '+', 'moe'], ['rwkv', 'hybrid', '(block'],
                                                    ['gpt'], ['gpt', '+', 'window'], ['gpt', '+', 'gqa']]
    assert all(float(r[4]) > 0 for r in rows)
    moe = {r[0]: r for r in table(scaling, 'model')}
    assert len(moe) == 6
    for k in (1, 2):  # the parameters a token uses, and its FLOPs, grow with k; with E only by the router (E x C)
        used = [int(moe[f'rwkv moe E={E} k={k}'][2].replace(',', '')) for E in (2, 4, 8)]
        assert used[2] - used[0] == L * 6 * C  # 6 more router rows per layer
    assert float(moe['rwkv moe E=4 k=2'][3]) > float(moe['rwkv moe E=4 k=1'][3])


def test_quant_benchmark(dataset, tmp_path):
    from helpers import args, run
    r = run('train.py', *args('rwkv', dataset, tmp_path / 'o', 2, '--n_embd=32'))
    assert r.returncode == 0, r.stderr
    out = script('benchmarks/bench_quant.py', '--shape=(2, 32, 40)', '--threads=[1]', '--n_tokens=2', '--rounds=1',
                 f"--checkpoints=['{tmp_path / 'o'}']", '--eval_tokens=512', f'--plot={tmp_path}/q.png', cwd=tmp_path)
    assert (tmp_path / 'q.png').stat().st_size > 10000
    assert 'GB/s (read + write), a 512 MB sum at' in out
    rows = {(r[0], r[1]): r for r in table(out, 'decoder')}
    for fmt in ('fp32', 'int8', 'q8_0', 'q5_1', 'q4_0', 'int4'):
        name = 'ours fp32' if fmt == 'fp32' else f'ours {fmt} (head quantized)'
        assert (name, '1') in rows and (name, '8') in rows, name
    mb = {k[0]: float(r[-2]) for k, r in rows.items() if k[0].startswith('ours')}  # MB/token: second to last
    assert mb['ours int8 (head quantized)'] < 0.5 * mb['ours fp32']  # fewer bytes per token, from the buffers
    assert ("rwkv pip 'cpu fp32'", '1') in rows and ('torch.ao dynamic int8 (ours)', '1') in rows
    ppl = table(out, 'checkpoint')
    assert [r[1] for r in ppl] == ['quantized', 'fp32'] and all(float(c.split()[0]) > 1 for c in ppl[0][2:])


@pytest.mark.parametrize('name', ['benchmark_inference_time.py', 'benchmarks/bench_train.py',
                                  'benchmarks/bench_decode.py', 'benchmarks/bench_wkv.py', 'train.py', 'sample.py',
                                  'export.py', 'data/shakespeare_char/prepare.py', 'data/shakespeare/prepare.py',
                                  'data/openwebtext/prepare.py', 'data/openwebtext_neox/prepare.py',
                                  'data/tinystories/prepare.py', 'data/instruct/prepare.py',
                                  'assets/make_animations.py',
                                  'benchmarks/bench_infctx.py', 'benchmarks/bench_long_range.py',
                                  'benchmarks/bench_options.py', 'benchmarks/bench_quant.py',
                                  'benchmarks/bench_finetune.py', 'benchmarks/bench_versions.py',
                                  'benchmarks/bench_gpu.py'])
def test_help_documents_every_option(name, tmp_path, monkeypatch):
    out = script(name, '--help', cwd=tmp_path)
    monkeypatch.setattr(sys, 'path', list(sys.path))  # the data scripts put the repository root on it
    module = runpy.run_path(str(REPO / name))  # not as __main__: only the definitions run
    options = module.get('OPTIONS') or module['DOCUMENT_OPTIONS']
    assert out.startswith(module['__doc__'].strip())
    for key, option in options.items():
        assert f'  {key} = {option.default!r}  # {option.help}' in out, key
    assert not list(tmp_path.iterdir())  # --help prepared, trained or wrote nothing


@pytest.mark.parametrize('version', [5.1, 7])
def test_benchmarks_take_the_rwkv_version(version, tmp_path):
    """--rwkv_version: the inference benchmark's state is the matrix state (L (2C + H N^2)); bench_train runs it."""
    N, n = 8, 6
    script('benchmark_inference_time.py', f'--n_layer={L}', f'--n_embd={C}', f'--vocab_size={V}', "--models=['rwkv']",
           f'--rwkv_version={version}', f'--head_size={N}', f'--n_tokens={n}', '--report_at=[6]', '--window=2',
           f'--out={tmp_path}/it', f'--plot={tmp_path}/it.png', '--device=cpu', cwd=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / 'it.csv')))
    assert len(rows) == n and all(float(r['cache_mb']) * 2 ** 20 == L * (2 * C + C * N) * 4 for r in rows)
    out = script('benchmarks/bench_train.py', f'--n_layer={L}', f'--n_embd={C}', '--n_head=2', f'--vocab_size={V}',
                 '--block_size=16', '--batch_size=2', '--iters=1', '--warmup=1', '--device=cpu', '--compile=[False]',
                 '--transformers=False', f'--rwkv_version={version}', f'--head_size={N}', cwd=tmp_path)
    assert f'rwkv = RWKV-{version:g} (head_size {N})' in out and [r[0] for r in table(out, 'model')] == ['gpt', 'rwkv']


def test_finetune_benchmark(dataset, tmp_path):
    from helpers import args, run
    r = run('train.py', *args('rwkv', dataset, tmp_path / 'base', 2, '--rwkv_version=7', '--head_size=8'))
    assert r.returncode == 0, r.stderr
    out = script('benchmarks/bench_finetune.py', f'--base={tmp_path / "base"}', '--task=["README.md"]',
                 '--max_iters=2', '--eval_iters=1', '--block_size=32', '--batch_size=4', cwd=tmp_path)
    rows = {r[0]: r for r in table(out, 'method')}
    assert list(rows) == ['full', 'lora', 'state']
    share = {m: float(r[2].rstrip('%')) for m, r in rows.items()}
    assert share['full'] == 100 and share['state'] < share['lora'] < 100
    assert rows['full'][8] == '100%'
