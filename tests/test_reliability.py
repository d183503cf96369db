"""Runs that cannot hurt each other: one run per out_dir, restarts that resume by themselves (also under torchrun
--max-restarts with a rank SIGKILLed), a full disk while saving, data changed under a run, a failing data
preparation, checkpoints from before the current layout, and every bad setting of every script as one line."""
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from checkpoint import model_from_checkpoint, run_id_of
from helpers import REPO, args, loss_lines, one_line_error, run

pytestmark = pytest.mark.slow  # every test here runs the scripts in subprocesses

FIXTURES = Path(__file__).resolve().parent / 'fixtures'


def test_one_run_per_out_dir(dataset, tmp_path):
    out = tmp_path / 'out'
    first = run('train.py', *args('gpt', dataset, out, 6, '--eval_interval=2', '--keep_last=5'))
    assert first.returncode == 0, first.stderr
    before = {f.name: f.read_bytes() for f in out.glob('ckpt*.pt')}
    # a second run from scratch in the same out_dir is refused, and nothing is touched
    r = run('train.py', *args('gpt', dataset, out, 2))
    one_line_error(r, 'train.py', f'{out} holds another run\'s checkpoints (newest: {out / "ckpt-00000006.pt"}); '
                                  f'continue that run with --init_from=resume, use another --out_dir, or '
                                  f'--overwrite=True')
    assert {f.name: f.read_bytes() for f in out.glob('ckpt*.pt')} == before
    # --overwrite=True moves them aside, all of them, byte for byte
    r = run('train.py', *args('gpt', dataset, out, 2, '--eval_interval=1'), '--overwrite=True')
    assert r.returncode == 0, r.stderr
    aside, = out.glob('replaced-*')
    assert f'moved the checkpoints of {out} into {aside}' in r.stdout
    assert {f.name: f.read_bytes() for f in aside.glob('ckpt*.pt')} == before
    assert sorted(f.name for f in out.glob('ckpt*.pt')) == ['ckpt-00000001.pt', 'ckpt-00000002.pt', 'ckpt.pt']


def test_keep_last_deletes_only_this_runs_checkpoints(dataset, tmp_path):
    out = tmp_path / 'out'
    assert run('train.py', *args('gpt', dataset, out, 4, '--eval_interval=2', '--keep_last=5')).returncode == 0
    mine = run_id_of(out / 'ckpt-00000004.pt')
    # older-numbered files of another run and of a checkpoint from before run ids are put beside this run's 2, 4
    other = run('train.py', *args('gpt', dataset, tmp_path / 'other', 1, '--eval_interval=1'))
    assert other.returncode == 0, other.stderr
    shutil.copy(tmp_path / 'other' / 'ckpt-00000001.pt', out / 'ckpt-00000001.pt')
    shutil.copy(FIXTURES / 'ckpt-gpt-fec4f0d.pt', out / 'ckpt-00000003.pt')
    foreign = {name: (out / name).read_bytes() for name in ('ckpt-00000001.pt', 'ckpt-00000003.pt')}
    r = run('train.py', *args('gpt', dataset, out, 8, '--eval_interval=2', '--keep_last=2'), '--init_from=resume')
    assert r.returncode == 0, r.stderr
    assert f'resuming from {out / "ckpt-00000004.pt"}' in r.stdout
    # this run saved 6 and 8 and kept its newest two; the others' files, older than both, are untouched
    assert sorted(f.name for f in out.glob('ckpt-*.pt')) == ['ckpt-00000001.pt', 'ckpt-00000003.pt',
                                                             'ckpt-00000006.pt', 'ckpt-00000008.pt']
    assert run_id_of(out / 'ckpt-00000006.pt') == run_id_of(out / 'ckpt-00000008.pt') == mine
    assert run_id_of(out / 'ckpt-00000001.pt') not in (None, mine) and run_id_of(out / 'ckpt-00000003.pt') is None
    assert {name: (out / name).read_bytes() for name in foreign} == foreign


def test_init_from_auto_starts_then_resumes(dataset, tmp_path):
    out = tmp_path / 'out'
    first = run('train.py', *args('rwkv', dataset, out, 3), '--init_from=auto')
    assert first.returncode == 0, first.stderr
    assert f"init_from='auto': no checkpoint in {out}, starting from scratch" in first.stdout
    again = run('train.py', *args('rwkv', dataset, out, 6), '--init_from=auto')
    assert again.returncode == 0, again.stderr
    assert f'resuming from {out / "ckpt-00000003.pt"} at iteration 3' in again.stdout
    whole = run('train.py', *args('rwkv', dataset, tmp_path / 'whole', 6))
    assert {**loss_lines(first.stdout), **loss_lines(again.stdout)} == loss_lines(whole.stdout)


def children(pid):
    """The pids whose parent is pid (Linux /proc)."""
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rank_of(pid):
    try:
        env = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b'RANK=')), None)


@pytest.mark.skipif(not Path('/proc/self/environ').exists(), reason='finds the worker processes through /proc')
def test_torchrun_max_restarts_resumes_after_a_rank_is_killed(dataset, tmp_path):
    # the preemptible command of the README: the same torchrun line, restarted by torchrun itself when a rank dies;
    # rank 1 is SIGKILLed twice, each time right after rank 0 logs a chosen iteration
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    common = ['--eval_interval=1', '--eval_iters=1', '--gradient_accumulation_steps=2']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    ref = subprocess.run([*torchrun, str(REPO / 'train.py'), *args('rwkv', dataset, tmp_path / 'ref', 16, *common)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    p = subprocess.Popen([*torchrun, '--max-restarts=3', str(REPO / 'train.py'),
                          *args('rwkv', dataset, tmp_path / 'out', 16, *common), '--init_from=auto'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(300, p.kill)  # a hang fails the test instead of stalling the suite
    watchdog.start()
    targets, killed, lines = [5, 11], [], []
    for line in p.stdout:
        lines.append(line)
        if targets and line.startswith(f'iter {targets[0]}/'):
            victim = next(pid for pid in children(p.pid) if rank_of(pid) == 1)
            os.kill(victim, signal.SIGKILL)
            killed.append(targets.pop(0))
    stderr = p.stderr.read()
    watchdog.cancel()
    assert p.wait() == 0, stderr[-3000:]
    stdout = ''.join(lines)
    assert killed == [5, 11]
    resumed = [int(i) for i in re.findall(r'resuming from .* at iteration (\d+)', stdout)]
    assert len(resumed) == 2 and resumed[0] <= 6 and 6 < resumed[1] <= 12, resumed
    got, want = loss_lines(stdout), loss_lines(ref.stdout)
    assert sorted(got) == sorted(want) == list(range(16))
    assert got == want  # every logged loss, before and after each restart, equals the uninterrupted run's
    a = torch.load(tmp_path / 'ref' / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def limit_file_size(nbytes):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return set_limit


def test_disk_full_while_saving(dataset, tmp_path):
    out = tmp_path / 'out'
    a = args('gpt', dataset, out, 3, '--eval_interval=1')
    assert run('train.py', *a).returncode == 0
    before = {f.name: f.read_bytes() for f in out.glob('ckpt*.pt')}
    # the next checkpoint cannot be written: more than 20 kB is refused (a checkpoint here is ~60 kB)
    r = subprocess.run([sys.executable, str(REPO / 'train.py'), *args('gpt', dataset, out, 6, '--eval_interval=1'),
                        '--init_from=resume'], capture_output=True, text=True, timeout=600,
                       preexec_fn=limit_file_size(20_000))
    one_line_error(r, 'train.py', f'could not write the checkpoint {out / "ckpt-00000004.pt"} (File too large); the '
                                  f'earlier checkpoints in {out} are intact')
    assert {f.name: f.read_bytes() for f in out.glob('ckpt*.pt')} == before  # ckpt.pt included
    assert not list(out.glob('*.tmp'))
    # and a resume afterwards is exact
    r = run('train.py', *args('gpt', dataset, out, 6, '--eval_interval=1'), '--init_from=resume')
    assert r.returncode == 0, r.stderr
    whole = run('train.py', *args('gpt', dataset, tmp_path / 'whole', 6, '--eval_interval=1'))
    for i, loss in loss_lines(r.stdout).items():
        assert loss == loss_lines(whole.stdout)[i]


def test_export_disk_full_and_onto_the_checkpoint_link(dataset, tmp_path):
    """export.py under a full disk: one line, the old export byte-identical, no temporary file; --dest=<out>/ckpt.pt
    replaces the link, never the checkpoint it points at."""
    out = tmp_path / 'out'
    assert run('train.py', *args('rwkv', dataset, out, 2)).returncode == 0
    dest = tmp_path / 'm.pth'
    assert run('export.py', f'--out_dir={out}', '--format=pth', f'--dest={dest}').returncode == 0
    before = dest.read_bytes()
    r = subprocess.run([sys.executable, str(REPO / 'export.py'), f'--out_dir={out}', '--format=pth', f'--dest={dest}'],
                       capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size(len(before) // 2))
    one_line_error(r, 'export.py', f'could not write {dest} (File too large); pick a writable --dest')
    assert dest.read_bytes() == before and not list(tmp_path.glob('.*.tmp'))
    checkpoints = {f.name: f.read_bytes() for f in out.glob('ckpt-*.pt')}
    r = run('export.py', f'--out_dir={out}', '--format=pth', f'--dest={out / "ckpt.pt"}')
    assert r.returncode == 0, r.stderr
    assert {f.name: f.read_bytes() for f in out.glob('ckpt-*.pt')} == checkpoints


def test_training_data_changed_under_a_run(dataset, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(dataset, data)
    out = tmp_path / 'out'
    assert run('train.py', *args('gpt', data, out, 2)).returncode == 0
    with open(data / 'train.bin', 'r+b') as f:  # the same size, other tokens in the middle
        f.seek(36000)
        f.write(bytes(200))
    r = run('train.py', *args('gpt', data, out, 4), '--init_from=resume')
    one_line_error(r, 'train.py', f'{data / "train.bin"} is not the file {out / "ckpt-00000002.pt"} was trained on')


def test_failing_data_preparation_is_its_own_line(tmp_path):
    d = tmp_path / 'web'
    d.mkdir()
    (d / 'prepare.py').write_text("import sys\nsys.exit('prepare.py: error: cannot stream the dataset (offline)')\n")
    r = run('train.py', f'--data_dir={d}', f'--out_dir={tmp_path / "out"}', '--device=cpu')
    one_line_error(r, 'train.py', f'preparing the dataset failed ({d / "prepare.py"} exited with status 1')
    lines = r.stderr.strip().splitlines()
    assert lines[-2] == 'prepare.py: error: cannot stream the dataset (offline)'


def test_cpu_kernel_build_prints_no_cuda_home_warning():
    r = subprocess.run([sys.executable, '-c', "import wkv_cuda; print(type(wkv_cuda.get_extension('cpu')).__name__)"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0 and 'Error' not in r.stdout, r.stderr
    assert 'CUDA' not in r.stderr, r.stderr


@pytest.mark.parametrize('model_type', ['gpt', 'rwkv'])
def test_checkpoints_from_before_the_layout_change_still_work(model_type, dataset, tmp_path):
    # written by main at fec4f0d (train.py, 2 iterations, L1 C8), with the logits that code gave for `idx`
    ckpt = torch.load(FIXTURES / f'ckpt-{model_type}-fec4f0d.pt', weights_only=True)
    saved = torch.load(FIXTURES / 'logits-fec4f0d.pt', weights_only=True)
    model = model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        logits, _ = model.prefill(saved['idx'])
    torch.testing.assert_close(logits, saved[model_type], rtol=0, atol=1e-6)
    # sample.py reads it, and a run resumes from it
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(FIXTURES / f'ckpt-{model_type}-fec4f0d.pt', out / 'ckpt.pt')
    r = run('sample.py', f'--out_dir={out}', '--start=abc', '--num_samples=1', '--max_new_tokens=5', '--device=cpu')
    assert r.returncode == 0 and r.stdout.startswith('abc'), r.stderr
    r = run('train.py', f'--data_dir={dataset}', f'--out_dir={out}', '--init_from=resume', '--max_iters=5',
            '--eval_interval=5', '--eval_iters=1', '--device=cpu', '--wkv_backend=torch', '--peak_flops=1e11')
    assert r.returncode == 0, r.stderr
    assert f'resuming from {out / "ckpt.pt"} at iteration 3' in r.stdout
    assert torch.load(out / 'ckpt.pt', weights_only=True)['iter_num'] == 5


# every bad setting: (script, arguments, what the one-line error says). The first nine are the ones that used to
# end in a traceback or be accepted.
SYNTAX_ERROR = 'batch_size = 4\nlearning_rate = (1e-3\n'
BAD = [
    ('train.py', ['--batch_size=0'], 'batch_size=0 (from --batch_size) is not allowed: batch_size must be >= 1'),
    ('train.py', ['--block_size=-1'], 'block_size must be >= 1'),
    ('train.py', ['--n_embd=0'], 'n_embd must be >= 1'),
    ('train.py', ['--gradient_accumulation_steps=0'], 'gradient_accumulation_steps must be >= 1'),
    ('train.py', ['--wkv_backend=gpu'], "wkv_backend must be one of 'auto', 'cuda', 'cpu', 'torch'"),
    ('train.py', ['--model_type=gpt', '--n_head=3', '--n_embd=32'], 'n_embd=32 must be a multiple of n_head=3'),
    ('train.py', ['CONFIG'], "line 2: '(' was never closed"),
    ('train.py', ['--eval_iters=0'], 'eval_iters must be >= 1'),
    ('train.py', ['--max_iters=-5'], 'max_iters must be >= 0'),
    ('train.py', ['--learning_rate=0'], 'learning_rate must be > 0'),
    ('train.py', ['--beta2=1.0'], 'beta2 must be in [0, 1)'),
    ('train.py', ['--dropout=-0.1'], 'dropout must be in [0, 1)'),
    ('train.py', ['--dtype=fp8'], "dtype must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
    ('train.py', ['--device=gpu'], 'device must be a string matching auto|cpu|cuda'),
    ('train.py', ['--nan_policy=ignore'], "nan_policy must be one of 'stop', 'skip'"),
    ('train.py', ['--keep_last=0'], 'keep_last must be >= 1'),
    ('train.py', ['--device=cuda:3'], "device='cuda:3' but CUDA is not available here"),
    ('sample.py', ['--top_k=-1'], 'top_k must be >= 0'),
    ('sample.py', ['--temperature=-1'], 'temperature must be >= 0'),
    ('sample.py', ['--top_p=0'], 'top_p must be in (0, 1]'),
    ('sample.py', ['--num_samples=0'], 'num_samples must be >= 1'),
    ('sample.py', ['--mode=fast'], "mode must be one of 'auto', 'rnn', 'parallel'"),
    ('sample.py', ['--device=tpu'], 'device must be a string matching'),
    ('sample.py', ['--dtype=half'], "dtype must be one of 'auto'"),
    ('export.py', ['--format=onnx'], "format must be one of 'hf', 'pth'"),
    ('export.py', ['--dest='], 'say where to write with --dest=PATH'),
    ('benchmark_inference_time.py', ['--n_tokens=0'], 'n_tokens must be >= 1'),
    ('benchmark_inference_time.py', ['--out=x/{dev}'], "out='x/{dev}': cannot fill in its placeholders"),
    ('benchmarks/bench_infctx.py', ['--worker=segmented'], "--worker='segmented': expected 'segmented:<ctx_len>'"),
    ('benchmark_inference_time.py', ['--models=["lstm"]'], "models must be one of 'rwkv', 'gpt'"),
    ('benchmark_inference_time.py', ['--report_at=[0]'], 'report_at must be >= 1'),
    ('benchmark_inference_time.py', ['--models=["gpt"]', '--n_head=3', '--n_embd=32', '--n_tokens=1'],
     'n_embd=32 must be a multiple of n_head=3'),
    ('benchmarks/bench_train.py', ['--iters=0'], 'iters must be >= 1'),
    ('benchmarks/bench_train.py', ['--wkv_backend=triton'], "wkv_backend must be one of"),
    ('benchmarks/bench_decode.py', ['--versions=[8]'], 'versions must be one of 4, 5, 6, 7'),
    ('benchmarks/bench_decode.py', ['--rounds=0'], 'rounds must be >= 1'),
    ('benchmarks/bench_decode.py', ['--worker=3'], 'it is how this script measures one version; leave it out'),
    ('benchmarks/bench_decode.py', ['--versions=[7]', '--n_embd=40'],
     'measuring version 7 failed: n_embd=40 must be a multiple of head_size=64'),
    ('benchmarks/bench_wkv.py', ['--dtypes=["int8"]'], "dtypes must be one of 'float32', 'float64', 'bfloat16'"),
    ('benchmarks/bench_wkv.py', ['--shapes=[(1, 0, 4)]'], 'shapes must be >= 1'),
    ('data/openwebtext/prepare.py', ['--num_proc=0'], 'num_proc must be >= 1'),
    ('data/shakespeare/prepare.py', ['--tokenizer=bpe'], "tokenizer must be 'gpt2', 'neox'"),
    ('data/shakespeare_char/prepare.py', ['--out'], 'must look like --key=value'),
]


@pytest.mark.parametrize('script,argv,fragment', BAD, ids=[f'{s} {" ".join(a)}' for s, a, _ in BAD])
def test_bad_setting_is_one_line(script, argv, fragment, tmp_path, dataset):
    if argv == ['CONFIG']:
        (tmp_path / 'cfg.py').write_text(SYNTAX_ERROR)
        argv = [str(tmp_path / 'cfg.py')]
    extra = [f'--out_dir={tmp_path / "out"}', f'--data_dir={dataset}', '--device=cpu'] if script == 'train.py' \
        and not any(a.startswith('--device') for a in argv) else []
    name = Path(script).name
    one_line_error(run(script, *extra, *argv, cwd=tmp_path), name, fragment)
    assert not (tmp_path / 'out').exists()  # refused before anything ran


def test_failing_kernel_build_is_one_line(dataset, tmp_path):
    # an explicitly requested kernel that cannot be compiled (here: no working C++ compiler, an empty extension cache)
    env = {**os.environ, 'TORCH_EXTENSIONS_DIR': str(tmp_path / 'ext'), 'CXX': '/bin/false'}
    r = subprocess.run([sys.executable, str(REPO / 'train.py'), *args('rwkv', dataset, tmp_path / 'out', 2),
                        '--wkv_backend=cpu'], capture_output=True, text=True, timeout=600, env=env)
    one_line_error(r, 'train.py', "wkv_backend='cpu': the kernel failed to build:")
    assert 'hint: pip install ninja and make sure a C++ compiler' in r.stderr
    assert not list((tmp_path / 'out').glob('ckpt*'))


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_node_command_on_one_machine_matches_one_process(dataset, tmp_path):
    # the README's multi-node line as far as one machine allows: two torchrun agents, --nnodes=2 --node_rank=0/1,
    # c10d rendezvous at one address, one CPU process each (gloo); the same losses as one process running both
    # micro-steps, and the restart flag accepted
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    common = ['--gradient_accumulation_steps=2']
    one = run('train.py', *args('rwkv', dataset, tmp_path / 'one', 6, *common))
    assert one.returncode == 0, one.stderr[-2000:]
    endpoint = f'127.0.0.1:{free_port()}'
    nodes = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1',
                               f'--node_rank={rank}', '--rdzv_backend=c10d', f'--rdzv_endpoint={endpoint}',
                               '--max-restarts=3', str(REPO / 'train.py'),
                               *args('rwkv', dataset, tmp_path / f'node{rank}', 6, *common), '--init_from=auto'],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for rank in (0, 1)]
    watchdog = threading.Timer(600, lambda: [p.kill() for p in nodes])
    watchdog.start()
    outs = [p.communicate() for p in nodes]
    watchdog.cancel()
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    got, want = loss_lines(outs[0][0] + outs[1][0]), loss_lines(one.stdout)
    assert sorted(got) == sorted(want) == list(range(6))
    for i in want:
        assert got[i] == pytest.approx(want[i], rel=1e-5), i
