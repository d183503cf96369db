"""
Training throughput of every RWKV version in one run, against RWKV-4: one forward + backward + AdamW step of the same
size, batch and context, each version with the compiled WKV kernel and with the pure-PyTorch op (the chunked form),
eager and/or torch.compile'd. The contenders are interleaved round by round (the order alternates), and each ratio is
the median of the per-round ratios to RWKV-4 with its kernel, so a machine that slows down mid-run shifts every
contender alike.

$ python benchmarks/bench_versions.py                                  # CPU: L4 C256 head 64, 4 x 256, one thread
$ python benchmarks/bench_versions.py --block_size=128 --batch_size=12 --n_embd=128 --head_size=32   # quick start
$ python benchmarks/bench_versions.py --compile="[False, True]" --threads=2
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configurator import Option, parse_config, run_script  # noqa: E402
from hardware import DEVICE, resolve_device, run_provenance  # noqa: E402
from model_rwkv import RWKV, RWKVConfig  # noqa: E402

OPTIONS = dict(
    device=Option('cpu', "'cpu', 'cuda', ...", DEVICE),
    n_layer=Option(4, "blocks", '>= 1'),
    n_embd=Option(256, "width", '>= 1'),
    head_size=Option(64, "versions 5-7: channels per head", '>= 1'),
    vocab_size=Option(65, "tiny shakespeare's characters", '>= 1'),
    block_size=Option(256, "context length of a batch", '>= 1'),
    batch_size=Option(4, "sequences per batch", '>= 1'),
    versions=Option([4, 5, 5.1, 6, 7], "RWKV-LM versions in the run (4 is the reference)", (4, 5, 5.1, 6, 7)),
    backends=Option(['auto', 'torch'], "WKV implementations per version: 'auto' = the compiled kernel, 'torch' = "
                    "the pure-PyTorch op", ('auto', 'cpu', 'cuda', 'torch')),
    compile=Option([False], "eager and/or torch.compile'd"),
    threads=Option(1, "CPU threads (torch.set_num_threads); 0 = torch's default", '>= 0'),
    rounds=Option(7, "timed rounds; each contender runs one step per round", '>= 1'),
    warmup=Option(2, "untimed steps per contender first (compiles, builds)", '>= 1'),
    seed=Option(1337, "seeds the weights and the batch", '>= 0'),
)


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    commit, machine = run_provenance(device)
    B, T = cfg.batch_size, cfg.block_size
    print(f"# bench_versions.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}\nL{cfg.n_layer} C{cfg.n_embd} head "
          f"{cfg.head_size} V{cfg.vocab_size}, batch {B} x {T}, fp32, AdamW; median of {cfg.rounds} interleaved "
          f"rounds after {cfg.warmup} warm-up steps\n")
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    # every block of every model is compiled on its own (guards on its module): more than dynamo's default of 8
    torch._dynamo.config.recompile_limit = 16 * len(cfg.versions) * len(cfg.backends) * cfg.n_layer
    steps = {}
    for compiled in cfg.compile:
        for version in cfg.versions:
            for backend in cfg.backends:
                torch.manual_seed(cfg.seed)
                model = RWKV(RWKVConfig(block_size=T, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                                        n_embd=cfg.n_embd, version=version, head_size=cfg.head_size,
                                        wkv_backend=backend)).to(device).train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                run = torch.compile(model) if compiled else model

                def step(run=run, opt=opt):
                    _, loss = run(x, y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                name = f"RWKV-{version:g} {'kernel' if backend != 'torch' else 'torch op'}" + \
                    (' compiled' if compiled else '')
                steps[name] = step
                for _ in range(cfg.warmup):
                    step()
    names = list(steps)
    ref = next(n for n in names if n.startswith('RWKV-4') and 'torch' not in n) if any(
        n.startswith('RWKV-4') and 'torch' not in n for n in names) else names[0]
    times = {n: [] for n in names}
    for rnd in range(cfg.rounds):
        for n in (names if rnd % 2 == 0 else names[::-1]):
            sync()
            t0 = time.perf_counter()
            steps[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    print(f"| contender | ms/iter | tokens/s | vs {ref} |")
    print("|---|---|---|---|")
    for n in names:
        dt = statistics.median(times[n])
        ratio = statistics.median(r / t for r, t in zip(times[ref], times[n]))
        print(f"| {n} | {dt * 1e3:.1f} | {B * T / dt:,.0f} | {ratio:.2f}x |", flush=True)


if __name__ == '__main__':
    run_script(main)
