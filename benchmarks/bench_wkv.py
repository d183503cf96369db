"""
Benchmark the WKV op per backend: forward, and forward + backward, against the pure-PyTorch reference; and the
RWKV-5/6 op (wkv_cuda/wkv5.py) and the RWKV-7 op (wkv7.py): each chunked form against its per-token loop, with
per-token decays (RWKV-6's, RWKV-7's range).
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
from wkv_cuda.wkv5 import wkv5_chunked, wkv5_loop  # noqa: E402
from wkv_cuda.wkv7 import wkv7_chunked, wkv7_loop  # noqa: E402

OPTIONS = dict(
    device=Option('cpu', "'cpu', 'cuda', 'cuda:1', ...", DEVICE),
    shapes=Option([(8, 1024, 512), (8, 256, 512), (3, 11, 5)], "(B, T, C) for the op", '>= 1'),
    dtypes=Option(['float32'], "k, v dtype for the op; bfloat16 on CUDA only", ('float32', 'float64', 'bfloat16')),
    repeats=Option(5, "timed runs; the median is reported", '>= 1'),
    torch_max_t=Option(1024, "skip the reference above this T (it is a Python loop)", '>= 0'),
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


def bench_wkv5(cfg):
    device = cfg.device
    print(f"\n## RWKV-5/6 op (per-token decay) and RWKV-7 op, float32, device {device}, chunk {cfg.chunk_len}, "
          f"median of {cfg.repeats}")
    print("| op | form | B | T | C | head | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, T, C, N in cfg.wkv5_shapes:
        H = C // N
        g = torch.Generator().manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device)
        r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
        kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
        ops = {  # RWKV-6: log w = -exp(.); RWKV-7: log w = -e^-0.5 sigmoid(.), a = -kk, b = kk * sigmoid(.)
            'wkv5': ([r, k, v, -torch.exp(randn(B, T, H, N) - 1), randn(H, N)], wkv5_loop, wkv5_chunked),
            'wkv7': ([r, -0.6065 * torch.sigmoid(randn(B, T, H, N)), k, v, -kk, kk * torch.sigmoid(randn(B, T, H, N))],
                     wkv7_loop, wkv7_chunked)}
        for op_name, (args, loop, chunked) in ops.items():
            args = [a.clone().requires_grad_() for a in args]
            base = None
            for name, op in (('loop', loop), ('chunked', lambda *a, f=chunked: f(*a, chunk_len=cfg.chunk_len))):
                def fwd(op=op):
                    with torch.no_grad():
                        op(*args)

                def fwd_bwd(op=op):
                    y, s = op(*args)
                    (y.square().sum() + s.square().sum()).backward()
                repeats = cfg.repeats if name == 'chunked' else max(1, min(cfg.repeats, 3))
                t_f, t_fb = timed(fwd, device, repeats), timed(fwd_bwd, device, repeats)
                base = base or t_fb
                print(f"| {op_name} | {name} | {B} | {T} | {C} | {N} | {t_f * 1e3:.1f} | {t_fb * 1e3:.1f} | "
                      f"{base / t_fb:.1f}x |", flush=True)


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    commit, machine = run_provenance(cfg.device)
    print(f"# bench_wkv.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}")
    bench_op(cfg)
    bench_wkv5(cfg)


if __name__ == '__main__':
    run_script(main)
