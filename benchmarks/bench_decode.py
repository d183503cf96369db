"""
Decoding speed of every RWKV version on the CPU, fp32: our RWKV.step against the `rwkv` pip package (strategy
'cpu fp32', its TorchScript path; RWKV_V7_ON=1 for version 7) on the same random weights, exported once by save_pth
to a .pth that both load (their logits are compared first). Per version and thread count, the contenders run in
interleaved rounds whose order alternates, and each ratio is the median of the per-round ratios, so a machine that
slows down mid-run shifts every contender alike:
- ours: step() after layout_for_decoding_() (what generate() runs), and as loaded (its products through F.linear);
- ours compiled: torch.compile(step), laid out for decoding;
- rwkv pip: forward([token], state);
- ours batch B: step() on B sequences at once (tokens/s counts all B);
- memory read: torch.sum over a 256 MB tensor, the read bandwidth a decoder could reach (the same threads).
A token reads every weight matrix once (the embedding: one row); GB/s = those bytes / time, and its share of the
measured read bandwidth. The state a token reads and writes is listed apart (it stays in cache at these sizes).
Then the prompt: ours prefill(last_only=True) of --prefill tokens against the package's forward(token list).

$ python benchmarks/bench_decode.py                                   # versions 4-7 at L12 C768, 1 and 2 threads
$ python benchmarks/bench_decode.py --versions="[7]" --threads="[1]" --compile=False
$ python benchmarks/bench_decode.py --n_layer=4 --n_embd=256 --vocab_size=65 --prefill=64

Each version runs in its own process (the package reads RWKV_V7_ON when imported).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configurator import ConfigError, Option, parse_config, run_script  # noqa: E402
from hardware import others_quiet, run_provenance  # noqa: E402

OPTIONS = dict(
    versions=Option([4, 5, 6, 7], "RWKV versions, each against the package's runner of that version", (4, 5, 6, 7)),
    n_layer=Option(12, "blocks (RWKV-4 169M and RWKV-7 0.1B: 12)", '>= 1'),
    n_embd=Option(768, "width", '>= 1'),
    head_size=Option(64, "versions 5-7: channels per head", '>= 1'),
    vocab_size=Option(0, "0 = 50277 for version 4 (the Pile's), 65536 for 5-7 (RWKV World's)", '>= 0'),
    threads=Option([1, 2], "CPU thread counts (torch.set_num_threads), each measured", '>= 1'),
    n_tokens=Option(16, "tokens per contender per round", '>= 1'),
    rounds=Option(5, "interleaved rounds", '>= 1'),
    warmup=Option(4, "untimed steps per contender first (compiles)", '>= 1'),
    batch_size=Option(8, "sequences of the batched contender", '>= 1'),
    compile=Option(True, "also time torch.compile(step)"),
    prefill=Option(512, "prompt length of the prefill comparison; 0 = none", '>= 0'),
    seed=Option(1337, "seeds the random weights and tokens", '>= 0'),
    worker=Option(0, "internal: measure this version in this process and print JSON (the parent runs each version "
                     "so); leave it out", '>= 0'),
)
BANDWIDTH_BYTES = 256 * 2 ** 20


def interleaved(contenders, rounds):
    """{name: [seconds per round]} of each contender run once per round, the order alternating round by round."""
    times = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def measure(cfg, version):
    os.environ['RWKV_V7_ON'] = '1' if version == 7 else '0'
    os.environ.setdefault('RWKV_CUDA_ON', '0')
    os.environ.setdefault('RWKV_JIT_ON', '1')
    with others_quiet('the rwkv package'):
        from rwkv.model import RWKV as PipRWKV
    from model_rwkv import RWKV, RWKVConfig
    V = cfg.vocab_size or (50277 if version == 4 else 65536)
    torch.manual_seed(cfg.seed)
    try:
        config = RWKVConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=V, version=str(version),
                            head_size=cfg.head_size)
    except ValueError as e:  # a shape this version cannot take
        raise ConfigError(str(e)) from None
    src = RWKV(config)
    with torch.no_grad():  # RWKV-LM's init zeroes several matrices; random weights make every product real work
        for p in src.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    with tempfile.TemporaryDirectory() as tmp:  # the one file every decoder loads, gone once they have
        path = Path(tmp) / 'model.pth'
        src.save_pth(path)
        del src
        ours = RWKV.from_pretrained(path).eval()
        loaded = RWKV.from_pretrained(path).eval()  # as loaded: its products through F.linear
        ours.layout_for_decoding_()
        with others_quiet('the rwkv package'):
            kw = {} if version == 7 else dict(verbose=False)
            pip = PipRWKV(model=str(path.with_suffix('')), strategy='cpu fp32', **kw)
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, V, (cfg.warmup + cfg.n_tokens + max(cfg.prefill, 1),), generator=g)

    # the same logits, token by token, before timing anything
    s_ours, s_loaded, s_pip, diff = None, None, None, 0.0
    with torch.inference_mode():
        for t in tokens[:8].tolist():
            a, s_ours = ours.step(torch.tensor([t]), s_ours)
            b, s_loaded = loaded.step(torch.tensor([t]), s_loaded)
            c, s_pip = pip.forward([t], s_pip)
            diff = max(diff, (a[0] - c).abs().max().item(), (b[0] - c).abs().max().item())

    def decoder(step, batch=1):
        state = [None]
        toks = tokens[:, None].expand(-1, batch).contiguous()

        def run(n=cfg.n_tokens):
            with torch.inference_mode():
                for i in range(n):
                    _, state[0] = step(toks[i], state[0])
        return run

    def pip_decoder():
        state = [None]

        def run(n=cfg.n_tokens):
            for i in range(n):
                _, state[0] = pip.forward([int(tokens[i])], state[0])
        return run

    big = torch.ones(BANDWIDTH_BYTES // 4)
    contenders = {'ours': decoder(ours.step), 'ours, as loaded': decoder(loaded.step)}
    if cfg.compile:
        contenders['ours compiled'] = decoder(torch.compile(ours.step))
    contenders['rwkv pip'] = pip_decoder()
    contenders[f'ours batch {cfg.batch_size}'] = decoder(ours.step, cfg.batch_size)
    contenders['memory read'] = lambda n=None: big.sum()
    prompt = tokens[:cfg.prefill]

    def prefill_ours():
        with torch.inference_mode():
            ours.prefill(prompt[None], last_only=True)

    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if n != 'emb.weight')
    weight_bytes += ours.config.n_embd * 4  # the embedding row
    state_bytes = sum(s.numel() * s.element_size() for s in ours.initial_state(1))
    out = dict(version=version, V=V, diff=diff, weight_bytes=weight_bytes, state_bytes=2 * state_bytes, runs={})
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        for run in contenders.values():
            for _ in range(cfg.warmup):
                run(1)
        times = interleaved(contenders, cfg.rounds)
        pip_t = times['rwkv pip']
        res = {}
        for name, ts in times.items():
            if name == 'memory read':
                res[name] = dict(gbs=statistics.median(BANDWIDTH_BYTES / t / 1e9 for t in ts))
                continue
            n = cfg.n_tokens * (cfg.batch_size if name.startswith('ours batch') else 1)
            res[name] = dict(ms=statistics.median(t / cfg.n_tokens * 1e3 for t in ts),
                             tok_s=statistics.median(n / t for t in ts),
                             vs_pip=statistics.median(p / t * (n / cfg.n_tokens) for p, t in zip(pip_t, ts)))
        if cfg.prefill:
            prefill_ours()
            pip.forward(prompt.tolist(), None)
            pt = interleaved({'ours prefill': prefill_ours, 'rwkv pip forward': lambda: pip.forward(prompt.tolist(),
                                                                                                    None)},
                             max(3, cfg.rounds // 2))
            for name, ts in pt.items():
                res[name] = dict(ms=statistics.median(ts) * 1e3,
                                 tok_s=statistics.median(cfg.prefill / t for t in ts),
                                 vs_pip=statistics.median(p / t for p, t in zip(pt['rwkv pip forward'], ts)))
        out['runs'][threads] = res
    return out


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    import importlib.util
    if importlib.util.find_spec('rwkv') is None:
        raise ConfigError("the rwkv package is not installed: pip install rwkv")
    if cfg.worker:
        if cfg.worker not in (4, 5, 6, 7):
            raise ConfigError(f"--worker={cfg.worker}: it is how this script measures one version; leave it out")
        print(json.dumps(measure(cfg, cfg.worker)))
        return
    commit, machine = run_provenance('cpu')
    from importlib.metadata import version as package_version
    print(f"# bench_decode.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, rwkv "
          f"{package_version('rwkv')}, {machine.split(',')[0]}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n"
          f"fp32, batch 1 unless stated; L{cfg.n_layer} C{cfg.n_embd} head {cfg.head_size}; median of {cfg.rounds} "
          f"interleaved rounds of {cfg.n_tokens} tokens; ratio = median of the per-round ratios to rwkv pip\n")
    results = []
    for v in cfg.versions:
        r = subprocess.run([sys.executable, __file__, f'--worker={v}', *argv], capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ['(no output)'])[-1]
            raise ConfigError(f"measuring version {v} failed: {last.removeprefix('bench_decode.py: error: ')}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"measured version {v}", file=sys.stderr, flush=True)
    print("| version | vocab | threads | contender | ms/token | tokens/s | vs rwkv pip | weights GB/s | share of read "
          "bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in results:
        for threads, runs in res['runs'].items():
            bw = runs['memory read']['gbs']
            for name, m in runs.items():
                if name == 'memory read' or 'prefill' in name or 'forward' in name:
                    continue
                gbs = res['weight_bytes'] / (m['ms'] / 1e3) / 1e9
                batched = name.startswith('ours batch')
                print(f"| {res['version']} | {res['V']} | {threads} | {name} | {m['ms']:.2f} | {m['tok_s']:,.1f} | "
                      f"{m['vs_pip']:.2f}x | {'-' if batched else f'{gbs:.1f}'} | "
                      f"{'-' if batched else f'{gbs / bw:.0%}'} |")
            print(f"| {res['version']} | {res['V']} | {threads} | memory read (torch.sum, 256 MB) | | | | {bw:.1f} | "
                  f"100% |")
    if cfg.prefill:
        print(f"\nprompt of {cfg.prefill} tokens (ours: prefill(last_only=True); the package: forward(token list))\n")
        print("| version | threads | contender | ms | tokens/s | vs rwkv pip |")
        print("|---|---|---|---|---|---|")
        for res in results:
            for threads, runs in res['runs'].items():
                for name in ('ours prefill', 'rwkv pip forward'):
                    m = runs[name]
                    print(f"| {res['version']} | {threads} | {name} | {m['ms']:.1f} | {m['tok_s']:,.1f} | "
                          f"{m['vs_pip']:.2f}x |")
    print("\nbytes a token reads: " + ', '.join(
        f"version {r['version']}: weights {r['weight_bytes'] / 1e6:.1f} MB, state {r['state_bytes'] / 1e6:.2f} MB "
        f"(read + written), max logit diff vs rwkv pip {r['diff']:.1e}" for r in results))


if __name__ == '__main__':
    run_script(main)
