"""
Benchmark the WKV op per backend, and RWKV training throughput per backend next to a GPT of the same size.

$ python benchmarks/bench_wkv.py                          # CPU: the op grid, then the models
$ python benchmarks/bench_wkv.py --device=cuda --shapes="[(8, 1024, 768)]" --dtypes="['float32', 'bfloat16']"

Times are medians over --repeats runs after a warm-up; ratios are to the 'torch' reference in the same run.
"""
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import ConfigError, parse_config  # noqa: E402
from wkv_cuda import wkv  # noqa: E402

DEFAULTS = dict(
    device='cpu',
    shapes=[(8, 1024, 512), (8, 256, 512), (3, 11, 5)],  # (B, T, C) for the op
    dtypes=['float32'],  # k, v dtype for the op; bfloat16 on CUDA
    repeats=5,
    torch_max_t=1024,  # skip the reference above this T (it is a Python loop)
    # the training-throughput comparison: RWKV and GPT of the same depth, width and vocabulary; each entry is
    # (n_layer, n_embd, vocab_size): a char-level model, and one with GPT-2's vocabulary (the head then dominates)
    models=[(4, 256, 65), (4, 512, 50304)],
    model_block_size=1024,
    model_batch_size=4,
    model_iters=3,
)


def sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (and, for compiled backends, the build)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_op(c):
    device = c['device']
    backends = ['torch', 'cuda' if device.startswith('cuda') else 'cpu']
    print(f"\n## WKV op, fwd+bwd, device {device}, median of {c['repeats']}")
    print("| backend | dtype | B | T | C | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name in c['dtypes']:
        dtype = getattr(torch, dtype_name)
        for B, T, C in c['shapes']:
            g = torch.Generator().manual_seed(0)
            td = (torch.randn(C, generator=g) - 1).to(device).requires_grad_()
            tf = torch.randn(C, generator=g).to(device).requires_grad_()
            k = torch.randn(B, T, C, generator=g).to(device, dtype).requires_grad_()
            v = torch.randn(B, T, C, generator=g).to(device, dtype).requires_grad_()
            base = None
            for backend in backends:
                if backend == 'torch' and T > c['torch_max_t']:
                    continue

                def fwd():
                    with torch.no_grad():
                        wkv(td, tf, k, v, backend=backend)

                def fwd_bwd():
                    y, _ = wkv(td, tf, k, v, backend=backend)
                    y.float().square().sum().backward()
                repeats = c['repeats'] if backend != 'torch' else max(1, min(c['repeats'], 3))
                t_f = timed(fwd, device, repeats)
                t_fb = timed(fwd_bwd, device, repeats)
                base = t_fb if backend == 'torch' else base
                ratio = f"{base / t_fb:.1f}x" if base else '-'
                print(f"| {backend} | {dtype_name} | {B} | {T} | {C} | {t_f * 1e3:.3f} | {t_fb * 1e3:.3f} | {ratio} |",
                      flush=True)


def bench_models(c):
    from model_gpt import GPT, GPTConfig
    from model_rwkv import RWKV, RWKVConfig
    device = c['device']
    B, T = c['model_batch_size'], c['model_block_size']
    kernel = 'cuda' if device.startswith('cuda') else 'cpu'
    print(f"\n## training throughput, device {device}: batch {B} x {T} tokens, fp32, AdamW, forward + backward + "
          f"step, median of {c['model_iters']} iterations")
    print("| model | n_layer | n_embd | vocab | WKV backend | ms/iter | tokens/s | vs GPT |")
    print("|---|---|---|---|---|---|---|---|")
    for L, C, V in c['models']:
        models = [('gpt', '-', lambda: GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=max(1, C // 64),
                                                      n_embd=C, bias=False)))]
        for backend in (kernel, 'torch'):
            models.append(('rwkv', backend, lambda b=backend: RWKV(RWKVConfig(block_size=T, vocab_size=V, n_layer=L,
                                                                               n_embd=C, wkv_backend=b))))
        try:
            from transformers import RwkvConfig, RwkvForCausalLM
            if L < 2:
                raise ImportError("its RWKV init divides by n_layer - 1")
            hf_config = RwkvConfig(vocab_size=V, context_length=T, hidden_size=C, num_hidden_layers=L,
                                   attention_hidden_size=C, intermediate_size=4 * C)
            models.append(('transformers RwkvForCausalLM', 'its own', lambda: HFWrapper(RwkvForCausalLM(hf_config))))
        except ImportError as e:
            print(f"(transformers' RWKV is left out: {e})")
        idx = torch.randint(0, V, (B, T), device=device)
        gpt_tps = None
        for name, backend, make in models:
            torch.manual_seed(0)
            model = make().to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step():
                _, loss = model(idx, idx)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            dt = timed(step, device, c['model_iters'])
            tps = B * T / dt
            gpt_tps = tps if name == 'gpt' else gpt_tps
            print(f"| {name} | {L} | {C} | {V} | {backend} | {dt * 1e3:.0f} | {tps:,.0f} | {tps / gpt_tps:.2f}x |",
                  flush=True)


class HFWrapper(torch.nn.Module):
    """transformers' model behind our (idx, targets) -> (logits, loss) call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        out = self.model(input_ids=idx, labels=targets)  # shifts the labels itself: same work per token
        return out.logits, out.loss


def main(argv):
    c = parse_config(DEFAULTS, argv)
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    name = torch.cuda.get_device_name() if c['device'].startswith('cuda') else platform.processor() or 'cpu'
    print(f"# bench_wkv.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {name}, "
          f"{torch.get_num_threads()} CPU threads, {time.strftime('%Y-%m-%d')}")
    bench_op(c)
    bench_models(c)


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"bench_wkv.py: error: {e}")
