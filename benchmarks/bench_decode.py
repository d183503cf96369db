"""
RNN-mode decoding speed: our RWKV.step vs the `rwkv` pip package (strategy 'cpu fp32', its default TorchScript
path) on the same exported RWKV-4 .pth, in one run. Both decode one sequence, one token at a time; the logits of the
two are compared on the way, so both provably run the same weights. Ours runs eager and with torch.compile(model.step)
(which fuses the elementwise work of a step: small models are dispatch-bound on a CPU); our batched decode is shown
next to it (the package decodes one sequence per call).

$ python benchmarks/bench_decode.py
$ python benchmarks/bench_decode.py --sizes="[(12, 768, 50277)]" --n_tokens=200

Tokens/s are medians over --repeats runs of --n_tokens steps each, after --warmup steps.
"""
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configurator import ConfigError, Option, parse_config, run_script  # noqa: E402
from hardware import others_quiet, run_provenance  # noqa: E402

OPTIONS = dict(
    # (n_layer, n_embd, vocab_size): a char-level model, a small BPE model, and RWKV-4 169M's shape
    sizes=Option([(4, 256, 65), (6, 512, 50277), (12, 768, 50277)], "(n_layer, n_embd, vocab_size) of each model: a "
                 "char-level model, a small BPE model, and RWKV-4 169M's shape", '>= 1'),
    n_tokens=Option(64, "steps per timed run", '>= 1'),
    warmup=Option(8, "untimed steps first", '>= 0'),
    repeats=Option(3, "timed runs; the median is reported", '>= 1'),
    batch_size=Option(8, "our batched decode, the extra column", '>= 1'),
    compile=Option(True, "also time torch.compile(model.step)"),
    seed=Option(1337, "seeds the random weights and tokens", '>= 0'),
)


def decode_rate(step, n_tokens, warmup, repeats, batch=1):
    """tokens/s of step(i) called n_tokens times, median over repeats."""
    for i in range(warmup):
        step(i)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n_tokens):
            step(i)
        rates.append(batch * n_tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench(L, C, V, cfg, tmp):
    os.environ.setdefault('RWKV_CUDA_ON', '0')
    with others_quiet('the rwkv package'):
        from rwkv.model import RWKV as PipRWKV
    from model_rwkv import RWKV, RWKVConfig
    torch.manual_seed(cfg.seed)
    src = RWKV(RWKVConfig(n_layer=L, n_embd=C, vocab_size=V))
    with torch.no_grad():  # v4neo's init zeroes several matrices; random weights make every matmul real work
        for p in src.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    path = Path(tmp) / f'L{L}-C{C}-V{V}.pth'
    src.save_pth(path)
    ours = RWKV.from_pretrained(path).eval()  # the same file for both
    with others_quiet('the rwkv package'):
        pip = PipRWKV(model=str(path.with_suffix('')), strategy='cpu fp32', verbose=False)
    tokens = torch.randint(0, V, (cfg.warmup + cfg.n_tokens,), generator=torch.Generator().manual_seed(cfg.seed))

    # the same logits, token by token, before timing anything
    state, pip_state, diff = None, None, 0.0
    with torch.inference_mode():
        for t in tokens[:16].tolist():
            logits, state = ours.step(torch.tensor([t]), state)
            pip_logits, pip_state = pip.forward([t], pip_state)
            diff = max(diff, (logits[0] - pip_logits).abs().max().item())

    def run_ours(batch):
        s = [None]
        toks = tokens[:, None].expand(-1, batch).contiguous()

        def step(i):
            with torch.inference_mode():
                _, s[0] = ours.step(toks[i], s[0])
        return step

    pip_s = [None]

    def run_pip(i):
        _, pip_s[0] = pip.forward([int(tokens[i])], pip_s[0])

    n, w, r = cfg.n_tokens, cfg.warmup, cfg.repeats
    ours_1 = decode_rate(run_ours(1), n, w, r)
    pip_1 = decode_rate(run_pip, n, w, r)
    ours_b = decode_rate(run_ours(cfg.batch_size), n, w, r, cfg.batch_size)
    compiled = None
    if cfg.compile:
        step = ours.step
        ours.step = torch.compile(step)  # the first calls (warm-up) compile it
        compiled = decode_rate(run_ours(1), n, max(w, 2), r)
        ours.step = step
    return ours_1, pip_1, ours_b, compiled, diff


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    import importlib.util
    if importlib.util.find_spec('rwkv') is None:
        raise ConfigError("the rwkv package is not installed: pip install rwkv")
    commit, machine = run_provenance('cpu')
    from importlib.metadata import version
    print(f"# bench_decode.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, rwkv {version('rwkv')}, "
          f"{machine}, {time.strftime('%Y-%m-%d')}\nfp32 on the CPU, batch 1 unless stated, {cfg.n_tokens} fixed "
          f"random tokens per run, median of {cfg.repeats} runs\n")
    B = cfg.batch_size
    rows = []  # printed at the end, so that no library's message lands inside the table
    with tempfile.TemporaryDirectory() as tmp:
        for L, C, V in cfg.sizes:
            ours_1, pip_1, ours_b, compiled, diff = bench(L, C, V, cfg, tmp)
            comp = f"{compiled:,.1f} | {compiled / pip_1:.2f}x" if compiled else "- | -"
            rows.append(f"| {L} | {C} | {V} | {pip_1:,.1f} | {ours_1:,.1f} | {ours_1 / pip_1:.2f}x | {comp} | "
                        f"{ours_b:,.1f} | {diff:.1e} |")
            print(f"measured L{L} C{C} V{V}", file=sys.stderr, flush=True)
    sys.stderr.flush()
    print(f"| n_layer | n_embd | vocab | rwkv pip tok/s | ours tok/s | ours / pip | ours compiled tok/s | "
          f"compiled / pip | ours batch {B} tok/s | max logit diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print('\n'.join(rows), flush=True)


if __name__ == '__main__':
    run_script(main)
