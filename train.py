"""
Train a GPT-2 or an RWKV-4 language model; nanoGPT's train.py loop for both.

Single process (CPU or one GPU):
$ python train.py config/train_shakespeare_char.py --max_iters=500
DDP on 8 GPUs of one node:
$ torchrun --standalone --nproc_per_node=8 train.py config/train_rwkv.py

The defaults below are the configuration; a config file (plain Python assignments) and then `--key=value` arguments
override them. Only keys defined here are accepted.
"""
import ast
import builtins
import difflib
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# default config values: RWKV-4 ~130M on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # evaluate once and exit
always_save_checkpoint = True  # save after every eval, not only when val loss improves
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt, either model type), or a pretrained model: gpt2*,
# RWKV/rwkv-4-*-pile, a Hugging Face directory or an RWKV-4 .pth (with eval_only: the eval configs)
# wandb logging
wandb_log = False
wandb_project = 'nanorwkv'
wandb_run_name = 'run'
# data
dataset = 'openwebtext'
data_dir = ''  # '' means data/<dataset> next to this file
gradient_accumulation_steps = 5 * 8  # micro-steps per optimizer step, across all DDP ranks
batch_size = 12  # micro-batch size
block_size = 1024
# model
model_type = 'rwkv'  # 'rwkv' or 'gpt'
n_layer = 12
n_embd = 768
n_head = 12  # gpt only
dropout = 0.0  # gpt only
bias = False  # gpt only
wkv_backend = 'auto'  # rwkv only: 'auto' | 'cuda' | 'cpu' | 'torch'
rwkv_lr_scale = True  # rwkv only: RWKV-LM's layerwise_lr (time_decay x2, time_first x3)
# AdamW
learning_rate = 6e-4
max_iters = 600000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping
# learning rate schedule: linear warmup, cosine decay to min_lr
decay_lr = True
warmup_iters = 2000
lr_decay_iters = 600000  # ~= max_iters per Chinchilla
min_lr = 6e-5  # ~= learning_rate / 10 per Chinchilla
# system
device = 'auto'  # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
dtype = 'auto'  # 'auto', 'float32', 'bfloat16' or 'float16' (the last two by autocast)
compile = False  # torch.compile the model
seed = 1337
peak_flops = 0.0  # device peak FLOP/s for MFU; 0 means: a table for known GPUs, else a matmul measured at start
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


class ConfigError(ValueError):
    pass


def _check(config, key, value, origin):
    if key not in config:
        close = difflib.get_close_matches(key, list(config), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise ConfigError(f"unknown config key '{key}' in {origin}{hint}")
    want = type(config[key])
    if want is float and type(value) is int:
        value = float(value)  # an int may stand for a float
    if type(value) is not want:
        raise ConfigError(f"config key '{key}' in {origin} expects {want.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value


def usage(script):
    """A script's --help: its docstring and its defaults with their comments (the defaults are the documentation)."""
    source = Path(script).read_text()
    tree = ast.parse(source)
    lines = source.splitlines()
    marks = [i for i, line in enumerate(lines) if line.startswith('# ---')]
    if len(marks) >= 2:  # train.py: module-level defaults between two marker lines
        block = '\n'.join(lines[marks[0] + 1:marks[1]])
    else:  # DEFAULTS = dict(...)
        node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'DEFAULTS')
        block = '\n'.join(lines[node.lineno:node.end_lineno - 1])
    return f"{ast.get_docstring(tree)}\n\noptions, as --key=value (or in a config file as key = value):\n{block}"


def parse_config(defaults, argv):
    """defaults updated by config files and --key=value arguments, in order. Raises ConfigError on anything else.
    -h / --help prints the running script's usage and exits."""
    if any(arg in ('-h', '--help') for arg in argv):
        print(usage(sys.modules['__main__'].__file__))
        raise SystemExit(0)
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith('--'):
            path = Path(arg)
            if not path.is_file():
                raise ConfigError(f"config file {arg} not found (expected a file like config/train_shakespeare_char.py"
                                  f" or --key=value)")
            namespace = {}
            exec(builtins.compile(path.read_text(), str(path), "exec"), namespace)  # `compile` is a config key
            for key, value in namespace.items():
                if not key.startswith('_') and not isinstance(value, type(sys)):
                    config[key] = _check(config, key, value, arg)
        else:
            key, sep, raw = arg[2:].partition('=')
            if not sep:
                raise ConfigError(f"argument {arg} must look like --key=value")
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # a bare word is a string
            config[key] = _check(config, key, value, f"--{key}")
    return config


# -----------------------------------------------------------------------------
# helpers used by train.py and sample.py

def resolve_device(name):
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f"device='{name}' but CUDA is not available here; use --device=cpu or --device=auto")
    return name


def resolve_dtype(name, device_type):
    if name == 'auto':
        if device_type == 'cuda':
            return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
        return 'float32'  # CPU autocast to bf16 is slower than fp32 on most CPUs
    if name not in ('float32', 'bfloat16', 'float16'):
        raise ConfigError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got '{name}'")
    return name


def build_model(model_type, model_args):
    """A fresh model of either type from its config dict (as stored in checkpoints)."""
    if model_type == 'gpt':
        from model_gpt import GPT, GPTConfig
        return GPT(GPTConfig(**model_args))
    if model_type == 'rwkv':
        from model_rwkv import RWKV, RWKVConfig
        return RWKV(RWKVConfig(**model_args))
    raise ConfigError(f"model_type must be 'gpt' or 'rwkv', got '{model_type}'")


def load_checkpoint(path, device):
    """Load a checkpoint written by train.py; never unpickles code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; train one first, e.g. python train.py "
                          f"config/train_shakespeare_char.py")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files; say which file and why
        raise ConfigError(f"{path} is not a readable nanoRWKV checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict) or not {'model', 'model_type', 'model_args'} <= set(ckpt):
        raise ConfigError(f"{path} is not a nanoRWKV checkpoint (expected keys model, model_type, model_args)")
    return ckpt


def model_from_checkpoint(ckpt):
    model = build_model(ckpt['model_type'], ckpt['model_args'])
    state_dict = ckpt['model']
    prefix = '_orig_mod.'  # left by torch.compile
    state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    model.load_state_dict(state_dict)
    return model


def load_pretrained(init_from, wkv_backend='auto'):
    """(model, model type, tokenizer spec) for a pretrained model: gpt2*, RWKV/rwkv-4-*-pile, a Hugging Face format
    directory (RWKV or GPT-2) or an official RWKV-4 .pth. Errors are ConfigErrors of one line."""
    import json
    from model_gpt import GPT
    from model_rwkv import RWKV
    path = Path(init_from)
    try:
        if init_from in GPT.HUB_NAMES:
            return GPT.from_pretrained(init_from), 'gpt', {'tokenizer': 'gpt2'}
        if init_from in RWKV.HUB_NAMES:
            return RWKV.from_pretrained(init_from, wkv_backend), 'rwkv', {'tokenizer': 'neox'}
        if path.is_file():
            return RWKV.from_pretrained(path, wkv_backend), 'rwkv', {'tokenizer': 'neox'}  # official: a Pile model
        if path.is_dir():
            config = path / 'config.json'
            model_type = json.loads(config.read_text()).get('model_type') if config.is_file() else None
            if model_type not in ('rwkv', 'gpt2'):
                raise ConfigError(f"{path} is not a Hugging Face RWKV or GPT-2 directory (config.json model_type: "
                                  f"{model_type})")
            # the tokenizer: what export.py recorded, else the directory's tokenizer.json, else the family's usual
            if (path / 'nanorwkv_tokenizer.json').is_file():
                spec = json.loads((path / 'nanorwkv_tokenizer.json').read_text())
            elif (path / 'tokenizer.json').is_file():
                spec = {'tokenizer': 'file', 'path': str(path / 'tokenizer.json')}
            else:
                spec = {'tokenizer': 'neox' if model_type == 'rwkv' else 'gpt2'}
            if model_type == 'rwkv':
                return RWKV.from_pretrained(path, wkv_backend), 'rwkv', spec
            return GPT.from_pretrained(path), 'gpt', spec
    except ValueError as e:  # from_pretrained's errors are one line already
        raise ConfigError(str(e)) from e
    raise ConfigError(f"init_from={init_from!r}: expected {', '.join(GPT.HUB_NAMES)}, RWKV/rwkv-4-{{169m,430m,1b5,"
                      f"3b,7b,14b}}-pile, a Hugging Face directory or an RWKV-4 .pth")


def data_path(config):
    return Path(config['data_dir']) if config['data_dir'] else REPO / 'data' / config['dataset']


def read_meta(directory):
    """The dataset's meta.json (vocabulary of char datasets), or None for GPT-2 BPE datasets."""
    import json
    meta = directory / 'meta.json'
    return json.loads(meta.read_text()) if meta.is_file() else None


def measure_peak_flops(device, dtype):
    """Peak FLOP/s for MFU. Known GPUs: the vendor's dense peak for the training dtype; otherwise measured with a
    large matmul on this device, so MFU on a CPU means 'fraction of what a plain matmul reaches here'."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        # dense (no sparsity) tensor-core peaks from NVIDIA's datasheets: (bf16/fp16, tf32 for fp32)
        table = {'H100': (989e12, 494e12), 'H200': (989e12, 494e12), 'A100': (312e12, 156e12)}
        for key, (half, single) in table.items():
            if key in name:
                return half if dtype in ('bfloat16', 'float16') else single
    tdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    n = 1024 if device == 'cpu' else 8192
    a = torch.randn(n, n, device=device, dtype=tdtype)
    b = torch.randn(n, n, device=device, dtype=tdtype)
    a @ b  # warm up
    best = float('inf')
    for _ in range(3):
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def save_checkpoint(ckpt, path):
    """Atomic: write a temporary file next to the target, then rename over it."""
    tmp = path.with_suffix('.pt.tmp')
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def main(argv):
    config = parse_config(DEFAULTS, argv)
    c = config
    # DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
        world_size = int(os.environ['WORLD_SIZE'])
    master = rank == 0
    device = resolve_device(c['device'])
    if ddp and device == 'cuda':
        device = f'cuda:{local_rank}'
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype = resolve_dtype(c['dtype'], device_type)
    if c['model_type'] not in ('gpt', 'rwkv'):
        raise ConfigError(f"model_type must be 'gpt' or 'rwkv', got '{c['model_type']}'")
    if c['gradient_accumulation_steps'] % world_size != 0:
        raise ConfigError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be a multiple of "
                          f"the number of processes ({world_size})")

    # data: prepare it on first use when the dataset knows how
    ddir = data_path(c)
    if not (ddir / 'train.bin').is_file():
        prepare = ddir / 'prepare.py'
        if not prepare.is_file():
            raise ConfigError(f"train.bin not found in {ddir} and there is no prepare.py there; "
                              f"create train.bin/val.bin or pick another --dataset")
        if master:
            print(f"train.bin not found in {ddir}: running {prepare.relative_to(REPO) if prepare.is_relative_to(REPO) else prepare}")
            subprocess.run([sys.executable, str(prepare)], check=True)
    if ddp:
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
        torch.distributed.init_process_group(backend=backend)
        torch.distributed.barrier()  # wait for rank 0's data preparation
        if device_type == 'cuda':
            torch.cuda.set_device(device)
    for split in ('train', 'val'):
        if not (ddir / f'{split}.bin').is_file():
            raise ConfigError(f"{split}.bin not found in {ddir}; run: python {ddir / 'prepare.py'}")
        n_tokens = (ddir / f'{split}.bin').stat().st_size // 2
        if n_tokens <= c['block_size']:
            raise ConfigError(f"{split}.bin in {ddir} has {n_tokens} tokens, not more than block_size="
                              f"{c['block_size']}; use a smaller --block_size")
    meta = read_meta(ddir)
    grad_accum = c['gradient_accumulation_steps'] // world_size
    tokens_per_iter = grad_accum * world_size * c['batch_size'] * c['block_size']
    if master:
        print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} x {grad_accum} x {c['batch_size']} x "
              f"{c['block_size']}); device {device}, dtype {dtype}")
        os.makedirs(c['out_dir'], exist_ok=True)
    torch.manual_seed(c['seed'] + rank)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

    def get_batch(split):
        # a fresh memmap per batch: numpy keeps memmaps alive otherwise, and memory grows (nanoGPT)
        data = np.memmap(ddir / f'{split}.bin', dtype=np.uint16, mode='r')
        ix = torch.randint(len(data) - c['block_size'], (c['batch_size'],))
        x = torch.stack([torch.from_numpy(data[i:i + c['block_size']].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + c['block_size']].astype(np.int64)) for i in ix])
        if device_type == 'cuda':
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    # model
    iter_num, best_val_loss = 0, 1e9
    ckpt_path = Path(c['out_dir']) / 'ckpt.pt'
    if c['init_from'] == 'scratch':
        vocab_size = meta['vocab_size'] if meta else 50257  # no meta.json: GPT-2 BPE
        if not meta or meta['tokenizer'] != 'char':
            vocab_size = -(-vocab_size // 64) * 64  # BPE: pad to a multiple of 64 for faster matmuls (GPT-2: 50304)
        if c['model_type'] == 'gpt':
            model_args = dict(n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'], block_size=c['block_size'],
                              bias=c['bias'], vocab_size=vocab_size, dropout=c['dropout'])
        else:
            # RWKV-v4neo initialises the embedding as U(-lr_init, lr_init)
            model_args = dict(n_layer=c['n_layer'], n_embd=c['n_embd'], block_size=c['block_size'],
                              vocab_size=vocab_size, emb_init=c['learning_rate'], wkv_backend=c['wkv_backend'])
        model = build_model(c['model_type'], model_args)
        checkpoint = None
    elif c['init_from'] != 'resume':
        model, c['model_type'], spec = load_pretrained(c['init_from'], c['wkv_backend'])
        data_tokenizer = (meta or {'tokenizer': 'gpt2'}).get('tokenizer')
        if spec['tokenizer'] != 'file' and data_tokenizer != spec['tokenizer']:
            raise ConfigError(f"{ddir} is tokenized with '{data_tokenizer}' but {c['init_from']} reads "
                              f"'{spec['tokenizer']}': tokenize the data with the model's tokenizer, e.g. "
                              f"python data/openwebtext/prepare.py --tokenizer={spec['tokenizer']}")
        if c['model_type'] == 'gpt':
            if c['block_size'] > model.config.block_size:
                raise ConfigError(f"block_size={c['block_size']} exceeds {c['init_from']}'s "
                                  f"{model.config.block_size} positions")
            model.crop_block_size(c['block_size'])
        else:
            model.config.block_size = c['block_size']
        model_args = asdict(model.config)
        checkpoint = None
    else:
        checkpoint = load_checkpoint(ckpt_path, device)
        if checkpoint['model_type'] != c['model_type']:
            print(f"resuming a '{checkpoint['model_type']}' checkpoint (model_type={c['model_type']} is ignored)")
        c['model_type'] = checkpoint['model_type']
        model_args = checkpoint['model_args']
        if c['model_type'] == 'rwkv':
            model_args['wkv_backend'] = c['wkv_backend']  # a runtime choice, not part of the weights
        model = model_from_checkpoint(checkpoint)
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    model.to(device)
    if master:
        print(f"{c['model_type']}: {model.get_num_params() / 1e6:.2f}M parameters (non-embedding)")

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    betas = (c['beta1'], c['beta2'])
    if c['model_type'] == 'rwkv':
        optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], betas, device_type,
                                               lr_scale=c['rwkv_lr_scale'])
    else:
        optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], betas, device_type)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if 'scaler' in checkpoint:
            scaler.load_state_dict(checkpoint['scaler'])
    checkpoint = None  # free memory

    raw_model = model
    if c['compile']:
        print("compiling the model... (takes a while)")
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
        raw_model = model.module._orig_mod if c['compile'] else model.module
    elif c['compile']:
        raw_model = model._orig_mod

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ('train', 'val'):
            losses = torch.zeros(c['eval_iters'])
            for k in range(c['eval_iters']):
                X, Y = get_batch(split)
                with ctx:
                    _, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    def get_lr(it):
        # linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters, then min_lr
        if it < c['warmup_iters']:
            return c['learning_rate'] * (it + 1) / (c['warmup_iters'] + 1)
        if it > c['lr_decay_iters']:
            return c['min_lr']
        ratio = (it - c['warmup_iters']) / max(c['lr_decay_iters'] - c['warmup_iters'], 1)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return c['min_lr'] + coeff * (c['learning_rate'] - c['min_lr'])

    if c['wandb_log'] and master:
        import wandb
        wandb.init(project=c['wandb_project'], name=c['wandb_run_name'], config=config)

    peak = c['peak_flops'] or measure_peak_flops(device, dtype)
    if master:
        print(f"peak FLOP/s for MFU: {peak / 1e12:.3g} TFLOP/s")
    tokenizer = meta if meta else {'tokenizer': 'gpt2'}
    X, Y = get_batch('train')
    t0 = time.time()
    local_iter, running_mfu = 0, -1.0
    while True:
        lr = get_lr(iter_num) if c['decay_lr'] else c['learning_rate']
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)

        if iter_num % c['eval_interval'] == 0 and master:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if c['wandb_log']:
                wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr,
                           'mfu': running_mfu * 100})
            if losses['val'] < best_val_loss or c['always_save_checkpoint']:
                best_val_loss = min(best_val_loss, losses['val'])
                if iter_num > 0:
                    ckpt = {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                            'scaler': scaler.state_dict(), 'model_type': c['model_type'],
                            'model_args': asdict(raw_model.config), 'iter_num': iter_num,
                            'best_val_loss': best_val_loss, 'config': config, 'tokenizer': tokenizer}
                    print(f"saving checkpoint to {c['out_dir']}")
                    save_checkpoint(ckpt, ckpt_path)
        if iter_num == 0 and c['eval_only']:
            break

        for micro_step in range(grad_accum):
            if ddp:
                # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / grad_accum
            X, Y = get_batch('train')  # fetch the next batch while the device works
            scaler.scale(loss).backward()
        if c['grad_clip'] != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), c['grad_clip'])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % c['log_interval'] == 0 and master:
            lossf = loss.item() * grad_accum  # a CPU-GPU sync point
            if local_iter >= 5:  # let the first iterations settle
                mfu = raw_model.estimate_mfu(c['batch_size'] * grad_accum, dt, peak)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            print(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, "
                  f"tok/s {tokens_per_iter / dt:,.0f}, mfu {running_mfu * 100:.2f}%")
        iter_num += 1
        local_iter += 1
        if iter_num > c['max_iters']:
            break

    if ddp:
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"train.py: error: {e}")
