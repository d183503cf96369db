"""
Training throughput of GPT and RWKV of the same size, batch and context (nanoGPT's bench.py role): ms/iter, tokens/s
and MFU for one forward + backward + AdamW step, eager and with torch.compile, and, when `transformers` is installed,
its RwkvForCausalLM and GPT2LMHeadModel of the same configuration in the same run, printed as ratios.

$ python benchmarks/bench_train.py                                       # CPU: L4 C256, char vocabulary, 4 x 1024
$ python benchmarks/bench_train.py --rwkv_version=7 --head_size=32      # our rwkv as RWKV-7
$ python benchmarks/bench_train.py --device=cuda --n_layer=12 --n_embd=768 --n_head=12 --vocab_size=50304 \
      --batch_size=12                                                   # GPU: the ~125M models of the configs

MFU counts the matmul FLOPs of the model (model_gpt.py / model_rwkv.py flops_per_token; transformers' twins get the
same count) against the device's peak: NVIDIA's datasheet dense peak for A100/H100/H200, otherwise (CPUs) a
matmul measured at the start of this run (train.py measure_peak_flops). Times are medians after warm-up iterations.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configurator import ConfigError, Option, parse_config, run_script  # noqa: E402
from hardware import (DEVICE, DTYPES, autocast_context, measure_peak_flops, resolve_device, resolve_dtype,  # noqa: E402
                      run_provenance)
from wkv_cuda import BACKENDS  # noqa: E402

OPTIONS = dict(
    device=Option('auto', "'auto' (cuda if available), 'cpu', 'cuda', ...", DEVICE),
    dtype=Option('auto', "as train.py: 'auto' = bf16 autocast on GPUs that have it, fp32 on CPU", DTYPES),
    n_layer=Option(4, "blocks of both models", '>= 1'),
    n_embd=Option(256, "width of both models", '>= 1'),
    n_head=Option(4, "gpt: attention heads (n_embd must be a multiple)", '>= 1'),
    vocab_size=Option(65, "tiny shakespeare's characters; 50304 for GPT-2's padded BPE vocabulary", '>= 1'),
    block_size=Option(1024, "context length of a batch", '>= 1'),
    batch_size=Option(4, "sequences per batch", '>= 1'),
    compile=Option([False, True], "run each of our models eager and/or torch.compile'd"),
    transformers=Option(True, "add transformers' RwkvForCausalLM and GPT2LMHeadModel (eager) when installed"),
    wkv_backend=Option('auto', "rwkv 4: the WKV implementation", BACKENDS),
    rwkv_version=Option('4', "our rwkv's RWKV-LM version: 4, 5, 5.1, 6 or 7 (transformers' is RWKV-4)",
                        ('4', '5', '5.1', '6', '7')),
    head_size=Option(64, "rwkv versions 5-7: channels per head of the matrix state", '>= 1'),
    warmup=Option(2, "untimed iterations first (the compile happens in the first)", '>= 1'),
    iters=Option(5, "timed iterations; the median is reported", '>= 1'),
    peak_flops=Option(0.0, "FLOP/s for MFU; 0 = datasheet for known GPUs, else measured", '>= 0'),
    seed=Option(1337, "seeds the weights and the batch", '>= 0'),
)


class HFWrapper(torch.nn.Module):
    """transformers' model behind our (idx, targets) -> (logits, loss) call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        out = self.model(input_ids=idx, labels=targets)  # shifts the labels itself: the same work per token
        return out.logits, out.loss


def models(cfg):
    """(name, constructor, our twin for the FLOP count) of every model in the run."""
    from model_gpt import GPT, GPTConfig
    from model_rwkv import RWKV, RWKVConfig
    L, C, V, T = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size
    if C % cfg.n_head:
        raise ConfigError(f"n_embd={C} must be a multiple of n_head={cfg.n_head}")
    # bias=True: the GPT-2 architecture exactly, as transformers' GPT2LMHeadModel
    def gpt():
        return GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=cfg.n_head, n_embd=C, bias=True))

    def rwkv(version=cfg.rwkv_version):
        return RWKV(RWKVConfig(block_size=T, vocab_size=V, n_layer=L, n_embd=C, wkv_backend=cfg.wkv_backend,
                               version=version, head_size=cfg.head_size))
    out = []
    for compiled in cfg.compile:
        out += [(f"gpt{' compiled' if compiled else ''}", gpt, compiled, gpt),
                (f"rwkv{' compiled' if compiled else ''}", rwkv, compiled, rwkv)]
    if cfg.transformers:
        try:
            import transformers
        except ImportError:
            print("(transformers is not installed: its models are left out)")
            return out
        hf_gpt = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=cfg.n_head,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0)
        out.append(('transformers GPT2LMHeadModel', lambda: HFWrapper(transformers.GPT2LMHeadModel(hf_gpt)), False,
                    gpt))
        if L >= 2:  # its RWKV init divides by num_hidden_layers - 1
            hf_rwkv = transformers.RwkvConfig(vocab_size=V, context_length=T, hidden_size=C, num_hidden_layers=L,
                                              attention_hidden_size=C, intermediate_size=4 * C,
                                              bos_token_id=0, eos_token_id=0)
            out.append(('transformers RwkvForCausalLM', lambda: HFWrapper(transformers.RwkvForCausalLM(hf_rwkv)),
                        False, lambda: rwkv(4)))  # its FLOPs are an RWKV-4's
        else:
            print("(transformers' RWKV is left out: it cannot build a 1-layer model)")
    return out


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    device = resolve_device(cfg.device)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    dtype = resolve_dtype(cfg.dtype, device_type)
    ctx = autocast_context(device_type, dtype)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    commit, machine = run_provenance(device)
    peak = cfg.peak_flops or measure_peak_flops(device, dtype)
    B, T = cfg.batch_size, cfg.block_size
    print(f"# bench_train.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}\nL{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, batch {B} x {T} tokens, "
          f"{dtype}, AdamW; forward + backward + step, median of {cfg.iters} after {cfg.warmup} warm-up; "
          f"peak {peak / 1e12:.3g} TFLOP/s; rwkv = RWKV-{cfg.rwkv_version}"
          f"{f' (head_size {cfg.head_size})' if cfg.rwkv_version != '4' else ''}\n")
    print("| model | ms/iter | tokens/s | MFU | vs gpt |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g).to(device)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    results = {}
    for name, make, compiled, twin in models(cfg):
        torch.manual_seed(cfg.seed)
        model = make().to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        run = torch.compile(model) if compiled else model

        def step():
            with ctx:
                _, loss = run(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for _ in range(cfg.warmup):
            step()
        times = []
        for _ in range(cfg.iters):
            if device_type == 'cuda':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device_type == 'cuda':
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        mfu = twin().flops_per_token() * B * T / dt / peak
        results[name] = B * T / dt
        vs = f"{results[name] / results['gpt']:.2f}x" if 'gpt' in results else '-'
        print(f"| {name} | {dt * 1e3:.1f} | {B * T / dt:,.0f} | {mfu * 100:.3g}% | {vs} |", flush=True)

    print()
    pairs = [('rwkv', 'transformers RwkvForCausalLM'), ('gpt', 'transformers GPT2LMHeadModel'),
             ('rwkv compiled', 'rwkv'), ('gpt compiled', 'gpt'), ('rwkv', 'gpt'), ('rwkv compiled', 'gpt compiled')]
    for a, b in pairs:
        if a in results and b in results:
            print(f"{a} / {b}: {results[a] / results[b]:.2f}x tokens/s")


if __name__ == '__main__':
    run_script(main)
