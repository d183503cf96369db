"""README.md runs as printed: every shell command and Python block, top to bottom, in one copy of the repository, the
way a newcomer would go through it. What the test changes is written here, in the open:
- training commands get OVERRIDES appended (later --key=value arguments win), sample.py commands SAMPLE_OVERRIDES;
- data/shakespeare_char/ holds a stand-in for tiny shakespeare (README.md's own characters), since the suite is
  offline; the real dataset's download is the one step not run here;
- commands and Python blocks that need a download or GPUs are skipped, each matched by a rule of SKIP with its reason;
  any other block runs, and every block must be run, skipped by a rule, or an output sample (```text).
After the walk no tracked file of the copy has changed: no command overwrote the repository's own files."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO

pytestmark = pytest.mark.slow

OVERRIDES = ['--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--log_interval=1']
SAMPLE_OVERRIDES = ['--max_new_tokens=16']
SKIP = [  # (pattern found in the command or Python block, why it is not run here)
    (r'^pip install', "installs packages (.ci/run does, before the suite)"),
    (r'python -m pytest', "the test suite itself"),
    (r'--nproc_per_node=8|--nnodes', "needs 8 GPUs"),
    (r'config/train_rwkv\.py|config/train_gpt2\.py', "OpenWebText from the hub, on GPUs"),
    (r'config/eval_', "pretrained models and OpenWebText from the hub, on GPUs"),
    (r'tinystories', "TinyStories from the hub, on a GPU"),
    (r"RWKV/rwkv-4|gpt2-medium|from_pretrained\('gpt2'\)", "a download from the Hugging Face hub"),
    (r'RWKV-4-Pile-169M|RWKV-x070-World', "BlinkDL's file, a download"),
]


def readme_blocks():
    """[(language, text, line)] of README.md's fenced blocks, in order."""
    text = (REPO / 'README.md').read_text()
    return [(m[1], m[2], text[:m.start()].count('\n') + 1)
            for m in re.finditer(r'^```(\w*)\n(.*?)^```', text, re.S | re.M)]


def commands(block):
    """The commands of a shell block: continuation lines joined, comments dropped, '&&' chains split."""
    joined = block.replace('\\\n', ' ')
    out = []
    for line in joined.splitlines():
        if '>' in line:  # a redirection: as written, less its comment
            out += [line.split(' #')[0].strip()] if line.strip() else []
            continue
        words = shlex.split(line, comments=True)
        while words:
            n = words.index('&&') if '&&' in words else len(words)
            out.append(shlex.join(words[:n]))
            words = words[n + 1:]
    return out


def skip_reason(text):
    return next((why for pattern, why in SKIP if re.search(pattern, text)), None)


def copy_repository(dest):
    """The tracked files (git ls-files), with wkv_cuda/ linked rather than copied: the kernels build from the same
    sources, so torch's extension cache serves them."""
    files = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith('wkv_cuda/') or not (REPO / f).is_file():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    (dest / 'wkv_cuda').symlink_to(REPO / 'wkv_cuda')
    git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-c', 'commit.gpgsign=false']
    subprocess.run([*git, 'init', '-q'], cwd=dest, check=True)
    subprocess.run([*git, 'add', '-A'], cwd=dest, check=True)
    subprocess.run([*git, 'commit', '-qm', 'copy'], cwd=dest, check=True)


def stand_in_shakespeare(data):
    """data/shakespeare_char as its prepare.py writes it, from README.md's text instead of tiny shakespeare."""
    text = (REPO / 'README.md').read_text()
    itos = sorted(set(text))
    ids = np.array([itos.index(c) for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    data.mkdir(parents=True, exist_ok=True)
    ids[:n].tofile(data / 'train.bin')
    ids[n:].tofile(data / 'val.bin')
    (data / 'meta.json').write_text(json.dumps({'tokenizer': 'char', 'vocab_size': len(itos), 'itos': itos}))


def run_in(copy, cmd, env):
    r = subprocess.run(['bash', '-c', cmd], cwd=copy, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0 and 'Traceback' not in r.stderr, f"$ {cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_every_readme_command_and_snippet_runs_as_printed(tmp_path):
    copy = tmp_path / 'nanoRWKV'
    copy_repository(copy)
    stand_in_shakespeare(copy / 'data' / 'shakespeare_char')
    bin_dir = tmp_path / 'bin'  # `python` is this interpreter; torchrun its own
    bin_dir.mkdir()
    (bin_dir / 'python').symlink_to(sys.executable)
    env = {**os.environ, 'PATH': f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    ran, skipped = [], []
    for lang, block, line in readme_blocks():
        assert lang in ('sh', 'python', 'text'), f"README.md line {line}: a ```{lang} block the test cannot run"
        if lang == 'text':
            continue
        if lang == 'python':
            why = skip_reason(block)
            if why:
                skipped.append((line, 'python block', why))
                continue
            run_in(copy, f"python -c {shlex.quote(block)}", env)
            ran.append((line, 'python block'))
            continue
        for cmd in commands(block):
            why = skip_reason(cmd)
            if why:
                skipped.append((line, cmd, why))
                continue
            if re.search(r'\btrain\.py\b', cmd):
                cmd = ' '.join([cmd, *OVERRIDES])
            elif re.search(r'\bsample\.py\b', cmd):
                cmd = ' '.join([cmd, *SAMPLE_OVERRIDES])
            r = run_in(copy, cmd, env)
            ran.append((line, cmd))
            if 'train.py' in cmd and 'torchrun' not in cmd:
                assert re.search(r'iter 1/2: loss [\d.]+', r.stdout), r.stdout[-2000:]
    print('\n'.join(f"ran (line {n}): {c}" for n, c in ran) + '\n' +
          '\n'.join(f"skipped (line {n}): {c}: {why}" for n, c, why in skipped))
    assert len(ran) >= 20
    # the quick start trained and sampled, exports landed where their --dest said
    assert (copy / 'out-shakespeare-char' / 'ckpt.pt').is_file() and (copy / 'rwkv-shakespeare.pth').is_file()
    changed = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=copy, capture_output=True,
                             text=True, check=True).stdout
    assert changed == '', f"README commands changed tracked files:\n{changed}"
