"""The notebooks run top to bottom on the CPU, offline, and their assertion cells hold (the WKV forms agree, the
modes agree, the formulas equal the FLOP counter); the committed copies carry their outputs."""
import nbformat
import pytest

from helpers import REPO

nbclient = pytest.importorskip('nbclient')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['rwkv_tutorial.ipynb', 'model_sizing.ipynb'])
def test_notebook_runs_and_its_claims_hold(name):
    committed = nbformat.read(REPO / name, as_version=4)
    code = [c for c in committed.cells if c.cell_type == 'code']
    assert code and all(c.execution_count for c in code) and sum(bool(c.outputs) for c in code) >= len(code) - 2, \
        'commit the notebook executed, with its outputs'
    nb = nbformat.read(REPO / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                     resources={'metadata': {'path': str(REPO)}})
    client.execute()  # raises CellExecutionError on any failing cell or assert
    errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == 'error']
    assert not errors


@pytest.mark.slow
def test_animation_script_draws_both_gifs(tmp_path):
    from PIL import Image

    from helpers import run
    r = run('assets/make_animations.py', '--frames=2', f'--out_dir={tmp_path}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]  # it asserts that what it draws is what the model computes
    for name in ('time_mixing.gif', 'channel_mixing.gif'):
        assert Image.open(tmp_path / name).n_frames == 2
