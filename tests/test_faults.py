"""Training under faults and at scale, on CPU: exact resume, DDP / FSDP2 under torchrun against one process,
preemption signals, SIGKILL at random moments, non-finite losses, bad inputs, activation checkpointing."""
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, args, loss_lines, one_line_error, run

pytestmark = pytest.mark.slow  # every test here runs the scripts in subprocesses


@pytest.mark.parametrize('model_type', ['gpt', 'rwkv'])
def test_resume_is_exact(model_type, dataset, tmp_path):
    whole = run('train.py', *args(model_type, dataset, tmp_path / 'a', 12))
    assert whole.returncode == 0, whole.stderr
    first = run('train.py', *args(model_type, dataset, tmp_path / 'b', 8))
    assert first.returncode == 0, first.stderr
    second = run('train.py', *args(model_type, dataset, tmp_path / 'b', 12), '--init_from=resume')
    assert second.returncode == 0, second.stderr
    want, got = loss_lines(whole.stdout), {**loss_lines(first.stdout), **loss_lines(second.stdout)}
    assert sorted(loss_lines(second.stdout)) == list(range(8, 12))
    assert got == want  # every iteration's loss, to the 6 printed decimals
    a = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])  # bit for bit
    assert len(b['rng']) == 1 and b['world_size'] == 1


def torchrun(nproc, *argv):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                           str(REPO / 'train.py'), *argv], capture_output=True, text=True, timeout=600, env=env,
                          cwd=REPO)


DDP_TOLERANCE = 1e-5  # relative, on each logged loss; fp32 all-reduce sums in another order than one process does


@pytest.mark.parametrize('model_type,sharding', [('gpt', 'ddp'), ('rwkv', 'ddp'), ('gpt', 'fsdp'), ('rwkv', 'fsdp'),
                                                 ('rwkv', 'ddp segments'), ('rwkv', 'fsdp segments'),
                                                 ('gpt', 'fsdp accumulation'), ('rwkv', 'ddp moe hybrid'),
                                                 ('gpt', 'fsdp moe window gqa'), ('rwkv', 'fsdp moe segments'),
                                                 ('rwkv', 'ddp v7'), ('rwkv', 'fsdp v6 segments'),
                                                 ('rwkv', 'ddp v7 lora+state segments')])
def test_torchrun_two_processes_match_one(model_type, sharding, dataset, tmp_path):
    # the same global batch: 2 processes x 1 micro-step each vs 1 process x 2 micro-steps, the same data order;
    # 'segments': samples of 32 tokens in 2 segments of 16 (full BPTT, bptt.py); 'accumulation': 2 micro-steps per
    # process, gradients reduced after the second only; 'moe': 4 experts, top-1 (some get no tokens in a step: they
    # must still take part in the gradient reduction); 'hybrid': block 1 is windowed attention; 'v7', 'v6': RWKV-7 / 6;
    # 'lora+state': only LoRA adapters and the learned initial states train (the rest frozen, no gradient to reduce)
    segmented = ['--block_size=16', '--ctx_len=32'] if 'segments' in sharding else []
    segmented += ['--moe_experts=4', '--moe_top_k=1'] if 'moe' in sharding else []
    segmented += ['--attn_layers=[1]', '--attn_window=8'] if 'hybrid' in sharding else []
    segmented += ['--attn_window=8', '--attn_kv_heads=1'] if 'gqa' in sharding else []
    segmented += [f"--rwkv_version={sharding.split(' v')[1][0]}", '--head_size=8'] if ' v' in sharding else []
    segmented += ['--finetune=lora+state'] if 'lora+state' in sharding else []
    accumulate = 4 if 'accumulation' in sharding else 2
    common = args(model_type, dataset, tmp_path / 'one', 6, f'--gradient_accumulation_steps={accumulate}',
                  *segmented)
    one = subprocess.run([sys.executable, str(REPO / 'train.py'), *common], capture_output=True, text=True,
                         timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert one.returncode == 0, one.stderr
    extra = ['--fsdp=True'] if 'fsdp' in sharding else []
    two = torchrun(2, *args(model_type, dataset, tmp_path / 'two', 6, f'--gradient_accumulation_steps={accumulate}',
                            *extra, *segmented))
    assert two.returncode == 0, two.stderr[-3000:]
    assert f'tokens per iteration: {256 * accumulate:,} (2 x {accumulate // 2} x 8 x 32)' in two.stdout
    a, b = loss_lines(one.stdout), loss_lines(two.stdout)
    assert sorted(a) == sorted(b) == list(range(6))
    for i in a:
        assert b[i] == pytest.approx(a[i], rel=DDP_TOLERANCE), i
    wa = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)['model']
    ckpt = torch.load(tmp_path / 'two' / 'ckpt.pt', weights_only=True)
    assert len(ckpt['rng']) == 2 and ckpt['world_size'] == 2
    for k, v in ckpt['model'].items():  # a full (unsharded) state dict either way
        assert v.shape == wa[k].shape and torch.allclose(v, wa[k], rtol=1e-4, atol=1e-6), k


def start(argv):
    return subprocess.Popen([sys.executable, str(REPO / 'train.py'), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_and_exits_zero(sig, dataset, tmp_path):
    p = start(args('rwkv', dataset, tmp_path, 100000))
    for line in p.stdout:
        if line.startswith('iter 3/'):
            break
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    done = max(loss_lines('iter 3/0: loss 0\n' + out))  # the last iteration that ran
    assert f'{sig.name} received: checkpoint saved at iteration {done + 1}' in out
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == done + 1


def test_sigkill_at_random_iterations_never_corrupts(dataset, tmp_path):
    # a checkpoint every iteration, so that kills land in or near a write; each attempt is the same command
    # (init_from='auto') and is SIGKILLed right after it logs an iteration chosen at random; after each kill every
    # checkpoint on disk must load; the last attempt finishes, and every loss any attempt logged equals the
    # uninterrupted run's loss for that iteration
    n = 40
    a = args('rwkv', dataset, tmp_path / 'ref', n, '--eval_interval=1', '--eval_iters=1', '--keep_last=2')
    ref = run('train.py', *a)
    assert ref.returncode == 0, ref.stderr
    want = loss_lines(ref.stdout)
    out = tmp_path / 'killed'
    a = args('rwkv', dataset, out, n, '--eval_interval=1', '--eval_iters=1', '--keep_last=2', '--init_from=auto')
    rng = random.Random(0)
    kills = in_write = 0
    got = {}
    while True:
        # kill after this iteration's eval line (its checkpoint is being written then) or its loss line
        target = max(got, default=-1) + rng.randint(1, 8)
        mark = rng.choice([f'step {target}:', f'iter {target}/'])
        p = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *a], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        for line in p.stdout:
            got.update(loss_lines(line))
            if line.startswith(mark):
                p.kill()
                break
        p.stdout.read()
        stderr = p.stderr.read()
        p.wait()
        if p.returncode == 0:
            break  # finished before the chosen iteration
        assert p.returncode == -signal.SIGKILL, stderr
        kills += 1
        in_write += any(out.glob('*.tmp'))
        for f in out.glob('ckpt*.pt'):  # every checkpoint left behind is complete
            ckpt = torch.load(f, weights_only=True)
            assert {'model', 'optimizer', 'iter_num', 'rng', 'run_id'} <= set(ckpt), f
        assert kills < 30, 'the run never finished'
    assert got == want
    print(f"\nSIGKILL kills {kills}, kills with a checkpoint write under way {in_write}, corrupt 0")
    assert kills >= 3


def test_nonfinite_loss_stops_and_keeps_checkpoints(dataset, tmp_path):
    assert run('train.py', *args('gpt', dataset, tmp_path, 3)).returncode == 0
    before = {f.name: f.read_bytes() for f in tmp_path.glob('ckpt*.pt')}
    blowup = ['--init_from=resume', '--learning_rate=1e30', '--decay_lr=False', '--grad_clip=0']
    r = run('train.py', *args('gpt', dataset, tmp_path, 20), *blowup)
    one_line_error(r, 'train.py', 'the loss is')
    assert re.search(r'iteration \d+: the loss is (nan|inf)', r.stderr)
    assert {f.name: f.read_bytes() for f in tmp_path.glob('ckpt*.pt')} == before  # nothing overwritten
    r = run('train.py', *args('gpt', dataset, tmp_path, 8), *blowup, '--nan_policy=skip')
    assert r.returncode == 0, r.stderr
    assert 'step skipped' in r.stdout


class Exploit:
    """A pickle that would create a file if it were ever unpickled with code execution allowed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), 'w'))


def test_bad_inputs_each_get_one_line(dataset, tmp_path, monkeypatch):
    data = tmp_path / 'data'
    data.mkdir()
    for f in ('train.bin', 'val.bin', 'meta.json'):
        (data / f).write_bytes((dataset / f).read_bytes())
    out = tmp_path / 'out'
    assert run('train.py', *args('gpt', data, out, 2)).returncode == 0

    def check(fragment, *extra, data_dir=data, out_dir=tmp_path / 'fresh', model='gpt'):
        one_line_error(run('train.py', *args(model, data_dir, out_dir, 4), *extra), 'train.py', fragment)

    check("did you mean 'learning_rate'?", '--learnig_rate=1')  # unknown key
    check("expects int, got 'many'", '--n_layer=many')  # ill-typed
    check("holds a 'gpt' model but model_type='rwkv'", '--init_from=resume', model='rwkv', out_dir=out)  # other type
    check('was trained with n_layer=2 but this run has n_layer=3', '--init_from=resume', '--n_layer=3', out_dir=out)
    check('use a smaller --block_size', '--block_size=100000')
    # a truncated .bin
    bad = tmp_path / 'truncated'
    bad.mkdir()
    for f in ('val.bin', 'meta.json'):
        (bad / f).write_bytes((data / f).read_bytes())
    (bad / 'train.bin').write_bytes((data / 'train.bin').read_bytes()[:-1])
    check('is truncated', data_dir=bad)
    (bad / 'train.bin').unlink()
    check('train.bin not found in', data_dir=bad)
    # token ids beyond the vocabulary (data tokenized with another tokenizer)
    (bad / 'train.bin').write_bytes(np.full(5000, 12, dtype=np.uint16).tobytes())
    check("holds token id 12, but the model's vocab_size is 10", data_dir=bad, out_dir=tmp_path / 'o2')
    # an out_dir that cannot be created (below a file; root cannot do that either)
    (tmp_path / 'a_file').write_text('')
    check('cannot write to out_dir=', out_dir=tmp_path / 'a_file' / 'out')
    # checkpoints that are not ours: garbage, a foreign dict, and a pickle that would run code
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'ckpt.pt').write_bytes(b'not a checkpoint')
    check('no intact checkpoint in', '--init_from=resume', out_dir=foreign)
    (foreign / 'ckpt.pt').unlink()
    torch.save({'weights': torch.zeros(2)}, foreign / 'ckpt-00000001.pt')
    check('is not a nanoRWKV checkpoint (expected keys', '--init_from=resume', out_dir=foreign)
    marker = tmp_path / 'pwned'
    (foreign / 'ckpt-00000002.pt').write_bytes(pickle.dumps({'model': Exploit(marker)}))
    r = run('train.py', *args('gpt', data, foreign, 4), '--init_from=resume')
    one_line_error(r, 'train.py', 'no intact checkpoint in')
    assert 'skipping' in r.stderr and 'ckpt-00000002.pt' in r.stderr
    assert not marker.exists()  # weights_only=True: nothing ran
    # a newer damaged checkpoint next to an intact one: resume takes the intact one and says so
    (out / 'ckpt-00000009.pt').write_bytes(b'half a checkpoint')
    r = run('train.py', *args('gpt', data, out, 4), '--init_from=resume')
    assert r.returncode == 0, r.stderr
    assert 'skipping' in r.stderr and 'ckpt-00000009.pt' in r.stderr
    assert f'resuming from {out / "ckpt-00000002.pt"}' in r.stdout


def test_wandb_without_network_falls_back_to_offline(dataset, tmp_path):
    # a stand-in for the wandb package whose online init fails the way it does without a network
    fake = tmp_path / 'fake'
    fake.mkdir()
    calls = tmp_path / 'calls.jsonl'
    (fake / 'wandb.py').write_text(
        "import json\n"
        f"CALLS = {str(calls)!r}\n"
        "def init(mode='online', **kw):\n"
        "    open(CALLS, 'a').write(json.dumps({'init': mode}) + '\\n')\n"
        "    if mode != 'offline':\n"
        "        raise ConnectionError('Network error (ConnectionError), entering retry loop.')\n"
        "def log(d):\n"
        "    open(CALLS, 'a').write(json.dumps({'log': sorted(d)}) + '\\n')\n")
    r = subprocess.run([sys.executable, str(REPO / 'train.py'), *args('gpt', dataset, tmp_path / 'o', 2),
                        '--wandb_log=True'], capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'PYTHONPATH': str(fake)})
    assert r.returncode == 0, r.stderr
    assert 'wandb could not start online (ConnectionError' in r.stdout and 'logging offline' in r.stdout
    lines = [json.loads(line) for line in calls.read_text().splitlines()]
    assert lines[:2] == [{'init': 'online'}, {'init': 'offline'}] and {'log': ['iter', 'lr', 'mfu', 'train/loss',
                                                                              'val/loss']} in lines


@pytest.mark.parametrize('model_type', ['gpt', 'rwkv'])
def test_activation_checkpointing_same_gradients(model_type):
    from model_gpt import GPT, GPTConfig
    from model_rwkv import RWKV, RWKVConfig
    torch.manual_seed(0)
    # with dropout: the recomputation must replay the same masks; with MoE and (RWKV) an attention layer: their
    # routing and caches are recomputed too
    if model_type == 'gpt':
        model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=3, n_head=2, n_embd=16, dropout=0.2,
                              moe_experts=3, moe_top_k=2))
    else:
        model = RWKV(RWKVConfig(block_size=16, vocab_size=11, n_layer=3, n_embd=16, wkv_backend='torch',
                                dropout=0.2, moe_experts=3, attn_layers=(1,), n_head=2, attn_window=5))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    model = model.double().train()
    idx = torch.randint(0, 11, (3, 16))
    grads = []
    for flag in (False, True):
        model.activation_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(1)
        _, loss = model(idx, idx)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-10, atol=1e-12), n


def test_activation_checkpointing_in_training(dataset, tmp_path):
    plain = run('train.py', *args('rwkv', dataset, tmp_path / 'a', 3))
    ckpt = run('train.py', *args('rwkv', dataset, tmp_path / 'b', 3), '--activation_checkpointing=True')
    assert plain.returncode == 0 and ckpt.returncode == 0, ckpt.stderr
    a, b = loss_lines(plain.stdout), loss_lines(ckpt.stdout)
    assert a.keys() == b.keys() and all(b[i] == pytest.approx(a[i], rel=1e-5) for i in a)


def test_fsdp_needs_torchrun(dataset, tmp_path):
    check = run('train.py', *args('gpt', dataset, tmp_path, 2), '--fsdp=True')
    one_line_error(check, 'train.py', 'fsdp=True needs several processes')


def test_wandb_not_installed_is_one_line(dataset, tmp_path):
    import importlib.util
    if importlib.util.find_spec('wandb') is not None:
        pytest.skip('wandb is installed here')
    r = run('train.py', *args('gpt', dataset, tmp_path, 2), '--wandb_log=True')
    one_line_error(r, 'train.py', 'wandb_log=True but wandb is not installed: pip install wandb')
