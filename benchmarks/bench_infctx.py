"""
Memory and time of one training step at long context: segmented full BPTT (bptt.py, segments of block_size carrying
the state) against a plain full-length forward and backward, as ctx_len grows.

For each (mode, ctx_len) a fresh process runs one warm-up step, one measured step and a few timed ones of a small
RWKV at batch 1, and reports:
- saved: the peak bytes that autograd holds for backward, counted by torch.autograd.graph.saved_tensors_hooks (each
  storage once, the weights included);
- states: the boundary states segmented BPTT keeps across the sample (n_segments x the state's bytes);
- rss: the process's peak resident memory during the measured steps above what it held before them;
- ms/token of the measured step, and segmented / plain.

$ python benchmarks/bench_infctx.py                            # CPU: 1k .. 64k tokens, segments of 512
$ python benchmarks/bench_infctx.py --device=cuda --ctx_lens="[1024, 16384, 262144, 1048576]" --n_embd=512
  (on a GPU 'rss' is torch.cuda.max_memory_allocated above what was allocated before the step)
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bptt import forward_backward, segments  # noqa: E402
from configurator import ConfigError, Option, parse_config, run_script  # noqa: E402
from hardware import DEVICE, resolve_device, run_provenance  # noqa: E402
from model_rwkv import RWKV, RWKVConfig  # noqa: E402

OPTIONS = dict(
    ctx_lens=Option([1024, 4096, 16384, 65536], "sample lengths to measure", '>= 1'),
    block_size=Option(512, "segment length of the segmented step", '>= 1'),
    modes=Option(['segmented', 'plain'], "which steps to measure", ('segmented', 'plain')),
    n_layer=Option(2, "RWKV blocks", '>= 1'),
    n_embd=Option(128, "RWKV width", '>= 1'),
    vocab_size=Option(65, "vocabulary", '>= 1'),
    device=Option('cpu', "'cpu', 'cuda', ...", DEVICE),
    repeats=Option(3, "timed steps after the measured one; ms/token is the fastest", '>= 0'),
    worker=Option('', "internal: 'mode:ctx_len' runs one measurement in this process and prints it as JSON"),
)


class SavedBytes:
    """Bytes held for backward now and at most, each storage counted once (as a context: the hooks are active)."""

    def __init__(self):
        self.now = self.peak = 0
        self.refs = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.tensor)

    def pack(self, tensor):
        return Held(self, tensor)

    def add(self, key, nbytes, sign):
        count = self.refs.get(key, 0) + sign
        self.refs[key] = count
        if count == 0:
            del self.refs[key]
            self.now -= nbytes
        elif count == 1 and sign == 1:
            self.now += nbytes
            self.peak = max(self.peak, self.now)

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class Held:
    """A saved tensor; it leaves the count when autograd frees it."""

    def __init__(self, meter, tensor):
        self.meter, self.tensor = meter, tensor
        storage = tensor.untyped_storage()
        self.key, self.nbytes = storage.data_ptr(), storage.nbytes()
        meter.add(self.key, self.nbytes, +1)

    def __del__(self):
        self.meter.add(self.key, self.nbytes, -1)


def make_model(cfg, device):
    torch.manual_seed(0)
    return RWKV(RWKVConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                           n_embd=cfg.n_embd)).to(device).train()


def step(model, mode, idx, targets, block_size):
    if mode == 'segmented':
        forward_backward(model, model.initial_state(idx.shape[0]), idx, targets, block_size)
    else:
        _, loss = model(idx, targets)
        loss.backward()
    model.zero_grad(set_to_none=True)


def measure(cfg, mode, T, device):
    """One measurement (in a fresh process: peak RSS is per process)."""
    model = make_model(cfg, device)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(cfg.vocab_size, (1, T), generator=g).to(device)
    targets = torch.randint(cfg.vocab_size, (1, T), generator=g).to(device)
    step(model, mode, idx, targets, cfg.block_size)  # warm-up (and the kernel build)
    cuda = device.startswith('cuda')
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open('/proc/self/statm') as f:
            before = int(f.read().split()[1]) * resource.getpagesize()
    t0 = time.perf_counter()
    with SavedBytes() as saved:
        step(model, mode, idx, targets, cfg.block_size)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for _ in range(cfg.repeats):  # timing only: the fastest of a few steps, as this machine's speed wanders
        t0 = time.perf_counter()
        step(model, mode, idx, targets, cfg.block_size)
        if cuda:
            torch.cuda.synchronize()
        dt = min(dt, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state_bytes = sum(s.numel() * s.element_size() for s in model.initial_state(1))
    n_seg = len(segments(T, cfg.block_size)) if mode == 'segmented' else 0
    return dict(mode=mode, ctx_len=T, saved_mb=saved.peak / 2 ** 20, states_mb=n_seg * state_bytes / 2 ** 20,
                rss_mb=max(peak - before, 0) / 2 ** 20, ms_per_token=dt * 1e3 / T)


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    device = resolve_device(cfg.device)
    if cfg.worker:  # the parent's own call; anything else is a mistake said in one line
        mode, _, T = cfg.worker.partition(':')
        if mode not in ('segmented', 'plain') or not T.isdigit() or int(T) < 1:
            raise ConfigError(f"--worker={cfg.worker!r}: expected 'segmented:<ctx_len>' or 'plain:<ctx_len>' (it is "
                              f"how this script runs each measurement; leave it out)")
        print(json.dumps(measure(cfg, mode, int(T), device)))
        return
    commit, machine = run_provenance(device)
    print(f"# bench_infctx.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}\nRWKV L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, batch 1, one training "
          f"step; segmented = segments of {cfg.block_size}, bptt='full'\n")
    rows = {}
    for T in cfg.ctx_lens:
        for mode in cfg.modes:
            r = subprocess.run([sys.executable, __file__, f'--worker={mode}:{T}', *argv], capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise ConfigError(f"the {mode} step at ctx_len={T} failed: {r.stderr.strip().splitlines()[-1]}")
            rows[mode, T] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"measured {mode} at {T}", file=sys.stderr)
    print("| ctx_len | mode | saved for backward MB | boundary states MB | peak RSS growth MB | ms/token | "
          "segmented / plain time |")
    print("|---|---|---|---|---|---|---|")
    for (mode, T), r in rows.items():
        ratio = (f"{r['ms_per_token'] / rows['plain', T]['ms_per_token']:.2f}x"
                 if mode == 'segmented' and ('plain', T) in rows else '')
        print(f"| {T:,} | {mode} | {r['saved_mb']:.2f} | {r['states_mb']:.3f} | {r['rss_mb']:.1f} | "
              f"{r['ms_per_token']:.4f} | {ratio} |")


if __name__ == '__main__':
    run_script(main)
