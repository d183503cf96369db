"""
Quantized CPU decoding (quantize.py): tokens/s of RWKV-4's RNN step with its weights in fp32, int8, q8_0, q5_1,
q4_0 and int4, against the rivals that run offline on the same weights: the `rwkv` pip package ('cpu fp32' and
'cpu fp32i8'), torch.ao dynamic int8 on our model, and rwkv.cpp's library (FP32 from our file, Q4_0 / Q4_1 from its
own quantizer) where it loads (benchmarks/rwkvcpp.py). Then held-out perplexity per format on trained checkpoints.

$ python benchmarks/bench_quant.py                                   # 169M shape (L12 C768 V50277), 1 and 2 threads
$ python benchmarks/bench_quant.py --checkpoints="['out-shakespeare-char']" --n_tokens=8

Speed: batch 1 and batch 8 (ours only: the others decode one sequence per call), 1 and 2 threads; every decoder
runs once per round, the order alternating round by round; tokens/s is the median over the rounds and each ratio
the median of the per-round ratios, so a machine that slows down mid-run shifts every decoder alike. "MB/token" is
what a step reads: every matrix and vector, the embedding's one row aside; GB/s = that x tokens/s, next to a 512 MB
copy (read + written) and a 512 MB sum (read) measured in the same run: the memory's limit.
Perplexity: exp of the mean cross-entropy over the checkpoint's val.bin in windows of block_size, same windows for
every format.
"""
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configurator import ConfigError, Option, parse_config, run_script  # noqa: E402
from files import atomic_path  # noqa: E402
from hardware import others_quiet, run_provenance  # noqa: E402

FORMATS = ['fp32', 'int8', 'q8_0', 'q5_1', 'q4_0', 'int4']
OPTIONS = dict(
    shape=Option((12, 768, 50277), "(n_layer, n_embd, vocab_size) of the random model timed: RWKV-4 169M's", '>= 1'),
    threads=Option([1, 2], "torch / rwkv.cpp threads, each timed", '>= 1'),
    batch_sizes=Option([1, 8], "our decode's batch sizes", '>= 1'),
    n_tokens=Option(16, "steps per timed round", '>= 1'),
    rounds=Option(5, "interleaved rounds (medians over them)", '>= 1'),
    rivals=Option(True, "time the rwkv pip package, torch.ao and rwkv.cpp (where they load) too"),
    checkpoints=Option([], "out_dirs of trained RWKV checkpoints whose val perplexity is measured per format"),
    head=Option([True, False], "perplexity with the head quantized and kept fp32"),
    eval_tokens=Option(65536, "val tokens per perplexity (in block_size windows)", '>= 1'),
    plot=Option('out-bench/quant_decode_cpu.png', "where the bar chart of batch-1 tokens/s goes ('' = none; "
                                                   "out-bench/ is git-ignored; assets/... is the README's)"),
    seed=Option(1337, "seeds the random weights and tokens", '>= 0'),
)


def memory_gbs():
    """GB/s of a 512 MB copy (bytes read + written) and of a 512 MB sum (bytes read), best of 5, at the current
    thread count: what a matrix-vector product that reads its matrix once could reach."""
    src = torch.ones(2 ** 27)
    dst = torch.ones_like(src)
    copy, read = float('inf'), float('inf')
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        src.sum()
        copy, read = min(copy, t1 - t0), min(read, time.perf_counter() - t1)
    return 2 * src.numel() * 4 / copy / 1e9, src.numel() * 4 / read / 1e9


def step_bytes(model):
    """Bytes a step reads: every parameter and buffer, the embedding's one row instead of all of it."""
    from quantize import weight_bytes
    emb = model.emb.weight
    return weight_bytes(model) - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def our_runner(model, tokens, batch):
    toks = tokens[:, None].expand(-1, batch).contiguous()
    state = [None]

    def run(i):
        with torch.inference_mode():
            _, state[0] = model.step(toks[i % len(toks)], state[0])
    return run


def speed_rows(cfg, tmp):
    """[(name, batch, bytes per token or None, {threads: runner factory})] for every contestant."""
    from model_rwkv import RWKV, RWKVConfig
    L, C, V = cfg.shape
    torch.manual_seed(cfg.seed)
    src = RWKV(RWKVConfig(n_layer=L, n_embd=C, vocab_size=V))
    with torch.no_grad():  # random weights (v4neo's init zeroes several matrices)
        for p in src.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    pth = Path(tmp) / 'model.pth'
    src.save_pth(pth)
    file_sizes(src, pth, tmp)
    tokens = torch.randint(0, V, (cfg.n_tokens,), generator=torch.Generator().manual_seed(cfg.seed))
    rows = []
    for fmt in FORMATS:
        model = RWKV.from_pretrained(pth).eval()
        if fmt != 'fp32':
            model.quantize_(fmt)
        model.layout_for_decoding_()  # what generate() runs: fp32's matrices (and the low-rank ones) as decoded
        for b in cfg.batch_sizes:
            head = '' if fmt == 'fp32' else f" (head {'quantized' if model.quantized[1] else 'fp32'})"
            rows.append((f"ours {fmt}{head}", b, step_bytes(model), lambda n, m=model, b=b: our_runner(m, tokens, b)))
    if not cfg.rivals:
        return rows
    float_model = RWKV.from_pretrained(pth).eval()
    with others_quiet('torch.ao'):
        qmodel = torch.ao.quantization.quantize_dynamic(float_model, {torch.nn.Linear}, dtype=torch.qint8)
    rows.append(('torch.ao dynamic int8 (ours)', 1, None, lambda n: our_runner(qmodel, tokens, 1)))
    try:
        os.environ.setdefault('RWKV_CUDA_ON', '0')
        with others_quiet('the rwkv package'):
            from rwkv.model import RWKV as PipRWKV
        for strategy in ('cpu fp32', 'cpu fp32i8'):
            with others_quiet('the rwkv package'):
                pip = PipRWKV(model=str(pth.with_suffix('')), strategy=strategy, verbose=False)

            def factory(n, pip=pip):
                s = [None]

                def run(i):
                    _, s[0] = pip.forward([int(tokens[i % len(tokens)])], s[0])
                return run
            rows.append((f"rwkv pip '{strategy}'", 1, None, factory))
    except ImportError:
        print("(the rwkv pip package is not installed: its rows are left out)")
    from interop import save_rwkvcpp
    from rwkvcpp import RwkvCpp
    try:
        lib = RwkvCpp()
    except (FileNotFoundError, OSError) as e:
        print(f"(rwkv.cpp's library does not load: {e}; its rows are left out)")
        return rows
    fp32 = Path(tmp) / 'rwkvcpp-FP32.bin'
    save_rwkvcpp(src, fp32, 'FP32')
    files = {'FP32': fp32}
    for name, ggml_type in (('Q4_0', 2), ('Q4_1', 3)):
        files[name] = Path(tmp) / f'rwkvcpp-{name}.bin'
        lib.quantize_file(fp32, files[name], ggml_type)
    for name, path in files.items():
        def factory(n, path=path):
            ctx = lib.load(path, n)
            state_out, logits = lib.buffers(ctx)
            state_in = [None]

            def run(i):
                lib.eval(ctx, int(tokens[i % len(tokens)]), state_in[0], state_out, logits)
                state_in[0] = state_out
            return run
        # the file's tensors minus the embedding but one row: what a token reads
        emb = src.emb.weight
        rows.append((f"rwkv.cpp {name}", 1, path.stat().st_size - emb.numel() * 4 + emb.shape[1] * 4, factory))
    return rows


def file_sizes(src, pth, tmp):
    """Bytes on disk of the fp32 .pth, each quantized .safetensors (head quantized) and each rwkv.cpp file."""
    from interop import save_quantized, save_rwkvcpp
    base = pth.stat().st_size
    print(f"| file | MB | vs fp32 .pth |\n|---|---|---|\n| fp32 .pth (RWKV-LM) | {base / 1e6:.1f} | 1.00 |")
    for fmt in FORMATS[1:]:
        path = Path(tmp) / f'model-{fmt}.safetensors'
        model = copy.deepcopy(src).eval().quantize_(fmt)
        save_quantized(model, path, 'rwkv')
        print(f"| {fmt} .safetensors (head {'quantized' if model.quantized[1] else 'fp32'}) | "
              f"{path.stat().st_size / 1e6:.1f} | {path.stat().st_size / base:.2f} |")
        path.unlink()
    for kind in ('FP16', 'Q8_0', 'Q5_1', 'Q4_0'):
        path = Path(tmp) / f'rwkvcpp-{kind}.bin'
        save_rwkvcpp(src, path, kind)
        note = 'all matrices' if kind == 'FP16' else 'emb and head FP32'
        print(f"| rwkv.cpp {kind} ({note}) | {path.stat().st_size / 1e6:.1f} | "
              f"{path.stat().st_size / base:.2f} |")
        path.unlink()
    print()


def perplexity(model, val, block, n_tokens):
    n = min(n_tokens, (len(val) - 1) // block * block)
    x = torch.from_numpy(val[:n].astype(np.int64)).view(-1, block)
    y = torch.from_numpy(val[1:n + 1].astype(np.int64)).view(-1, block)
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(x), 16):
            logits, _ = model.prefill(x[i:i + 16])
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 16].flatten(),
                                                       reduction='sum').item()
    return math.exp(total / y.numel())


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    commit, machine = run_provenance('cpu')
    print(f"# bench_quant.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        copy, read = memory_gbs()
        print(f"memory, {threads} thread{'s' if threads > 1 else ''}: a 512 MB copy runs at {copy:.1f} GB/s (read + "
              f"write), a 512 MB sum at {read:.1f} GB/s (read)")
    print()
    results = {}  # threads -> [(decoder, tokens/s)] at batch 1
    with tempfile.TemporaryDirectory() as tmp:
        rows = speed_rows(cfg, tmp)
        L, C, V = cfg.shape
        for threads in cfg.threads:
            torch.set_num_threads(threads)
            runners = [factory(threads) for _, _, _, factory in rows]
            for run in runners:
                run(0)  # warm: the first call pays for nothing a round should
            times = [[] for _ in rows]  # seconds per token, one per round
            for r in range(cfg.rounds):
                order = list(range(len(rows)))
                for i in order if r % 2 == 0 else reversed(order):
                    t0 = time.perf_counter()
                    for t in range(cfg.n_tokens):
                        runners[i](t)
                    times[i].append((time.perf_counter() - t0) / cfg.n_tokens)
            names = [(name, b) for name, b, _, _ in rows]
            refs = [ref for ref in (('ours fp32', 1), ('rwkv.cpp FP32', 1), ('rwkv.cpp Q4_0', 1)) if ref in names]
            print(f"L{L} C{C} V{V}, {threads} thread{'s' if threads > 1 else ''}, median of {cfg.rounds} interleaved "
                  f"rounds of {cfg.n_tokens} tokens:\n| decoder | batch | tokens/s | "
                  + ''.join(f"vs {n} | " for n, _ in refs) + "MB/token | GB/s |\n|" + "---|" * (5 + len(refs)))
            for (name, b, nbytes, _), ts in zip(rows, times):
                rate = b / statistics.median(ts)
                ratios = [statistics.median(b * u / t for u, t in zip(times[names.index(ref)], ts)) for ref in refs]
                mb = f"{nbytes / 1e6:.1f}" if nbytes else '-'
                bw = f"{nbytes * rate / b / 1e9:.1f}" if nbytes else '-'
                print(f"| {name} | {b} | {rate:,.1f} | " + ''.join(f"{q:.2f}x | " for q in ratios) + f"{mb} | {bw} |",
                      flush=True)
                if b == 1:
                    results.setdefault(threads, []).append((name.split(' (')[0], rate))
            print()
    torch.set_num_threads(max(cfg.threads))
    if cfg.plot:
        plot(results, f"RWKV-4 L{L} C{C} V{V} RNN decoding, batch 1, {machine}, commit {commit}", cfg.plot)
    if cfg.checkpoints:
        perplexities(cfg)


def plot(results, title, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = [n for n, _ in next(iter(results.values()))]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(results)
    for i, (threads, rows) in enumerate(results.items()):
        ax.bar([j + i * width for j in range(len(rows))], [r for _, r in rows], width,
               label=f"{threads} thread{'s' if threads > 1 else ''}")
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(names))], names, rotation=30, ha='right',
                  fontsize=8)
    ax.set(ylabel='tokens/s', title=title)
    ax.title.set_fontsize(9)
    ax.grid(axis='y', alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    print(f"wrote {path}\n")


def perplexities(cfg):
    from checkpoint import load_latest_checkpoint, model_from_checkpoint
    print("| checkpoint | head | " + " | ".join(FORMATS) + " |\n|---|---|" + "---|" * len(FORMATS))
    for out_dir in cfg.checkpoints:
        ckpt = load_latest_checkpoint(out_dir, 'cpu')[0]
        if ckpt['model_type'] != 'rwkv':
            raise ConfigError(f"{out_dir} holds a {ckpt['model_type']}; the perplexity table is for RWKV checkpoints")
        data_dir = Path(ckpt['config'].get('data_dir') or Path(__file__).resolve().parents[1] / 'data' /
                        ckpt['config']['dataset'])
        val = np.memmap(data_dir / 'val.bin', dtype=np.uint16, mode='r')
        block = ckpt['model_args']['block_size']
        a = ckpt['model_args']
        name = f"{out_dir} (L{a['n_layer']} C{a['n_embd']}, iter {ckpt['iter_num']})"
        base = None
        for head in cfg.head:
            cells = []
            for fmt in FORMATS:
                model = model_from_checkpoint(ckpt).eval()
                if fmt != 'fp32':
                    model.quantize_(fmt, head=head)
                ppl = perplexity(model, val, block, cfg.eval_tokens)
                base = base or ppl
                cells.append(f"{ppl:.4f}" if fmt == 'fp32' else f"{ppl:.4f} ({(ppl / base - 1) * 100:+.2f}%)")
            print(f"| {name} | {'quantized' if head else 'fp32'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == '__main__':
    run_script(main)
