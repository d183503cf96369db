"""Files written whole or not at all, and damaged files found: every export writer under a full disk (RLIMIT_FSIZE)
and into a missing folder (file writers) leaves the old file byte-identical and no temporary file; an export onto a hard link of a
checkpoint does not write through it; a checkpoint with a flipped byte is refused by its CRCs and the one before it
used."""
import resource
import signal
from contextlib import contextmanager

import pytest
import torch

import interop
from checkpoint import load_checkpoint, load_latest_checkpoint, new_run_id, save_checkpoint
from configurator import ConfigError
from helpers import tiny_gpt, tiny_rwkv


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
