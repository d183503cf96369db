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
import signal
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
keep_last = 3  # checkpoints kept in out_dir (ckpt-<iter>.pt; ckpt.pt is the newest)
nan_policy = 'stop'  # a non-finite loss: 'stop' (one-line error, nothing saved) or 'skip' (drop that step)
init_from = 'scratch'  # 'scratch', 'resume' (the newest intact checkpoint in out_dir), or a pretrained model: gpt2*,
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
activation_checkpointing = False  # recompute each block in backward instead of storing its activations
fsdp = False  # under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard) instead of DDP
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


def parse_config(defaults, argv, given=None):
    """defaults updated by config files and --key=value arguments, in order. Raises ConfigError on anything else.
    -h / --help prints the running script's usage and exits. `given`, a set, collects the keys that were set."""
    given = set() if given is None else given
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
                    given.add(key)
        else:
            key, sep, raw = arg[2:].partition('=')
            if not sep:
                raise ConfigError(f"argument {arg} must look like --key=value")
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw  # a bare word is a string
            config[key] = _check(config, key, value, f"--{key}")
            given.add(key)
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


def run_provenance(device):
    """(git commit, machine) for the header every benchmark prints: what produced its numbers."""
    import platform
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                            cwd=REPO).stdout.strip() or 'unknown'
    if device.startswith('cuda'):
        return commit, torch.cuda.get_device_name(device)
    return commit, f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


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


class TrainingError(RuntimeError):
    pass


def fsync_dir(directory):
    """Make renames in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_files(out_dir):
    """ckpt-<iter>.pt files in out_dir, newest first."""
    files = [f for f in Path(out_dir).glob('ckpt-*.pt') if f.stem[5:].isdigit()]
    return sorted(files, key=lambda f: int(f.stem[5:]), reverse=True)


def save_checkpoint(ckpt, out_dir, keep_last):
    """Crash-safe: written to a temporary file, fsynced, renamed to ckpt-<iter>.pt (a rename is atomic), the directory
    fsynced; then ckpt.pt is pointed at it (a hard link swapped in by rename) and all but the newest keep_last go.
    A crash at any moment leaves every ckpt*.pt complete; a stray *.tmp is removed by the next save."""
    out_dir = Path(out_dir)
    for stale in out_dir.glob('ckpt*.tmp'):
        stale.unlink()
    path = out_dir / f"ckpt-{ckpt['iter_num']:08d}.pt"
    tmp = out_dir / f'{path.name}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    latest = out_dir / 'ckpt.pt.tmp'
    try:
        os.link(path, latest)
    except OSError:  # no hard links here (some network filesystems): a copy
        import shutil
        shutil.copyfile(path, latest)
    os.replace(latest, out_dir / 'ckpt.pt')
    fsync_dir(out_dir)
    for old in checkpoint_files(out_dir)[max(keep_last, 1):]:
        old.unlink()


def load_latest_checkpoint(out_dir, device):
    """The newest checkpoint in out_dir that loads; a damaged one is reported and skipped."""
    candidates = checkpoint_files(out_dir) + [Path(out_dir) / 'ckpt.pt']  # ckpt.pt alone: older runs
    errors = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return load_checkpoint(path, device), path
        except ConfigError as e:
            errors.append(str(e))
            print(f"skipping {path}: {e}", file=sys.stderr)
    if errors:
        raise ConfigError(f"no intact checkpoint in {out_dir}: {errors[0]}")
    return load_checkpoint(Path(out_dir) / 'ckpt.pt', device), None  # raises the usual "no checkpoint" error


ARCH_KEYS = {'gpt': ('n_layer', 'n_embd', 'n_head', 'block_size', 'bias'), 'rwkv': ('n_layer', 'n_embd', 'block_size')}


def check_resume(c, given, checkpoint, path):
    """The run's model settings against the checkpoint's: a key not given takes the checkpoint's value, a key given
    another value is an error (a resumed run cannot change the architecture)."""
    kind = checkpoint['model_type']
    if c['model_type'] != kind and 'model_type' in given:
        raise ConfigError(f"{path} holds a '{kind}' model but model_type='{c['model_type']}'; resume it with the "
                          f"config it was trained with, or use another --out_dir")
    c['model_type'] = kind
    for key in ARCH_KEYS[kind]:
        theirs = checkpoint['model_args'][key]
        if c[key] != theirs and key in given:
            raise ConfigError(f"{path} was trained with {key}={theirs!r} but this run has {key}={c[key]!r}; resume "
                              f"with the config it was trained with, or use another --out_dir")
        c[key] = theirs


def check_data(ddir, block_size):
    for split in ('train', 'val'):
        path = ddir / f'{split}.bin'
        if not path.is_file():
            raise ConfigError(f"{split}.bin not found in {ddir}; run: python {ddir / 'prepare.py'}")
        size = path.stat().st_size
        if size % 2:
            raise ConfigError(f"{path} has an odd number of bytes ({size}): it is truncated (uint16 tokens); prepare "
                              f"the dataset again")
        if size // 2 <= block_size:
            raise ConfigError(f"{path} has {size // 2} tokens, not more than block_size={block_size}; use a smaller "
                              f"--block_size")


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = Path(out_dir) / '.write_test'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir={out_dir} ({e.strerror or type(e).__name__}); pick a writable "
                          f"--out_dir") from e


def start_wandb(c, config):
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb_log=True but wandb is not installed: pip install wandb, or --wandb_log=False")
    try:
        wandb.init(project=c['wandb_project'], name=c['wandb_run_name'], config=config)
    except Exception as e:  # no network, no login: keep the run, log locally
        print(f"wandb could not start online ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"logging offline (sync later with `wandb sync`)")
        wandb.init(project=c['wandb_project'], name=c['wandb_run_name'], config=config, mode='offline')
    return wandb


def main(argv):
    given = set()
    config = parse_config(DEFAULTS, argv, given)
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
    if c['nan_policy'] not in ('stop', 'skip'):
        raise ConfigError(f"nan_policy must be 'stop' or 'skip', got '{c['nan_policy']}'")
    if c['gradient_accumulation_steps'] % world_size != 0:
        raise ConfigError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be a multiple of "
                          f"the number of processes ({world_size})")
    if c['fsdp'] and not ddp:
        raise ConfigError("fsdp=True needs several processes: torchrun --nproc_per_node=N train.py ... --fsdp=True")
    if master:
        check_writable(c['out_dir'])

    # data: prepare it on first use when the dataset knows how
    ddir = data_path(c)
    if not (ddir / 'train.bin').is_file():
        prepare = ddir / 'prepare.py'
        if not prepare.is_file():
            raise ConfigError(f"train.bin not found in {ddir} and there is no prepare.py there; "
                              f"create train.bin/val.bin or pick another --dataset")
        if master:
            print(f"train.bin not found in {ddir}: running {prepare}")
            subprocess.run([sys.executable, str(prepare)], check=True)
    if ddp:
        # NCCL between GPUs, gloo between CPU processes
        torch.distributed.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
        torch.distributed.barrier()  # wait for rank 0's data preparation
        if device_type == 'cuda':
            torch.cuda.set_device(device)
    meta = read_meta(ddir)
    grad_accum = c['gradient_accumulation_steps'] // world_size
    tokens_per_iter = grad_accum * world_size * c['batch_size'] * c['block_size']
    torch.manual_seed(c['seed'])  # the same initial weights on every rank (FSDP shards them as they are)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

    # model
    iter_num, best_val_loss = 0, 1e9
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
        checkpoint, path = load_latest_checkpoint(c['out_dir'], 'cpu')
        check_resume(c, given, checkpoint, path)
        model_args = checkpoint['model_args']
        if c['model_type'] == 'rwkv':
            model_args['wkv_backend'] = c['wkv_backend']  # a runtime choice, not part of the weights
        model = model_from_checkpoint(checkpoint)
        iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
        if master:
            print(f"resuming from {path} at iteration {iter_num}")
    check_data(ddir, c['block_size'])
    if master:
        print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} x {grad_accum} x {c['batch_size']} x "
              f"{c['block_size']}); device {device}, dtype {dtype}")
    torch.manual_seed(c['seed'] + rank)  # from here on (dropout) each rank draws its own numbers
    model.activation_checkpointing = c['activation_checkpointing']
    model.to(device)
    if master:
        print(f"{c['model_type']}: {model.get_num_params() / 1e6:.2f}M parameters (non-embedding)")
    vocab_size = model.config.vocab_size

    def get_batch(split, offsets):
        # a fresh memmap per batch: numpy keeps memmaps alive otherwise, and memory grows (nanoGPT)
        data = np.memmap(ddir / f'{split}.bin', dtype=np.uint16, mode='r')
        x = torch.stack([torch.from_numpy(data[i:i + c['block_size']].astype(np.int64)) for i in offsets])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + c['block_size']].astype(np.int64)) for i in offsets])
        top = max(int(x[:, 0].max()), int(y.max()))  # y is x shifted by one: together they hold every token
        if top >= vocab_size:
            raise ConfigError(f"{split}.bin in {ddir} holds token id {top}, but the model's vocab_size is "
                              f"{vocab_size}: the data and the model use different tokenizers; prepare the data again")
        if device_type == 'cuda':
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    n_train = len(np.memmap(ddir / 'train.bin', dtype=np.uint16, mode='r')) - c['block_size']

    def train_offsets(it):
        # the data order is a function of (seed, iteration) alone: every rank draws the whole global batch and takes
        # its share, so N processes see what one process with N x the accumulation sees, and a resumed run continues
        # with exactly the batches an uninterrupted run would have used
        g = torch.Generator().manual_seed(c['seed'] * 1_000_003 + it)
        offsets = torch.randint(n_train, (world_size * grad_accum, c['batch_size']), generator=g)
        return offsets[rank * grad_accum:(rank + 1) * grad_accum]

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    betas = (c['beta1'], c['beta2'])
    raw_model = model
    if c['fsdp']:
        from torch.distributed.fsdp import fully_shard
        blocks = model.transformer.h if c['model_type'] == 'gpt' else model.blocks
        for block in blocks:
            fully_shard(block)  # each block's parameters gathered only while it runs
        fully_shard(model)
    if c['model_type'] == 'rwkv':
        optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], betas, device_type,
                                               lr_scale=c['rwkv_lr_scale'])
    else:
        optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], betas, device_type)
    if checkpoint is not None:
        if c['fsdp']:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, checkpoint['optimizer'],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
        rng = checkpoint.get('rng')
        if rng and len(rng) == world_size:  # each rank's generators, as they were when the checkpoint was taken
            torch.set_rng_state(rng[rank]['torch'])
            if device_type == 'cuda' and rng[rank]['cuda'] is not None:
                torch.cuda.set_rng_state(rng[rank]['cuda'])
    checkpoint = None  # free memory

    if c['compile']:
        print("compiling the model... (takes a while)")
        model = torch.compile(model)
    if ddp and not c['fsdp']:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

    def no_sync(last):
        """Gradient accumulation without all-reduce on every micro-step but the last."""
        if last or not ddp:
            return nullcontext()
        if c['fsdp']:
            raw_model.set_requires_gradient_sync(False)
            return nullcontext()
        return model.no_sync()

    @torch.no_grad()
    def estimate_loss():
        # the same eval batches every time (their own generator), so evals are comparable and use no training RNG
        out = {}
        model.eval()
        for split in ('train', 'val'):
            n = len(np.memmap(ddir / f'{split}.bin', dtype=np.uint16, mode='r')) - c['block_size']
            g = torch.Generator().manual_seed(c['seed'])
            losses = torch.zeros(c['eval_iters'])
            for k in range(c['eval_iters']):
                X, Y = get_batch(split, torch.randint(n, (c['batch_size'],), generator=g))
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

    def checkpoint_now():
        """Every rank takes part (FSDP gathers the shards, RNG states are collected); rank 0 writes."""
        rng = {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if device_type == 'cuda'
               else None}
        rngs = [rng]
        if ddp:
            rngs = [None] * world_size
            torch.distributed.all_gather_object(rngs, rng)
        if c['fsdp']:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
            model_state, optim_state = get_state_dict(raw_model, optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        else:
            model_state, optim_state = raw_model.state_dict(), optimizer.state_dict()
        if master:
            ckpt = {'model': model_state, 'optimizer': optim_state, 'scaler': scaler.state_dict(),
                    'model_type': c['model_type'], 'model_args': asdict(raw_model.config), 'iter_num': iter_num,
                    'best_val_loss': best_val_loss, 'config': config, 'tokenizer': tokenizer, 'rng': rngs,
                    'world_size': world_size}
            save_checkpoint(ckpt, c['out_dir'], c['keep_last'])
            print(f"saved checkpoint {Path(c['out_dir']) / f'ckpt-{iter_num:08d}.pt'}")

    # preemption: SIGTERM / SIGINT finish the current iteration, save, and exit 0
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signal.Signals(signum).name))

    wandb = start_wandb(c, config) if c['wandb_log'] and master else None
    peak = c['peak_flops'] or measure_peak_flops(device, dtype)
    if master:
        print(f"peak FLOP/s for MFU: {peak / 1e12:.3g} TFLOP/s")
    tokenizer = meta if meta else {'tokenizer': 'gpt2'}
    offsets = train_offsets(iter_num)
    X, Y = get_batch('train', offsets[0])
    if iter_num > c['max_iters'] and not c['eval_only']:
        if master:
            print(f"the checkpoint is at iteration {iter_num}, past max_iters={c['max_iters']}: nothing to train "
                  f"(raise --max_iters to continue)")
        if ddp:
            torch.distributed.destroy_process_group()
        return
    t0 = time.time()
    local_iter, running_mfu, skipped = 0, -1.0, 0
    while True:
        lr = get_lr(iter_num) if c['decay_lr'] else c['learning_rate']
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)

        if iter_num % c['eval_interval'] == 0:
            losses = estimate_loss() if master or c['fsdp'] else None  # FSDP: every rank runs its shard
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if wandb:
                    wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr,
                               'mfu': running_mfu * 100})
                save = (losses['val'] < best_val_loss or c['always_save_checkpoint']) and iter_num > 0
                best_val_loss = min(best_val_loss, losses['val'])
            else:
                save = False
            if ddp:  # rank 0 decides, everyone takes part
                flag = [save]
                torch.distributed.broadcast_object_list(flag, src=0)
                save = flag[0]
            if save:
                checkpoint_now()
        if iter_num == 0 and c['eval_only']:
            break

        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            with no_sync(micro_step == grad_accum - 1):
                with ctx:
                    _, loss = model(X, Y)
                    loss = loss / grad_accum
                # fetch the next batch while the device works
                if micro_step == grad_accum - 1:
                    offsets = train_offsets(iter_num + 1)
                X, Y = get_batch('train', offsets[(micro_step + 1) % grad_accum])
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if c['fsdp']:
            raw_model.set_requires_gradient_sync(True)
        # one small all-reduce per iteration: the mean loss over all ranks, non-finite losses, stop signals
        flags = torch.stack([loss_sum.float(), (~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(bool(stop_signal)), device=device)])
        if ddp:
            torch.distributed.all_reduce(flags)
        lossf, nonfinite, stopping = flags[0].item() / world_size, flags[1].item() > 0, flags[2].item() > 0
        if nonfinite:
            optimizer.zero_grad(set_to_none=True)
            if c['nan_policy'] == 'stop':
                raise TrainingError(f"iteration {iter_num}: the loss is {lossf}; stopped without saving (the "
                                    f"checkpoints in {c['out_dir']} are from before it); lower the learning rate, "
                                    f"or set nan_policy='skip'")
            skipped += 1
            if master:
                print(f"iteration {iter_num}: the loss is {lossf}; step skipped ({skipped} so far)")
        else:
            if c['grad_clip'] != 0.0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), c['grad_clip'])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % c['log_interval'] == 0 and master:
            if local_iter >= 5:  # let the first iterations settle
                mfu = raw_model.estimate_mfu(c['batch_size'] * grad_accum, dt, peak)  # this process's share
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            print(f"iter {iter_num}: loss {lossf:.6f}, time {dt * 1000:.2f}ms, "
                  f"tok/s {tokens_per_iter / dt:,.0f}, mfu {running_mfu * 100:.2f}%")
        iter_num += 1
        local_iter += 1
        if stopping:
            checkpoint_now()
            if master:
                print(f"{stop_signal[0] if stop_signal else 'a signal'} received: checkpoint saved at iteration "
                      f"{iter_num}; resume with --init_from=resume")
            break
        if iter_num > c['max_iters']:
            checkpoint_now()  # the end of the run is a checkpoint too: it can be continued with a larger max_iters
            break

    if ddp:
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ConfigError, TrainingError) as e:
        sys.exit(f"train.py: error: {e}")
