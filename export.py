"""
Convert a training checkpoint (out*/ckpt.pt) to a format the rest of the ecosystem loads.

$ python export.py --out_dir=out-shakespeare-char --format=hf --dest=rwkv-shakespeare   # transformers directory
$ python export.py --out_dir=out-shakespeare-char --format=pth --dest=rwkv-shakespeare.pth   # RWKV-LM / rwkv pip

format 'hf': config.json + model.safetensors, loaded by transformers as RwkvForCausalLM or GPT2LMHeadModel.
format 'pth': RWKV only, the official RWKV-4 .pth of BlinkDL's RWKV-LM, which the rwkv pip package runs.
"""
import json
import sys
from pathlib import Path

from train import ConfigError, load_latest_checkpoint, model_from_checkpoint, parse_config

DEFAULTS = dict(
    out_dir='out',  # the directory with ckpt.pt
    format='hf',  # 'hf' or 'pth'
    dest='',  # the directory (hf) or file (pth) to write
)


def main(argv):
    c = parse_config(DEFAULTS, argv)
    if c['format'] not in ('hf', 'pth'):
        raise ConfigError(f"format must be 'hf' or 'pth', got '{c['format']}'")
    if not c['dest']:
        raise ConfigError("say where to write with --dest=PATH")
    ckpt = load_latest_checkpoint(c['out_dir'], 'cpu')[0]
    model = model_from_checkpoint(ckpt)
    dest = Path(c['dest'])
    if c['format'] == 'pth':
        if ckpt['model_type'] != 'rwkv':
            raise ConfigError("format 'pth' is RWKV's official format; this checkpoint is a GPT: use --format=hf")
        model.save_pth(dest)
    else:
        model.save_pretrained(dest)
        # the tokenizer the model was trained with, for sample.py and for people
        (dest / 'nanorwkv_tokenizer.json').write_text(json.dumps(ckpt.get('tokenizer', {'tokenizer': 'gpt2'})))
    print(f"wrote {dest} ({ckpt['model_type']}, format {c['format']}, iteration {ckpt.get('iter_num')})")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"export.py: error: {e}")
