"""Files written whole or not at all, and damaged files found: every export writer under a full disk (RLIMIT_FSIZE)
and into a missing folder (file writers) leaves the old file byte-identical and no temporary file; an export onto a
hard link of a checkpoint does not write through it; a checkpoint with a flipped byte is refused by its CRCs and the
one before it used; every malformed model file given to the loader is one line, told apart by content."""
import json
import struct
import re
import resource
import signal
from contextlib import contextmanager

import pytest
import torch

import interop
from checkpoint import load_checkpoint, load_latest_checkpoint, new_run_id, save_checkpoint
from configurator import ConfigError
from helpers import official_pth, tiny_gpt, tiny_rwkv


@contextmanager
def file_size_limit(n_bytes):
    """Writes past n_bytes fail with EFBIG (File too large), as on a full disk; SIGXFSZ ignored meanwhile."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def quantized(model):
    return model.quantize_('int8')


# writer name: (write(model, path), the model, the file it writes inside path (directories) or None)
WRITERS = {
    'pth': (interop.save_pth, lambda: tiny_rwkv(torch.float32), None),
    'rwkvcpp': (lambda m, p: interop.save_rwkvcpp(m, p, 'Q8_0'), lambda: tiny_rwkv(torch.float32, n_embd=32), None),
    'quantized': (lambda m, p: interop.save_quantized(m, p, 'rwkv'), lambda: quantized(tiny_rwkv(torch.float32,
                                                                                                   n_embd=32)), None),
    'hf rwkv': (interop.save_pretrained, lambda: tiny_rwkv(torch.float32), 'model.safetensors'),
    'hf gpt': (interop.save_pretrained, lambda: tiny_gpt(), 'model.safetensors'),
}


@pytest.mark.parametrize('name', WRITERS)
def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(name, tmp_path):
    write, make, inner = WRITERS[name]
    model = make()
    dest = tmp_path / 'export'
    write(model, dest)
    target = dest / inner if inner else dest
    before = target.read_bytes()
    with torch.no_grad():  # another model's values: the file would change if the write got through
        for p in model.parameters():
            p.add_(1.0)
    for b in model.buffers():
        if b.dtype == torch.int8:
            b.add_(1)
    with file_size_limit(len(before) // 2), pytest.raises(OSError) as e:
        write(model, dest)
    assert str(e.value).startswith('could not write') and 'File too large' in str(e.value), e.value
    assert '\n' not in str(e.value)
    assert target.read_bytes() == before
    assert not [f for f in tmp_path.rglob('*') if f.name.endswith('.tmp')]
    if not inner:  # a file into a folder that is not there (a directory export creates its folder, as transformers')
        with pytest.raises(OSError, match=r'could not write .*x \(No such file or directory\)'):
            write(model, tmp_path / 'missing' / 'x')
    write(model, dest)  # and with room, the new file is written
    assert target.read_bytes() != before


def test_an_export_onto_a_hard_link_of_a_checkpoint_leaves_the_checkpoint(tmp_path):
    (tmp_path / 'ckpt-00000001.pt').write_bytes(b'the checkpoint')
    (tmp_path / 'ckpt.pt').hardlink_to(tmp_path / 'ckpt-00000001.pt')
    interop.save_pth(tiny_rwkv(torch.float32), tmp_path / 'ckpt.pt')  # --dest=<out_dir>/ckpt.pt
    assert (tmp_path / 'ckpt-00000001.pt').read_bytes() == b'the checkpoint'


def flip_a_tensor_byte(path):
    """Flip one byte inside the data of the largest tensor record of a torch.save file, in place."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    with open(path, 'rb') as f:  # the local header: 30 bytes, then the name and the extra field
        f.seek(info.header_offset + 26)
        n_name, n_extra = int.from_bytes(f.read(2), 'little'), int.from_bytes(f.read(2), 'little')
    data[info.header_offset + 30 + n_name + n_extra + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_and_the_one_before_used(tmp_path, capsys):
    model, run_id = tiny_rwkv(torch.float32), new_run_id()
    for it in (1, 2):
        save_checkpoint({'model': model.state_dict(), 'model_type': 'rwkv', 'model_args': {}, 'iter_num': it,
                         'run_id': run_id}, tmp_path, keep_last=2)
    newest = tmp_path / 'ckpt-00000002.pt'
    assert torch.load(newest, weights_only=True)['iter_num'] == 2
    flip_a_tensor_byte(newest)
    torch.load(newest, weights_only=True)  # torch itself loads it without a word
    with pytest.raises(ConfigError, match=r'is damaged: its record .*data/\d+ fails its checksum'):
        load_checkpoint(newest, 'cpu')
    ckpt, path = load_latest_checkpoint(tmp_path, 'cpu')
    assert path.name == 'ckpt-00000001.pt' and ckpt['iter_num'] == 1
    assert f'skipping {newest}' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# every malformed model file given to the loader (sample.py / train.py --init_from, from_pretrained): one line

def hf_rwkv(path, edit_config=None, weights=None):
    interop.save_pretrained(tiny_rwkv(torch.float32), path)
    if edit_config:
        config = json.loads((path / 'config.json').read_text())
        edit_config(config)
        (path / 'config.json').write_text(json.dumps(config))
    if weights is not None:
        weights(path)
    return path


def truncate(f, keep=0.5):
    f.write_bytes(f.read_bytes()[:int(f.stat().st_size * keep)])


class Pickled:
    """What a malicious pickle would build: weights_only loading refuses the class."""

    def __reduce__(self):
        return (print, ('this would have run',))


def pth_without(version, key, tmp_path):
    official_pth(version, tmp_path / 'full.pth')
    state = torch.load(tmp_path / 'full.pth')
    if isinstance(key, tuple):  # (key, replacement)
        state[key[0]] = key[1]
    else:
        del state[key]
    torch.save(state, tmp_path / 'bad.pth')
    return tmp_path / 'bad.pth'


def quantized_with(meta_edit, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    interop.save_quantized(tiny_rwkv(torch.float32, n_embd=32).quantize_('int8'), tmp_path / 'q.safetensors', 'rwkv')
    with safe_open(str(tmp_path / 'q.safetensors'), 'pt') as f:
        meta = f.metadata()
    meta_edit(meta)
    save_file(load_file(tmp_path / 'q.safetensors'), str(tmp_path / 'bad.safetensors'), metadata=meta)
    return tmp_path / 'bad.safetensors'


def write(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


BAD_FILES = {
    'random bytes': (lambda p: write(p, 'x.safetensors', bytes(range(256)) * 8), 'is not a model file nanoRWKV reads'),
    'a truncated safetensors': (lambda p: (quantized_with(lambda m: None, p), truncate(p / 'bad.safetensors'))[0],
                                'is damaged'),
    'a plain safetensors': (lambda p: hf_rwkv(p / 'hf') / 'model.safetensors', 'give the directory'),
    'a truncated pth': (lambda p: (official_pth('4', p / 'm.pth'), truncate(p / 'm.pth'), p / 'm.pth')[2],
                        'is not a readable torch file'),
    'a truncated rwkv.cpp file': (lambda p: (interop.save_rwkvcpp(tiny_rwkv(torch.float32, n_embd=32), p / 'm.bin'),
                                             truncate(p / 'm.bin'), p / 'm.bin')[2], 'm.bin is truncated'),
    'an rwkv.cpp file of another version': (lambda p: write(p, 'm.bin', struct.pack('<6i', 0x67676d66, 102, 40, 32,
                                                                                       2, 0)),
                                            'an rwkv.cpp file of format version 102'),
    'a training checkpoint': (lambda p: (save_checkpoint({'model': {}, 'model_type': 'rwkv', 'model_args': {},
                                                          'iter_num': 1, 'run_id': 'x'}, p, 1), p / 'ckpt.pt')[1],
                              'is a nanoRWKV training checkpoint'),
    'a pth missing a tensor': (lambda p: pth_without('4', 'blocks.1.att.key.weight', p),
                               "missing ['blocks.1.att.key.weight']"),
    'an RWKV-7 pth missing r_k': (lambda p: pth_without('7', 'blocks.0.att.r_k', p),
                                  'incomplete RWKV-7 checkpoint: it has no blocks.0.att.r_k'),
    'an RWKV-7 pth missing v1': (lambda p: pth_without('7', ('blocks.1.att.v1', 3), p),
                                 'blocks.1.att.v1 is a int, not a tensor'),
    'a pth with code': (lambda p: (torch.save({'emb.weight': Pickled()}, p / 'm.pth'), p / 'm.pth')[1],
                        'holds more than tensors'),
    'config.json not JSON': (lambda p: hf_rwkv(p / 'hf', weights=lambda d: (d / 'config.json').write_text('{"a": ')),
                             'config.json is not valid JSON'),
    'config.json without hidden_size': (lambda p: hf_rwkv(p / 'hf', lambda c: c.pop('hidden_size')),
                                        "config.json has no 'hidden_size'"),
    'truncated HF weights': (lambda p: hf_rwkv(p / 'hf', weights=lambda d: truncate(d / 'model.safetensors')),
                             'model.safetensors is damaged'),
    'HF weights with code': (lambda p: hf_rwkv(p / 'hf', weights=lambda d: (
        (d / 'model.safetensors').unlink(), torch.save({'x': Pickled()}, d / 'pytorch_model.bin'))),
        'pytorch_model.bin holds more than tensors'),
    'quantized metadata without a key': (lambda p: quantized_with(lambda m: m.pop('model_args'), p),
                                         'its metadata has no model_args'),
    'quantized metadata not JSON': (lambda p: quantized_with(lambda m: m.update(model_args='{'), p),
                                    'its metadata is not valid JSON'),
    'quantized metadata with an unknown config key': (
        lambda p: quantized_with(lambda m: m.update(model_args=json.dumps({**json.loads(m['model_args']),
                                                                           'n_fingers': 5})), p),
        'its model config does not build'),
}


@pytest.mark.parametrize('case', BAD_FILES)
def test_every_malformed_model_file_is_one_line(case, tmp_path, capsys):
    make, fragment = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ConfigError) as e:
        interop.load_pretrained(str(path))
    assert fragment in str(e.value) and '\n' not in str(e.value), str(e.value)
    assert 'this would have run' not in capsys.readouterr().out  # no code from a model file ever runs


def test_non_finite_logits_stop_generation_and_a_tiny_temperature_is_greedy():
    from sampling import sample_logits
    logits = torch.randn(2, 37, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_logits(logits, temperature=1e-45), logits.argmax(-1, keepdim=True))
    model = tiny_rwkv(torch.float32)
    with torch.no_grad():
        model.head.weight.fill_(float('nan'))
    for temperature in (0.0, 0.8):
        with pytest.raises(ValueError, match='logits are not finite'):
            model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=temperature)


def test_files_are_told_apart_by_content_not_name(tmp_path):
    """export.py --format=int8 --dest=x.pth writes a quantized safetensors under a .pth name: it loads as what it is."""
    model = tiny_rwkv(torch.float32, n_embd=32).quantize_('int8')
    interop.save_quantized(model, tmp_path / 'x.pth', 'rwkv')
    loaded, kind, _ = interop.load_pretrained(str(tmp_path / 'x.pth'))
    idx = torch.zeros(1, 3, dtype=torch.long)
    assert kind == 'rwkv' and torch.equal(loaded.prefill(idx)[0], model.prefill(idx)[0])
    interop.save_pth(tiny_rwkv(torch.float32), tmp_path / 'y.safetensors', {'tokenizer': 'gpt2'})  # a .pth so named
    assert interop.load_pretrained(str(tmp_path / 'y.safetensors'))[1:] == ('rwkv', {'tokenizer': 'gpt2'})


@pytest.mark.parametrize('text,fragment', [
    ('{"tokenizer": "char", "vocab_size": 65, ', 'is not valid JSON'),
    ('{"vocab_size": 65}', 'names no tokenizer'),
    ('{"tokenizer": "char", "itos": ["a", "b"]}', 'has no vocab_size (a positive int; it has None)'),
    ('{"tokenizer": "char", "vocab_size": 1000, "itos": ["a", "b"]}',
     'vocab_size=1000 but its character list (itos) has 2 entries'),
    ('{"tokenizer": "gpt2", "vocab_size": "50257"}', "has no vocab_size (a positive int; it has '50257')"),
])
def test_a_malformed_meta_json_is_one_line(text, fragment, tmp_path):
    from tokenizer import read_meta
    (tmp_path / 'meta.json').write_text(text)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        read_meta(tmp_path)
    (tmp_path / 'meta.json').write_text('{"tokenizer": "char", "vocab_size": 2, "itos": ["a", "b"]}')
    assert read_meta(tmp_path)['itos'] == ['a', 'b']


def test_options_a_model_does_not_read_are_named():
    from types import SimpleNamespace

    from train import ignored_options
    gpt = SimpleNamespace(model_type='gpt', rwkv_version='4', attn_layers=[])
    assert ignored_options(gpt, {'rwkv_version', 'wkv_backend', 'bias', 'n_layer', 'attn_window'}) == \
        ['rwkv_version', 'wkv_backend']
    rwkv4 = SimpleNamespace(model_type='rwkv', rwkv_version='4', attn_layers=[])
    assert ignored_options(rwkv4, {'bias', 'head_size', 'attn_kv_heads', 'n_layer'}) == \
        ['bias', 'head_size', 'attn_kv_heads']
    hybrid7 = SimpleNamespace(model_type='rwkv', rwkv_version='7', attn_layers=[1])
    assert ignored_options(hybrid7, {'head_size', 'attn_kv_heads'}) == []


def test_quantizing_a_model_without_a_quantizable_matrix_is_refused():
    with pytest.raises(ValueError, match=r'no matrix of this model can be quantized to int8: their input widths '
                                         r'\[12, 48\] are not multiples of 32'):
        tiny_rwkv(torch.float32).quantize_('int8')


def test_a_pth_carries_its_tokenizer_beside_it(tmp_path):
    """A char model's .pth: the tokenizer in x.tokenizer.json, found by the loader; without it, a vocabulary no
    known tokenizer fits is one line naming the file it needs (never NeoX ids handed to a 65-token model)."""
    spec = {'tokenizer': 'char', 'vocab_size': 37, 'itos': [chr(97 + i % 26) + str(i) for i in range(37)]}
    interop.save_pth(tiny_rwkv(torch.float32), tmp_path / 'char.pth', spec)
    assert (tmp_path / 'char.tokenizer.json').is_file()
    assert interop.load_pretrained(str(tmp_path / 'char.pth'))[2] == spec
    (tmp_path / 'char.tokenizer.json').unlink()
    with pytest.raises(ConfigError, match='has a vocabulary of 37 tokens, which neither the World nor the GPT-NeoX '
                                          'tokenizer fits: put its tokenizer beside it as char.tokenizer.json'):
        interop.load_pretrained(str(tmp_path / 'char.pth'))
    with pytest.raises(ConfigError, match='no such file or folder'):
        interop.load_pretrained(str(tmp_path / 'missing.pth'))


def test_a_refused_export_leaves_no_file_and_a_killed_writers_leftover_goes(tmp_path):
    with pytest.raises(ValueError, match='needs a multiple of 32'):  # Q8_0 of 12-wide matrices: refused mid-file
        interop.save_rwkvcpp(tiny_rwkv(torch.float32), tmp_path / 'm.bin', 'Q8_0')
    assert not list(tmp_path.iterdir())
    (tmp_path / '.m.pth.12345.tmp').write_bytes(b'half of a file')  # what a SIGKILLed writer leaves
    interop.save_pth(tiny_rwkv(torch.float32), tmp_path / 'm.pth')
    assert sorted(f.name for f in tmp_path.iterdir()) == ['m.pth']


def test_a_tokenizer_file_that_is_not_one_is_one_line(tmp_path):
    from tokenizer import get_codec
    (tmp_path / 'tok.json').write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r'tok.json is not a tokenizer.json the tokenizers library reads'):
        get_codec({'tokenizer': 'file', 'path': str(tmp_path / 'tok.json')})


KILLED_WRITER = '''
import os, sys, time
import torch
sys.path[:0] = [{repo!r}, {tests!r}]
from test_files import WRITERS
write, make, inner = WRITERS[{name!r}]
model = make()
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
def stall(fd):  # the bytes are written, the rename has not happened: where a kill does the most harm
    print('written, not renamed', flush=True)
    time.sleep(600)
os.fsync = stall
write(model, {dest!r})
'''


@pytest.mark.slow
@pytest.mark.parametrize('name', WRITERS)
def test_a_writer_killed_mid_write_leaves_the_old_file(name, tmp_path):
    # SIGKILL of a process inside an export's write: the destination keeps its old bytes, and the temporary file
    # the killed process left is removed by the next write to it
    import subprocess
    import sys
    from helpers import REPO
    write, make, inner = WRITERS[name]
    dest = tmp_path / 'export'
    write(make(), dest)
    target = dest / inner if inner else dest
    before = target.read_bytes()
    code = KILLED_WRITER.format(repo=str(REPO), tests=str(REPO / 'tests'), name=name, dest=str(dest))
    p = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == 'written, not renamed', p.stderr.read()
        left = [f for f in tmp_path.rglob('*') if f.name.endswith('.tmp')]
        assert left and left[0].stat().st_size > 0  # the new bytes are there, under the temporary name
    finally:
        p.kill()
        p.wait(timeout=60)
    assert target.read_bytes() == before
    write(make(), dest)
    assert not [f for f in tmp_path.rglob('*') if f.name.endswith('.tmp')]
