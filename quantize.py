"""
Weight-only quantization for CPU inference (rwkv.cpp's and smolrsrwkv's idea): decoding one token reads every weight
once, so it runs at memory speed, and fewer bytes per weight is the speed-up. The matrices of the blocks (and, by
choice, the head) are stored quantized and multiplied by the compiled kernel in wkv_cuda/qlinear_cpu.cpp, which widens
each block in registers; activations, the RNN state, LayerNorms, the time_* vectors and the embedding stay fp32.

Formats (blocks of 32 along the input dimension; ggml's are bit-for-bit ggml's `quantize_row_*_ref`, ggml-quants.c,
so their quality compares one-to-one with rwkv.cpp's):
- int8: one symmetric scale per output row, d = max|w| / 127, q = round(w / d);               8 bits + 32 per row
- q8_0: ggml block_q8_0: d = max|w| / 127 per block (fp16), q = round(w / d);                   8.5 bits per weight
- q5_1: ggml block_q5_1: d = (max - min) / 31, m = min (fp16 each), q = round((w - min) / d), 5 bits; 6 bits
- q4_0: ggml block_q4_0: d = (the value of largest magnitude) / -8 (fp16), q = min(15, floor(w / d + 8.5)); 4.5 bits
- int4: group-32 asymmetric, d = (max - min) / 15, m = min (fp32 each), q = floor((w - min) / d + 0.5); 6 bits
The 4-bit formats pack element j (low nibble) and element j + 16 (high nibble) of a block into byte j, as ggml does.

A quantized model is for inference: QLinear has no backward and refuses training mode.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn

FORMATS = ('int8', 'q8_0', 'q5_1', 'q4_0', 'int4')
FMT_ID = {'int8': 0, 'q8_0': 1, 'q4_0': 2, 'q5_1': 3, 'int4': 4}  # the kernel's numbering (qlinear.h)
QK = 32
# The head is quantized by default, in every format: on the trained char models of README's Results it costs <= 0.01%
# perplexity at 8 bits and 0.1-0.4 points of a percent at 4-5 bits (all far inside 0.5% / 1.5% / 3%), while an fp32
# head is a third of what a 169M model reads per token (rwkv.cpp keeps it fp32, and reads 3x more at Q4_0).
DEFAULT_HEAD = True
FILE_VERSION = 1  # of the safetensors layout written by save_quantized


def roundf(v):
    """C's roundf (halves away from zero); torch.round rounds halves to even. v - trunc(v) is exact in float."""
    r = torch.trunc(v)
    return r + torch.sign(v) * (torch.abs(v - r) >= 0.5)


def pack_nibbles(q):
    """(O, nb, 32) values 0..15 -> (O, nb * 16) bytes: byte j = element j | element j + 16 << 4."""
    q = q.to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).flatten(1)


def unpack_nibbles(packed, O, nb):
    b = packed.view(O, nb, 16)
    return torch.cat([b & 15, b >> 4], dim=-1).to(torch.int32)  # (O, nb, 32)


def quantize(W, fmt):
    """W (O, I) float, I a multiple of 32 -> {name: tensor} of `fmt`, with ggml's arithmetic in float32."""
    O, I = W.shape
    if I % QK:
        raise ValueError(f"cannot quantize a matrix with {I} input features: {fmt} needs a multiple of {QK}")
    w = W.detach().float().cpu()
    if fmt == 'int8':
        d = w.abs().amax(dim=1, keepdim=True) / 127  # (O, 1)
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        return {'q': roundf(w * inv).to(torch.int8), 'd': d}
    x = w.view(O, I // QK, QK)  # (O, nb, 32)
    if fmt == 'q8_0':
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        return {'q': roundf(x * inv).to(torch.int8).view(O, I), 'd': d[..., 0].half()}
    if fmt == 'q4_0':
        at = x.abs().argmax(-1, keepdim=True)  # the first of the largest magnitudes, as ggml's strict `<` scan
        d = torch.gather(x, -1, at) / -8
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        q = torch.clamp(torch.trunc(x * inv + 8.5), max=15)  # (int8_t) truncates; the values are >= 0.5
        return {'q': pack_nibbles(q), 'd': d[..., 0].half()}
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    levels = 31 if fmt == 'q5_1' else 15
    d = (hi - lo) / levels
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.trunc((x - lo) * inv + 0.5)  # (uint8_t) truncates; the values are >= 0
    if fmt == 'int4':
        return {'q': pack_nibbles(torch.clamp(q, max=15)), 'd': d[..., 0], 'm': lo[..., 0]}
    if fmt != 'q5_1':
        raise ValueError(f"unknown quantization format {fmt!r}; use one of {', '.join(FORMATS)}")
    q = q.to(torch.int64)
    bits = (q >> 4) & 1  # (O, nb, 32): element j's fifth bit goes to bit j of qh
    qh = (bits << torch.arange(QK)).sum(-1)  # < 2^32
    qh = torch.where(qh >= 2 ** 31, qh - 2 ** 32, qh).to(torch.int32)  # the same 32 bits, as int32
    return {'q': pack_nibbles(q & 15), 'qh': qh, 'd': d[..., 0].half(), 'm': lo[..., 0].half()}


def dequantize(t, fmt):
    """The float32 matrix that `fmt`'s tensors stand for (the reference the kernels are tested against)."""
    if fmt == 'int8':
        return t['q'].float() * t['d']
    if fmt == 'q8_0':
        O, I = t['q'].shape
        return (t['q'].float().view(O, -1, QK) * t['d'].float()[..., None]).view(O, I)
    O, nb = t['d'].shape
    q = unpack_nibbles(t['q'], O, nb)  # (O, nb, 32)
    if fmt == 'q4_0':
        return ((q - 8).float() * t['d'].float()[..., None]).view(O, nb * QK)
    if fmt == 'q5_1':
        qh = t['qh'].to(torch.int64) & 0xFFFFFFFF
        q = q | (((qh[..., None] >> torch.arange(QK)) & 1) << 4).to(torch.int32)
    return (q.float() * t['d'].float()[..., None] + t['m'].float()[..., None]).view(O, nb * QK)


def kernel():
    from wkv_cuda import build_hint, get_extension
    ext = get_extension('cpu')
    if isinstance(ext, Exception):
        raise RuntimeError(f"quantized inference needs the compiled CPU kernel, which failed to build: "
                           f"{build_hint('cpu', ext)}")
    return ext


class QLinear(nn.Module):
    """An nn.Linear whose weight is stored in a quantization format (its bias, if any, stays float); forward runs the
    compiled kernel."""

    def __init__(self, fmt, in_features, out_features, tensors, bias=None):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        for name, t in tensors.items():  # buffers: they move with .to() and are in the state dict
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x):
        if self.training:
            raise RuntimeError("a quantized model is for inference only: call model.eval() (train the float model "
                               "and quantize it afterwards)")
        if x.device.type != 'cpu':
            raise RuntimeError("quantized inference runs on the CPU: move the model and inputs with .to('cpu')")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        y = kernel().qlinear(x2, FMT_ID[self.fmt], *self.operands())
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.out_features).to(x.dtype)

    def operands(self):
        """(q, d, m, qh) as the kernel takes them: scales and offsets in float32 (ggml's fp16 values convert exactly),
        empty tensors where a format has none. Converted once, and again only if a buffer changed (load_state_dict
        writes in place: the version counter moves)."""
        key = tuple((t.data_ptr(), t._version) for t in self.buffers())
        if getattr(self, '_key', None) != key:
            get = lambda n, f: f(getattr(self, n)) if hasattr(self, n) else torch.empty(0)  # noqa: E731
            self._ops = (self.q, get('d', torch.Tensor.float), get('m', torch.Tensor.float), get('qh', lambda t: t))
            self._key = key
        return self._ops

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}"


def quantize_model(model, fmt, head, head_name):
    """The models' quantize_: every Linear whose input width is a multiple of 32 (all of them in the configs here)
    becomes a QLinear of `fmt`, in place; the head (`head_name`) too when `head` (None = DEFAULT_HEAD)."""
    if getattr(model, 'quantized', None):
        raise ValueError(f"the model is already quantized ({model.quantized[0]})")
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; use one of {', '.join(FORMATS)}")
    head = DEFAULT_HEAD if head is None else head
    names = [name for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and mod.in_features % QK == 0 and (name != head_name or head)]
    for name in names:
        parent_name, _, child = name.rpartition('.')
        parent, lin = model.get_submodule(parent_name), model.get_submodule(name)
        setattr(parent, child, QLinear(fmt, lin.in_features, lin.out_features, quantize(lin.weight, fmt), lin.bias))
    model.quantized = (fmt, head)
    return model.eval()


def weight_bytes(model):
    """Bytes of every parameter and buffer: what a token's decoding reads (the embedding row aside)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ---------------------------------------------------------------------------------------------------------------------
# files: safetensors with the packed tensors and what is needed to rebuild the model

def save_quantized(model, path, model_type, tokenizer=None):
    """One .safetensors file: the quantized model's state dict (packed tensors, scales, the fp32 rest) and, in its
    metadata, the format, the model type and config, and the tokenizer; load_quantized needs nothing else."""
    from dataclasses import asdict

    from safetensors.torch import save_file
    fmt, head = model.quantized
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model_type == 'gpt' and 'lm_head.weight' in state:
        state.pop('transformer.wte.weight')  # tied to the float head
    meta = {'format': 'pt', 'nanorwkv': 'quantized', 'version': str(FILE_VERSION), 'quantization': fmt,
            'head': 'quantized' if head else 'fp32', 'model_type': model_type,
            'model_args': json.dumps(asdict(model.config)), 'tokenizer': json.dumps(tokenizer or {'tokenizer': 'gpt2'})}
    save_file(state, str(path), metadata=meta)


def is_quantized_file(path):
    path = Path(path)
    if not path.is_file() or path.suffix != '.safetensors':
        return False
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        return (f.metadata() or {}).get('nanorwkv') == 'quantized'


def load_quantized(path, expect=None):
    """(model, model_type, tokenizer spec) from a file save_quantized wrote; expect: the model type it must hold."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from checkpoint import build_model
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata() or {}
    if meta.get('nanorwkv') != 'quantized':
        raise ValueError(f"{path} is not a quantized nanoRWKV file (no 'nanorwkv: quantized' in its metadata)")
    if int(meta.get('version', 0)) > FILE_VERSION:
        raise ValueError(f"{path} is version {meta['version']} of the quantized layout; this code reads up to "
                         f"{FILE_VERSION}: update nanoRWKV")
    model_type, fmt, head = meta['model_type'], meta['quantization'], meta['head'] == 'quantized'
    if expect and model_type != expect:
        raise ValueError(f"{path} holds a quantized {model_type}, not {'an RWKV' if expect == 'rwkv' else 'a GPT'}")
    with torch.device('meta'):
        model = build_model(model_type, json.loads(meta['model_args']))
    model.to_empty(device='cpu')
    model.quantize_(fmt, head=head)  # the structure; the values come from the file
    state = load_file(str(path))
    if model_type == 'gpt' and 'transformer.wte.weight' not in state:
        state['transformer.wte.weight'] = state['lm_head.weight']
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its own model config: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    return model.eval(), model_type, json.loads(meta['tokenizer'])


# ---------------------------------------------------------------------------------------------------------------------
# rwkv.cpp model files (RWKV/rwkv.cpp docs/FILE_FORMAT.md): a header of six int32 (magic 'ggmf', version, n_vocab,
# n_embed, n_layer, data type), then per tensor (dim count, key length, data type, the shape reversed, the key, the
# data). FP32 and FP16 files are version 100 (the same in 101, and what the April-2023 library reads); quantized ones
# version 101, whose blocks are ggml's current ones: q8_0 = fp16 d + 32 int8, q4_0 = fp16 d + 16 bytes,
# q5_1 = fp16 d, fp16 m, uint32 qh, 16 bytes. As rwkv.cpp does, the embedding and the head stay unquantized, the
# time_* vectors are squeezed to (n_embed,), time_decay is stored as -exp(time_decay), and 1-D tensors are FP32.

RWKVCPP_TYPES = {'FP32': 0, 'FP16': 1, 'Q4_0': 2, 'Q5_1': 8, 'Q8_0': 9}
RWKVCPP_MAGIC = 0x67676d66


def ggml_blocks(W, fmt):
    """W (O, I) as the bytes of ggml blocks of `fmt` ('q8_0', 'q4_0', 'q5_1'), row after row."""
    import numpy as np
    t = quantize(W, fmt)
    O, nb = t['d'].shape
    parts = [t['d'].numpy().view(np.uint8).reshape(O, nb, 2)]
    if fmt == 'q5_1':
        parts += [t['m'].numpy().view(np.uint8).reshape(O, nb, 2),
                  t['qh'].numpy().astype('<i4').view(np.uint8).reshape(O, nb, 4)]
    qs = t['q'].numpy().view(np.uint8).reshape(O, nb, -1)  # 32 int8 (q8_0) or 16 packed bytes
    return np.concatenate(parts + [qs], axis=-1).tobytes()


def save_rwkvcpp(model, path, data_type='FP32'):
    """Write an RWKV-4 model as an rwkv.cpp file of data_type FP32, FP16, Q8_0, Q5_1 or Q4_0."""
    import struct
    if data_type not in RWKVCPP_TYPES:
        raise ValueError(f"rwkv.cpp data type must be one of {', '.join(RWKVCPP_TYPES)}, got {data_type!r}")
    if model.config.version != 4:
        raise ValueError(f"the rwkv.cpp format written here is RWKV-4's; this model is RWKV-{model.config.version}: "
                         f"export it as an official .pth (--format=pth) or quantize it (--format=int8, ...)")
    state = model.plain_state_dict()  # RWKV-LM's names and values, fp32; refuses MoE / hybrids
    V, C = state['emb.weight'].shape
    version = 100 if data_type in ('FP32', 'FP16') else 101
    with open(path, 'wb') as f:
        f.write(struct.pack('<6i', RWKVCPP_MAGIC, version, V, C, model.config.n_layer, RWKVCPP_TYPES[data_type]))
        for k, t in state.items():
            if '.time_' in k:
                t = t.reshape(-1)  # (1, 1, C) -> (C,)
            if k.endswith('.time_decay'):
                t = -torch.exp(t)
            kind = 'FP32'
            if t.dim() == 2 and data_type == 'FP16':
                kind = 'FP16'
            elif t.dim() == 2 and data_type != 'FP32' and k not in ('emb.weight', 'head.weight'):
                kind = data_type
            key = k.encode('utf-8')
            f.write(struct.pack(f'<3i{t.dim()}i', t.dim(), len(key), RWKVCPP_TYPES[kind], *reversed(t.shape)))
            f.write(key)
            if kind == 'FP32':
                f.write(t.numpy().astype('<f4').tobytes())
            elif kind == 'FP16':
                f.write(t.half().numpy().astype('<f2').tobytes())
            else:
                f.write(ggml_blocks(t, kind.lower()))


class RwkvCpp:
    """rwkv.cpp's shared library through ctypes, to check our files against it and to race it (tests,
    benchmarks/bench_decode.py). The library is not a dependency: the one that runs offline is the April-2023 x86-64
    build inside the PyPI sdist rwkv-cpp-python==0.0.1 (rwkv/ under _skbuild/); point NANORWKV_RWKVCPP_LIB at its
    librwkv.so or copy it to ~/.cache/nanorwkv/rwkvcpp/. It reads file version 100 (FP32, FP16 and its own old
    quantized layouts)."""

    def __init__(self, path=None):
        import ctypes
        import os
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
        import os
        import sys
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
