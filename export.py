"""
Convert a training checkpoint (out*/ckpt.pt) to a format the rest of the ecosystem loads.

$ python export.py --out_dir=out-shakespeare-char --format=hf --dest=rwkv-shakespeare   # transformers directory
$ python export.py --out_dir=out-shakespeare-char --format=pth --dest=rwkv-shakespeare.pth   # RWKV-LM / rwkv pip

A checkpoint of a LoRA run (train.py --finetune=lora) is exported with its adapters merged into the weights.
format 'hf': config.json + model.safetensors, loaded by transformers as RwkvForCausalLM or GPT2LMHeadModel, and the
  tokenizer as AutoTokenizer loads it (tokenizer.json, tokenizer_config.json) and as sample.py reads it back.
format 'pth': RWKV only, the official .pth of BlinkDL's RWKV-LM (any version), which the rwkv pip package runs, and
  its tokenizer beside it in <dest minus .pth>.tokenizer.json (sample.py --init_from=<.pth> reads it).
formats 'int8', 'q8_0', 'q5_1', 'q4_0', 'int4': the model quantized for CPU inference (quantize.py), one .safetensors
  that sample.py --init_from=<file> and RWKV/GPT.from_pretrained load without the checkpoint;
  --head=True/False overrides the format's default for the output head.
format 'state': a state-tuned RWKV-5/6/7 (train.py --finetune=state): its learned initial state alone, a small .pth
  of blocks.<i>.att.time_state; sample.py --init_from=<base .pth> --init_state=<file> runs the base model from it.
format 'rwkvcpp': RWKV only, an rwkv.cpp model file (docs/FILE_FORMAT.md there) of --rwkvcpp_type FP32, FP16 (file
  version 100) or Q8_0, Q5_1, Q4_0 (version 101, ggml's current blocks; the embedding and head stay FP32), with the
  tokenizer beside it as for 'pth'; sample.py --init_from=<file> runs it (a quantized one quantized).
"""
from pathlib import Path

import interop
from checkpoint import load_latest_checkpoint, model_from_checkpoint
from configurator import ConfigError, Option, parse_config, run_script
from files import WriteError, cause
from lora import merge_lora

OPTIONS = dict(
    out_dir=Option('out', "the directory with the checkpoints (the newest intact one is exported)"),
    format=Option('hf', "'hf' (a transformers directory), 'pth' (RWKV only: the official .pth), or a "
                        "quantization format (a .safetensors for CPU inference)",
                  ('hf', 'pth', 'state', 'rwkvcpp', 'int8', 'q8_0', 'q5_1', 'q4_0', 'int4')),
    dest=Option('', "the directory (hf) or file (pth, quantized) to write"),
    rwkvcpp_type=Option('FP32', "format 'rwkvcpp': the data type of its matrices",
                        ('FP32', 'FP16', 'Q8_0', 'Q5_1', 'Q4_0')),
    head=Option('default', "quantized formats: quantize the output head too ('default': quantize.DEFAULT_HEAD, "
                           "True)",
                ('default', True, False)),
)


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    if not cfg.dest:
        raise ConfigError("say where to write with --dest=PATH")
    ckpt = load_latest_checkpoint(cfg.out_dir, 'cpu')[0]
    model = merge_lora(model_from_checkpoint(ckpt))  # a LoRA run's adapters folded into plain weights
    dest = Path(cfg.dest)
    if cfg.format in ('pth', 'rwkvcpp', 'state') and ckpt['model_type'] != 'rwkv':
        what = {'pth': "RWKV's official format", 'state': "an RWKV's learned initial state"}.get(
            cfg.format, "rwkv.cpp's format, for RWKV")
        raise ConfigError(f"format '{cfg.format}' is {what}; this checkpoint is a GPT: use --format=hf or a "
                          f"quantized format")
    try:
        if cfg.format == 'pth':
            interop.save_pth(model, dest, ckpt.get('tokenizer', {'tokenizer': 'gpt2'}))
        elif cfg.format == 'state':
            interop.save_state(model, dest)
        elif cfg.format == 'rwkvcpp':
            interop.save_rwkvcpp(model, dest, cfg.rwkvcpp_type, ckpt.get('tokenizer', {'tokenizer': 'gpt2'}))
        elif cfg.format != 'hf':
            model.quantize_(cfg.format, head=None if cfg.head == 'default' else cfg.head)
            interop.save_quantized(model, dest, ckpt['model_type'], ckpt.get('tokenizer'))
        else:  # with the tokenizer the model was trained with, for sample.py and for people
            interop.save_pretrained(model, dest, ckpt.get('tokenizer', {'tokenizer': 'gpt2'}))
    except ValueError as e:  # a model the format cannot hold (MoE, attention options)
        raise ConfigError(str(e)) from e
    except OSError as e:  # a WriteError of files.py names the file and the cause; the old file is as it was
        message = e if isinstance(e, WriteError) else WriteError(dest, cause(e))
        raise ConfigError(f"{message}; pick a writable --dest with room for the file") from e
    print(f"wrote {dest} ({ckpt['model_type']}, format {cfg.format}, iteration {ckpt.get('iter_num')})")


if __name__ == '__main__':
    run_script(main)
