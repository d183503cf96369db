"""
Per-token latency and memory of RWKV (RNN mode, constant state) vs GPT (KV cache) as the context grows, and of the
two constant-memory attention options beside them: an RWKV hybrid whose attention layers are windowed (a ring buffer
of attn_window keys and values each) and a GPT with the same window (Mistral-style). Full attention (gpt, or a hybrid
with attn_window=0) keeps every key and value: its cache grows with the context, and the table says so.

All models are this repository's, randomly initialised at the same depth, width and vocabulary, generating greedily
one token at a time from an empty history. At every step we record the step's latency, the cumulative time and the
memory: on a GPU the peak allocated memory; on a CPU the bytes of the RWKV state / GPT KV cache and the process RSS.

$ python benchmark_inference_time.py                                    # CPU, L6 C512, 4096 tokens
$ python benchmark_inference_time.py --models="['rwkv']" --rwkv_version=7 # RWKV-7 alone
$ python benchmark_inference_time.py --device=cuda --dtype=float16 --n_layer=32 --n_embd=2560 --n_head=32 \
      --n_tokens=16384                                                 # GPU, ~3B models as in the original plot

Writes <out>.csv (one row per model and token), <out>.json (config, machine, summary, rows) and the three-panel PNG
at --plot (both under out-bench/, which git ignores, unless you name other paths), and prints a summary table.
Options are --key=value overrides of OPTIONS below, as in train.py.
"""
import csv
import io
import json
import os
import resource
import statistics
import sys
import time

import torch

from configurator import ConfigError, Option, fill_path, parse_config, run_script
from files import atomic_path, write_text
from hardware import DEVICE, resolve_device, run_provenance

OPTIONS = dict(
    device=Option('auto', "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...", DEVICE),
    dtype=Option('float32', "weights and activations (the RWKV state stays fp32)", ('float32', 'bfloat16', 'float16')),
    models=Option(['rwkv', 'gpt', 'hybrid', 'gpt_window'], "the models to run, in order",
                  ('rwkv', 'gpt', 'hybrid', 'gpt_window')),
    n_layer=Option(6, "blocks of every model", '>= 1'),
    n_embd=Option(512, "width of every model", '>= 1'),
    n_head=Option(8, "attention heads (gpt, and the hybrid's attention layers; n_embd must be a multiple)", '>= 1'),
    rwkv_version=Option('4', "the 'rwkv' model's RWKV-LM version: 4, 5, 5.1, 6 or 7 (the hybrid is RWKV-4)",
                        ('4', '5', '5.1', '6', '7')),
    head_size=Option(64, "rwkv versions 5-7: channels per head of the matrix state", '>= 1'),
    hybrid_layers=Option([2, 5], "hybrid: the blocks that are attention (one in three of L6)", '>= 0'),
    attn_window=Option(256, "hybrid and gpt_window: each token attends to the last attn_window tokens; 0 = all",
                       '>= 0'),
    attn_kv_heads=Option(0, "attention: grouped-query K/V heads, 0 = n_head", '>= 0'),
    vocab_size=Option(50277, "vocabulary of both models", '>= 1'),
    n_tokens=Option(4096, "tokens generated per model, from an empty context", '>= 1'),
    report_at=Option([64, 256, 1024, 4096], "context lengths in the summary (those <= n_tokens)", '>= 1'),
    window=Option(32, "the summary's ms/token at context n is the median over the `window` steps ending at n", '>= 1'),
    out=Option('out-bench/inference_time_{device}', "where the .csv and .json go; {device}: cpu / cuda"),
    plot=Option('out-bench/inference_time_{device}.png', "where the PNG goes; {device} becomes cpu / cuda"),
    seed=Option(1337, "seeds the random weights", '>= 0'),
)


def make_model(name, cfg, dtype, device):
    torch.manual_seed(cfg.seed)
    try:
        model = build(name, cfg)
    except ValueError as e:  # the model configs check their values
        raise ConfigError(str(e)) from e
    return model.to(device=device, dtype=dtype).eval()


def build(name, cfg):
    attention = dict(n_head=cfg.n_head, attn_kv_heads=cfg.attn_kv_heads)
    if name in ('rwkv', 'hybrid'):
        from model_rwkv import RWKV, RWKVConfig
        hybrid = dict(attn_layers=cfg.hybrid_layers, attn_window=cfg.attn_window, **attention) if name == 'hybrid' \
            else dict(version=cfg.rwkv_version, head_size=cfg.head_size)
        model = RWKV(RWKVConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                                block_size=cfg.n_tokens, **hybrid))
        with torch.no_grad():  # v4neo's init zeroes several matrices; random weights make every matmul real work
            for n, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
    else:
        from model_gpt import GPT, GPTConfig
        window = cfg.attn_window if name == 'gpt_window' else 0
        model = GPT(GPTConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                              block_size=cfg.n_tokens, bias=False, attn_window=window, **attention))
    return model


def cache_bytes(cache):
    """Bytes of the tensors in a model's state: the RWKV State, a hybrid's State and KV caches, GPT's KV caches."""
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, (tuple, list)):
        return sum(cache_bytes(item) for item in cache)
    return 0  # a position counter, or a cache not created yet (None)


def rss_bytes():
    """Resident set size of this process now (Linux), else its peak so far."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except OSError:
        scale = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@torch.inference_mode()
def run(name, model, cfg, device):
    """Greedy generation of n_tokens from an empty history; one row per token."""
    from tqdm import tqdm
    cuda = device.startswith('cuda')
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if hasattr(model, 'layout_for_decoding_') and not cuda:
        model.layout_for_decoding_()  # what RWKV's generate runs on a CPU
    token = torch.zeros(1, dtype=torch.long, device=device)
    cache, rows, total = None, [], 0.0
    for n in tqdm(range(1, cfg.n_tokens + 1), desc=name, unit='tok', mininterval=1, file=sys.stderr):
        t0 = time.perf_counter()
        logits, cache = model.step(token, cache)
        token = logits.argmax(-1)
        if cuda:
            torch.cuda.synchronize()
        else:
            token = token.clone()  # nothing is lazy on the CPU; the argmax above has run
        dt = time.perf_counter() - t0
        total += dt
        row = dict(model=name, tokens=n, ms_per_token=dt * 1e3, cumulative_s=total,
                   cache_mb=cache_bytes(cache) / 2 ** 20)
        if cuda:
            row['peak_allocated_mb'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        else:
            row['rss_mb'] = rss_bytes() / 2 ** 20
        rows.append(row)
    return rows


def summarize(rows, cfg):
    """Per model: median ms/token over the window ending at each reported context, the ratio last / first, memory."""
    at = [n for n in cfg.report_at if n <= cfg.n_tokens] or [cfg.n_tokens]
    summary = {}
    for name in dict.fromkeys(r['model'] for r in rows):
        mine = [r for r in rows if r['model'] == name]
        ms = {n: statistics.median(r['ms_per_token'] for r in mine[max(0, n - cfg.window):n]) for n in at}
        summary[name] = dict(ms_per_token=ms, ratio_last_first=ms[at[-1]] / ms[at[0]],
                             cache_mb_first=mine[at[0] - 1]['cache_mb'], cache_mb_last=mine[at[-1] - 1]['cache_mb'],
                             total_s=mine[-1]['cumulative_s'])
    return at, summary


def print_table(at, summary):
    print(f"| model | {' | '.join(f'ms/token @{n}' for n in at)} | @{at[-1]} / @{at[0]} | "
          f"state/cache MB @{at[0]} -> @{at[-1]} | memory per token | total s |")
    print('|---' * (len(at) + 5) + '|')
    for name, s in summary.items():
        cells = ' | '.join(f"{s['ms_per_token'][n]:.3f}" for n in at)
        grows = 'grows with the context' if s['cache_mb_last'] > s['cache_mb_first'] else 'constant'
        print(f"| {name} | {cells} | {s['ratio_last_first']:.3f} | {s['cache_mb_first']:.3f} -> "
              f"{s['cache_mb_last']:.3f} | {grows} | {s['total_s']:.1f} |")


STATE_LABEL = {'rwkv': 'state', 'hybrid': 'state + KV cache'}


def figure(rows, title):
    """The three panels of the original README's plot: single-token latency, cumulative latency, memory."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    mem_key = 'peak_allocated_mb' if 'peak_allocated_mb' in rows[0] else 'rss_mb'
    for name in dict.fromkeys(r['model'] for r in rows):
        mine = [r for r in rows if r['model'] == name]
        n = [r['tokens'] for r in mine]
        line, = axes[0].plot(n, [r['ms_per_token'] for r in mine], lw=0.6, label=name)
        axes[1].plot(n, [r['cumulative_s'] for r in mine], color=line.get_color(), label=name)
        if mem_key == 'peak_allocated_mb':
            axes[2].plot(n, [r[mem_key] for r in mine], color=line.get_color(), label=f"{name} (peak allocated)")
        else:  # the RSS holds the weights and the allocator's pools: its growth is what generation adds
            axes[2].plot(n, [r[mem_key] - mine[0][mem_key] for r in mine], color=line.get_color(),
                         label=f"{name} (process RSS growth)")
        axes[2].plot(n, [r['cache_mb'] for r in mine], color=line.get_color(), ls='--',
                     label=f"{name} ({STATE_LABEL.get(name, 'KV cache')})")
    for ax, ylabel, t in zip(axes, ['ms', 's', 'MB'], ['single-token latency', 'cumulative latency', 'memory']):
        ax.set(xlabel='#tokens', ylabel=ylabel, title=t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    device = resolve_device(cfg.device)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype = getattr(torch, cfg.dtype)
    # the output paths before measuring: a bad placeholder fails now, not after the run
    out, png = fill_path('out', cfg.out, device=device_type), fill_path('plot', cfg.plot, device=device_type)
    commit, machine = run_provenance(device)
    title = (f"L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size} {cfg.dtype}, batch 1, {machine}, torch "
             f"{torch.__version__}, commit {commit}")
    print(f"# benchmark_inference_time.py {' '.join(argv)}\n{title}, {time.strftime('%Y-%m-%d')}")

    rows = []
    for name in cfg.models:
        model = make_model(name, cfg, dtype, device)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
        rows += run(name, model, cfg, device)
        del model
    at, summary = summarize(rows, cfg)
    print_table(at, summary)

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    meta = dict(argv=argv, config=vars(cfg), device=device, machine=machine, torch=torch.__version__, commit=commit,
                date=time.strftime('%Y-%m-%d'), summary=summary)
    for path in (out, png):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix('.csv'), table.getvalue())
    write_text(out.with_suffix('.json'), json.dumps(dict(meta, rows=rows), indent=1))
    with atomic_path(png) as tmp:
        figure(rows, title).savefig(tmp, dpi=110, format='png')
    print(f"wrote {out.with_suffix('.csv')}, {out.with_suffix('.json')} and {png}")


if __name__ == '__main__':
    run_script(main)
