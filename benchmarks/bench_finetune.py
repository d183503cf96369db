"""
Fine-tuning a trained RWKV on a new task three ways, each a train.py run from the same base .pth on the same data:
full fine-tuning (every weight), LoRA (adapters on the block matrices, lora.py) and state tuning (each layer's initial
WKV state, RWKV-5/6/7). The task is text of another style in the base model's own characters: by default this
repository's Python sources, for a model trained on Shakespeare.

$ python train.py config/train_shakespeare_char.py --rwkv_version=7 --head_size=32 --out_dir=out-char-v7
$ python benchmarks/bench_finetune.py --base=out-char-v7

Per method: trainable parameters (and their share), AdamW's state for them (two fp32 moments each), the peak RSS of
the training process, the task's val loss before and after, the improvement as a share of full fine-tuning's, and the
wall time. Every run sees the same batches (train.py's data order is a function of the seed and the iteration).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configurator import ConfigError, Option, parse_config, run_script  # noqa: E402
from hardware import run_provenance  # noqa: E402

OPTIONS = dict(
    base=Option('out-char-v7', "out_dir of the trained RWKV-5/6/7 checkpoint that every method starts from"),
    task=Option(['*.py'], "glob patterns (from the repository root) of the task's text; characters outside the base "
                          "model's vocabulary are dropped"),
    methods=Option(['full', 'lora', 'state'], "what to compare", ('full', 'lora', 'state')),
    max_iters=Option(300, "iterations per method", '>= 1'),
    eval_iters=Option(40, "val batches per evaluation (the same for every method)", '>= 1'),
    learning_rate=Option({'full': 1e-3, 'lora': 2e-3, 'state': 5e-2}, "peak learning rate per method"),
    lora_r=Option(8, "LoRA rank", '>= 1'),
    batch_size=Option(16, "sequences per iteration", '>= 1'),
    block_size=Option(128, "characters per sequence", '>= 1'),
)


def task_data(cfg, itos, out):
    """The task as a char dataset of the base's vocabulary: train.bin / val.bin (90 / 10) and meta.json."""
    stoi = {c: i for i, c in enumerate(itos)}
    text = ''.join(p.read_text(errors='replace') for pattern in cfg.task for p in sorted(REPO.glob(pattern)))
    ids = np.array([stoi[c] for c in text if c in stoi], dtype=np.uint16)
    if len(ids) < 20 * cfg.block_size:
        raise ConfigError(f"task={cfg.task} gives {len(ids)} characters of the base's vocabulary; give more text")
    n = int(0.9 * len(ids))
    out.mkdir(parents=True)
    ids[:n].tofile(out / 'train.bin')
    ids[n:].tofile(out / 'val.bin')
    (out / 'meta.json').write_text(json.dumps({'tokenizer': 'char', 'vocab_size': len(itos), 'itos': itos}))
    return len(ids)


def finetune(cfg, method, base_pth, data, out):
    """One train.py run: (its stdout, wall seconds, peak RSS in MB)."""
    lr = cfg.learning_rate[method]
    argv = [sys.executable, str(REPO / 'train.py'), f'--init_from={base_pth}', f'--finetune={method}',
            f'--data_dir={data}', f'--out_dir={out}', f'--max_iters={cfg.max_iters}',
            f'--eval_interval={cfg.max_iters}', f'--eval_iters={cfg.eval_iters}', f'--batch_size={cfg.batch_size}',
            f'--block_size={cfg.block_size}', '--gradient_accumulation_steps=1', f'--learning_rate={lr}',
            f'--min_lr={lr / 10}', f'--lr_decay_iters={cfg.max_iters}', '--warmup_iters=0', '--weight_decay=0',
            f'--lora_r={cfg.lora_r}', '--log_interval=50', '--device=cpu', '--compile=False']
    t0 = time.perf_counter()
    with open(out.with_suffix('.out'), 'w+') as fout, open(out.with_suffix('.err'), 'w+') as ferr:
        p = subprocess.Popen(argv, stdout=fout, stderr=ferr, text=True)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS (kB on Linux)
        fout.seek(0), ferr.seek(0)
        stdout, stderr = fout.read(), ferr.read()
    if status != 0:
        raise ConfigError(f"train.py --finetune={method} failed: {(stderr.strip().splitlines() or ['?'])[-1]}")
    return stdout, time.perf_counter() - t0, usage.ru_maxrss / 1024


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    import torch
    from checkpoint import load_latest_checkpoint, model_from_checkpoint
    from interop import save_pth
    ckpt = load_latest_checkpoint(cfg.base, 'cpu')[0]
    if ckpt['model_type'] != 'rwkv' or ckpt.get('tokenizer', {}).get('tokenizer') != 'char':
        raise ConfigError(f"{cfg.base} must hold a char-level RWKV (the quick start's, say)")
    commit, machine = run_provenance('cpu')
    a = ckpt['model_args']
    print(f"# bench_finetune.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}\nbase {cfg.base}: RWKV-{a['version']} L{a['n_layer']} C{a['n_embd']}, "
          f"iteration {ckpt['iter_num']}; {cfg.max_iters} iterations of {cfg.batch_size} x {cfg.block_size} per "
          f"method, lr {cfg.learning_rate}, LoRA r={cfg.lora_r}\n", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_pth = tmp / 'base.pth'
        save_pth(model_from_checkpoint(ckpt), base_pth, ckpt['tokenizer'])
        n = task_data(cfg, ckpt['tokenizer']['itos'], tmp / 'task')
        print(f"task: {cfg.task}, {n:,} characters\n", flush=True)
        for method in cfg.methods:
            stdout, wall, rss = finetune(cfg, method, base_pth, tmp / 'task', tmp / method)
            evals = [float(v) for v in re.findall(r'val loss ([\d.]+)', stdout)]
            trained = re.search(r': ([\d,]+) parameters trained, ([\d,]+) frozen', stdout)
            total = sum(p.numel() for p in model_from_checkpoint(ckpt).parameters())
            k = int(trained[1].replace(',', '')) if trained else total
            rows[method] = dict(trained=k, total=total, before=evals[0], after=evals[-1], wall=wall, rss=rss)
            print(f"{method}: val {evals[0]:.4f} -> {evals[-1]:.4f} in {wall:.0f} s", file=sys.stderr, flush=True)
    gain = rows['full']['before'] - rows['full']['after'] if 'full' in rows else None
    print("| method | trained parameters | share | AdamW state | peak RSS | val loss before | after | improvement | "
          "vs full | wall |\n|---|---|---|---|---|---|---|---|---|---|")
    for method, r in rows.items():
        vs = f"{(r['before'] - r['after']) / gain * 100:.0f}%" if gain else '-'
        print(f"| {method} | {r['trained']:,} | {r['trained'] / r['total'] * 100:.2f}% | "
              f"{r['trained'] * 8 / 2 ** 20:.2f} MB | {r['rss']:.0f} MB | {r['before']:.4f} | {r['after']:.4f} | "
              f"{r['before'] - r['after']:.4f} | {vs} | {r['wall']:.0f} s |")


if __name__ == '__main__':
    run_script(main)
