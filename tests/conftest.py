"""The suite's fixtures; the repository root and tests/ are on sys.path by pytest.ini (pythonpath)."""
import json

import numpy as np
import pytest


@pytest.fixture(scope='session')
def dataset(tmp_path_factory):
    """A char dataset from a small random Markov chain: learnable structure, nothing to download."""
    d = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)
    itos = list('abcdefgh \n')
    V = len(itos)
    trans = rng.dirichlet(np.full(V, 0.2), size=V)  # peaked next-character distributions
    ids = [0]
    for _ in range(40000):
        ids.append(rng.choice(V, p=trans[ids[-1]]))
    ids = np.array(ids, dtype=np.uint16)
    ids[:36000].tofile(d / 'train.bin')
    ids[36000:].tofile(d / 'val.bin')
    (d / 'meta.json').write_text(json.dumps({'tokenizer': 'char', 'vocab_size': V, 'itos': itos}))
    return d
