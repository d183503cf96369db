"""
The machine a script runs on: which device and dtype a setting means here, the autocast context for it, the peak
FLOP/s that MFU is measured against, the (commit, machine) line every benchmark prints with its numbers, and the
process group under torchrun.
"""
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch

from configurator import ConfigError

DEVICE = re.compile(r'auto|cpu|cuda(:\d+)?')  # the `allowed` of every script's device option
DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def resolve_device(name):
    """'auto' -> 'cuda' if there is a GPU, else 'cpu'; a CUDA device where there is none is an error."""
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f"device='{name}' but CUDA is not available here; use --device=cpu or --device=auto")
    return name


def resolve_dtype(name, device_type):
    """'auto' -> bf16 on GPUs that have it, else fp16 on GPUs, fp32 on the CPU (where bf16 autocast is slower)."""
    if name != 'auto':
        return name
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'


def autocast_context(device_type, dtype):
    """Mixed precision for 'bfloat16' / 'float16' (weights stay fp32), nothing for 'float32'."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def measure_peak_flops(device, dtype):
    """Peak FLOP/s for MFU. Known GPUs: the vendor's dense peak for the training dtype; otherwise measured with a
    large matmul on this device, so MFU on a CPU means 'fraction of what a plain matmul reaches here'."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        # dense (no sparsity) tensor-core peaks from NVIDIA's datasheets: (bf16/fp16, tf32 for fp32)
        table = {'H100': (989e12, 494e12), 'H200': (989e12, 494e12), 'A100': (312e12, 156e12)}
        for key, (half, single) in table.items():
            if key in name:
                return half if dtype in ('bfloat16', 'float16') else single
    # the best of several runs of a matmul large enough to reach the BLAS's peak (a 1024 one on a busy 2-core CPU
    # read below what training then reached: MFU over 100%)
    n = 2048 if device == 'cpu' else 8192
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    a @ b  # warm up
    best = float('inf')
    for _ in range(5):
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def run_provenance(device):
    """(git commit, machine) for the header every benchmark prints: what produced its numbers."""
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or 'unknown'
    if device.startswith('cuda'):
        return commit, torch.cuda.get_device_name(device)
    return commit, f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def start_distributed(device_type):
    """(rank, local_rank, world_size); under torchrun (RANK set) the process group is started: NCCL between GPUs,
    gloo between CPU processes."""
    if 'RANK' not in os.environ:
        return 0, 0, 1
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    # torchrun's agent keeps one store across restarts (--max-restarts) holding the previous attempt's addresses, to
    # which a restarted gloo group tries to connect (and hangs): each attempt gets its own keys
    agent_store = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
    store = torch.distributed.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world_size,
                                       is_master=not agent_store and rank == 0, timeout=timedelta(minutes=30))
    store = torch.distributed.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    torch.distributed.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo', store=store, rank=rank,
                                         world_size=world_size)
    return rank, local_rank, world_size


@contextmanager
def others_quiet(name):
    """Another library's prints and warnings (the rwkv package's, torch.ao's deprecation) kept out of a benchmark's
    table: collected while the block runs, then said once, in one line on stderr."""
    import io
    import warnings
    from contextlib import redirect_stderr, redirect_stdout
    buf, caught = io.StringIO(), []
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(buf), redirect_stderr(buf):
            warnings.simplefilter('always')
            yield
    finally:  # said even when the block fails: what the library printed may be why
        _say(name, buf, caught)


def _say(name, buf, caught):
    said = [line.strip() for line in buf.getvalue().splitlines() if line.strip()]
    said += [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
    if said:
        text = '; '.join(dict.fromkeys(said))
        print(f"({name} said: {text[:400]}{'...' if len(text) > 400 else ''})", file=sys.stderr, flush=True)
