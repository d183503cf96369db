"""Dataset preparation on local files (no network): data/openwebtext/prepare.py with a local source."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, one_line_error, word_tokenizer


@pytest.mark.slow
def test_openwebtext_prepare_on_a_local_file(tmp_path):
    pytest.importorskip('datasets')
    words = ['alpha', 'beta', 'gamma', 'delta']
    vocab = word_tokenizer(tmp_path / 'tok.json', words)
    rng = np.random.default_rng(0)
    docs = [' '.join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(50)]
    (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    out = tmp_path / 'owt'
    r = subprocess.run([sys.executable, str(REPO / 'data/openwebtext/prepare.py'),
                        f'--source={tmp_path / "docs.jsonl"}',
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


@pytest.mark.slow
def test_openwebtext_prepare_bad_inputs(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / 'data/openwebtext/prepare.py'), '--tokenizer=bpe2000'],
                       capture_output=True, text=True, timeout=300)
    one_line_error(r, 'prepare.py', "tokenizer must be 'gpt2', 'neox'")
    pytest.importorskip('datasets')
    word_tokenizer(tmp_path / 'tok.json', ['alpha', 'beta'])
    sources = {'empty.jsonl': ('', 'is empty: it needs documents'),
               'one.jsonl': ('{"text": "alpha"}\n', 'gave 0 train and 2 val tokens'),
               'body.jsonl': ('{"body": "alpha"}\n{"body": "beta"}\n', "a document has no 'text' field"),
               'broken.jsonl': ('{"text": "alpha"}\n{"text": \n', 'could not read')}
    for name, (text, fragment) in sources.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f'out-{name}'
        r = subprocess.run([sys.executable, str(REPO / 'data/openwebtext/prepare.py'), f'--source={tmp_path / name}',
                            f'--tokenizer={tmp_path / "tok.json"}', f'--out_dir={out}', '--num_proc=1'],
                           capture_output=True, text=True, timeout=600)
        one_line_error(r, 'prepare.py', fragment)
        assert not list(out.glob('*.bin*')), name  # no .bin, no .partial


def test_tinystories_prepare_uses_both_hub_splits(tmp_path, monkeypatch):
    # the hub is replaced by local streams (no network); what is checked is that each split goes to its own file
    # the script itself runs (in this process, so the hub can be replaced); sys.path and argv are restored after
    pytest.importorskip('datasets')
    import runpy
    from data import common
    words = ['once', 'upon', 'a', 'time']
    vocab = word_tokenizer(tmp_path / 'tok.json', words)
    stories = {'train': ['once upon a time', 'a time'], 'validation': ['upon upon']}
    seen = []

    def fake_documents(source, hub_name, split='train'):
        seen.append((hub_name, split))
        return [{'text': t} for t in stories[split]]
    monkeypatch.setattr(common, 'documents', fake_documents)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    monkeypatch.setattr(sys, 'argv', ['prepare.py', f'--tokenizer={tmp_path / "tok.json"}',
                                      f'--out_dir={tmp_path / "ts"}', '--num_proc=1'])
    runpy.run_path(str(REPO / 'data/tinystories/prepare.py'), run_name='__main__')
    assert seen == [('roneneldan/TinyStories', 'train'), ('roneneldan/TinyStories', 'validation')]
    for split, hub in (('train', 'train'), ('val', 'validation')):
        expect = [i for t in stories[hub] for i in [vocab[w] for w in t.split()] + [0]]
        assert np.fromfile(tmp_path / 'ts' / f'{split}.bin', dtype=np.uint16).tolist() == expect


@pytest.mark.slow
def test_tinystories_offline_names_an_offline_dataset(tmp_path):
    word_tokenizer(tmp_path / 'tok.json', ['once'])  # a local tokenizer: nothing to fetch
    r = subprocess.run([sys.executable, str(REPO / 'data/tinystories/prepare.py'),
                        f'--tokenizer={tmp_path / "tok.json"}',
                        f'--out_dir={tmp_path / "ts"}'], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'})
    one_line_error(r, 'prepare.py', 'cannot stream roneneldan/TinyStories from the Hugging Face hub')
    assert 'python data/shakespeare_char/prepare.py works' in r.stderr
    assert not (tmp_path / 'ts' / 'train.bin').exists()
    r = subprocess.run([sys.executable, str(REPO / 'data/tinystories/prepare.py'), '--tokenizer=neox-ish'],
                       capture_output=True, text=True, timeout=300)
    one_line_error(r, 'prepare.py', "tokenizer must be")


@pytest.mark.slow
def test_shakespeare_bpe_prepare(tmp_path):
    words = ['to', 'be', 'or', 'not']
    vocab = word_tokenizer(tmp_path / 'tok.json', words)
    text = ' '.join(np.random.default_rng(0).choice(words, size=200))
    (tmp_path / 'in.txt').write_text(text)
    r = subprocess.run([sys.executable, str(REPO / 'data/shakespeare/prepare.py'), f'--input={tmp_path / "in.txt"}',
                        f'--tokenizer={tmp_path / "tok.json"}', f'--out_dir={tmp_path / "s"}'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n = int(len(text) * 0.9)  # the first 90% of the characters, then the rest, each encoded on its own
    for split, part in (('train', text[:n]), ('val', text[n:])):
        assert np.fromfile(tmp_path / 's' / f'{split}.bin', dtype=np.uint16).tolist() == \
            [vocab.get(w, vocab['[UNK]']) for w in part.split()]  # a word cut in two is unknown on both sides
    meta = json.loads((tmp_path / 's' / 'meta.json').read_text())
    assert meta['vocab_size'] == 6
    assert (meta['train_tokens'], meta['val_tokens']) == (len(text[:n].split()), len(text[n:].split()))


@pytest.mark.slow
def test_shakespeare_bpe_token_counts_match_nanogpt(tmp_path):
    # nanoGPT's README: "train.bin has 301,966 tokens, val.bin has 36,059 tokens". Needs the tiny shakespeare text
    # and the GPT-2 ranks already in tokenizer.py's cache, which it then reads without asking tiktoken's server: the
    # suite never downloads.
    from tokenizer import CACHE
    if not (REPO / 'data/shakespeare_char/input.txt').is_file() or not (CACHE / 'gpt2.tiktoken').is_file():
        pytest.skip('tiny shakespeare or the GPT-2 ranks are not on this machine')
    r = subprocess.run([sys.executable, str(REPO / 'data/shakespeare/prepare.py'), f'--out_dir={tmp_path}'],
                       capture_output=True, text=True, timeout=300, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / 'meta.json').read_text())
    assert (meta['train_tokens'], meta['val_tokens']) == (301_966, 36_059)
