"""
Registers, spills and shared memory of every CUDA kernel in wkv_cuda/, as ptxas reports them when compiling for
real GPUs: sm_80 (A100) and sm_90 (H100/H200). No GPU needed, only nvcc:

    python benchmarks/ptxas.py                      # print the table
    python benchmarks/ptxas.py --out=ptxas.json     # and write it as JSON (the tests read that)

nvcc is taken from $CUDA_HOME, else /usr/local/cuda. Kernels are listed with their template arguments (head size,
element type, accumulator type), demangled by c++filt.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from files import write_text  # noqa: E402
SOURCES = ('wkv_cuda.cu', 'wkv5_cuda.cu', 'wkv7_cuda.cu')
ARCHS = ('sm_80', 'sm_90')


def nvcc():
    path = Path(os.environ.get('CUDA_HOME') or '/usr/local/cuda', 'bin', 'nvcc')
    if not path.is_file():
        sys.exit(f"ptxas.py: error: nvcc not found at {path}; install the CUDA toolkit or set CUDA_HOME")
    return path


def demangle(names):
    r = subprocess.run(['c++filt'], input='\n'.join(names), capture_output=True, text=True)
    return r.stdout.splitlines() if r.returncode == 0 else names


def report(source, arch):
    """[{kernel, registers, spill_stores, spill_loads, stack, smem}] for one .cu and one architecture."""
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([str(nvcc()), '-O3', '-std=c++20', '-Xptxas', '-v', f'-arch={arch}', '-I',
                            str(REPO / 'wkv_cuda'), '-c', str(REPO / 'wkv_cuda' / source), '-o', f'{d}/k.o'],
                           capture_output=True, text=True, timeout=1200)
    if r.returncode:
        sys.exit(f"ptxas.py: error: nvcc failed on {source} for {arch}: {r.stderr.strip().splitlines()[-1]}")
    rows, name = [], None
    for line in r.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for", line):
            name = m.group(1)
            rows.append({'source': source, 'arch': arch, 'kernel': name})
        elif name and (m := re.search(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads',
                                      line)):
            rows[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif name and (m := re.search(r'Used (\d+) registers', line)):
            smem = re.search(r'(\d+) bytes smem', line)
            rows[-1].update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    for row, pretty in zip(rows, demangle([row['kernel'] for row in rows])):
        # "(anonymous namespace)::forward_kernel<64, float, float>(long, ...)" -> "forward_kernel<64, float, float>"
        row['kernel'] = re.sub(r'^.*?::|\(.*$', '', pretty).replace('__nv_bfloat16', 'bf16')
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument('--out', help="also write the rows as JSON to this file")
    a = ap.parse_args()
    jobs = [(s, arch) for s in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        rows = [row for rs in pool.map(lambda j: report(*j), jobs) for row in rs]
    print(f"{'source':<13} {'arch':<6} {'kernel':<44} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'smem':>6}")
    for r in sorted(rows, key=lambda r: (r['source'], r['arch'], r['kernel'])):
        print(f"{r['source']:<13} {r['arch']:<6} {r['kernel']:<44} {r['registers']:>5} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<6} {r['stack']:>6} {r['smem']:>6}")
    if a.out:
        write_text(a.out, json.dumps(rows, indent=1))


if __name__ == '__main__':
    main()
