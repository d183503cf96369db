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

A quantized model is for inference: QLinear has no backward and refuses training mode. Its files (a .safetensors of
the packed tensors, rwkv.cpp's model files) are interop.py's.
"""
import torch
import torch.nn as nn

FORMATS = ('int8', 'q8_0', 'q5_1', 'q4_0', 'int4')
FMT_ID = {'int8': 0, 'q8_0': 1, 'q4_0': 2, 'q5_1': 3, 'int4': 4}  # the kernel's numbering (qlinear.h)
QK = 32
# The head is quantized by default, in every format: on the trained char models of README's Results it costs <= 0.01%
# perplexity at 8 bits and 0.1-0.4 points of a percent at 4-5 bits (all far inside 0.5% / 1.5% / 3%), while an fp32
# head is a third of what a 169M model reads per token (rwkv.cpp keeps it fp32, and reads 3x more at Q4_0).
DEFAULT_HEAD = True
FILE_VERSION = 1  # of the quantized .safetensors layout (interop.save_quantized)


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


_kernel = []  # the built extension, once found (a layer calls kernel() per token)


def kernel():
    if _kernel:
        return _kernel[0]
    from wkv_cuda import build_hint, get_extension
    ext = get_extension('cpu')
    if isinstance(ext, Exception):
        raise RuntimeError(f"quantized inference needs the compiled CPU kernel, which failed to build: "
                           f"{build_hint('cpu', ext)}")
    _kernel.append(ext)
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
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        y = kernel().qlinear(x2, FMT_ID[self.fmt], *self.operands())
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def operands(self):
        """(q, d, m, qh) as the kernel takes them: scales and offsets in float32 (ggml's fp16 values convert exactly),
        empty tensors where a format has none. Converted once, and again only if a buffer changed (load_state_dict
        writes in place: the version counter moves)."""
        key = tuple((t.data_ptr(), t._version) for t in self._buffers.values())  # this module's own
        if getattr(self, '_key', None) != key:
            get = lambda n, f: f(getattr(self, n)) if hasattr(self, n) else torch.empty(0)  # noqa: E731
            self._ops = (self.q, get('d', torch.Tensor.float), get('m', torch.Tensor.float), get('qh', lambda t: t))
            self._key = key
        return self._ops

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}"


class DecodeLinear(nn.Linear):
    """An fp32 nn.Linear for decoding (RWKV.layout_for_decoding_ turns a model's nn.Linears into these): one input
    row on the CPU without a gradient runs the compiled one-row product of qlinear_cpu.cpp (flinear_cpu), which
    streams the weight rows in order on every thread where a BLAS's matrix-vector path uses one; anything else (a
    batch, training, torch.compile, another device) is F.linear. The parameters and state dict are nn.Linear's."""

    def forward(self, x):
        if (x.numel() == self.in_features and x.dtype == self.weight.dtype == torch.float32 and x.device.type == 'cpu'
                and self.weight.is_contiguous() and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            from wkv_cuda import get_extension
            ext = get_extension('cpu')
            if not isinstance(ext, Exception):  # a failed build was announced by the WKV op: F.linear serves
                y = ext.flinear(x.reshape(1, -1).contiguous(), self.weight)
                if self.bias is not None:
                    y += self.bias
                return y.view(*x.shape[:-1], self.out_features)
        return nn.functional.linear(x, self.weight, self.bias)


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
    if not names:
        widths = sorted({mod.in_features for mod in model.modules() if isinstance(mod, nn.Linear)})
        raise ValueError(f"no matrix of this model can be quantized to {fmt}: their input widths {widths} are not "
                         f"multiples of {QK}; train with an n_embd (and dim_ffn) that is")
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
# ggml's blocks as bytes (what rwkv.cpp files hold: interop.save_rwkvcpp)

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
