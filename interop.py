"""
Every file another program reads or writes, reader beside writer, and the one front door `load_pretrained`:
- hub names and Hugging Face format directories (config.json + model.safetensors / pytorch_model.bin): RWKV-4 as
  transformers' RwkvForCausalLM, GPT-2 as its GPT2LMHeadModel, both directions;
- BlinkDL's RWKV-LM .pth files, versions 4, 5, 5.1, 6 and 7 (what the rwkv pip package runs);
- the quantized .safetensors of export.py (quantize.py's formats, with the model config in its metadata);
- rwkv.cpp model files (RWKV/rwkv.cpp docs/FILE_FORMAT.md);
- the tokenizer sidecars of exports (nanorwkv_tokenizer.json in a directory, x.tokenizer.json beside x.pth).
Every writer writes through files.atomic_path: a failed write leaves the old file as it was. Readers tell files apart
by their content (file_kind), never run pickled code, and turn every malformed file into a one-line ValueError that
names it. train.py's own checkpoints are checkpoint.py's.
"""
import json
import math
import re
import struct
from pathlib import Path

import torch

from checkpoint import build_model
from configurator import ConfigError
from files import atomic_path, first_line, save_torch, write_text
from model_gpt import GPT, GPTConfig
from model_rwkv import RWKV, RWKVConfig
from quantize import FILE_VERSION, FORMATS, QLinear, ggml_blocks
from tokenizer import hf_tokenizer_json

RWKV_HUB_NAMES = tuple(f'RWKV/rwkv-4-{size}-pile' for size in ('169m', '430m', '1b5', '3b', '7b', '14b'))
GPT_HUB_NAMES = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')


# ---------------------------------------------------------------------------------------------------------------------
# shared: finding a model, reading a directory (every writer writes through files.atomic_path)

def save_safetensors(state, path):
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={'format': 'pt'})


def hub_or_local(name_or_path, hub_names):
    """A local directory or file as given, or a hub model (one of hub_names) downloaded to the local cache. Offline,
    a hub name fails with one line that says a local path works."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if name_or_path not in hub_names:
        raise ValueError(f"{name_or_path} is neither a local path nor a known model; expected a Hugging Face format "
                         f"directory, a file, or one of {', '.join(hub_names)}")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name_or_path, allow_patterns=['config.json', '*.safetensors', '*.bin',
                                                                    '*.json']))
    except Exception as e:  # the hub client raises many types (connection, HTTP, missing repo): say which, and why
        raise ValueError(f"could not download {name_or_path} from the Hugging Face hub ({type(e).__name__}); "
                         f"a local path works too: a directory with config.json and model weights") from e


def load_hf_directory(directory):
    """(config dict, state dict) of a Hugging Face format directory: config.json and model.safetensors or
    pytorch_model.bin (sharded ones too). The weights are read without running any pickled code."""
    directory = Path(directory)
    missing = f"{directory} has no config.json: not a Hugging Face format model directory"
    config = read_json(directory / 'config.json', missing)
    state = {}
    files = sorted(directory.glob('*.safetensors'))
    if files:
        from safetensors.torch import load_file
        for f in files:
            try:
                state.update(load_file(f))
            except Exception as e:  # safetensors' own error type, for a truncated or foreign file
                raise ValueError(f"{f} is damaged or not a safetensors file ({first_line(e)})") from e
    else:
        files = sorted(directory.glob('pytorch_model*.bin'))
        for f in files:
            state.update(load_torch_tensors(f))
    if not files:
        raise ValueError(f"{directory} has no model.safetensors or pytorch_model.bin")
    return config, state


def read_json(path, missing):
    """A JSON file as a dict; `missing` is the error when there is no such file."""
    if not Path(path).is_file():
        raise ValueError(missing)
    try:
        value = json.loads(Path(path).read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value


def config_value(config, key, source):
    """config[key] of a config.json, or an error naming the file and the key."""
    if key not in config:
        raise ValueError(f"{source}/config.json has no '{key}'")
    return config[key]


def load_torch_tensors(path):
    """A dict of tensors from a torch.save file, read without running any pickled code (weights_only=True)."""
    import pickle
    try:
        with open(path, 'rb') as f:  # a file object: torch.load would go by a .safetensors name otherwise
            state = torch.load(f, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{path} holds more than tensors (pickled code, which is never run here): not "
                         f"loaded") from e
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable torch file ({type(e).__name__}: "
                         f"{first_line(e)})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    return state


def file_kind(path):
    """What a model file is, by its first bytes: 'quantized' (export.py's .safetensors), 'rwkvcpp' (an rwkv.cpp
    file) or 'torch' (a torch.save file: an official .pth or a training checkpoint); anything else is an error that
    says what the file is."""
    path = Path(path)
    with open(path, 'rb') as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < path.stat().st_size:
        # safetensors: the length of a JSON header, then the header
        from safetensors import safe_open
        try:
            with safe_open(str(path), 'pt') as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors' own error type
            raise ValueError(f"{path} is damaged ({first_line(e)})") from e
        if meta.get('nanorwkv') == 'quantized':
            return 'quantized'
        raise ValueError(f"{path} is a .safetensors without nanoRWKV's quantized metadata: a Hugging Face model is "
                         f"loaded from its directory (config.json beside the weights); give the directory")
    if head[:4] == b'PK\x03\x04' or head[:1] == b'\x80':  # a torch.save zip, or the legacy pickle format
        return 'torch'
    if len(head) >= 4 and int.from_bytes(head[:4], 'little') == RWKVCPP_MAGIC:
        return 'rwkvcpp'
    raise ValueError(f"{path} is not a model file nanoRWKV reads (expected an RWKV .pth, a quantized .safetensors "
                     f"of export.py, or a Hugging Face directory)")


def load_state_checked(model, state, source):
    """Copy `state` into model: the key sets and every shape must match exactly."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
            own[k].copy_(v)


def empty_model(cls, config):
    """A model whose every tensor the caller loads: built on the meta device (no memory, no slow init), then given
    uninitialised CPU storage."""
    with torch.device('meta'):
        model = cls(config)
    return model.to_empty(device='cpu')


# ---------------------------------------------------------------------------------------------------------------------
# RWKV in RWKV-LM's own form: the .pth files of BlinkDL's RWKV-LM (any version) and the rwkv pip package

def check_rwkv4_file(model, what):
    """The RWKV-4 of RWKV-LM and transformers has no MoE nor attention layers: no file of theirs can hold them."""
    if model.config.moe_experts or model.config.attn_layers:
        has = 'MoE channel mixes' if model.config.moe_experts else 'attention layers'
        raise ValueError(f"{what}: this model has {has}, which RWKV-LM's and transformers' RWKV-4 do not; keep "
                         f"train.py's checkpoint instead")


def plain_state_dict(model):
    """The weights of an RWKV in RWKV-LM's own form (never rescaled), fp32 on the CPU, RWKV-LM's names."""
    check_rwkv4_file(model, 'export')
    if getattr(model, 'quantized', None):
        raise ValueError(f"the model is quantized ({model.quantized[0]}): export the float model it came from")
    state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    r = model.config.rescale_every
    for i in range(model.config.n_layer if r else 0):
        for name in (f'blocks.{i}.att.output.weight', f'blocks.{i}.ffn.value.weight'):
            state[name] *= 2 ** (i // r)
    return state


def load_official_pth(path):
    """The tensors of a BlinkDL RWKV .pth, loaded without running pickled code; anything else is an error."""
    state = load_torch_tensors(path)
    if {'model', 'model_type', 'model_args'} <= set(state):
        raise ValueError(f"{path} is a nanoRWKV training checkpoint: sample it with sample.py --out_dir=<its folder>, "
                         f"continue it with train.py --init_from=resume, or export it with export.py")
    if 'emb.weight' not in state or 'blocks.0.ln1.weight' not in state:
        raise ValueError(f"{path} is not an RWKV checkpoint (no emb.weight / blocks.0.ln1.weight)")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{path}: {bad} is a {type(state[bad]).__name__}, not a tensor: not an RWKV checkpoint")
    return state


def pth_version(state):
    """The RWKV-LM version of a .pth, told apart by its keys and shapes as the rwkv pip package does."""
    att = {k[len('blocks.0.att.'):] for k in state if k.startswith('blocks.0.att.')}
    if att & {'r_k', 'w0', 'w1', 'a0', 'a1', 'k_k', 'k_a', 'x_r', 'x_w'}:  # RWKV_Tmix_x070's own names
        return '7'
    if att & {'time_maa_x', 'time_maa_w', 'time_maa_w1', 'time_decay_w1'}:  # x060's
        return '6'
    if 'blocks.0.att.ln_x.weight' in state:
        if 'blocks.0.att.gate.weight' not in state:
            raise ValueError("this .pth is RWKV-5.0 (no gate), which nanoRWKV does not run; RWKV-4, 5.1, 5.2, 6 and "
                             "7 it does")
        decay = state['blocks.0.att.time_decay']
        return '5' if decay.dim() > 1 and decay.shape[1] > 1 else '5.1'  # a decay per channel (5.2) or per head
    return '4'


def pth_config(state):
    """RWKVConfig arguments read off an RWKV-LM state dict (any version): sizes from the tensors' shapes."""
    version = pth_version(state)
    V, C = state['emb.weight'].shape
    args = dict(version=version, vocab_size=V, n_embd=C, dim_ffn=state['blocks.0.ffn.key.weight'].shape[0],
                n_layer=1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.')))
    att = Tensors({k[len('blocks.0.att.'):]: v for k, v in state.items() if k.startswith('blocks.0.att.')})
    if version == '7':
        head_size, d_decay, d_a = att['r_k'].shape[-1], att['w1'].shape[1], att['a1'].shape[1]
        v1 = state['blocks.1.att.v1'] if 'blocks.1.att.v1' in state else att['v1']  # layer 0's is unused
        args.update(head_size=head_size, lora_dims=(d_decay, d_a, v1.shape[1], att['g1'].shape[1]))
    elif version == '6':
        args.update(head_size=att['time_faaaa'].shape[-1],
                    lora_dims=(att['time_maa_w1'].shape[1] // 5, att['time_decay_w1'].shape[1]))
    elif version == '5':
        args.update(head_size=att['time_decay'].shape[1])
    elif version == '5.1':
        args.update(head_size=C // att['time_decay'].shape[0])
    return args


class Tensors(dict):
    """Block 0's attention tensors by short name; a missing one is a KeyError of its full name."""

    def __missing__(self, name):
        raise KeyError(f'blocks.0.att.{name}')


MIX_51 = re.compile(r'\.(att\.time_m(ix|aa)_[kvrg]|ffn\.time_m(ix|aa)_[kr])$')


def from_rwkv_lm(state, version):
    """An RWKV-LM state dict in our names: 5.1's time_mix become x051a's time_maa = 1 - time_mix, a per-head decay
    and bonus get their (H, 1) shape, RWKV-7's unused layer-0 v0/v1/v2 are dropped, and an old RWKV-5/6 file's
    time_first (u = exp(time_first), the rwkv pip package reads it so) becomes time_faaaa."""
    out = {}
    for k, v in state.items():
        if version == '7' and re.fullmatch(r'blocks\.0\.att\.v[012]', k):
            continue
        if version == '5.1' and MIX_51.search(k) and '.time_mix_' in k:
            k, v = k.replace('.time_mix_', '.time_maa_'), 1 - v.float()
        if version != '4' and k.endswith('.time_first'):
            k, v = k[:-len('time_first')] + 'time_faaaa', torch.exp(v.float())
        if version == '5.1' and k.endswith(('.time_decay', '.time_faaaa')):
            v = v.reshape(-1, 1)
        out[k] = v
    return out


def to_rwkv_lm(state, config):
    """Our plain state dict as RWKV-LM's .pth: from_rwkv_lm's inverse."""
    out = {}
    for k, v in state.items():
        if config.version == '5.1' and MIX_51.search(k):
            k, v = k.replace('.time_maa_', '.time_mix_'), 1 - v
        out[k] = v
    if config.version == '7':  # RWKV_Tmix_x070 layer 0's v0 / v1 / v2 at their constructor values (v2: zeros)
        C = config.n_embd
        linear = torch.arange(C, dtype=torch.float32) / max(C - 1, 1) - 0.5
        d_v = config.lora_dims[2]
        out.update({'blocks.0.att.v0': (0.73 - linear * 0.4).view(1, 1, C), 'blocks.0.att.v1': torch.zeros(C, d_v),
                    'blocks.0.att.v2': torch.zeros(d_v, C)})
    return out


def save_pth(model, path, tokenizer=None):
    """Write an official .pth (RWKV-LM's names and key set, fp32) that BlinkDL's code and the rwkv pip package
    load. Version 5.1 is written in the layout the rwkv pip package reads as v5.1 (time_mix = 1 - time_maa);
    RWKV-7's layer 0 carries the v0/v1/v2 that RWKV-LM creates there and never uses (at their init values).
    A tokenizer spec (a char vocabulary, say) goes beside it in <name>.tokenizer.json, where load_pretrained finds it:
    a .pth itself holds only tensors. So does a state-tuned model's learned initial state: <name>.state.pth
    (save_state), which load_pretrained takes with the .pth and the rwkv package takes as its start state."""
    state = plain_state_dict(model)
    if model.config.state_tuning:
        save_state(model, state_sidecar(path))
        state = {k: v for k, v in state.items() if not k.endswith('.att.time_state')}
    save_torch(to_rwkv_lm(state, model.config), path)
    if tokenizer is not None:
        write_text(tokenizer_sidecar(path), json.dumps(tokenizer))


# ---------------------------------------------------------------------------------------------------------------------
# a learned initial state (state tuning): RWKV-PEFT's blocks.<i>.att.time_state, (H, N, N) per layer

def save_state(model, path):
    """The learned initial WKV state of a state-tuned RWKV-5/6/7 as a .pth of blocks.<i>.att.time_state (H, N, N),
    the names RWKV-PEFT gives them, in the layout of the rwkv pip package's state ([key, value] for 5 and 6,
    [value, key] for 7: model.forward(tokens, state) takes it as each layer's matrix)."""
    if not model.config.state_tuning:
        raise ValueError("this model has no learned initial state: train one with train.py --finetune=state")
    save_torch({f'blocks.{i}.att.time_state': b.att.time_state.detach().float().cpu().clone()
                for i, b in enumerate(model.blocks)}, path)


def load_state(model, path):
    """Start `model` (RWKV-5/6/7) from the state save_state wrote, in place: each layer's time_state is checked
    against the model's heads and head size."""
    state = load_torch_tensors(path)
    if getattr(model, 'config', None) is None or getattr(model.config, 'version', '4') == '4':
        raise ValueError(f"{path} is an initial state for RWKV-5/6/7; this model is not one")
    H, N, L = model.config.n_embd // model.config.head_size, model.config.head_size, model.config.n_layer
    want = {f'blocks.{i}.att.time_state' for i in range(L)}
    if set(state) != want:
        extra, missing = sorted(set(state) - want), sorted(want - set(state))
        raise ValueError(f"{path} is not a state of this {L}-layer model: missing {missing[:3]}, unexpected "
                         f"{extra[:3]} (export.py --format=state writes one per model)")
    bad = next((k for k, v in state.items() if tuple(v.shape) != (H, N, N)), None)
    if bad is not None:
        raise ValueError(f"{path}: {bad} has shape {tuple(state[bad].shape)}, this model's heads need {(H, N, N)}: "
                         f"the state was tuned for another model")
    model.enable_state_tuning()
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.att.time_state.copy_(state[f'blocks.{i}.att.time_state'])
    return model


def state_sidecar(path):
    """Where the learned initial state of a .pth is kept: x.pth -> x.state.pth."""
    return Path(path).with_suffix('.state.pth')


def tokenizer_sidecar(path):
    """Where the tokenizer of a .pth is kept: x.pth -> x.tokenizer.json."""
    return Path(path).with_suffix('.tokenizer.json')


def pth_tokenizer(path, vocab_size):
    """The tokenizer of an RWKV-LM .pth: its sidecar (save_pth), else what its vocabulary says (65536: the World
    tokenizer, 50277 or more: GPT-NeoX's, as the Pile models); any other vocabulary is an error that names the
    sidecar it needs."""
    sidecar = tokenizer_sidecar(path)
    if sidecar.is_file():
        return read_json(sidecar, '')
    if vocab_size == 65536:
        return {'tokenizer': 'world'}
    if vocab_size >= 50277:
        return {'tokenizer': 'neox'}
    raise ValueError(f"{path} has a vocabulary of {vocab_size} tokens, which neither the World nor the GPT-NeoX "
                     f"tokenizer fits: put its tokenizer beside it as {sidecar.name} (export.py --format=pth writes "
                     f"it)")


def rwkv_from_pth(path, wkv_backend):
    """(config, state in our names) of an official .pth."""
    state = load_official_pth(path)
    try:
        config = RWKVConfig(wkv_backend=wkv_backend, **pth_config(state))
    except KeyError as e:
        raise ValueError(f"{path} is an incomplete RWKV-{pth_version(state)} checkpoint: it has no "
                         f"{e.args[0]}") from e
    return config, from_rwkv_lm(state, config.version)


# ---------------------------------------------------------------------------------------------------------------------
# RWKV-4 as transformers' RwkvForCausalLM

def hf_name(name):
    """Our parameter name (= RWKV-LM's) -> transformers' RwkvForCausalLM name; the renames of transformers'
    models/rwkv/convert_rwkv_checkpoint_to_hf.py."""
    if name == 'head.weight':
        return name
    name = re.sub(r'^emb\.', 'embeddings.', name).replace('blocks.0.ln0.', 'blocks.0.pre_ln.')
    name = name.replace('.att.', '.attention.').replace('.ffn.', '.feed_forward.')
    name = re.sub(r'time_mix_([kvr])$', lambda m: {'k': 'time_mix_key', 'v': 'time_mix_value',
                                                   'r': 'time_mix_receptance'}[m[1]], name)
    return 'rwkv.' + name


def rwkv_from_hf(directory, source, wkv_backend):
    """(config, state in our names) of a transformers RWKV directory."""
    hf, hf_state = load_hf_directory(directory)
    if hf.get('model_type') != 'rwkv':
        raise ValueError(f"{source} is a '{hf.get('model_type')}' model, not RWKV")
    C = config_value(hf, 'hidden_size', directory)
    if hf.get('attention_hidden_size') not in (None, C):
        raise ValueError(f"{source}: attention_hidden_size != hidden_size is not supported")
    config = RWKVConfig(block_size=hf.get('context_length', 1024), vocab_size=config_value(hf, 'vocab_size', directory),
                        n_layer=config_value(hf, 'num_hidden_layers', directory), n_embd=C,
                        dim_ffn=hf.get('intermediate_size') or 0, wkv_backend=wkv_backend)
    with torch.device('meta'):  # names only: no memory, no init
        hf_to_ours = {hf_name(n): n for n in RWKV(config).state_dict()}
    unknown = sorted(set(hf_state) - set(hf_to_ours))
    if unknown:
        raise ValueError(f"{source} has tensors an RWKV-4 does not: {unknown[:4]}")
    return config, {hf_to_ours[k]: v for k, v in hf_state.items()}


def save_rwkv_hf(model, directory, special_ids=None):
    """Write a Hugging Face format directory (config.json + model.safetensors) that transformers loads as
    RwkvForCausalLM. special_ids: config.json's bos/eos_token_id (default: GPT-NeoX's <|endoftext|>, 0)."""
    cfg = model.config
    if cfg.version != '4':
        raise ValueError(f"transformers has no class for RWKV-{cfg.version} (its RwkvForCausalLM is RWKV-4): export "
                         f"the official .pth instead (save_pth, export.py --format=pth)")
    state = {hf_name(k): v for k, v in plain_state_dict(model).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, directory / 'model.safetensors')
    # rescale_every 6 is transformers' default: it rescales at inference time itself, in its own copy
    hf = {'architectures': ['RwkvForCausalLM'], 'model_type': 'rwkv', 'vocab_size': cfg.vocab_size,
          'context_length': cfg.block_size, 'hidden_size': cfg.n_embd, 'num_hidden_layers': cfg.n_layer,
          'attention_hidden_size': cfg.n_embd, 'intermediate_size': cfg.dim_ffn, 'layer_norm_epsilon': 1e-5,
          'rescale_every': 6, 'tie_word_embeddings': False, **(special_ids or default_special_ids(0, cfg))}
    write_text(directory / 'config.json', json.dumps(hf, indent=2))


def load_rwkv(name_or_path, wkv_backend='auto'):
    """RWKV from an official BlinkDL .pth file of any version (RWKV-4-Pile-*.pth, RWKV-x070-*.pth; shapes inferred
    from the tensors), a local Hugging Face format directory, a hub name RWKV/rwkv-4-{169m,...,14b}-pile (downloaded
    once), or a quantized .safetensors of export.py (it comes back quantized)."""
    path = hub_or_local(name_or_path, RWKV_HUB_NAMES)
    if path.is_dir():
        config, state = rwkv_from_hf(path, name_or_path, wkv_backend)
    elif file_kind(path) == 'quantized':
        return load_quantized(path, expect='rwkv')[0]
    elif file_kind(path) == 'rwkvcpp':
        return load_rwkvcpp(path, wkv_backend)
    else:
        config, state = rwkv_from_pth(path, wkv_backend)
    model = empty_model(RWKV, config)
    own = model.state_dict()
    # the rwkv pip package squeezes size-1 dimensions: take (C,) for a (1, 1, C) parameter, nothing else
    state = {k: v.reshape(own[k].shape) if k in own and v.shape != own[k].shape and
             v.squeeze().shape == own[k].squeeze().shape else v for k, v in state.items()}
    load_state_checked(model, {k: v.float() for k, v in state.items()}, name_or_path)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# GPT-2 as transformers' GPT2LMHeadModel

# GPT2LMHeadModel stores these four as Conv1D, (in, out): the transpose of nn.Linear's weight
HF_TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def load_gpt(name_or_path, dropout=0.0):
    """GPT-2 from a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; downloaded once), a local Hugging Face format
    directory, or a quantized .safetensors of export.py (it comes back quantized)."""
    path = hub_or_local(name_or_path, GPT_HUB_NAMES)
    if path.is_file():
        if file_kind(path) == 'quantized':
            return load_quantized(path, expect='gpt')[0]
        raise ValueError(f"{path} is a torch file; GPT-2 is read from a Hugging Face directory or a hub name")
    hf, state = load_hf_directory(path)
    if hf.get('model_type') != 'gpt2':
        raise ValueError(f"{name_or_path} is a '{hf.get('model_type')}' model, not GPT-2")
    config = GPTConfig(**{ours: config_value(hf, theirs, path) for ours, theirs in (
        ('block_size', 'n_positions'), ('vocab_size', 'vocab_size'), ('n_layer', 'n_layer'), ('n_head', 'n_head'),
        ('n_embd', 'n_embd'))}, dropout=dropout, bias=True)
    model = empty_model(GPT, config)
    model.transformer.wte.weight = model.lm_head.weight  # to_empty unties them
    state = {(k if k.startswith('lm_head') else k if k.startswith('transformer.') else 'transformer.' + k): v
             for k, v in state.items() if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
    state['lm_head.weight'] = state.get('lm_head.weight', state['transformer.wte.weight'])  # tied
    state = {k: v.t() if k.endswith(HF_TRANSPOSED) else v for k, v in state.items()}
    load_state_checked(model, {k: v.float() for k, v in state.items()}, name_or_path)
    return model


def save_gpt_hf(model, directory, special_ids=None):
    """Write a Hugging Face format directory that transformers loads as GPT2LMHeadModel. special_ids: config.json's
    bos/eos_token_id (default: GPT-2's <|endoftext|>, 50256)."""
    import torch.nn as nn
    cfg = model.config
    if getattr(model, 'quantized', None):
        raise ValueError(f"the model is quantized ({model.quantized[0]}): export the float model it came from")
    if cfg.attn_window or cfg.attn_kv_heads not in (0, cfg.n_head) or cfg.moe_experts:
        raise ValueError("GPT2LMHeadModel has no sliding window, grouped-query attention or mixture of experts: "
                         "save this model with train.py's checkpoints instead")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k != 'lm_head.weight'}
    if not cfg.bias:  # GPT2LMHeadModel always has biases: zeros are the same function
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != 'lm_head':
                state[f'{name}.bias'] = torch.zeros(module.out_features)
            elif isinstance(module, nn.LayerNorm):
                state[f'{name}.bias'] = torch.zeros(module.weight.shape)
    state = {k: (v.t() if k.endswith(HF_TRANSPOSED) else v).contiguous() for k, v in state.items()}
    save_safetensors(state, directory / 'model.safetensors')
    hf = {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': cfg.vocab_size,
          'n_positions': cfg.block_size, 'n_embd': cfg.n_embd, 'n_layer': cfg.n_layer, 'n_head': cfg.n_head,
          'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5, 'resid_pdrop': cfg.dropout,
          'embd_pdrop': cfg.dropout, 'attn_pdrop': cfg.dropout, 'tie_word_embeddings': True,
          **(special_ids or default_special_ids(50256, cfg))}
    write_text(directory / 'config.json', json.dumps(hf, indent=2))


def default_special_ids(eot, cfg):
    """config.json's bos/eos ids without a tokenizer: the family's <|endoftext|> where the vocabulary has it."""
    eot = eot if eot < cfg.vocab_size else None
    return {'bos_token_id': eot, 'eos_token_id': eot}


def save_pretrained(model, directory, tokenizer=None):
    """A Hugging Face format directory of either model (RWKV-4 or GPT-2). With the tokenizer spec it was trained
    with, also that tokenizer as transformers' AutoTokenizer reads it (tokenizer.json, tokenizer_config.json;
    config.json's bos/eos ids its end-of-text token, or none for a char vocabulary) and as sample.py reads it back
    exactly (nanorwkv_tokenizer.json)."""
    hf_tokenizer, special_ids = None, None
    if tokenizer is not None and tokenizer.get('tokenizer') != 'world':  # the World tokenizer has no HF form
        from tokenizers import Tokenizer
        hf_tokenizer, eot = hf_tokenizer_json(tokenizer)
        eot_id = Tokenizer.from_str(hf_tokenizer).token_to_id(eot) if eot else None
        special_ids = {'bos_token_id': eot_id, 'eos_token_id': eot_id}
    (save_gpt_hf if isinstance(model, GPT) else save_rwkv_hf)(model, directory, special_ids)
    directory = Path(directory)
    if hf_tokenizer is not None:
        write_text(directory / 'tokenizer.json', hf_tokenizer)
        config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': model.config.block_size,
                  'clean_up_tokenization_spaces': False, **({'bos_token': eot, 'eos_token': eot} if eot else {})}
        write_text(directory / 'tokenizer_config.json', json.dumps(config, indent=2))
    if tokenizer is not None:
        write_text(directory / 'nanorwkv_tokenizer.json', json.dumps(tokenizer))


def directory_tokenizer(path, model_type):
    """The tokenizer of a Hugging Face directory: what export.py recorded, else its tokenizer.json, else the
    family's usual one."""
    if (path / 'nanorwkv_tokenizer.json').is_file():
        return json.loads((path / 'nanorwkv_tokenizer.json').read_text())
    if (path / 'tokenizer.json').is_file():
        return {'tokenizer': 'file', 'path': str(path / 'tokenizer.json')}
    return {'tokenizer': 'neox' if model_type == 'rwkv' else 'gpt2'}


# ---------------------------------------------------------------------------------------------------------------------
# quantized models: one .safetensors with the packed tensors (quantize.py) and what is needed to rebuild the model

def save_quantized(model, path, model_type, tokenizer=None):
    """One .safetensors file: the quantized model's state dict (packed tensors, scales, the fp32 rest) and, in its
    metadata, the format, the model type and config, and the tokenizer; load_quantized needs nothing else."""
    from dataclasses import asdict

    from safetensors.torch import save_file
    fmt, head = model.quantized
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model_type == 'gpt' and 'lm_head.weight' in state:
        state.pop('transformer.wte.weight')  # tied to the float head
    meta = {'format': 'pt', 'nanorwkv': 'quantized', 'version': str(FILE_VERSION), 'quantization': fmt,
            'head': 'quantized' if head else 'fp32', 'model_type': model_type,
            'model_args': json.dumps(asdict(model.config)), 'tokenizer': json.dumps(tokenizer or {'tokenizer': 'gpt2'})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def is_quantized_file(path):
    path = Path(path)
    if not path.is_file():  # by content, whatever the name (export.py writes any --dest)
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), 'pt') as f:
            return (f.metadata() or {}).get('nanorwkv') == 'quantized'
    except Exception:  # safetensors' own error type: a damaged or foreign file holds no quantized model
        return False


def load_quantized(path, expect=None):
    """(model, model_type, tokenizer spec) from a file save_quantized wrote; expect: the model type it must hold."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata() or {}
    if meta.get('nanorwkv') != 'quantized':
        raise ValueError(f"{path} is not a quantized nanoRWKV file (no 'nanorwkv: quantized' in its metadata)")
    if int(meta.get('version', 0)) > FILE_VERSION:
        raise ValueError(f"{path} is version {meta['version']} of the quantized layout; this code reads up to "
                         f"{FILE_VERSION}: update nanoRWKV")
    missing = [k for k in ('model_type', 'quantization', 'head', 'model_args', 'tokenizer') if k not in meta]
    if missing:
        raise ValueError(f"{path}: its metadata has no {', '.join(missing)}; export the model again with export.py")
    model_type, fmt, head = meta['model_type'], meta['quantization'], meta['head'] == 'quantized'
    try:
        model_args, tokenizer = json.loads(meta['model_args']), json.loads(meta['tokenizer'])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its metadata is not valid JSON ({e}); export the model again with export.py") from e
    if model_type not in ('gpt', 'rwkv') or fmt not in FORMATS:
        raise ValueError(f"{path}: its metadata names model_type {model_type!r} and quantization {fmt!r}; export "
                         f"the model again with export.py")
    if expect and model_type != expect:
        raise ValueError(f"{path} holds a quantized {model_type}, not {'an RWKV' if expect == 'rwkv' else 'a GPT'}")
    with torch.device('meta'):
        try:
            model = build_model(model_type, model_args)
        except (ConfigError, TypeError) as e:  # a key or value no config of this version takes
            raise ValueError(f"{path}: its model config does not build ({first_line(e)})") from e
    model.to_empty(device='cpu')
    model.quantize_(fmt, head=head)  # the structure; the values come from the file
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' own error type
        raise ValueError(f"{path} is damaged ({first_line(e)})") from e
    if model_type == 'gpt' and 'transformer.wte.weight' not in state:
        state['transformer.wte.weight'] = state['lm_head.weight']
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its own model config: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    return model.eval(), model_type, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# rwkv.cpp model files (RWKV/rwkv.cpp docs/FILE_FORMAT.md): a header of six int32 (magic 'ggmf', version, n_vocab,
# n_embed, n_layer, data type), then per tensor (dim count, key length, data type, the shape reversed, the key, the
# data). FP32 and FP16 files are version 100 (the same in 101, and what the April-2023 library reads); quantized ones
# version 101, whose blocks are ggml's current ones (quantize.ggml_blocks). As rwkv.cpp does, the embedding and the
# head stay unquantized, the time_* vectors are squeezed to (n_embed,), time_decay is stored as -exp(time_decay), and
# 1-D tensors are FP32.

RWKVCPP_TYPES = {'FP32': 0, 'FP16': 1, 'Q4_0': 2, 'Q5_1': 8, 'Q8_0': 9}
RWKVCPP_MAGIC = 0x67676d66


def save_rwkvcpp(model, path, data_type='FP32', tokenizer=None):
    """Write an RWKV-4 model as an rwkv.cpp file of data_type FP32, FP16, Q8_0, Q5_1 or Q4_0 (its tokenizer spec, if
    given, beside it as for save_pth)."""
    if data_type not in RWKVCPP_TYPES:
        raise ValueError(f"rwkv.cpp data type must be one of {', '.join(RWKVCPP_TYPES)}, got {data_type!r}")
    if model.config.version != '4':
        raise ValueError(f"the rwkv.cpp format written here is RWKV-4's; this model is RWKV-{model.config.version}: "
                         f"export it as an official .pth (--format=pth) or quantize it (--format=int8, ...)")
    state = plain_state_dict(model)  # RWKV-LM's names and values, fp32; refuses MoE / hybrids
    V, C = state['emb.weight'].shape
    version = 100 if data_type in ('FP32', 'FP16') else 101
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        f.write(struct.pack('<6i', RWKVCPP_MAGIC, version, V, C, model.config.n_layer, RWKVCPP_TYPES[data_type]))
        for k, t in state.items():
            if '.time_' in k:
                t = t.reshape(-1)  # (1, 1, C) -> (C,)
            if k.endswith('.time_decay'):
                t = -torch.exp(t)
            kind = 'FP32'
            if t.dim() == 2 and data_type == 'FP16':
                kind = 'FP16'
            elif t.dim() == 2 and data_type != 'FP32' and k not in ('emb.weight', 'head.weight'):
                kind = data_type
            key = k.encode('utf-8')
            f.write(struct.pack(f'<3i{t.dim()}i', t.dim(), len(key), RWKVCPP_TYPES[kind], *reversed(t.shape)))
            f.write(key)
            if kind == 'FP32':
                f.write(t.numpy().astype('<f4').tobytes())
            elif kind == 'FP16':
                f.write(t.half().numpy().astype('<f2').tobytes())
            else:
                f.write(ggml_blocks(t, kind.lower()))
    if tokenizer is not None:
        write_text(tokenizer_sidecar(path), json.dumps(tokenizer))


def load_rwkvcpp(path, wkv_backend='auto'):
    """An RWKV-4 from an rwkv.cpp file of the types save_rwkvcpp writes (rwkv.cpp's docs/FILE_FORMAT.md: the header
    magic, version 100 / 101, n_vocab, n_embed, n_layer, data type; then per tensor its dims, key length, type,
    shape innermost first, key and data). FP32 / FP16 tensors load as fp32; Q8_0 / Q5_1 / Q4_0 matrices become
    QLinear of that format holding the file's own blocks, so the model runs quantized exactly as the file is."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path} is a truncated rwkv.cpp file ({len(data)} bytes, shorter than its header)")
    _, version, V, C, L, _ = struct.unpack_from('<6i', data, 0)
    if version not in (100, 101):
        raise ValueError(f"{path} is an rwkv.cpp file of format version {version}; nanoRWKV reads versions 100 and "
                         f"101 (what export.py --format=rwkvcpp writes)")
    kinds = {v: k for k, v in RWKVCPP_TYPES.items()}
    state, blocks, pos = {}, {}, 24
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"{path} is truncated at byte {pos} (inside a tensor's header)")
        n_dims, key_len, kind = struct.unpack_from('<3i', data, pos)
        if n_dims not in (1, 2) or kind not in kinds or not 0 < key_len < 256:
            raise ValueError(f"{path} is damaged at byte {pos}: a tensor header of {n_dims} dims, type {kind}, key "
                             f"length {key_len} (nanoRWKV reads types {', '.join(RWKVCPP_TYPES)})")
        shape = tuple(reversed(struct.unpack_from(f'<{n_dims}i', data, pos + 12)))
        pos += 12 + 4 * n_dims
        key = data[pos:pos + key_len].decode('utf-8', 'replace')
        pos += key_len
        kind, n = kinds[kind], math.prod(shape)
        size = {'FP32': 4 * n, 'FP16': 2 * n}.get(kind) or n // 32 * {'Q8_0': 34, 'Q4_0': 18, 'Q5_1': 24}[kind]
        if pos + size > len(data):
            raise ValueError(f"{path} is truncated: {key} needs {size} bytes at byte {pos}, the file ends at "
                             f"{len(data)}")
        raw = bytearray(data[pos:pos + size])
        pos += size
        if kind in ('FP32', 'FP16'):
            t = torch.frombuffer(raw, dtype=torch.float32 if kind == 'FP32' else torch.float16).float().reshape(shape)
            state[key] = torch.log(-t) if key.endswith('.time_decay') else t  # the file holds -exp(time_decay)
        else:
            blocks[key] = (kind.lower(), ggml_tensors(raw, shape, kind.lower()))
            state[key] = torch.empty(shape)  # replaced by the QLinear below
    if 'emb.weight' not in state or tuple(state['emb.weight'].shape) != (V, C):
        raise ValueError(f"{path} has no emb.weight of its header's shape ({V}, {C})")
    fmts = {fmt for fmt, _ in blocks.values()}
    if len(fmts) > 1:
        raise ValueError(f"{path} mixes the quantization types {sorted(fmts)}; nanoRWKV runs one per model")
    config = RWKVConfig(wkv_backend=wkv_backend, **pth_config(state))
    if config.version != '4' or config.n_layer != L:
        raise ValueError(f"{path} is not an RWKV-4 of {L} layers as its header says")
    model = empty_model(RWKV, config)
    own = model.state_dict()
    load_state_checked(model, {k: v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v
                               for k, v in state.items()}, path)
    for key, (fmt, tensors) in blocks.items():
        parent, _, child = key[:-len('.weight')].rpartition('.')
        O, I = tensors['d'].shape[0], tensors['d'].shape[1] * 32
        setattr(model.get_submodule(parent), child, QLinear(fmt, I, O, tensors))
    if blocks:
        model.quantized = (fmts.pop(), 'head.weight' in blocks)
    return model.eval()


def ggml_tensors(raw, shape, fmt):
    """ggml blocks (ggml_blocks' bytes) of an (O, I) matrix as quantize.quantize's tensors of fmt."""
    import numpy as np
    O, I = shape
    nb = I // 32
    b = np.frombuffer(raw, dtype=np.uint8).reshape(O, nb, -1)
    half = lambda a: torch.from_numpy(np.ascontiguousarray(a).view('<f2').reshape(O, nb).copy())  # noqa: E731
    t = {'d': half(b[..., :2])}
    if fmt == 'q5_1':
        t['m'] = half(b[..., 2:4])
        t['qh'] = torch.from_numpy(np.ascontiguousarray(b[..., 4:8]).view('<i4').reshape(O, nb).copy())
    qs = np.ascontiguousarray(b[..., {'q8_0': 2, 'q4_0': 2, 'q5_1': 8}[fmt]:]).reshape(O, -1)
    t['q'] = torch.from_numpy(qs.view(np.int8) if fmt == 'q8_0' else qs.copy()).clone()
    return t


# ---------------------------------------------------------------------------------------------------------------------
# the front door

def load_pretrained(init_from, wkv_backend='auto', for_training=False):
    """(model, model type, tokenizer spec) for a pretrained model: gpt2*, RWKV/rwkv-4-*-pile, a Hugging Face format
    directory (RWKV or GPT-2), an official RWKV .pth (version 4, 5, 5.1, 6 or 7), or a quantized .safetensors of
    export.py (inference only). Errors are ConfigErrors of one line."""
    path = Path(init_from)
    try:
        if is_quantized_file(path):
            if for_training:
                raise ConfigError(f"{path} is a quantized model, for inference only: train from the float checkpoint "
                                  f"it was exported from (--init_from=resume in its out_dir)")
            return load_quantized(path)
        if init_from in GPT_HUB_NAMES:
            return load_gpt(init_from), 'gpt', {'tokenizer': 'gpt2'}
        if init_from in RWKV_HUB_NAMES:
            return load_rwkv(init_from, wkv_backend), 'rwkv', {'tokenizer': 'neox'}
        if path.is_file():  # an official .pth or rwkv.cpp file: its tokenizer beside it, or a World or Pile model's
            model = load_rwkv(path, wkv_backend)
            if for_training and getattr(model, 'quantized', None):
                raise ConfigError(f"{path} is a quantized rwkv.cpp file, for inference only: train from the float "
                                  f"checkpoint it was exported from (--init_from=resume in its out_dir)")
            if state_sidecar(path).is_file() and path.suffix == '.pth':  # a state-tuned model's learned start
                load_state(model, state_sidecar(path))
            return model, 'rwkv', pth_tokenizer(path, model.config.vocab_size)
        if path.is_dir():
            config = path / 'config.json'
            model_type = read_json(config, '').get('model_type') if config.is_file() else None
            if model_type not in ('rwkv', 'gpt2'):
                raise ConfigError(f"{path} is not a Hugging Face RWKV or GPT-2 directory (config.json model_type: "
                                  f"{model_type})")
            spec = directory_tokenizer(path, model_type)
            if model_type == 'rwkv':
                return load_rwkv(path, wkv_backend), 'rwkv', spec
            return load_gpt(path), 'gpt', spec
    except ValueError as e:  # the readers' errors are one line already
        raise ConfigError(str(e)) from e
    if path.suffix or len(path.parts) > 1:  # meant as a file or folder
        raise ConfigError(f"init_from={init_from}: no such file or folder")
    raise ConfigError(f"init_from={init_from!r}: expected {', '.join(GPT_HUB_NAMES)}, RWKV/rwkv-4-{{169m,430m,1b5,"
                      f"3b,7b,14b}}-pile, a Hugging Face directory, an RWKV .pth or a quantized .safetensors")
