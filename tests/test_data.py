"""Dataset preparation on local files (no network): data/openwebtext/prepare.py with a local source."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_train import one_line_error

REPO = Path(__file__).resolve().parents[1]


def word_tokenizer(path, words):
    tokenizers = pytest.importorskip('tokenizers')
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    vocab = {'<|endoftext|>': 0, '[UNK]': 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return vocab


def test_openwebtext_prepare_on_a_local_file(tmp_path):
    pytest.importorskip('datasets')
    words = ['alpha', 'beta', 'gamma', 'delta']
    vocab = word_tokenizer(tmp_path / 'tok.json', words)
    rng = np.random.default_rng(0)
    docs = [' '.join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(50)]
    (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    out = tmp_path / 'owt'
    r = subprocess.run([sys.executable, str(REPO / 'data/openwebtext/prepare.py'), f'--source={tmp_path / "docs.jsonl"}',
                        f'--tokenizer={tmp_path / "tok.json"}', f'--out_dir={out}', '--val_every=10', '--num_proc=2'],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # expected: every document's word ids then <|endoftext|>, documents 0, 10, 20, ... in val
    expect = {'train': [], 'val': []}
    for i, d in enumerate(docs):
        expect['val' if i % 10 == 0 else 'train'] += [vocab[w] for w in d.split()] + [0]
    for split in ('train', 'val'):
        got = np.fromfile(out / f'{split}.bin', dtype=np.uint16).tolist()
        assert got == expect[split], split
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['tokenizer'] == 'file' and meta['vocab_size'] == 6
    assert (meta['train_tokens'], meta['val_tokens']) == (len(expect['train']), len(expect['val']))
    assert not list(out.glob('*.partial'))


def test_openwebtext_prepare_bad_inputs(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / 'data/openwebtext/prepare.py'), '--tokenizer=bpe2000'],
                       capture_output=True, text=True, timeout=300)
    one_line_error(r, 'prepare.py', "tokenizer must be 'gpt2', 'neox'")
