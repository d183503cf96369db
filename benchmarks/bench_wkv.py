"""
Benchmark the WKV ops per backend, forward and forward + backward: RWKV-4's against its pure-PyTorch reference;
the RWKV-5/6 op (wkv_cuda/wkv5.py) and the RWKV-7 op (wkv7.py), with per-token decays (RWKV-6's, RWKV-7's range):
the compiled kernel and the per-token loop against the chunked pure-PyTorch form.
(Whole-model training throughput is benchmarks/bench_train.py.)

$ python benchmarks/bench_wkv.py                          # CPU
$ python benchmarks/bench_wkv.py --device=cuda --shapes="[(8, 1024, 768)]" --dtypes="['float32', 'bfloat16']"

Times are medians over --repeats runs after a warm-up; ratios are to the 'torch' reference in the same run.
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configurator import Option, parse_config, run_script  # noqa: E402
from hardware import DEVICE, run_provenance  # noqa: E402
from wkv_cuda import wkv  # noqa: E402
from wkv_cuda.wkv5 import wkv5, wkv5_chunked, wkv5_loop  # noqa: E402
from wkv_cuda.wkv7 import wkv7, wkv7_chunked, wkv7_loop  # noqa: E402

OPTIONS = dict(
    device=Option('cpu', "'cpu', 'cuda', 'cuda:1', ...", DEVICE),
    shapes=Option([(8, 1024, 512), (8, 256, 512), (3, 11, 5)], "(B, T, C) for the op", '>= 1'),
    dtypes=Option(['float32'], "k, v dtype for the op; bfloat16 on CUDA only", ('float32', 'float64', 'bfloat16')),
    repeats=Option(5, "timed runs; the median is reported", '>= 1'),
    torch_max_t=Option(1024, "skip the Python-loop references (RWKV-4's, the RWKV-5/6/7 loops) above this T", '>= 0'),
    threads=Option(0, "CPU threads (torch.set_num_threads); 0 = torch's default", '>= 0'),
    wkv5_shapes=Option([(8, 1024, 512, 64), (2, 256, 256, 64)], "(B, T, C, head_size) for the RWKV-5/6 and 7 ops",
                       '>= 1'),
    chunk_len=Option(16, "the RWKV-5/6/7 ops' chunk length", '>= 1'),
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


def bench_op(cfg):
    device = cfg.device
    backends = ['torch', 'cuda' if device.startswith('cuda') else 'cpu']
    print(f"\n## WKV op, fwd+bwd, device {device}, median of {cfg.repeats}")
    print("| backend | dtype | B | T | C | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name in cfg.dtypes:
        dtype = getattr(torch, dtype_name)
        for B, T, C in cfg.shapes:
            g = torch.Generator().manual_seed(0)
            td = (torch.randn(C, generator=g) - 1).to(device).requires_grad_()
            tf = torch.randn(C, generator=g).to(device).requires_grad_()
            k = torch.randn(B, T, C, generator=g).to(device, dtype).requires_grad_()
            v = torch.randn(B, T, C, generator=g).to(device, dtype).requires_grad_()
            base = None
            for backend in backends:
                if backend == 'torch' and T > cfg.torch_max_t:
                    continue

                def fwd():
                    with torch.no_grad():
                        wkv(td, tf, k, v, backend=backend)

                def fwd_bwd():
                    y, _ = wkv(td, tf, k, v, backend=backend)
                    y.float().square().sum().backward()
                repeats = cfg.repeats if backend != 'torch' else max(1, min(cfg.repeats, 3))
                t_f = timed(fwd, device, repeats)
                t_fb = timed(fwd_bwd, device, repeats)
                base = t_fb if backend == 'torch' else base
                ratio = f"{base / t_fb:.1f}x" if base else '-'
                print(f"| {backend} | {dtype_name} | {B} | {T} | {C} | {t_f * 1e3:.3f} | {t_fb * 1e3:.3f} | {ratio} |",
                      flush=True)


def bench_matrix_ops(cfg):
    device = cfg.device
    kind = 'cuda' if device.startswith('cuda') else 'cpu'
    print(f"\n## RWKV-5/6 op (per-token decay) and RWKV-7 op, float32, device {device}, {torch.get_num_threads()} "
          f"threads; median of {cfg.repeats} rounds, contenders interleaved (order alternating), ratio = median of the "
          f"per-round ratios")
    print("| op | B | T | C | head | contender | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs chunked |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, T, C, N in cfg.wkv5_shapes:
        H = C // N
        g = torch.Generator().manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device)
        r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
        kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
        ops = {  # RWKV-6: log w = -exp(.); RWKV-7: log w = -e^-0.5 sigmoid(.), a = -kk, b = kk * sigmoid(.)
            'wkv5': ([r, k, v, -torch.exp(randn(B, T, H, N) - 1), randn(H, N)], wkv5_loop, wkv5_chunked, wkv5),
            'wkv7': ([r, -0.6065 * torch.sigmoid(randn(B, T, H, N)), k, v, -kk, kk * torch.sigmoid(randn(B, T, H, N))],
                     wkv7_loop, wkv7_chunked, wkv7)}
        for op_name, (args, loop, chunked, native) in ops.items():
            args = [a.clone().requires_grad_() for a in args]
            contenders = {f'kernel ({kind})': lambda *a, f=native: f(*a, backend=kind),
                          'chunked (torch)': lambda *a, f=chunked: f(*a, chunk_len=cfg.chunk_len)}
            if T <= cfg.torch_max_t:
                contenders['loop (torch)'] = loop

            def fwd(op):
                with torch.no_grad():
                    op(*args)

            def fwd_bwd(op):
                y, s = op(*args)
                (y.square().sum() + s.square().sum()).backward()
            for c in contenders.values():  # warm-up: builds, caches
                fwd_bwd(c)
            times = {c: ([], []) for c in contenders}
            for rnd in range(cfg.repeats):
                for c in (list(contenders) if rnd % 2 == 0 else list(reversed(contenders))):
                    times[c][0].append(timed_once(lambda: fwd(contenders[c]), device))
                    times[c][1].append(timed_once(lambda: fwd_bwd(contenders[c]), device))
            ref = times['chunked (torch)'][1]
            for c, (t_f, t_fb) in times.items():
                ratio = statistics.median(a / b for a, b in zip(ref, t_fb))
                print(f"| {op_name} | {B} | {T} | {C} | {N} | {c} | {statistics.median(t_f) * 1e3:.1f} | "
                      f"{statistics.median(t_fb) * 1e3:.1f} | {ratio:.2f}x |", flush=True)


def timed_once(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    commit, machine = run_provenance(cfg.device)
    print(f"# bench_wkv.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}")
    bench_op(cfg)
    bench_matrix_ops(cfg)


if __name__ == '__main__':
    run_script(main)
