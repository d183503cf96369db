"""
OpenWebText (Gokaslan & Cohen 2019, Skylion007/openwebtext on the Hugging Face hub), tokenized: writes train.bin and
val.bin (uint16 token ids, one <|endoftext|> after every document) and meta.json (tokenizer, token counts).

$ python data/openwebtext/prepare.py                      # GPT-2 BPE -> data/openwebtext/
$ python data/openwebtext/prepare.py --tokenizer=neox     # GPT-NeoX-20B (RWKV-4 Pile models) -> data/openwebtext_neox/
$ python data/openwebtext/prepare.py --source=docs.jsonl --out_dir=/tmp/mine   # a local jsonl / parquet / txt file

The dataset is streamed (nothing is held in memory or fully downloaded first) and tokenized by a process pool.
Every val_every-th document is held out for validation (2000: 0.05%, nanoGPT's split), and both splits are tokenized
with the same tokenizer, so a model evaluated on val reads the text it was trained to read.
"""
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from tokenizer import get_codec, spec_for, vocab_size  # noqa: E402  (the repo's root modules)
from train import ConfigError, parse_config  # noqa: E402

DEFAULTS = dict(
    tokenizer='gpt2',  # 'gpt2', 'neox', or a path to a tokenizer.json
    source='',  # '' = OpenWebText from the hub; or a local .jsonl / .json / .parquet / .txt with a 'text' column
    out_dir='',  # '' = data/openwebtext (gpt2) or data/openwebtext_<tokenizer>
    val_every=2000,
    num_proc=max(1, (os.cpu_count() or 2) // 2),
    max_docs=0,  # 0 = all; a small number for a quick look
)
HUB_NAME = 'Skylion007/openwebtext'


def documents(source, hub_name=HUB_NAME, split='train'):
    """An iterable of {'text': ...} records, streamed: a local file, or a split of a hub dataset."""
    from datasets import load_dataset
    if source:
        kinds = {'.jsonl': 'json', '.json': 'json', '.parquet': 'parquet', '.txt': 'text'}
        kind = kinds.get(Path(source).suffix)
        if kind is None or not Path(source).is_file():
            raise ConfigError(f"source {source} must be an existing {', '.join(kinds)} file")
        return load_dataset(kind, data_files=source, split='train', streaming=True)
    try:
        try:
            return load_dataset(hub_name, split=split, streaming=True)
        except RuntimeError as e:
            # datasets >= 4 refuses loading scripts; the hub's own parquet conversion holds the same rows
            if 'scripts are no longer supported' not in str(e):
                raise
            return load_dataset(hub_name, split=split, streaming=True, revision='refs/convert/parquet')
    except (OSError, ConnectionError, ValueError) as e:
        raise ConfigError(f"cannot stream {hub_name} from the Hugging Face hub ({type(e).__name__}); offline, "
                          f"python data/shakespeare_char/prepare.py works, or pass --source=a local file") from e


_encode, _eot = None, None


def _init_worker(spec):
    global _encode, _eot
    _encode, _, _eot = get_codec(spec)


def _tokenize(item):
    split, text = item
    return split, np.array(_encode(text) + [_eot], dtype=np.uint32)


def main(argv, hub_name=HUB_NAME, name='openwebtext', hub_splits=None):
    """hub_splits: None = one stream, every val_every-th document to val (OpenWebText has no val split); or
    {'train': hub split, 'val': hub split} for datasets that have both (--source still means one local file)."""
    c = parse_config(DEFAULTS, argv)
    try:
        spec = spec_for(c['tokenizer'])
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _, _, eot = get_codec(spec)  # fetches and caches the tokenizer once, before the workers start
    if eot is None:
        raise ConfigError(f"tokenizer {c['tokenizer']} has no <|endoftext|> token to separate documents")
    suffix = '' if c['tokenizer'] == 'gpt2' else '_' + (c['tokenizer'] if c['tokenizer'] == 'neox' else 'custom')
    out_dir = Path(c['out_dir']) if c['out_dir'] else HERE.parent / f'{name}{suffix}'
    if hub_splits and not c['source']:
        streams = {split: documents('', hub_name, hub) for split, hub in hub_splits.items()}
        if c['max_docs']:
            streams = {split: docs.take(c['max_docs']) for split, docs in streams.items()}
        items = ((split, d['text']) for split, docs in streams.items() for d in docs)
    else:
        docs = documents(c['source'], hub_name)
        if c['max_docs']:
            docs = docs.take(c['max_docs'])
        items = (('val' if i % c['val_every'] == 0 else 'train', d['text']) for i, d in enumerate(docs))
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {'train': 0, 'val': 0}
    vocab_max = 0
    parts = {split: out_dir / f'{split}.bin.partial' for split in counts}
    with open(parts['train'], 'wb') as ftrain, open(parts['val'], 'wb') as fval, \
            mp.Pool(c['num_proc'], initializer=_init_worker, initargs=(spec,)) as pool:
        for split, ids in tqdm(pool.imap(_tokenize, items, chunksize=64), desc='tokenizing', unit='doc'):
            vocab_max = max(vocab_max, int(ids.max()))
            ids.astype(np.uint16).tofile(fval if split == 'val' else ftrain)
            counts[split] += len(ids)
    if vocab_max >= 2 ** 16:
        raise ConfigError(f"token id {vocab_max} does not fit uint16: this tokenizer is too large for .bin files")
    for split, part in parts.items():
        os.replace(part, out_dir / f'{split}.bin')  # complete files only: a crash leaves no half-written .bin
    meta = {**spec, 'vocab_size': vocab_size(spec), 'train_tokens': counts['train'], 'val_tokens': counts['val'],
            'source': c['source'] or hub_name}
    (out_dir / 'meta.json').write_text(json.dumps(meta, indent=1))
    print(f"{out_dir}: train {counts['train']:,} tokens, val {counts['val']:,} tokens ({c['tokenizer']})")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"prepare.py: error: {e}")
