"""
Train a GPT-2 or an RWKV (version 4, 5, 6 or 7) language model; nanoGPT's train.py loop for both.

Single process (CPU or one GPU):
$ python train.py config/train_shakespeare_char.py --max_iters=500
DDP on 8 GPUs of one node:
$ torchrun --standalone --nproc_per_node=8 train.py config/train_rwkv.py
A preemptible job (requeued clusters, torchrun --max-restarts): the same command every time, continuing by itself
$ torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py config/train_rwkv.py --init_from=auto

OPTIONS below is the configuration; a config file (plain Python assignments) and then `--key=value` arguments
override it (configurator.py). Only keys defined here are accepted.
"""
import gc
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from functools import partial
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bptt import evaluate, forward_backward
from checkpoint import (build_model, check_resume, claim_out_dir, data_fingerprint, load_latest_checkpoint,
                        model_config, model_from_checkpoint, new_run_id, save_checkpoint)
from configurator import ConfigError, Option, parse_config
from hardware import (DEVICE, DTYPES, autocast_context, measure_peak_flops, resolve_device, resolve_dtype,
                      start_distributed)
from interop import load_pretrained
from lora import add_lora
from model_rwkv import VERSIONS, RWKVConfig
from tokenizer import read_meta
from wkv_cuda import BACKENDS

# -----------------------------------------------------------------------------
# default config values: RWKV-4 ~130M on OpenWebText
OPTIONS = dict(
    # I/O
    out_dir=Option('out', "checkpoints go here; one run per out_dir"),
    eval_interval=Option(2000, "evaluate (and checkpoint) every this many iterations", '>= 1'),
    log_interval=Option(1, "print the loss every this many iterations", '>= 1'),
    eval_iters=Option(200, "batches per split in each evaluation", '>= 1'),
    eval_only=Option(False, "evaluate once and exit"),
    always_save_checkpoint=Option(True, "checkpoint at every eval; False: only when the val loss improves (the end "
                                        "of the run and a stop signal always checkpoint)"),
    keep_last=Option(3, "this run's checkpoints kept in out_dir (ckpt-<iter>.pt; ckpt.pt is the newest)", '>= 1'),
    nan_policy=Option('stop', "a non-finite loss: 'stop' (one-line error, nothing saved) or 'skip' (drop that step)",
                      ('stop', 'skip')),
    init_from=Option('scratch', "'scratch'; 'resume' (the newest intact checkpoint in out_dir); 'auto' (resume "
                                "if out_dir has a checkpoint, else scratch: for jobs that restart); or a pretrained "
                                "model: gpt2*, RWKV/rwkv-4-*-pile, a Hugging Face directory or an RWKV .pth "
                                "(version 4-7)"),
    overwrite=Option(False, "start from scratch or pretrained in an out_dir that holds checkpoints, moving them "
                            "into out_dir/replaced-<time>/ first"),
    # wandb logging
    wandb_log=Option(False, "log to Weights & Biases (offline when it cannot reach its server)"),
    wandb_project=Option('nanorwkv', "wandb project"),
    wandb_run_name=Option('run', "wandb run name"),
    # data
    dataset=Option('openwebtext', "a folder of data/ with train.bin and val.bin (prepared on first use)"),
    data_dir=Option('', "any folder with train.bin, val.bin and optionally meta.json; '' means data/<dataset>"),
    gradient_accumulation_steps=Option(5 * 8, "micro-steps per optimizer step, across all DDP ranks", '>= 1'),
    batch_size=Option(12, "micro-batch size", '>= 1'),
    block_size=Option(1024, "context length in tokens: what the model sees at once", '>= 1'),
    ctx_len=Option(0, "rwkv: training sample length in tokens, any length; 0 = block_size. Longer samples run in "
                      "segments of block_size carrying the state (bptt.py)", '>= 0'),
    bptt=Option('full', "ctx_len > block_size: 'full' (the exact full-length gradient, in the memory of one segment) "
                        "or 'truncated' (no gradient across segment boundaries)", ('full', 'truncated')),
    bptt_range=Option(0, "ctx_len > block_size: 0 = every segment learns; k = only the last k segments, the earlier "
                         "ones only build the state", '>= 0'),
    # model
    model_type=Option('rwkv', "the model", ('rwkv', 'gpt')),
    n_layer=Option(12, "blocks", '>= 1'),
    n_embd=Option(768, "width", '>= 1'),
    n_head=Option(12, "attention heads of a gpt, or of an rwkv's attention layers (n_embd must be a multiple)",
                  '>= 1'),
    dropout=Option(0.0, "gpt: nanoGPT's; rwkv: RWKV-LM's, on the residual stream after each time and channel mix",
                   '[0, 1)'),
    bias=Option(False, "gpt only: biases in Linears and LayerNorms"),
    rwkv_version=Option('4', "rwkv only: RWKV-LM's version: 4, 5 (5.2), 5.1 (MicroRWKV's x051a), 6 or 7",
                        VERSIONS),
    head_size=Option(64, "rwkv 5-7: channels per head of the matrix-valued state (n_embd must be a multiple)",
                     '>= 1'),
    wkv_backend=Option('auto', "rwkv only: the WKV op's implementation: the compiled kernel of the device ('auto'), "
                       "'cpu', 'cuda', or 'torch' (pure PyTorch, the reference)", BACKENDS),
    finetune=Option('full', "what the run trains: 'full' (every weight), 'lora' (low-rank adapters on the blocks' "
                            "matrices, lora.py; the rest frozen), 'state' (state tuning, RWKV-5/6/7: only each "
                            "layer's initial WKV state, att.time_state) or 'lora+state'",
                    ('full', 'lora', 'state', 'lora+state')),
    lora_r=Option(8, "finetune='lora': the adapters' rank", '>= 1'),
    lora_alpha=Option(16.0, "finetune='lora': the update is scaled by lora_alpha / lora_r", '> 0'),
    lora_dropout=Option(0.0, "finetune='lora': dropout on the adapters' input", '[0, 1)'),
    lora_targets=Option([], "finetune='lora': regexes of the block matrices that get adapters, e.g. ['att', "
                            "'ffn.key']; [] = every Linear in the blocks (not the head)"),
    rwkv_lr_scale=Option(True, "rwkv only: RWKV-LM's layerwise_lr (time_decay and v7's w0 x2, v4's time_first x3)"),
    attn_layers=Option([], "rwkv only: blocks whose time mix is causal softmax attention (a hybrid), e.g. [3]",
                       '>= 0'),
    attn_window=Option(0, "attention (gpt, rwkv attn_layers): each token sees the last attn_window tokens, itself "
                          "included; 0 = all before it", '>= 0'),
    attn_kv_heads=Option(0, "attention: grouped-query attention with this many K/V heads shared by the n_head query "
                            "heads; 0 = n_head", '>= 0'),
    moe_experts=Option(0, "> 0: every feed-forward (gpt MLP, rwkv channel mix) is a top-k mixture of this many "
                          "experts", '>= 0'),
    moe_top_k=Option(1, "moe: experts per token", '>= 1'),
    moe_aux_coef=Option(0.01, "moe: weight of the load-balancing loss added to the training loss (Switch "
                              "Transformer's alpha)", '>= 0'),
    # AdamW
    learning_rate=Option(6e-4, "peak learning rate", '> 0'),
    max_iters=Option(600000, "total iterations", '>= 0'),
    weight_decay=Option(1e-1, "AdamW weight decay (matrices only)", '>= 0'),
    beta1=Option(0.9, "AdamW beta1", '[0, 1)'),
    beta2=Option(0.95, "AdamW beta2", '[0, 1)'),
    grad_clip=Option(1.0, "clip the gradient norm at this value; 0 disables clipping", '>= 0'),
    # learning rate schedule: linear warmup, cosine decay to min_lr
    decay_lr=Option(True, "warmup and cosine decay; False: learning_rate throughout"),
    warmup_iters=Option(2000, "linear warmup iterations", '>= 0'),
    lr_decay_iters=Option(600000, "where the cosine reaches min_lr; ~= max_iters per Chinchilla", '>= 0'),
    min_lr=Option(6e-5, "~= learning_rate / 10 per Chinchilla", '>= 0'),
    # system
    device=Option('auto', "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...", DEVICE),
    dtype=Option('auto', "'auto', 'float32', 'bfloat16' or 'float16' (the last two by autocast)", DTYPES),
    compile=Option(False, "torch.compile the model"),
    activation_checkpointing=Option(False, "recompute each block in backward instead of storing its activations"),
    fsdp=Option(False, "under torchrun: shard parameters, gradients and optimizer state with FSDP2 (fully_shard) "
                       "instead of DDP"),
    seed=Option(1337, "seeds the weights and the data order", '>= 0'),
    peak_flops=Option(0.0, "device peak FLOP/s for MFU; 0 means: a table for known GPUs, else a matmul measured at "
                           "start", '>= 0'),
)
# -----------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that cannot be written); one line, like ConfigError."""


def prepare_data(cfg, master):
    """The dataset's folder, with train.bin and val.bin checked; a dataset that knows how is prepared on first use."""
    ddir = Path(cfg.data_dir) if cfg.data_dir else Path(__file__).resolve().parent / 'data' / cfg.dataset
    prepare = ddir / 'prepare.py'
    if not (ddir / 'train.bin').is_file() and master:
        if not prepare.is_file():
            raise ConfigError(f"train.bin not found in {ddir} and there is no prepare.py there; create train.bin and "
                              f"val.bin or pick another --dataset")
        print(f"train.bin not found in {ddir}: running {prepare}")
        status = subprocess.run([sys.executable, str(prepare)]).returncode
        if status != 0:
            raise ConfigError(f"preparing the dataset failed ({prepare} exited with status {status}; its own message "
                              f"is above)")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank waits for rank 0's preparation
    for split in ('train', 'val'):
        path = ddir / f'{split}.bin'
        if not path.is_file():
            raise ConfigError(f"{split}.bin not found in {ddir}; run: python {prepare}")
        size = path.stat().st_size
        if size % 2:
            raise ConfigError(f"{path} has an odd number of bytes ({size}): it is truncated (uint16 tokens); prepare "
                              f"the dataset again")
        mask = ddir / f'{split}.mask.bin'  # a loss mask (data/instruct/prepare.py): one byte per token
        if mask.is_file() and mask.stat().st_size != size // 2:
            raise ConfigError(f"{mask} has {mask.stat().st_size:,} entries for {size // 2:,} tokens in {split}.bin: "
                              f"prepare the data again (data/instruct/prepare.py writes both)")
    return ddir


def ignored_options(cfg, given):
    """The options this run sets that its model does not read: the other kind's ('gpt only' / 'rwkv only' in their
    help), an RWKV-4's head_size, and the attention options of an rwkv without attention layers."""
    other = 'rwkv' if cfg.model_type == 'gpt' else 'gpt'
    ignored = [k for k in sorted(given) if OPTIONS[k].help.startswith((f'{other} only', f'{other} 5-7'))]
    if cfg.model_type == 'rwkv':
        ignored += ['head_size'] if cfg.rwkv_version == '4' and 'head_size' in given else []
        ignored += [k for k in ('attn_window', 'attn_kv_heads') if k in given and not cfg.attn_layers]
    return ignored


def apply_finetune(model, cfg, checkpoint, given, master):
    """What the run trains, and the LoRA settings its checkpoints record (None without adapters). finetune='lora':
    adapters on the blocks' matrices (lora.py), every other parameter frozen; 'state': RWKV-PEFT's state tuning, each
    layer's initial WKV state learned (model.enable_state_tuning), every weight frozen. A resumed run keeps its
    checkpoint's choice (model_from_checkpoint rebuilt its adapters)."""
    if checkpoint is not None:
        theirs = checkpoint.get('config', {}).get('finetune', 'full')
        if 'finetune' in given and cfg.finetune != theirs:
            raise ConfigError(f"the checkpoint was trained with finetune={theirs!r} but this run has "
                              f"finetune={cfg.finetune!r}; resume with it, or start from the exported model in another "
                              f"--out_dir")
        cfg.finetune = theirs
    if cfg.finetune == 'full':
        return None
    if cfg.fsdp:
        raise ConfigError(f"finetune={cfg.finetune!r} trains a small share of the parameters: plain DDP suffices; drop "
                          f"--fsdp=True")
    lora, parts = None, cfg.finetune.split('+')
    if 'lora' in parts:
        lora = (checkpoint or {}).get('lora') or dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                                      targets=list(cfg.lora_targets))
        if checkpoint is None:
            try:
                add_lora(model, **lora)
            except ValueError as e:
                raise ConfigError(str(e)) from e
    if 'state' in parts:
        if cfg.model_type != 'rwkv' or model.config.version == '4':
            kind = 'a GPT' if cfg.model_type != 'rwkv' else 'an RWKV-4'
            raise ConfigError(f"finetune={cfg.finetune!r} learns the initial matrix state of RWKV-5, 5.1, 6 or 7; this "
                              f"model is {kind}: use finetune='full' or 'lora'")
        model.enable_state_tuning()
    for name, p in model.named_parameters():  # the adapters and / or the states; everything else frozen
        p.requires_grad_('lora' in parts and name.endswith(('.lora_A', '.lora_B')) or
                         'state' in parts and name.endswith('.att.time_state'))
    what = ' + '.join(([f"LoRA r={lora['r']} alpha={lora['alpha']:g}"] if lora else []) +
                      (['state tuning'] if 'state' in parts else []))
    if master:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{what}: {n:,} parameters trained, {sum(p.numel() for p in model.parameters()) - n:,} frozen")
    return lora


def new_model_args(cfg, vocab_size):
    """The config of a model trained from scratch."""
    options = dict(dropout=cfg.dropout, attn_window=cfg.attn_window, attn_kv_heads=cfg.attn_kv_heads,
                   moe_experts=cfg.moe_experts, moe_top_k=cfg.moe_top_k, moe_aux_coef=cfg.moe_aux_coef)
    if cfg.model_type == 'gpt':
        if cfg.attn_layers:
            raise ConfigError("attn_layers is an rwkv option (a hybrid's attention blocks); every gpt block is "
                              "attention already")
        return dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                    bias=cfg.bias, vocab_size=vocab_size, **options)
    return dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, block_size=cfg.block_size, vocab_size=vocab_size,
                version=cfg.rwkv_version, head_size=cfg.head_size,
                emb_init=RWKVConfig.rwkv_lm_emb_init(cfg.rwkv_version, cfg.learning_rate),
                wkv_backend=cfg.wkv_backend, attn_layers=cfg.attn_layers, n_head=cfg.n_head, **options)


def init_model(cfg, given, init, meta, ddir, master):
    """(model, checkpoint to resume from or None): a new model, the newest intact checkpoint in out_dir, or a
    pretrained model whose tokenizer must be the data's."""
    if init == 'scratch':
        vocab_size = meta['vocab_size'] if meta else 50257  # no meta.json: GPT-2 BPE
        if not meta or meta['tokenizer'] != 'char':
            vocab_size = -(-vocab_size // 64) * 64  # BPE: pad to a multiple of 64 for faster matmuls (GPT-2: 50304)
        return build_model(cfg.model_type, new_model_args(cfg, vocab_size)), None
    if init == 'resume':
        checkpoint, path = load_latest_checkpoint(cfg.out_dir, 'cpu')
        check_resume(cfg, given, checkpoint, path, ddir / 'train.bin')
        if cfg.model_type == 'rwkv':
            checkpoint['model_args']['wkv_backend'] = cfg.wkv_backend  # a runtime choice, not part of the weights
        if master:
            print(f"resuming from {path} at iteration {checkpoint['iter_num']}")
        return model_from_checkpoint(checkpoint), checkpoint
    model, cfg.model_type, spec = load_pretrained(init, cfg.wkv_backend, for_training=True)
    data_tokenizer = (meta or {'tokenizer': 'gpt2'}).get('tokenizer')
    if spec['tokenizer'] != 'file' and data_tokenizer != spec['tokenizer']:
        raise ConfigError(f"{ddir} is tokenized with '{data_tokenizer}' but {init} reads '{spec['tokenizer']}': "
                          f"tokenize the data with the model's tokenizer, e.g. python data/openwebtext/prepare.py "
                          f"--tokenizer={spec['tokenizer']}")
    if spec['tokenizer'] == 'char' and meta.get('itos') != spec.get('itos'):
        raise ConfigError(f"{ddir}'s characters are not {init}'s ({len(meta.get('itos') or [])} against "
                          f"{len(spec.get('itos') or [])}): fine-tune a char model on data of its own vocabulary")
    if cfg.model_type == 'gpt':
        if cfg.block_size > model.config.block_size:
            raise ConfigError(f"block_size={cfg.block_size} exceeds {init}'s {model.config.block_size} positions")
        model.crop_block_size(cfg.block_size)
    else:
        model.config.block_size = cfg.block_size
    return model, None


def get_batch(ddir, split, offsets, block_size, vocab_size, device):
    """x, y (B, block_size): the tokens at each offset and the tokens one further; with a loss mask beside the data
    (<split>.mask.bin, data/instruct/prepare.py), the targets it marks 0 are -1: not counted by the loss."""
    # a fresh memmap per batch: numpy keeps memmaps alive otherwise, and memory grows (nanoGPT)
    data = np.memmap(ddir / f'{split}.bin', dtype=np.uint16, mode='r')
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in offsets])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in offsets])
    top = max(int(x[:, 0].max()), int(y.max()))  # y is x shifted by one: together they hold every token
    if top >= vocab_size:
        raise ConfigError(f"{split}.bin in {ddir} holds token id {top}, but the model's vocab_size is {vocab_size}: "
                          f"the data and the model use different tokenizers; prepare the data again")
    if (ddir / f'{split}.mask.bin').is_file():
        mask = np.memmap(ddir / f'{split}.mask.bin', dtype=np.uint8, mode='r')  # its length checked by prepare_data
        m = torch.stack([torch.from_numpy(mask[i + 1:i + 1 + block_size].astype(np.bool_)) for i in offsets])
        y = y.masked_fill(~m, -1)
    if device.startswith('cuda'):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def train_offsets(seed, it, n_train, batch_size, grad_accum, rank, world_size):
    """This rank's batch offsets of iteration `it`, (grad_accum, batch_size). The data order is a function of (seed,
    iteration) alone: every rank draws the whole global batch and takes its share, so N processes see what one
    process with N x the accumulation sees, and a resumed run continues with the batches an uninterrupted run uses."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + it)
    offsets = torch.randint(n_train, (world_size * grad_accum, batch_size), generator=g)
    return offsets[rank * grad_accum:(rank + 1) * grad_accum]


@torch.no_grad()
def estimate_loss(model, initial_state, cfg, sample_len, ddir, vocab_size, device, ctx):
    """Mean loss over eval_iters batches of each split; the same batches every time (their own generator), so evals
    are comparable and draw nothing from the training RNG. Samples longer than block_size run in segments carrying
    the state; then 'val_reset' is the val loss of the same tokens with the state reset at every segment: what the
    model makes of block_size tokens of context, against what it makes of ctx_len."""
    segmented = sample_len > cfg.block_size
    runs = [('train', 'train', True), ('val', 'val', True)] + ([('val_reset', 'val', False)] if segmented else [])
    out = {}
    model.eval()
    for name, split, carry in runs:
        n = len(np.memmap(ddir / f'{split}.bin', dtype=np.uint16, mode='r')) - sample_len
        g = torch.Generator().manual_seed(cfg.seed)
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            X, Y = get_batch(ddir, split, torch.randint(n, (cfg.batch_size,), generator=g), sample_len, vocab_size,
                             device)
            with ctx:
                if segmented:
                    loss = evaluate(model, initial_state(X.shape[0]), X, Y, cfg.block_size, carry=carry)
                else:
                    _, loss = model(X, Y)
            losses[k] = loss.item()
        out[name] = losses.mean().item()
    model.train()
    return out


def get_lr(it, cfg):
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(cfg.lr_decay_iters - cfg.warmup_iters, 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def format_duration(seconds):
    """1h02m, 3m05s, 12s: the log line's eta."""
    m, s = divmod(int(seconds + 0.5), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s" if m else f"{s}s"


def checkpoint_now(raw_model, optimizer, scaler, cfg, run, iter_num, best_val_loss):
    """Every rank takes part (FSDP gathers the shards, RNG states are collected); rank 0 writes."""
    rng = {'torch': torch.get_rng_state(),
           'cuda': torch.cuda.get_rng_state(run['device']) if run['device'].startswith('cuda') else None}
    rngs = [rng]
    if run['world_size'] > 1:
        rngs = [None] * run['world_size']
        torch.distributed.all_gather_object(rngs, rng)
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_state, optim_state = get_state_dict(raw_model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    else:
        model_state, optim_state = raw_model.state_dict(), optimizer.state_dict()
    if run['rank'] != 0:
        return
    ckpt = {'model': model_state, 'optimizer': optim_state, 'scaler': scaler.state_dict(),
            'model_type': cfg.model_type, 'model_args': asdict(raw_model.config), 'iter_num': iter_num,
            'best_val_loss': best_val_loss, 'config': vars(cfg), 'tokenizer': run['tokenizer'], 'rng': rngs,
            'world_size': run['world_size'], 'run_id': run['run_id'], 'data': run['data'],
            'lora': run['lora']}
    try:
        save_checkpoint(ckpt, cfg.out_dir, cfg.keep_last)
    except OSError as e:
        raise TrainingError(f"{e}; the earlier checkpoints in {cfg.out_dir} are intact: make room and continue with "
                            f"--init_from=resume") from e
    print(f"saved checkpoint {Path(cfg.out_dir) / f'ckpt-{iter_num:08d}.pt'}")


def start_wandb(cfg):
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb_log=True but wandb is not installed: pip install wandb, or --wandb_log=False")
    try:
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=vars(cfg))
    except Exception as e:  # no network, no login: keep the run, log locally
        print(f"wandb could not start online ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"logging offline (sync later with `wandb sync`)")
        wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=vars(cfg), mode='offline')
    return wandb


def main(argv):
    given = set()
    cfg = parse_config(OPTIONS, argv, __doc__, given)
    device = resolve_device(cfg.device)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype = resolve_dtype(cfg.dtype, device_type)
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if cfg.gradient_accumulation_steps > world_size and cfg.gradient_accumulation_steps % world_size != 0:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of the "
                          f"number of processes ({world_size}), or at most {world_size} (one micro-step per process)")
    if cfg.fsdp and 'RANK' not in os.environ:
        raise ConfigError("fsdp=True needs several processes: torchrun --nproc_per_node=N train.py ... --fsdp=True")
    if cfg.init_from in ('scratch', 'auto'):
        model_config(cfg.model_type, new_model_args(cfg, vocab_size=1))  # the model's own checks, before any work
    master = int(os.environ.get('RANK', 0)) == 0
    if master and ignored_options(cfg, given):  # harmless (a config shared by both kinds): named once
        print(f"note: this {cfg.model_type} run does not read {', '.join(ignored_options(cfg, given))}")
    init = claim_out_dir(cfg.out_dir, cfg.init_from, cfg.overwrite, cfg.eval_only, master)
    rank, local_rank, world_size = start_distributed(device_type)
    if world_size > 1 and device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    ddir = prepare_data(cfg, master)
    meta = read_meta(ddir)
    tokenizer = meta if meta else {'tokenizer': 'gpt2'}  # what sample.py will decode with
    # the global count, shared out (nanoGPT); fewer micro-steps than processes: one each, a larger global batch
    grad_accum = max(1, cfg.gradient_accumulation_steps // world_size)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = autocast_context(device_type, dtype)

    # model
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP shards them as they are)
    model, checkpoint = init_model(cfg, given, init, meta, ddir, master)
    lora = apply_finetune(model, cfg, checkpoint, given, master)
    iter_num, best_val_loss = (checkpoint['iter_num'], checkpoint['best_val_loss']) if checkpoint else (0, 1e9)
    sample_len = cfg.ctx_len or cfg.block_size  # after init_model: a resumed run's block_size is the checkpoint's
    if sample_len > cfg.block_size and cfg.model_type != 'rwkv':
        raise ConfigError(f"ctx_len={cfg.ctx_len} > block_size={cfg.block_size} needs a state to carry between "
                          f"segments: RWKV only; for a GPT raise block_size instead")
    if sample_len > cfg.block_size and cfg.model_type == 'rwkv' and model.config.attn_layers:
        raise ConfigError(f"ctx_len={cfg.ctx_len} > block_size={cfg.block_size} carries a fixed-size state between "
                          f"segments; attention layers (attn_layers) keep a KV cache instead: raise block_size")
    for split in ('train', 'val'):
        tokens = (ddir / f'{split}.bin').stat().st_size // 2
        if tokens <= sample_len:
            raise ConfigError(f"{ddir / f'{split}.bin'} has {tokens} tokens, not more than "
                              f"{'ctx_len' if cfg.ctx_len else 'block_size'}={sample_len}: "
                              + ("prepare a larger val split (the document datasets' prepare.py: a smaller "
                                 "--val_every) or " if split == 'val' else '')
                              + f"use a smaller --{'ctx_len' if cfg.ctx_len else 'block_size'}")
    tokens_per_iter = grad_accum * world_size * cfg.batch_size * sample_len
    run_id = (checkpoint or {}).get('run_id') or new_run_id()  # a resumed run keeps its id (older checkpoints had none)
    run = dict(device=device, rank=rank, world_size=world_size, tokenizer=tokenizer, run_id=run_id,
               data=data_fingerprint(ddir / 'train.bin'), lora=lora)
    if master:
        print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} x {grad_accum} x {cfg.batch_size} x "
              f"{sample_len}); device {device}, dtype {dtype}")
        if cfg.gradient_accumulation_steps < world_size:
            print(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} < {world_size} processes: each "
                  f"process runs one micro-step, {world_size} per iteration in all")
        if sample_len > cfg.block_size:
            print(f"samples of {sample_len} tokens in segments of {cfg.block_size} carrying the state, bptt="
                  f"'{cfg.bptt}'" + (f", the last {cfg.bptt_range} segments learn" if cfg.bptt_range else ''))
    torch.manual_seed(cfg.seed + rank)  # from here on (dropout) each rank draws its own numbers
    model.activation_checkpointing = cfg.activation_checkpointing
    model.to(device)
    try:  # build (or load) the model's kernels now: a failure is a one-line error before training starts
        model.build_kernels(device)
    except RuntimeError as e:
        raise ConfigError(str(e)) from e
    if master:
        print(f"{cfg.model_type}: {model.get_num_params() / 1e6:.2f}M parameters (non-embedding)")
    vocab_size = model.config.vocab_size
    n_train = len(np.memmap(ddir / 'train.bin', dtype=np.uint16, mode='r')) - sample_len

    # optimizer, sharding, compilation
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
    raw_model = model
    initial_state = partial(raw_model.initial_state, device=device) if cfg.model_type == 'rwkv' else None
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.fsdp_units():
            fully_shard(block)  # each block's parameters gathered only while it runs
        fully_shard(model)
    lr_scale = {'lr_scale': cfg.rwkv_lr_scale} if cfg.model_type == 'rwkv' else {}
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                           **lr_scale)
    if checkpoint is not None:
        if cfg.fsdp:
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
    if cfg.compile:
        print("compiling the model... (takes a while)")
        model = torch.compile(model)
    if world_size > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

    def no_sync(last):
        """Gradient accumulation without reducing gradients across ranks on every backward but the last."""
        if cfg.fsdp:
            raw_model.set_requires_gradient_sync(last)
            return nullcontext()
        if last or world_size == 1:
            return nullcontext()
        return model.no_sync()

    # preemption: SIGTERM / SIGINT finish the current iteration, save, and exit 0
    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signal.Signals(signum).name))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over a file-size limit, a write fails (and says so) instead

    wandb = start_wandb(cfg) if cfg.wandb_log and master else None
    peak = cfg.peak_flops or measure_peak_flops(device, dtype)
    if master:
        print(f"peak FLOP/s for MFU: {peak / 1e12:.3g} TFLOP/s")
    if 0 < cfg.max_iters <= iter_num and not cfg.eval_only:
        if master:
            print(f"the checkpoint is at iteration {iter_num}, max_iters={cfg.max_iters}: nothing to train "
                  f"(raise --max_iters to continue)")
        return

    # the training loop
    offsets = train_offsets(cfg.seed, iter_num, n_train, cfg.batch_size, grad_accum, rank, world_size)
    X, Y = get_batch(ddir, 'train', offsets[0], sample_len, vocab_size, device)
    t0 = t_start = time.time()
    local_iter, running_mfu, skipped = 0, -1.0, 0
    while True:
        lr = get_lr(iter_num, cfg) if cfg.decay_lr else cfg.learning_rate
        for group in optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)

        save = False
        # not again at the iteration a run resumes at: its checkpoint was taken after that eval
        if (iter_num % cfg.eval_interval == 0 and not (local_iter == 0 and iter_num > 0)) or cfg.eval_only:
            if master and local_iter == 0:  # the first eval can take long (eval_iters batches of each split)
                print(f"evaluating on {cfg.eval_iters} batches of each split every {cfg.eval_interval} iterations",
                      flush=True)
            losses = estimate_loss(model, initial_state, cfg, sample_len, ddir, vocab_size, device, ctx) \
                if master or cfg.fsdp else None
            if master:  # FSDP: every rank runs its shard of the eval, rank 0 reports
                reset = f" (state reset every {cfg.block_size}: {losses['val_reset']:.4f})" if 'val_reset' in losses \
                    else ''
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{reset}")
                if wandb:
                    wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr,
                               'mfu': running_mfu * 100})
                # not at the first eval of a process: a fresh run has nothing to save, a resumed one has it saved
                save = (losses['val'] < best_val_loss or cfg.always_save_checkpoint) and local_iter > 0
                best_val_loss = min(best_val_loss, losses['val'])
            if world_size > 1:  # rank 0 decides, everyone takes part
                flag = [save]
                torch.distributed.broadcast_object_list(flag, src=0)
                save = flag[0]
            if save:
                checkpoint_now(raw_model, optimizer, scaler, cfg, run, iter_num, best_val_loss)
        if cfg.eval_only:
            break
        if iter_num >= cfg.max_iters:  # max_iters iterations done; the end of the run is a checkpoint too
            if not save:
                checkpoint_now(raw_model, optimizer, scaler, cfg, run, iter_num, best_val_loss)
            break

        loss_sum = torch.zeros((), device=device)
        for micro_step in range(grad_accum):
            last = micro_step == grad_accum - 1
            if sample_len > cfg.block_size:  # segments carrying the state, each with its own forward and backward
                loss = forward_backward(model, initial_state(X.shape[0]), X, Y, cfg.block_size, cfg.bptt,
                                        cfg.bptt_range, scale=lambda loss: scaler.scale(loss / grad_accum),
                                        sync=lambda last_segment: no_sync(last and last_segment), autocast=ctx)
                loss = loss / grad_accum
            else:
                with no_sync(last):
                    with ctx:
                        _, loss = model(X, Y)
                        loss = loss / grad_accum
                    scaler.scale(loss).backward()
            # the next batch (on a GPU the work above is still running)
            if last:
                offsets = train_offsets(cfg.seed, iter_num + 1, n_train, cfg.batch_size, grad_accum, rank, world_size)
            X, Y = get_batch(ddir, 'train', offsets[(micro_step + 1) % grad_accum], sample_len, vocab_size, device)
            loss_sum += loss.detach()
        # one small all-reduce per iteration: the mean loss over all ranks, non-finite losses, stop signals
        flags = torch.stack([loss_sum.float(), (~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(bool(stop_signal)), device=device)])
        if world_size > 1:
            torch.distributed.all_reduce(flags)
        lossf, nonfinite, stopping = flags[0].item() / world_size, flags[1].item() > 0, flags[2].item() > 0
        if nonfinite:
            optimizer.zero_grad(set_to_none=True)
            if cfg.nan_policy == 'stop':
                raise TrainingError(f"iteration {iter_num}: the loss is {lossf}; stopped without saving (the "
                                    f"checkpoints in {cfg.out_dir} are from before it); lower the learning rate, "
                                    f"or set nan_policy='skip'")
            skipped += 1
            if master:
                print(f"iteration {iter_num}: the loss is {lossf}; step skipped ({skipped} so far)")
        else:
            if cfg.grad_clip != 0.0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % cfg.log_interval == 0 and master:
            if local_iter >= 5:  # let the first iterations settle
                # this process's share; a sample of sample_len tokens is sample_len / block_size model passes
                mfu = raw_model.estimate_mfu(cfg.batch_size * grad_accum * sample_len / cfg.block_size, dt, peak)
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
            # an MoE model's loss includes moe_aux_coef x the load-balancing loss, printed apart (last micro-step's)
            aux = f", moe aux {raw_model.last_moe_aux.item():.4f}" if raw_model.config.moe_experts else ''
            mfu = f", mfu {running_mfu * 100:.2f}%" if running_mfu >= 0 else ''  # measured from the 6th iteration
            eta = (t1 - t_start) / (local_iter + 1) * (cfg.max_iters - iter_num - 1)  # evals included
            print(f"iter {iter_num}/{cfg.max_iters}: loss {lossf:.6f}{aux}, time {dt * 1000:.2f}ms, "
                  f"tok/s {tokens_per_iter / dt:,.0f}{mfu}, eta {format_duration(eta)}")
        iter_num += 1
        local_iter += 1
        if stopping:
            checkpoint_now(raw_model, optimizer, scaler, cfg, run, iter_num, best_val_loss)
            if master:
                print(f"{stop_signal[0] if stop_signal else 'a signal'} received: checkpoint saved at iteration "
                      f"{iter_num}; resume with --init_from=resume")
            break
    if world_size > 1:
        torch.distributed.barrier()  # leave together: tearing down gloo while rank 0 still writes can abort a rank


if __name__ == '__main__':
    code = 1
    try:
        main(sys.argv[1:])
        code = 0
    except (ConfigError, TrainingError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
    finally:
        if torch.distributed.is_initialized():
            # free the model and optimizer first (FSDP's hooks hold them in reference cycles), then leave without the
            # interpreter's shutdown: there, tensors still tied to gloo's worker threads are destroyed after the GIL
            # is gone, and a rank aborts ("terminate called without an active exception") after a finished run.
            # An unexpected exception is still reported: its traceback is printed before we leave.
            gc.collect()
            torch.distributed.destroy_process_group()
            exc = sys.exc_info()[1]
            if isinstance(exc, SystemExit):  # --help, or an exit of its own
                code = exc.code if isinstance(exc.code, int) else 1
            elif exc is not None:
                traceback.print_exc()
            if 'wandb' in sys.modules and getattr(sys.modules['wandb'], 'run', None) is not None:
                sys.modules['wandb'].finish()  # what its exit hook would have done
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)
