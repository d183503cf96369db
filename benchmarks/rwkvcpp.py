"""
rwkv.cpp's shared library through ctypes, to check our rwkv.cpp files against it (tests/test_quantize.py) and to race
it (benchmarks/bench_decode.py, bench_quant.py). The library is not a dependency: the one that runs offline is the
April-2023 x86-64 build inside the PyPI sdist rwkv-cpp-python==0.0.1 (rwkv/ under _skbuild/); point
NANORWKV_RWKVCPP_LIB at its librwkv.so or copy it to ~/.cache/nanorwkv/rwkvcpp/. It reads file version 100 (FP32,
FP16 and its own old quantized layouts).
"""
import ctypes
import os
import sys
from pathlib import Path

import torch


class RwkvCpp:
    """librwkv.so: load a model file, run one token, quantize a file with its own quantizer."""

    def __init__(self, path=None):
        path = path or os.environ.get('NANORWKV_RWKVCPP_LIB') or \
            Path.home() / '.cache' / 'nanorwkv' / 'rwkvcpp' / 'librwkv.so'
        if not Path(path).is_file():
            raise FileNotFoundError(f"rwkv.cpp library not found at {path} (set NANORWKV_RWKVCPP_LIB)")
        self.ct = ctypes
        lib = self.lib = ctypes.cdll.LoadLibrary(str(path))
        lib.rwkv_init_from_file.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
        lib.rwkv_init_from_file.restype = ctypes.c_void_p
        pf = ctypes.POINTER(ctypes.c_float)
        lib.rwkv_eval.argtypes = [ctypes.c_void_p, ctypes.c_int32, pf, pf, pf]
        lib.rwkv_eval.restype = ctypes.c_bool
        lib.rwkv_get_state_buffer_element_count.argtypes = [ctypes.c_void_p]
        lib.rwkv_get_state_buffer_element_count.restype = ctypes.c_uint32
        lib.rwkv_get_logits_buffer_element_count.argtypes = [ctypes.c_void_p]
        lib.rwkv_get_logits_buffer_element_count.restype = ctypes.c_uint32
        lib.rwkv_quantize_model_file.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint32]
        lib.rwkv_quantize_model_file.restype = ctypes.c_bool
        lib.rwkv_free.argtypes = [ctypes.c_void_p]

    @staticmethod
    def _quiet(fn, *args):
        """fn(*args) with the C library's own prints (a line per tensor) sent to /dev/null."""
        sys.stdout.flush()
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        try:
            return fn(*args)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            os.close(null)

    def load(self, model_file, threads=1):
        ctx = self._quiet(self.lib.rwkv_init_from_file, str(model_file).encode(), threads)
        if not ctx:
            raise ValueError(f"rwkv.cpp could not load {model_file}")
        return ctx

    def buffers(self, ctx):
        return (torch.zeros(self.lib.rwkv_get_state_buffer_element_count(ctx)),
                torch.zeros(self.lib.rwkv_get_logits_buffer_element_count(ctx)))

    def eval(self, ctx, token, state_in, state_out, logits):
        """One token; state_in None for the empty history. Writes state_out and logits (float32 tensors)."""
        p = lambda t: self.ct.cast(t.data_ptr(), self.ct.POINTER(self.ct.c_float))  # noqa: E731
        if not self.lib.rwkv_eval(ctx, token, None if state_in is None else p(state_in), p(state_out), p(logits)):
            raise RuntimeError("rwkv_eval failed")

    def quantize_file(self, src, dst, ggml_type):
        """The library's own quantizer (its version-100 layouts): 2 = Q4_0, 3 = Q4_1, 4 = Q4_1_O."""
        if not self._quiet(self.lib.rwkv_quantize_model_file, str(src).encode(), str(dst).encode(), ggml_type):
            raise RuntimeError(f"rwkv.cpp could not quantize {src}")

    def free(self, ctx):
        self.lib.rwkv_free(ctx)
