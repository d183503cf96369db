"""
The GPU check of the WKV kernels, in one command of about 8 minutes on an H100/H200 that reaches no registry (it
needs torch, ninja, nvcc and pytest, nothing downloaded):

    python benchmarks/bench_gpu.py 2>&1 | tee bench_gpu.txt
    python benchmarks/bench_gpu.py --parts="['op', 'train']"      # some parts only

Parts, in order:
- build: every CUDA extension (RWKV-4, RWKV-5/6, RWKV-7) compiled for this GPU, in parallel;
- tests: the CUDA cases of tests/test_wkv_kernels.py and tests/test_wkv_matrix_kernels.py (every kernel on the GPU
  against the float64 loops: values, every gradient with the incoming state's, float64 / float32 / bfloat16);
- bptt: whole-sequence = segmented (bptt.py, 4 segments) gradients of a small model of every version, on the GPU;
- op: fwd+bwd ms and peak memory of the RWKV-6 and RWKV-7 ops, bf16: our kernel vs the pure-PyTorch chunked form
  (and fla's chunk_rwkv6 / chunk_rwkv7 when fla imports), contenders interleaved round by round;
- train: a training step's tokens/s and MFU per version at L12 C768 T512 (benchmarks/bench_train.py, eager).
Prints markdown tables; writes nothing.
"""
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bptt import forward_backward  # noqa: E402
from configurator import Option, parse_config, run_script  # noqa: E402
from hardware import run_provenance  # noqa: E402
import wkv_cuda  # noqa: E402
from wkv_cuda.wkv5 import wkv5, wkv5_chunked  # noqa: E402
from wkv_cuda.wkv7 import wkv7, wkv7_chunked  # noqa: E402

OPTIONS = dict(
    parts=Option(['build', 'tests', 'bptt', 'op', 'train'], "which parts to run"),
    op_shapes=Option([(8, 4096, 4096, 64), (8, 1024, 512, 64)], "(B, T, C, head_size) for the op part", '>= 1'),
    rounds=Option(5, "op part: timed rounds, contenders interleaved (the order alternates)", '>= 1'),
    versions=Option([4, 5, 6, 7], "versions for the bptt and train parts", (4, 5, 5.1, 6, 7)),
)


def header(title):
    print(f"\n## {title}", flush=True)


def part_build():
    header("build")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(3) as pool:
        for op, ext in zip(('wkv4', 'wkv5', 'wkv7'), pool.map(lambda op: wkv_cuda.get_extension('cuda', op),
                                                              ('wkv4', 'wkv5', 'wkv7'))):
            print(f"{op}: {'built' if not isinstance(ext, Exception) else 'FAILED: ' + str(ext).splitlines()[0]}")
    print(f"({time.perf_counter() - t0:.0f} s)")


def part_tests():
    header("tests (CUDA cases)")
    r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-k', 'cuda and not shim',
                        'tests/test_wkv_kernels.py', 'tests/test_wkv_matrix_kernels.py'], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-4000:], r.stderr[-2000:], sep='\n')


def part_bptt(cfg):
    from model_rwkv import RWKV, RWKVConfig
    header("whole-sequence vs segmented gradients on the GPU (fp32, T = 61 in segments of 16)")
    print("| version | loss rel diff | max grad rel diff |")
    print("|---|---|---|")
    for version in cfg.versions:
        torch.manual_seed(0)
        model = RWKV(RWKVConfig(version=version, n_layer=3, n_embd=128, head_size=64, vocab_size=97,
                                block_size=16)).cuda().train()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))  # no zero matrices: every path carries gradient
        idx = torch.randint(0, 97, (4, 61), device='cuda')
        targets = torch.randint(0, 97, (4, 61), device='cuda')
        _, loss = model(idx, targets)
        loss.backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        got = forward_backward(model, model.initial_state(4, device='cuda'), idx, targets, 16)
        err = max(((p.grad - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)).item()
                  for n, p in model.named_parameters())
        print(f"| {version} | {abs(got.item() - loss.item()) / loss.item():.1e} | {err:.1e} |", flush=True)


def op_inputs(name, B, T, H, N):
    g = torch.Generator(device='cuda').manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device='cuda')
    r, k, v = (randn(B, T, H, N).bfloat16() for _ in range(3))
    if name == 'rwkv6':
        return [r, k, v, -torch.exp(randn(B, T, H, N) - 1), randn(H, N)]
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    return [r, -0.6065 * torch.sigmoid(randn(B, T, H, N)), k, v, (-kk).bfloat16(),
            (kk * torch.sigmoid(randn(B, T, H, N))).bfloat16()]


def fla_contenders():
    """fla's Triton chunked ops, when fla imports: {name: fn(*our inputs) -> (y, state)} in our layouts."""
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as e:  # not installed, or an incompatible triton
        print(f"(fla left out: {type(e).__name__}: {e})")
        return {}

    def rwkv6(r, k, v, logw, u):
        return chunk_rwkv6(r, k, v, logw.bfloat16(), u.bfloat16(), scale=1.0, output_final_state=True)

    def rwkv7(r, logw, k, v, a, b):  # fla: state (K, V), the transpose of ours
        return chunk_rwkv7(r, logw.bfloat16(), k, v, a, b, scale=1.0, output_final_state=True)
    return {'rwkv6': rwkv6, 'rwkv7': rwkv7}


def part_op(cfg):
    header(f"WKV op fwd+bwd, bf16 inputs, median of {cfg.rounds} interleaved rounds")
    fla = fla_contenders()
    print("| op | B | T | C | head | contender | fwd+bwd ms | peak MiB | vs chunked |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B, T, C, N in cfg.op_shapes:
        for name in ('rwkv6', 'rwkv7'):
            xs = [x.requires_grad_() for x in op_inputs(name, B, T, C // N, N)]
            ours, chunked = (wkv5, wkv5_chunked) if name == 'rwkv6' else (wkv7, wkv7_chunked)
            contenders = {'ours (cuda)': lambda *a, f=ours: f(*a, backend='cuda'), 'chunked (torch)': chunked}
            if name in fla:
                contenders['fla chunk'] = fla[name]
            times, peaks = {c: [] for c in contenders}, {}
            for rnd in range(cfg.rounds + 1):  # round 0 warms up (and builds)
                order = list(contenders) if rnd % 2 else list(reversed(contenders))
                for c in order:
                    for x in xs:
                        x.grad = None
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    t0 = time.perf_counter()
                    y, s = contenders[c](*xs)
                    (y.float().square().sum() + s.float().sum()).backward()
                    torch.cuda.synchronize()
                    if rnd:
                        times[c].append(time.perf_counter() - t0)
                        peaks[c] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                    del y, s
            ref = statistics.median(times['chunked (torch)'])
            for c in contenders:
                t = statistics.median(times[c])
                print(f"| {name} | {B} | {T} | {C} | {N} | {c} | {t * 1e3:.2f} | {peaks[c]:,.0f} | "
                      f"{ref / t:.2f}x |", flush=True)


def part_train(cfg):
    header("training step, L12 C768 T512 B16, vocab 50304, bf16 autocast, eager (benchmarks/bench_train.py)")
    for version in cfg.versions:
        r = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_train.py'), '--device=cuda',
                            '--n_layer=12', '--n_embd=768', '--n_head=12', '--vocab_size=50304', '--block_size=512',
                            '--batch_size=16', '--compile=[False]', '--transformers=False',
                            f'--rwkv_version={version}', '--head_size=64', '--iters=5'],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
        rows = [line for line in r.stdout.splitlines() if line.startswith('| ')]
        print(f"version {version}:", *(rows or [r.stderr[-1500:]]), sep='\n', flush=True)


def main(argv):
    cfg = parse_config(OPTIONS, argv, __doc__)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: error: no CUDA device; run this on a GPU machine")
    commit, machine = run_provenance('cuda')
    print(f"# bench_gpu.py {' '.join(argv)}\ncommit {commit}, torch {torch.__version__}, {machine}, "
          f"{time.strftime('%Y-%m-%d')}")
    t0 = time.perf_counter()
    for part in cfg.parts:
        {'build': part_build, 'tests': part_tests, 'bptt': lambda: part_bptt(cfg), 'op': lambda: part_op(cfg),
         'train': lambda: part_train(cfg)}[part]()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == '__main__':
    run_script(main)
