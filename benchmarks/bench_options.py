"""
Training throughput of the MicroRWKV options (moe.py, attention.py) against the plain models, at the shakespeare_char
quick-start shape, and how an MoE layer's cost scales: with top_k (the experts a token visits), not with the number of
experts E.

$ python benchmarks/bench_options.py                 # CPU: L4 C128, 16 x 128 tokens, the six quick-start variants

The quick-start rows time forward + backward + AdamW step (training as train.py does it); the MoE rows forward +
backward only, as AdamW's cost grows with all the parameters, the experts no token visited included. The variants run
in interleaved rounds and each reports its best round (this 2-core machine is noisy: the least disturbed).
Parameters: all of them, and those a token uses (an MoE layer's router and top_k experts); FLOPs per token from the
models' flops_per_token.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configurator import Option, parse_config, run_script  # noqa: E402
from hardware import run_provenance  # noqa: E402

OPTIONS = dict(
    n_layer=Option(4, "blocks", '>= 1'),
    n_embd=Option(128, "width", '>= 1'),
    n_head=Option(4, "attention heads", '>= 1'),
    vocab_size=Option(65, "tiny shakespeare's characters", '>= 1'),
    block_size=Option(128, "tokens per sequence", '>= 1'),
    batch_size=Option(16, "sequences per batch", '>= 1'),
    rounds=Option(5, "interleaved rounds; each variant reports its best", '>= 1'),
    iters=Option(3, "timed iterations per round (their mean is the round's time)", '>= 1'),
    seed=Option(1337, "seeds the weights and the batch", '>= 0'),
)


def variants(cfg):
    """(name, model_type, options) of the quick-start comparison, then the MoE scaling rows."""
    window, hybrid = cfg.block_size // 2, [cfg.n_layer // 2]
    return [
        ('rwkv', 'rwkv', {}),
        ('rwkv + moe (E=4, k=1)', 'rwkv', dict(moe_experts=4, moe_top_k=1)),
        (f'rwkv hybrid (block {hybrid[0]} attention, window {window})', 'rwkv',
         dict(attn_layers=hybrid, n_head=cfg.n_head, attn_window=window)),
        ('gpt', 'gpt', {}),
        (f'gpt + window {window}', 'gpt', dict(attn_window=window)),
        (f'gpt + gqa ({cfg.n_head // 2} kv heads)', 'gpt', dict(attn_kv_heads=cfg.n_head // 2)),
    ], [(f'rwkv moe E={E} k={k}', 'rwkv', dict(moe_experts=E, moe_top_k=k)) for k in (1, 2) for E in (2, 4, 8)]


def build(model_type, options, cfg):
    from checkpoint import build_model
    args = dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, block_size=cfg.block_size, vocab_size=cfg.vocab_size)
    args.update(dict(n_head=cfg.n_head, bias=False) if model_type == 'gpt' else dict(wkv_backend='auto'))
    return build_model(model_type, {**args, **options})


def measure(rows, cfg, x, y, optimizer_step):
    """{name: best seconds per iteration} over interleaved rounds."""
    runs = []
    for name, model_type, options in rows:
        torch.manual_seed(cfg.seed)
        model = build(model_type, options, cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            _, loss = model(x, y)
            loss.backward()
            if optimizer_step:
                opt.step()
            opt.zero_grad(set_to_none=True)
        step()  # warm-up (the WKV kernel loads, the allocator settles)
        runs.append((name, model, step))
    best = {name: float('inf') for name, _, _ in runs}
    for _ in range(cfg.rounds):
        for name, _, step in runs:
            t0 = time.perf_counter()
            for _ in range(cfg.iters):
                step()
            best[name] = min(best[name], (time.perf_counter() - t0) / cfg.iters)
    return best, {name: model for name, model, _ in runs}


def used_params(model):
    """Parameters a token uses: all but the experts it does not visit."""
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    if not c.moe_experts:
        return total
    experts = sum(p.numel() for n, p in model.named_parameters() if '.experts.' in n)
    return int(total - experts * (1 - c.moe_top_k / c.moe_experts))


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    commit, machine = run_provenance('cpu')
    B, T = cfg.batch_size, cfg.block_size
    print(f"# bench_options.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}\nL{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, batch {B} x {T} tokens, fp32, "
          f"best of {cfg.rounds} interleaved rounds of {cfg.iters} iterations\n")
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    quick, scaling = variants(cfg)
    for title, rows, step in (('the quick-start variants (forward + backward + AdamW step)', quick, True),
                              ('MoE cost against E and k (forward + backward)', scaling, False)):
        best, models = measure(rows, cfg, x, y, step)
        print(f"{title}:\n| model | params | params used per token | MFLOP/token (train) | ms/iter | tokens/s |")
        print("|---|---|---|---|---|---|")
        for name, _, _ in rows:
            m = models[name]
            print(f"| {name} | {sum(p.numel() for p in m.parameters()):,} | {used_params(m):,} | "
                  f"{m.flops_per_token() / 1e6:.3g} | {best[name] * 1e3:.1f} | {B * T / best[name]:,.0f} |", flush=True)
        print()


if __name__ == '__main__':
    run_script(main)
