"""The suite's fixtures; the repository root and tests/ are on sys.path by pytest.ini (pythonpath). The layers:
`python -m pytest -m "not slow"` runs the fast one (components, in this process); tests that run a script in a Python
subprocess, train to a loss, or compile are marked slow, and a test that starts a Python subprocess without the mark
fails (the guard below)."""
import json
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def python_subprocesses_are_slow(request, monkeypatch):
    """Outside @pytest.mark.slow tests, starting `python ...` is an error that names the mark."""
    if request.node.get_closest_marker('slow'):
        return
    real = subprocess.Popen.__init__

    def guarded(self, cmd, *args, **kwargs):
        if isinstance(cmd, (list, tuple)) and cmd and cmd[0] == sys.executable:
            raise AssertionError(f"{request.node.nodeid} runs a Python subprocess: mark it @pytest.mark.slow")
        real(self, cmd, *args, **kwargs)
    monkeypatch.setattr(subprocess.Popen, '__init__', guarded)


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
