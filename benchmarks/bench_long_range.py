"""
What full backpropagation through time learns that truncation cannot: a key-recall task across segment boundaries.

Each sample is filler tokens, one key (one of n_keys) somewhere, more filler, and at the end a query token whose next
token is the key: the model must carry the key in its state over d tokens. Training samples are ctx_len tokens cut
into segments of block_size, with d drawn from [block_size, ctx_len - 1], so the key is always in an earlier segment
than the query. Three RWKV models, the same seed, steps and data:
- full:      bptt='full', the exact gradient through every segment boundary (bptt.py);
- truncated: bptt='truncated', the state carried forward but no gradient across boundaries (infctx's default);
- no state:  every segment trained on its own from an empty state (ordinary training at block_size).
Each is then asked for the key at distances d (running the whole sample carrying the state, as at inference); the
table and the plot give the accuracy (chance = 1 / n_keys).

$ python benchmarks/bench_long_range.py                                  # ~3 CPU minutes
$ python benchmarks/bench_long_range.py --ctx_len=256 --block_size=32 --iters=600
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bptt import forward_backward  # noqa: E402
from configurator import ConfigError, Option, parse_config, run_script  # noqa: E402
from files import atomic_path, write_text  # noqa: E402
from hardware import run_provenance  # noqa: E402
from model_rwkv import RWKV, RWKVConfig  # noqa: E402

OPTIONS = dict(
    n_keys=Option(8, "keys to remember; chance is 1 / n_keys", '>= 2'),
    block_size=Option(16, "segment length: what the model sees at once", '>= 2'),
    ctx_len=Option(64, "training sample length (several block_size)", '>= 4'),
    distances=Option([8, 16, 32, 48, 63], "distances from key to query evaluated (each < the sample length "
                                          "max(ctx_len, d + 2))", '>= 1'),
    n_layer=Option(2, "RWKV blocks", '>= 1'),
    n_embd=Option(64, "RWKV width", '>= 1'),
    batch_size=Option(32, "samples per step", '>= 1'),
    iters=Option(1000, "training steps per model", '>= 1'),
    learning_rate=Option(3e-3, "AdamW, constant", '> 0'),
    eval_samples=Option(256, "samples per distance", '>= 1'),
    seed=Option(1337, "seeds the weights and the data", '>= 0'),
    wkv_backend=Option('auto', "the WKV implementation", ('auto', 'cpu', 'torch')),
    out=Option('', "write the results as JSON here; '' = print only"),
    plot=Option('', "write the accuracy-vs-distance plot here (.png); '' = none"),
)
MODES = ('full', 'truncated', 'no state')


def samples(n, T, distances, n_keys, g):
    """idx, targets (n, T) and the keys: filler everywhere, the key at T - 1 - d, the query at T - 1; its target
    is the key. Tokens: keys 0..n_keys-1, filler n_keys, query n_keys + 1."""
    filler, query = n_keys, n_keys + 1
    seq = torch.full((n, T + 1), filler)
    keys = torch.randint(n_keys, (n,), generator=g)
    d = distances if torch.is_tensor(distances) else torch.full((n,), distances)
    seq[torch.arange(n), T - 1 - d] = keys
    seq[:, T - 1] = query
    seq[:, T] = keys
    return seq[:, :-1], seq[:, 1:], keys


def train(mode, cfg):
    torch.manual_seed(cfg.seed)
    model = RWKV(RWKVConfig(block_size=cfg.block_size, vocab_size=cfg.n_keys + 2, n_layer=cfg.n_layer,
                            n_embd=cfg.n_embd, emb_init=cfg.learning_rate, wkv_backend=cfg.wkv_backend)).train()
    opt = model.configure_optimizers(0.0, cfg.learning_rate, (0.9, 0.99), 'cpu')
    g = torch.Generator().manual_seed(cfg.seed)  # the same samples for every mode
    for _ in range(cfg.iters):
        d = torch.randint(cfg.block_size, cfg.ctx_len, (cfg.batch_size,), generator=g)
        idx, targets, _ = samples(cfg.batch_size, cfg.ctx_len, d, cfg.n_keys, g)
        if mode == 'no state':  # every segment a sample of its own, from an empty state
            T = cfg.ctx_len - cfg.ctx_len % cfg.block_size
            idx, targets = (t[:, :T].reshape(-1, cfg.block_size) for t in (idx, targets))
            forward_backward(model, model.initial_state(idx.shape[0]), idx, targets, cfg.block_size)
        else:
            forward_backward(model, model.initial_state(cfg.batch_size), idx, targets, cfg.block_size, bptt=mode)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def accuracy(model, d, cfg):
    """The share of samples whose key is the model's greedy answer after d tokens (the state carried throughout)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    T = max(cfg.ctx_len, d + 2)
    idx, _, keys = samples(cfg.eval_samples, T, d, cfg.n_keys, g)
    logits, _ = model.prefill(idx)  # the whole sample in one pass carries the state exactly as the segments do
    return (logits[:, -1].argmax(-1) == keys).float().mean().item()


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    if cfg.ctx_len < 2 * cfg.block_size:
        raise ConfigError(f"ctx_len={cfg.ctx_len} must be at least 2 * block_size={2 * cfg.block_size} (the key in "
                          f"an earlier segment than the query)")
    commit, machine = run_provenance('cpu')
    print(f"# bench_long_range.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}\nRWKV L{cfg.n_layer} C{cfg.n_embd}, {cfg.n_keys} keys (chance "
          f"{1 / cfg.n_keys:.3f}), samples of {cfg.ctx_len} in segments of {cfg.block_size}, {cfg.iters} steps of "
          f"{cfg.batch_size}\n")
    results = {}
    for mode in MODES:
        t0 = time.time()
        model = train(mode, cfg)
        results[mode] = {d: accuracy(model, d, cfg) for d in cfg.distances}
        print(f"trained '{mode}' in {time.time() - t0:.0f} s", file=sys.stderr)
    print("| training | " + ' | '.join(f'd={d}' for d in cfg.distances) + ' |')
    print('|---' * (len(cfg.distances) + 1) + '|')
    for mode, acc in results.items():
        print(f"| {mode} | " + ' | '.join(f'{a:.3f}' for a in acc.values()) + ' |')
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps(dict(config=vars(cfg), commit=commit, machine=machine, accuracy=results), indent=1))
        print(f"wrote {out}")
    if cfg.plot:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for mode, acc in results.items():
            ax.plot(list(acc), list(acc.values()), marker='o', label=mode)
        ax.axhline(1 / cfg.n_keys, color='gray', ls=':', label='chance')
        for k in range(1, max(cfg.distances) // cfg.block_size + 1):
            ax.axvline(k * cfg.block_size, color='gray', lw=0.5, alpha=0.4)
        ax.set(xlabel='distance from key to query (tokens; grey lines: segment length)', ylabel='recall accuracy',
               title=f'key recall, RWKV trained on {cfg.ctx_len} tokens in segments of {cfg.block_size}',
               ylim=(0, 1.05))
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(cfg.plot).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cfg.plot) as tmp:
            fig.savefig(tmp, dpi=110, format='png')
        print(f"wrote {cfg.plot}")


if __name__ == '__main__':
    run_script(main)
