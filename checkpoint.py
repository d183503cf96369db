"""
Checkpoints: the crash-safe files train.py writes, the models they hold and the checks a resumed run must pass.
Files of other programs (Hugging Face directories, RWKV-LM .pth, quantized and rwkv.cpp files) are interop.py's.

A run writes out_dir/ckpt-<iter>.pt (ckpt.pt is a hard link to the newest). Each checkpoint holds the weights, the
optimizer and grad-scaler state, model_type and model_args, the full run config, the iteration, the best val loss,
the tokenizer, every rank's RNG states, the run's id and a fingerprint of its train.bin.
"""
import hashlib
import os
import shutil
import sys
import time
import uuid
import zipfile
from pathlib import Path

import torch

from configurator import ConfigError
from files import WriteError, cause, first_line, fsync_dir, save_torch

# ---------------------------------------------------------------------------------------------------------------------
# writing and finding checkpoints


def new_run_id():
    return uuid.uuid4().hex[:12]


def checkpoint_files(out_dir):
    """ckpt-<iter>.pt files in out_dir, newest first."""
    files = [f for f in Path(out_dir).glob('ckpt-*.pt') if f.stem[5:].isdigit()]
    return sorted(files, key=lambda f: int(f.stem[5:]), reverse=True)


def run_id_of(path):
    """The run id recorded in a checkpoint file, or None (older checkpoints, unreadable files). The tensors are
    memory-mapped, not read."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True).get('run_id')
    except Exception:  # a damaged or foreign file belongs to no run of ours
        return None


def save_checkpoint(ckpt, out_dir, keep_last):
    """Crash-safe: written to a temporary file, fsynced, renamed to ckpt-<iter>.pt (a rename is atomic), the directory
    fsynced; then ckpt.pt is pointed at it (a hard link swapped in by rename) and this run's checkpoints but the
    newest keep_last are deleted (never another run's). A crash at any moment leaves every ckpt*.pt complete; a
    stray *.tmp is removed by the next save. A failed write (disk full, file-size limit) removes its temporary file,
    leaves every earlier checkpoint as it was, and raises OSError naming the file."""
    out_dir = Path(out_dir)
    for stale in [*out_dir.glob('.ckpt-*.tmp'), *out_dir.glob('ckpt*.tmp')]:  # left by a save that was killed
        stale.unlink()
    path = out_dir / f"ckpt-{ckpt['iter_num']:08d}.pt"
    latest = out_dir / 'ckpt.pt.tmp'
    try:
        save_torch(ckpt, path)  # a temporary file, fsynced, renamed (files.py)
        try:
            os.link(path, latest)
        except OSError:  # no hard links here (some network filesystems): a copy
            shutil.copyfile(path, latest)
        os.replace(latest, out_dir / 'ckpt.pt')
        fsync_dir(out_dir)
    except OSError as e:
        latest.unlink(missing_ok=True)
        raise WriteError(f'the checkpoint {path}', cause(e)) from e
    mine = [f for f in checkpoint_files(out_dir) if run_id_of(f) == ckpt['run_id']]
    for old in mine[max(keep_last, 1):]:
        old.unlink()


def damaged_record(path):
    """The first record of a torch.save zip file whose bytes fail their CRC-32, or None. torch.load does not check
    them: a flipped bit inside a tensor would load without a word."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (zipfile.BadZipFile, OSError):  # not a zip at all (truncated, foreign): torch.load says what it is
        return None


def load_checkpoint(path, device):
    """Load a checkpoint written by train.py, its every record checked against its CRC-32 first; never unpickles code
    (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; train one first, e.g. python train.py "
                          f"config/train_shakespeare_char.py")
    bad = damaged_record(path)
    if bad:
        raise ConfigError(f"{path} is damaged: its record {bad} fails its checksum (a bad disk or an interrupted "
                          f"copy); restore it, or move it away to resume from the checkpoint before it")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files; say which file and why
        raise ConfigError(f"{path} is not a readable nanoRWKV checkpoint ({type(e).__name__}: "
                          f"{first_line(e)})") from e
    if not isinstance(ckpt, dict) or not {'model', 'model_type', 'model_args'} <= set(ckpt):
        raise ConfigError(f"{path} is not a nanoRWKV checkpoint (expected keys model, model_type, model_args)")
    return ckpt


def has_checkpoints(out_dir):
    return any(Path(out_dir).glob('ckpt*.pt'))


def load_latest_checkpoint(out_dir, device):
    """(checkpoint, path) of the newest checkpoint in out_dir that loads; a damaged one is reported and skipped."""
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


def move_aside(out_dir):
    """Move out_dir's checkpoints into a new out_dir/replaced-<time>/ (train.py --overwrite=True); returns it."""
    out_dir = Path(out_dir)
    dest = out_dir / time.strftime('replaced-%Y%m%d-%H%M%S')
    n = 0
    while dest.exists():  # two overwrites in one second
        n += 1
        dest = out_dir / f"{time.strftime('replaced-%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir()
    for f in out_dir.glob('ckpt*.pt'):
        os.replace(f, dest / f.name)
    fsync_dir(out_dir)
    return dest


def claim_out_dir(out_dir, init_from, overwrite, eval_only, master):
    """One run per out_dir: a new run (scratch or pretrained) where checkpoints are is an error unless overwrite,
    which moves them aside; init_from 'auto' is 'resume' where there are checkpoints, else 'scratch'. Returns how the
    model starts: 'scratch', 'resume' or the pretrained model's name. out_dir must be writable."""
    init = init_from
    found = has_checkpoints(out_dir)
    if init == 'auto':
        init = 'resume' if found else 'scratch'
        if master:
            print(f"init_from='auto': {'resuming' if found else f'no checkpoint in {out_dir}, starting from scratch'}")
    if init != 'resume' and found and not eval_only:
        newest = (checkpoint_files(out_dir) or [Path(out_dir) / 'ckpt.pt'])[0]
        if not overwrite:
            raise ConfigError(f"{out_dir} holds another run's checkpoints (newest: {newest}); continue that run with "
                              f"--init_from=resume, use another --out_dir, or --overwrite=True to move them aside")
        if master:
            print(f"overwrite=True: moved the checkpoints of {out_dir} into {move_aside(out_dir)}")
    if master and not eval_only:
        try:
            os.makedirs(out_dir, exist_ok=True)
            probe = Path(out_dir) / '.write_test'
            probe.write_bytes(b'')
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"cannot write to out_dir={out_dir} ({e.strerror or type(e).__name__}); pick a "
                              f"writable --out_dir") from e
    return init


# ---------------------------------------------------------------------------------------------------------------------
# models in checkpoints, and what a resumed run must agree with

def model_config(model_type, model_args):
    """The config dataclass of either model from its dict (as stored in checkpoints); its own checks, as ConfigError."""
    if model_type == 'gpt':
        from model_gpt import GPTConfig as Config
    elif model_type == 'rwkv':
        from model_rwkv import RWKVConfig as Config
    else:
        raise ConfigError(f"model_type must be 'gpt' or 'rwkv', got '{model_type}'")
    try:
        return Config(**model_args)
    except ValueError as e:  # the configs check their own values with one-line messages
        raise ConfigError(str(e)) from e


def build_model(model_type, model_args):
    """A fresh model of either type from its config dict."""
    config = model_config(model_type, model_args)
    if model_type == 'gpt':
        from model_gpt import GPT
        return GPT(config)
    from model_rwkv import RWKV
    return RWKV(config)


def model_from_checkpoint(ckpt):
    """The model of a training checkpoint, with its LoRA adapters (lora.py) when the run trained them."""
    model = build_model(ckpt['model_type'], ckpt['model_args'])
    if ckpt.get('lora'):
        from lora import add_lora
        add_lora(model, **ckpt['lora'])
    prefix = '_orig_mod.'  # left by torch.compile
    model.load_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in ckpt['model'].items()})
    return model


def data_fingerprint(path):
    """Size and a hash of the first, middle and last MiB of a .bin file: cheap for any size, and different for data
    that was prepared again, appended to or truncated."""
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    with open(path, 'rb') as f:
        for at in (0, max(size // 2 - 2 ** 19, 0), max(size - 2 ** 20, 0)):
            f.seek(at)
            h.update(f.read(2 ** 20))
    return {'size': size, 'blake2b': h.hexdigest()}


ATTN_MOE_KEYS = ('attn_window', 'attn_kv_heads', 'moe_experts', 'moe_top_k')
ARCH_KEYS = {'gpt': ('n_layer', 'n_embd', 'n_head', 'block_size', 'bias') + ATTN_MOE_KEYS,
             'rwkv': ('n_layer', 'n_embd', 'block_size', 'attn_layers', 'n_head', 'rwkv_version', 'head_size')
             + ATTN_MOE_KEYS}
CONFIG_NAMES = {'rwkv_version': 'version'}  # train.py key -> config field, where they differ


def check_resume(cfg, given, ckpt, path, train_bin):
    """The run's settings against the checkpoint's: a model key not given takes the checkpoint's value, a key given
    another value is an error (a resumed run cannot change the architecture), and the training data must be the
    same file it was trained on."""
    kind = ckpt['model_type']
    if cfg.model_type != kind and 'model_type' in given:
        raise ConfigError(f"{path} holds a '{kind}' model but model_type='{cfg.model_type}'; resume it with the "
                          f"config it was trained with, or use another --out_dir")
    cfg.model_type = kind
    config = model_config(kind, ckpt['model_args'])  # a checkpoint from before an option has its default
    unread = set()  # keys this model does not read: any value given is no contradiction
    if kind == 'rwkv':
        unread |= set() if config.attn_layers else {'n_head', 'attn_window', 'attn_kv_heads'}
        unread |= {'head_size'} if config.version == '4' else set()
    for key in ARCH_KEYS[kind]:
        theirs = getattr(config, CONFIG_NAMES.get(key, key))
        theirs = list(theirs) if isinstance(theirs, tuple) else theirs  # attn_layers: a list in train.py
        if getattr(cfg, key) != theirs and key in given and key not in unread:
            raise ConfigError(f"{path} was trained with {key}={theirs!r} but this run has {key}={getattr(cfg, key)!r}; "
                              f"resume with the config it was trained with, or use another --out_dir")
        setattr(cfg, key, theirs)
    recorded = ckpt.get('data')  # checkpoints from before fingerprints have none
    if recorded is not None and recorded != data_fingerprint(train_bin):
        raise ConfigError(f"{train_bin} is not the file {path} was trained on (it was {recorded['size']:,} bytes, it "
                          f"is {train_bin.stat().st_size:,} now, or its contents changed); restore that data, or start"
                          f" a new run in another --out_dir")
