"""
RWKV language models in one file, versions 4, 5, 6 and 7 of BlinkDL's RWKV-LM with its parameter names
(emb -> ln0 -> [x + TimeMix(ln1(x)), x + ChannelMix(ln2(x))] x n_layer -> ln_out -> head), its initialisation
(`generate_init_weight`) and the L2Wrap loss trick. `RWKVConfig.version` picks the time mix and channel mix:
- 4: RWKV-v4neo/src/model.py (the WKV op of wkv_cuda/, a weighted average with one decay per channel);
- 5 (5.2, x052) and 5.1 (x051a, MicroRWKV's model: one decay per head): RWKV-v5/src/model.py RWKV_Tmix_x052, a
  matrix-valued state per head with a constant decay, a SiLU gate and a GroupNorm ln_x;
- 6 (x060): RWKV-v5/src/model.py RWKV_Tmix_x060, v5.2 plus data-dependent token shift (a LoRA "ddlerp") and decay;
- 7 (x070): RWKV-v7/train_temp/src/model.py RWKV_Tmix_x070, the generalized delta rule, a value residual to layer 0's
  value and a receptance-free channel mix.
Every version's WKV op has a compiled CPU and CUDA kernel (wkv_cuda/) and a pure-PyTorch reference; the config's
wkv_backend picks ('auto': the kernel of the tensors' device).

Two ways to run the same weights, through the same blocks:
- parallel mode, `forward(idx, targets)` / `prefill(idx, state)`: a whole chunk at once, the WKV op over time;
- RNN mode, `step(token, state)`: one token (T = 1), constant memory, the recurrence of RWKV-v4neo/src/model_run.py.
Both carry the RNN state: per layer the last input of time mix and of channel mix (token shift) and the WKV sums
(`State`, RWKV-4) or the per-head matrix (`MatrixState`, RWKV-5/6/7).

The file in sections: shared pieces · the config · RWKV-4 · RWKV-5, 5.1 and 6 · RWKV-7 · the model (states, Block,
RWKV). Every time mix is called the same way, (x, x_prev, state, v_first) -> (y, state, v_first).

Options of MicroRWKV, done so that every mode stays exact and causal (defaults off: the model is RWKV-4 exactly):
- dropout, where RWKV-LM puts it (on the residual stream after each time mix and channel mix);
- a top-k mixture-of-experts channel mix (moe.py; RWKV-4): the experts share their layer's token shift;
- hybrid layers (RWKV-4): the time mix of the blocks in attn_layers is causal softmax attention (attention.py: optional
  sliding window and grouped-query attention); in RNN mode such a layer carries a KV cache (a ring buffer of
  attn_window entries when windowed) beside the RWKV state, in a HybridState.

References: Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era" (arXiv:2305.13048); Peng et al. 2024,
"Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence" (arXiv:2404.05892); Peng et al. 2025,
"RWKV-7 Goose with Expressive Dynamic State Evolution" (arXiv:2503.14456); https://github.com/BlinkDL/RWKV-LM.
"""
import math
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from attention import CausalSelfAttention, check_attention
from moe import MoE, check_moe
from sampling import generate_tokens
from wkv_cuda import BACKENDS, initial_state, resolve_backend, wkv
from wkv_cuda.wkv5 import wkv5
from wkv_cuda.wkv7 import wkv7


# ---------------------------------------------------------------------------------------------------------------------
# shared pieces: the loss trick, the init curves, token shift

class L2Wrap(torch.autograd.Function):
    """Identity on the loss; in backward adds a small gradient pushing each position's largest logit towards 0
    (RWKV-v4neo/src/model.py L2Wrap: factor 1e-4 / (B*T)). We scale that gradient by grad_output so that it stays
    in proportion under gradient accumulation and fp16 loss scaling (RWKV-LM uses neither, so there it is the same).
    n_positions is the B*T of the whole sample when the logits are one segment of it (bptt.py)."""

    @staticmethod
    def forward(ctx, loss, logits, n_positions=None):
        ctx.save_for_backward(logits)
        ctx.n_positions = n_positions or logits.shape[0] * logits.shape[1]
        return loss.clone()  # a new tensor, not the input itself (which autograd would treat as a view)

    @staticmethod
    def backward(ctx, grad_output):
        logits, = ctx.saved_tensors  # (B, T, V)
        factor = 1e-4 / ctx.n_positions
        maxx, ids = torch.max(logits, -1, keepdim=True)
        glogits = torch.zeros_like(logits)
        glogits.scatter_(-1, ids, maxx * factor * grad_output)
        return grad_output, glogits, None


def channel_ramp(C):
    """i / C for i in 0..C-1, shaped (1, 1, C): the base of RWKV-v4neo's time_mix curves."""
    return (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)


def layer_ratios(layer_id, n_layer):
    """RWKV-LM's init curves' exponents: ratio_0_to_1 (0 at the first layer, 1 at the last; max(.., 1) keeps
    n_layer = 1 defined) and ratio_1_to_almost0 (1 down to 1/n_layer)."""
    return layer_id / max(n_layer - 1, 1), 1.0 - layer_id / n_layer


def token_shift(x, x_prev):
    """x (B, T, C) delayed by one token, x_prev (B, C) in front: each position sees the one before it."""
    return torch.cat([x_prev.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)  # (B, T, C)


def at_least_fp32(x):
    """x in fp32, or fp64 for a fp64 model: the decays and the state never run in bf16/fp16 (RWKV-LM keeps w fp32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def ortho(rows, cols, scale):
    """An orthogonal (rows, cols) matrix of gain scale * sqrt(rows / cols) when tall: RWKV-v7/train_temp/src/model.py
    ortho_init."""
    w = torch.empty(rows, cols)
    nn.init.orthogonal_(w, gain=scale * (math.sqrt(rows / cols) if rows > cols else 1.0))
    return w


# ---------------------------------------------------------------------------------------------------------------------
# the config

VERSIONS = ('4', '5', '5.1', '6', '7')


def version_name(version):
    """An RWKV-LM version as RWKVConfig keeps it, a string: 7, 7.0 and '7' are '7'; 5.1 is '5.1'."""
    return f'{version:g}' if isinstance(version, (int, float)) and not isinstance(version, bool) else version


@dataclass
class RWKVConfig:
    block_size: int = 1024  # training context length; the model itself has no context limit
    vocab_size: int = 50277  # GPT-NeoX tokenizer, as the RWKV-4 Pile models
    n_layer: int = 12
    n_embd: int = 768
    dim_ffn: int = 0  # 0 means RWKV-LM's: 4 * n_embd (versions 4 and 7), 3.5 * n_embd rounded down to 32 (5, 6)
    emb_init: float = 1e-4  # emb.weight ~ U(-emb_init, emb_init); RWKV-v4neo: lr_init (train.py too), v5-v7: 1e-4
    version: str = '4'  # '4' | '5' (5.2, x052) | '5.1' (x051a, MicroRWKV's) | '6' (x060) | '7' (x070); 7 reads '7'
    head_size: int = 64  # versions 5-7: channels per head of the matrix-valued state (n_head = n_embd / head_size)
    lora_dims: tuple = ()  # versions 6 (mix, decay) and 7 (decay, a, v, gate): LoRA widths; () = RWKV-LM's defaults
    wkv_backend: str = 'auto'  # 'auto' | 'cuda' | 'cpu' | 'torch': the WKV op's implementation (wkv_cuda/)
    rescale_every: int = 0  # > 0: weights rescaled for fp16 (RWKV.rescale_for_fp16), x halves every N layers
    dropout: float = 0.0  # RWKV-LM's: on the residual stream after each time mix and channel mix, in training
    moe_experts: int = 0  # > 0: each channel mix is a top-k mixture of this many experts (moe.py)
    moe_top_k: int = 1  # experts per token
    moe_aux_coef: float = 0.01  # weight of the load-balancing loss in the training loss (Switch Transformer's alpha)
    attn_layers: tuple = ()  # blocks whose time mix is causal softmax attention (a hybrid)
    n_head: int = 4  # the attention layers' query heads
    attn_window: int = 0  # > 0: an attention layer sees the last attn_window tokens (Mistral); 0 = all before
    attn_kv_heads: int = 0  # grouped-query attention: K/V heads shared by the n_head query heads; 0 = n_head
    state_tuning: bool = False  # versions 5-7: each layer's initial WKV state is a parameter, att.time_state

    @staticmethod
    def rwkv_lm_emb_init(version, learning_rate):
        """RWKV-LM's range of the uniform embedding init: the learning rate (lr_init) in RWKV-v4neo, 1e-4 in RWKV-v5
        and v7 (train.py's choice for a new model)."""
        return learning_rate if version_name(version) == '4' else 1e-4

    @property
    def wkv_op(self):
        """The wkv_cuda kernel this version's time mix runs: 'wkv4', 'wkv5' (RWKV-5, 5.1 and 6) or 'wkv7'."""
        return {'4': 'wkv4', '7': 'wkv7'}.get(self.version, 'wkv5')

    def __post_init__(self):
        for key in ('block_size', 'vocab_size', 'n_layer', 'n_embd'):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be at least 1")
        if self.wkv_backend not in BACKENDS:
            raise ValueError(f"wkv_backend must be one of {', '.join(BACKENDS)}, got {self.wkv_backend!r}")
        version = version_name(self.version)
        if version not in VERSIONS:
            raise ValueError(f"version={self.version!r} must be one of {', '.join(VERSIONS)}")
        self.version = version
        if self.version != '4':
            if self.head_size < 1 or self.n_embd % self.head_size:
                raise ValueError(f"n_embd={self.n_embd} must be a multiple of head_size={self.head_size} (RWKV-"
                                 f"{self.version}'s heads); set head_size to a divisor of n_embd")
            if self.moe_experts or self.attn_layers:
                raise ValueError("moe_experts and attn_layers are options of RWKV-4 (version='4') only")
        elif self.state_tuning:
            raise ValueError("state tuning learns the initial per-head matrix state of RWKV-5, 5.1, 6 and 7; RWKV-4's "
                             "state is running sums and a maximum: tune the weights (finetune='full') instead")
        if self.version == '6' and not self.lora_dims:
            self.lora_dims = (32, 64)  # RWKV-v5/src/model.py RWKV_Tmix_x060: D_MIX_LORA, D_DECAY_LORA
        if self.version == '7' and not self.lora_dims:  # RWKV-v7/train_temp/src/model.py: D_DECAY/AAA/MV/GATE_LORA
            self.lora_dims = tuple(max(32, int(round(f * self.n_embd ** 0.5 / 32) * 32)) for f in (2.5, 2.5, 1.7, 5))
        self.lora_dims = tuple(self.lora_dims)  # a checkpoint stores a list
        want = {'6': 2, '7': 4}.get(self.version, 0)
        if len(self.lora_dims) != want or any(d < 1 for d in self.lora_dims):
            raise ValueError(f"lora_dims={list(self.lora_dims)}: version {self.version} takes {want} positive widths")
        if self.dim_ffn == 0:
            if self.version in ('4', '7'):
                self.dim_ffn = 4 * self.n_embd
            else:  # RWKV-v5/src/model.py: int((n_embd * 3.5) // 32 * 32), never 0 for a tiny model
                self.dim_ffn = int(self.n_embd * 3.5) // 32 * 32 or int(self.n_embd * 3.5)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        check_moe(self.moe_experts, self.moe_top_k, self.moe_aux_coef)
        self.attn_layers = tuple(self.attn_layers)  # a checkpoint stores a list
        bad = [i for i in self.attn_layers if not 0 <= i < self.n_layer]
        if bad or len(set(self.attn_layers)) != len(self.attn_layers):
            raise ValueError(f"attn_layers={list(self.attn_layers)} must be distinct block indices in "
                             f"0..{self.n_layer - 1}")
        if self.attn_layers:
            check_attention(self.n_embd, self.n_head, self.attn_kv_heads, self.attn_window)


# ---------------------------------------------------------------------------------------------------------------------
# RWKV-4 (its channel mix is RWKV-5/5.1/6's too)

class TimeMix(nn.Module):

    def __init__(self, config, layer_id):
        super().__init__()
        C = config.n_embd
        self.backend = config.wkv_backend
        # RWKV-v4neo/src/model.py RWKV_TimeMix.__init__ "fancy init"
        ratio_0_to_1, ratio_1_to_almost0 = layer_ratios(layer_id, config.n_layer)
        h = torch.arange(C, dtype=torch.float32)
        self.time_decay = nn.Parameter(-5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1))  # (C,)
        zigzag = 0.5 * (((h + 1) % 3) - 1)  # 0.5, -0.5, 0, 0.5, ...
        self.time_first = nn.Parameter(torch.full((C,), math.log(0.3)) + zigzag)  # (C,)
        ramp = channel_ramp(C)
        self.time_mix_k = nn.Parameter(ramp ** ratio_1_to_almost0)  # (1, 1, C)
        self.time_mix_v = nn.Parameter(ramp ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1)
        self.time_mix_r = nn.Parameter(ramp ** (0.5 * ratio_1_to_almost0))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def forward(self, x, x_prev, sums, v_first=None):
        # x (B, T, C), any T (RNN mode: 1); x_prev (B, C) the input before x[:, 0]; sums (aa, bb, pp) each (B, C)
        xx = token_shift(x, x_prev)  # (B, T, C)
        # lerp(xx, x, m) = x * m + xx * (1 - m), RWKV-LM's mixing in one op
        k = self.key(torch.lerp(xx, x, self.time_mix_k))
        v = self.value(torch.lerp(xx, x, self.time_mix_v))
        r = self.receptance(torch.lerp(xx, x, self.time_mix_r))
        y, sums = wkv(self.time_decay, self.time_first, k, v, sums, self.backend)
        return self.output(torch.sigmoid(r) * y), sums, v_first


def squared_relu_mix(m, xk, xr):
    """RWKV-4's feed-forward on the token-mixed inputs, for a module m with key, receptance and value."""
    k = torch.square(torch.relu(m.key(xk)))  # squared ReLU
    return torch.sigmoid(m.receptance(xr)) * m.value(k)


class Expert(nn.Module):
    """One expert of a mixture-of-experts channel mix: a channel mix's three matrices, without the token shift."""

    def __init__(self, C, dim_ffn):
        super().__init__()
        self.key = nn.Linear(C, dim_ffn, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(dim_ffn, C, bias=False)

    def forward(self, xk, xr):
        return squared_relu_mix(self, xk, xr)


class ChannelMix(nn.Module):
    """RWKV-4/5/6 channel mix: squared-ReLU feed-forward gated by a receptance, on token-shifted inputs. Versions 4
    and 5 mix as time_mix (RWKV-v4neo, RWKV_CMix_x052), 5.1 and 6 as time_maa = 1 - time_mix (x051a, RWKV_CMix_x060)."""

    def __init__(self, config, layer_id):
        super().__init__()
        C = config.n_embd
        ratio_1_to_almost0 = 1.0 - layer_id / config.n_layer  # RWKV-v4neo RWKV_ChannelMix.__init__
        ramp = channel_ramp(C)
        if config.version in ('5.1', '6'):
            self.time_maa_k = nn.Parameter(1.0 - ramp ** ratio_1_to_almost0)  # (1, 1, C)
            self.time_maa_r = nn.Parameter(1.0 - ramp ** ratio_1_to_almost0)
        else:
            self.time_mix_k = nn.Parameter(ramp ** ratio_1_to_almost0)  # (1, 1, C)
            self.time_mix_r = nn.Parameter(ramp ** ratio_1_to_almost0)
        if config.moe_experts:  # experts in place of the three matrices, all reading this token shift
            self.moe = MoE(C, [Expert(C, config.dim_ffn) for _ in range(config.moe_experts)], config.moe_top_k)
        else:
            self.key = nn.Linear(C, config.dim_ffn, bias=False)
            self.receptance = nn.Linear(C, C, bias=False)
            self.value = nn.Linear(config.dim_ffn, C, bias=False)

    def forward(self, x, x_prev):
        # x (B, T, C); x_prev (B, C) the input before x[:, 0]
        xx = token_shift(x, x_prev)
        if hasattr(self, 'time_maa_k'):
            xk, xr = torch.lerp(x, xx, self.time_maa_k), torch.lerp(x, xx, self.time_maa_r)
        else:
            xk, xr = torch.lerp(xx, x, self.time_mix_k), torch.lerp(xx, x, self.time_mix_r)
        return self.moe(x, xk, xr) if hasattr(self, 'moe') else squared_relu_mix(self, xk, xr)


# ---------------------------------------------------------------------------------------------------------------------
# RWKV-5, 5.1 and 6

def decay_and_bonus(C, ratio_0_to_1):
    """RWKV-v5/src/model.py RWKV_Tmix_x052 / x060 init of time_decay and time_faaaa, (C,) each."""
    n = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
    zigzag = ((torch.arange(C) + 1) % 3 - 1) * 0.1
    return -6 + 5 * n ** (0.7 + 1.3 * ratio_0_to_1), ratio_0_to_1 * (1 - n) + zigzag


def add_projections(m, C, H):
    """RWKV-5/6's receptance, key, value, gate and output (C x C, no bias) and the GroupNorm ln_x on module m. RWKV-LM
    divides x by head_size_divisor 8 before GroupNorm(eps=1e-5): the same as eps = 64e-5 on x (the rwkv pip
    package's form)."""
    for name in ('receptance', 'key', 'value', 'gate', 'output'):
        setattr(m, name, nn.Linear(C, C, bias=False))
    m.ln_x = nn.GroupNorm(H, C, eps=64e-5)


class TimeMix5(nn.Module):
    """RWKV-5 time mix. version 5 (5.2): RWKV-v5/src/model.py RWKV_Tmix_x052, a decay and bonus per channel;
    version 5.1: MicroRWKV's x051a (BlinkDL/nanoRWKV model.py RWKV_TimeMix_x051a), one decay and bonus per head and
    the token shift written x + (x_prev - x) * time_maa (= RWKV-LM's time_mix form with time_maa = 1 - time_mix)."""

    def __init__(self, config, layer_id):
        super().__init__()
        C, N = config.n_embd, config.head_size
        H = C // N
        self.n_head, self.backend = H, config.wkv_backend
        ratio_0_to_1, ratio_1_to_almost0 = layer_ratios(layer_id, config.n_layer)
        ramp = channel_ramp(C)  # (1, 1, C)
        mix_k = ramp ** ratio_1_to_almost0
        mix_v = ramp ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1
        mix_r = ramp ** (0.5 * ratio_1_to_almost0)
        if config.version == '5.1':  # x051a
            self.time_maa_k, self.time_maa_v = nn.Parameter(1 - mix_k), nn.Parameter(1 - mix_v)
            self.time_maa_r, self.time_maa_g = nn.Parameter(1 - mix_r), nn.Parameter(1 - mix_r.clone())
            h = torch.arange(H, dtype=torch.float32) / max(H - 1, 1)
            self.time_decay = nn.Parameter((-6 + 5 * h ** (0.7 + 1.3 * ratio_0_to_1)).view(H, 1))
            self.time_faaaa = nn.Parameter((ratio_0_to_1 * (1 - h)).view(H, 1))
        else:  # x052
            self.time_mix_k, self.time_mix_v = nn.Parameter(mix_k), nn.Parameter(mix_v)
            self.time_mix_r, self.time_mix_g = nn.Parameter(mix_r), nn.Parameter(mix_r.clone())
            decay, bonus = decay_and_bonus(C, ratio_0_to_1)
            self.time_decay, self.time_faaaa = nn.Parameter(decay.view(H, N)), nn.Parameter(bonus.view(H, N))
        add_projections(self, C, H)

    def forward(self, x, x_prev, S, v_first=None):
        # x (B, T, C), any T (RNN mode: 1); x_prev (B, C) the input before x[:, 0]; S (B, H, K, V) the state before x
        B, T, C = x.shape
        H, N = self.n_head, C // self.n_head
        xx = token_shift(x, x_prev)
        if hasattr(self, 'time_maa_k'):
            xk, xv, xr, xg = (torch.lerp(x, xx, m) for m in (self.time_maa_k, self.time_maa_v, self.time_maa_r,
                                                                 self.time_maa_g))
        else:
            xk, xv, xr, xg = (torch.lerp(xx, x, m) for m in (self.time_mix_k, self.time_mix_v, self.time_mix_r,
                                                                 self.time_mix_g))
        r, k, v = (f(z).view(B, T, H, N) for f, z in ((self.receptance, xr), (self.key, xk), (self.value, xv)))
        g = F.silu(self.gate(xg))
        logw = -torch.exp(at_least_fp32(self.time_decay)).expand(H, N).expand(B, T, H, N)  # w = exp(-exp(decay))
        y, S = wkv5(r, k, v, logw, self.time_faaaa.expand(H, N), S, self.backend)  # y (B, T, H, N)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g), S, v_first


class TimeMix6(nn.Module):
    """RWKV-6 time mix, RWKV-v5/src/model.py RWKV_Tmix_x060: RWKV-5.2 with a data-dependent token shift (each of
    w, k, v, r, g mixes x and x_prev by time_maa_* plus a LoRA of the input: "ddlerp") and a data-dependent decay."""
    low_rank = ('time_maa_w1', 'time_decay_w1', 'time_decay_w2')  # (in, out) matrices of x @ m (time_maa_w2: 3-D)

    def __init__(self, config, layer_id):
        super().__init__()
        C, N = config.n_embd, config.head_size
        H = C // N
        self.n_head, self.backend = H, config.wkv_backend
        ratio_0_to_1, ratio_1_to_almost0 = layer_ratios(layer_id, config.n_layer)
        ramp = channel_ramp(C)  # (1, 1, C)
        self.time_maa_x = nn.Parameter(1.0 - ramp ** ratio_1_to_almost0)
        self.time_maa_w = nn.Parameter(1.0 - ramp ** ratio_1_to_almost0)
        self.time_maa_k = nn.Parameter(1.0 - ramp ** ratio_1_to_almost0)
        self.time_maa_v = nn.Parameter(1.0 - (ramp ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1))
        self.time_maa_r = nn.Parameter(1.0 - ramp ** (0.5 * ratio_1_to_almost0))
        self.time_maa_g = nn.Parameter(1.0 - ramp ** (0.5 * ratio_1_to_almost0))
        d_mix, d_decay = config.lora_dims  # RWKV-LM: 32 and 64
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, d_mix * 5))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, d_mix, C).uniform_(-0.01, 0.01))
        decay, bonus = decay_and_bonus(C, ratio_0_to_1)
        self.time_decay = nn.Parameter(decay.view(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, d_decay))
        self.time_decay_w2 = nn.Parameter(torch.zeros(d_decay, C).uniform_(-0.01, 0.01))
        self.time_faaaa = nn.Parameter(bonus.view(H, N))
        add_projections(self, C, H)

    def forward(self, x, x_prev, S, v_first=None):
        # x (B, T, C); x_prev (B, C); S (B, H, K, V)
        B, T, C = x.shape
        H, N = self.n_head, C // self.n_head
        xx = token_shift(x, x_prev) - x
        xxx = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1)  # (B, T, 5 * d_mix)
        xxx = xxx.view(B * T, 5, -1).transpose(0, 1) @ self.time_maa_w2  # (5, B*T, C): one LoRA per w, k, v, r, g
        mw, mk, mv, mr, mg = xxx.view(5, B, T, C).unbind(0)
        xw, xk = x + xx * (self.time_maa_w + mw), x + xx * (self.time_maa_k + mk)
        xv, xr = x + xx * (self.time_maa_v + mv), x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)
        r, k, v = (f(z).view(B, T, H, N) for f, z in ((self.receptance, xr), (self.key, xk), (self.value, xv)))
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2  # (B, T, C)
        logw = -torch.exp(at_least_fp32(w)).view(B, T, H, N)  # w_t = exp(-exp(w)), per token
        y, S = wkv5(r, k, v, logw, self.time_faaaa, S, self.backend)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        return self.output(y * g), S, v_first


# ---------------------------------------------------------------------------------------------------------------------
# RWKV-7

class TimeMix7(nn.Module):
    """RWKV-7 time mix, RWKV-v7/train_temp/src/model.py RWKV_Tmix_x070 (its "slow pytorch version" lines): the
    generalized delta rule (wkv_cuda/wkv7.py) with decay exp(-e^-0.5 sigmoid(.)), in-context learning rate a, the
    L2-normalised removal key kk, the value residual to layer 0's value (v_first) and the r_k bonus."""
    low_rank = ('w1', 'w2', 'a1', 'a2', 'v1', 'v2', 'g1', 'g2')  # the (in, out) matrices of x @ m

    def __init__(self, config, layer_id):
        super().__init__()
        C, N = config.n_embd, config.head_size
        H = C // N
        self.n_head, self.layer_id, self.backend = H, layer_id, config.wkv_backend
        ratio_0_to_1, ratio_1_to_almost0 = layer_ratios(layer_id, config.n_layer)
        ramp = channel_ramp(C)  # (1, 1, C)
        self.x_r = nn.Parameter(1.0 - ramp ** (0.2 * ratio_1_to_almost0))
        self.x_w = nn.Parameter(1.0 - ramp ** (0.9 * ratio_1_to_almost0))
        self.x_k = nn.Parameter(1.0 - ramp ** (0.7 * ratio_1_to_almost0))
        self.x_v = nn.Parameter(1.0 - ramp ** (0.7 * ratio_1_to_almost0))
        self.x_a = nn.Parameter(1.0 - ramp ** (0.9 * ratio_1_to_almost0))
        self.x_g = nn.Parameter(1.0 - ramp ** (0.2 * ratio_1_to_almost0))
        n = torch.arange(C, dtype=torch.float32)
        linear = n / max(C - 1, 1) - 0.5
        half = max(N - 1, 1) / 2
        zigzag = ((n % N) - half) / half
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / max(C - 1, 1)) ** (1 + ratio_0_to_1 ** 0.3)
        d_decay, d_a, d_v, d_gate = config.lora_dims
        self.w0 = nn.Parameter((www + 0.5 + zigzag * 2.5).view(1, 1, C))
        self.w1 = nn.Parameter(torch.zeros(C, d_decay))
        self.w2 = nn.Parameter(ortho(d_decay, C, 0.1))
        self.a0 = nn.Parameter((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        self.a1 = nn.Parameter(torch.zeros(C, d_a))
        self.a2 = nn.Parameter(ortho(d_a, C, 0.1))
        if layer_id > 0:  # RWKV-LM creates these in layer 0 too, unused there; save_pth writes them for the key set
            self.v0 = nn.Parameter((0.73 - linear * 0.4).view(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, d_v))
            self.v2 = nn.Parameter(ortho(d_v, C, 0.1))
        self.g1 = nn.Parameter(torch.zeros(C, d_gate))
        self.g2 = nn.Parameter(ortho(d_gate, C, 0.1))
        self.k_k = nn.Parameter((0.71 - linear * 0.1).view(1, 1, C))
        self.k_a = nn.Parameter(torch.full((1, 1, C), 1.02))
        self.r_k = nn.Parameter(torch.full((H, N), -0.04))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(self, x, x_prev, S, v_first):
        # x (B, T, C); x_prev (B, C); S (B, H, V, K); v_first (B, T, C) layer 0's value (None into layer 0)
        B, T, C = x.shape
        H, N = self.n_head, C // self.n_head
        xx = token_shift(x, x_prev) - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r = self.receptance(xr)
        w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:  # value residual: mix in layer 0's value, by a data-dependent gate
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate, (B, T, C)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)  # (B, T, H, N)
        k = k * (1 + (a - 1) * self.k_a)
        # decay exp(-e^-0.5 sigmoid(w)): RWKV-LM's kernel takes w' = -softplus(-w) - 0.5 and uses exp(-exp(w'))
        logw = -math.exp(-0.5) * torch.sigmoid(at_least_fp32(w))
        r4, k4, v4 = r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N)
        y, S = wkv7(r4, logw.view(B, T, H, N), k4, v4, -kk, kk * a.view(B, T, H, N), S, self.backend)
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        y = y + ((r4 * k4 * self.r_k).sum(-1, keepdim=True) * v4).view(B, T, C)  # the current token's bonus
        return self.output(y * g), S, v_first


class ChannelMix7(nn.Module):
    """RWKV-7 channel mix, RWKV-v7/train_temp/src/model.py RWKV_CMix_x070: squared ReLU, no receptance."""

    def __init__(self, config, layer_id):
        super().__init__()
        C = config.n_embd
        ratio_1_to_almost0 = 1.0 - layer_id / config.n_layer
        self.x_k = nn.Parameter(1.0 - channel_ramp(C) ** (ratio_1_to_almost0 ** 4))  # (1, 1, C)
        self.key = nn.Linear(C, config.dim_ffn, bias=False)
        self.value = nn.Linear(config.dim_ffn, C, bias=False)

    def forward(self, x, x_prev):
        k = x + (token_shift(x, x_prev) - x) * self.x_k
        return self.value(torch.relu(self.key(k)) ** 2)


# ---------------------------------------------------------------------------------------------------------------------
# the model: its state, its blocks, the network

class State(NamedTuple):
    """The RWKV-4 RNN state: what the model needs of the past, in fp32 (fp64 for a fp64 model) whatever the weights'
    dtype. Each slot is (B, C) for one layer, or (n_layer, B, C) for the whole model (RWKV.initial_state)."""
    x_att: torch.Tensor  # time mix's last input (its token shift)
    aa: torch.Tensor  # WKV numerator sum, scaled by e^-pp
    bb: torch.Tensor  # WKV denominator sum, scaled by e^-pp
    pp: torch.Tensor  # the largest exponent seen so far
    x_ffn: torch.Tensor  # channel mix's last input

    def time_state(self):
        return self.aa, self.bb, self.pp

    def moved(self, x_att, time_state, x_ffn):
        """The state after a block: its new last inputs and the time mix's new slots."""
        return State(x_att.to(self.x_att.dtype), *time_state, x_ffn.to(self.x_ffn.dtype))

    def layer(self, i):
        return State(*(s[i] for s in self))

    @staticmethod
    def stack(layers):
        return State(*(torch.stack(s) for s in zip(*layers)))


class MatrixState(NamedTuple):
    """The RWKV-5/6/7 RNN state, fp32 (fp64 for a fp64 model): x_att and x_ffn (B, C) as in State, and the per-head
    matrix wkv (B, H, N, N), laid out as the rwkv pip package's: [key, value] in versions 5 and 6, [value, key] in 7.
    With a leading n_layer dimension for the whole model."""
    x_att: torch.Tensor
    wkv: torch.Tensor
    x_ffn: torch.Tensor

    def time_state(self):
        return self.wkv

    def moved(self, x_att, time_state, x_ffn):
        return MatrixState(x_att.to(self.x_att.dtype), time_state, x_ffn.to(self.x_ffn.dtype))

    def layer(self, i):
        return MatrixState(*(s[i] for s in self))

    @staticmethod
    def stack(layers):
        return MatrixState(*(torch.stack(s) for s in zip(*layers)))


class HybridState(NamedTuple):
    """The state of a model with attention layers (attn_layers): the RWKV State of every layer (in an attention layer
    only x_ffn moves; its time-mix slots stay as they start) and each attention layer's KVCache (attention.py),
    None before the first token. The State stays one (n_layer, B, C) tensor per slot, as RWKV-LM and the rwkv
    package hold it, rather than a ragged per-layer structure: an attention layer's four idle slots are 4 B C
    floats, nothing beside its cache."""
    rnn: State
    kv: tuple


TIME_MIXES = {'4': TimeMix, '5': TimeMix5, '5.1': TimeMix5, '6': TimeMix6, '7': TimeMix7}  # by RWKVConfig.version


class Block(nn.Module):

    def __init__(self, config, layer_id):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(config.n_embd)  # RWKV-LM normalises the embedding inside block 0
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.attention = layer_id in config.attn_layers
        if self.attention:  # no bias, as every RWKV matrix
            self.att = CausalSelfAttention(config.n_embd, config.n_head, config.attn_kv_heads, config.attn_window)
        else:
            self.att = TIME_MIXES[config.version](config, layer_id)
        self.ffn = (ChannelMix7 if config.version == '7' else ChannelMix)(config, layer_id)
        if config.state_tuning:  # RWKV-PEFT's state tuning (its RWKV_Tmix_x070_State, x060_State): zeros at first
            self.att.time_state = nn.Parameter(torch.zeros(config.n_embd // config.head_size, config.head_size,
                                                           config.head_size))
        # RWKV-v4neo/src/model.py Block.forward: x = drop0(x + att(ln1(x))), x = drop1(x + ffn(ln2(x)))
        self.drop0 = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.drop1 = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def forward(self, x, state, cache=None, v_first=None, use_cache=True):
        """x (B, T, C), any T (RNN mode: 1), after `state` (this layer's, slots (B, ...)) and, in an attention layer,
        its KVCache. Returns x, the state after x, the cache after x (None in an RWKV layer, or without use_cache)
        and RWKV-7's v_first (layer 0's value, (B, T, C), that later layers mix in; None in other versions). Every
        time mix takes (x, x_prev, its state, v_first) and returns (y, its state, v_first); attention takes its cache
        and leaves the RWKV slots as they are."""
        if hasattr(self, 'ln0'):  # block 0 normalises the embedding (RWKV-v4neo Block.forward)
            x = self.ln0(x)
        xa = self.ln1(x)
        if self.attention:
            dx, cache = self.att(xa, cache, use_cache)
            time_state, x_att = state.time_state(), state.x_att
        else:
            dx, time_state, v_first = self.att(xa, state.x_att, state.time_state(), v_first)
            x_att = xa[:, -1]  # taken after the time mix ran: autograd sums xa's gradients in the order it always did
        x = self.drop0(x + dx)
        xf = self.ln2(x)
        x = self.drop1(x + self.ffn(xf, state.x_ffn))
        return x, state.moved(x_att, time_state, xf[:, -1]), cache, v_first


class RWKV(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.activation_checkpointing = False  # train.py's flag: recompute each block in backward
        self.last_moe_aux = None  # an MoE model's load-balancing loss of the last training forward, for logging
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        # RWKV-v4neo/src/model.py generate_init_weight: LayerNorms and time_* keep their constructor values; matrices
        # are orthogonal with gain sqrt(rows / cols) when tall, the "output-side" projections start at zero, the head
        # at gain 0.5, and the embedding is uniform and tiny. Our options follow the same rule: an expert's
        # receptance and value and an attention layer's output projection start at zero, the router and c_attn
        # orthogonal.
        if self.config.version != '4':
            return self._init_weights_matrix_state()
        zero = re.compile(r'\.(att\.(key|receptance|output|c_proj)|ffn\.(moe\.experts\.\d+\.)?(value|receptance))\.')
        for n, p in self.named_parameters():
            if p.dim() != 2:
                continue
            if n == 'emb.weight':
                nn.init.uniform_(p, -self.config.emb_init, self.config.emb_init)
            elif zero.search(n):
                nn.init.zeros_(p)
            else:
                gain = math.sqrt(p.shape[0] / p.shape[1]) if p.shape[0] > p.shape[1] else 1.0
                nn.init.orthogonal_(p, gain=gain * (0.5 if n == 'head.weight' else 1.0))

    @torch.no_grad()
    def _init_weights_matrix_state(self):
        # RWKV-v5/src/model.py and RWKV-v7/train_temp/src/model.py generate_init_weight: what is not a '.weight'
        # matrix keeps its constructor value (time_*, the LoRAs, v7's x_*, w0, a0, k_k, ...), except ln_x.weight =
        # ((1 + layer) / n_layer)^0.7; the matrices are orthogonal of gain 1, att.key and att.gate 0.1, att.output,
        # ffn.value and ffn.receptance zero, the head 0.5 sqrt(V / C) when V > C (else 0.5), and the embedding is
        # U(-emb_init, emb_init) (RWKV-LM: 1e-4). In RWKV-7 this overwrites the constructor's uniform receptance, key,
        # value and ffn.key.
        V, C = self.config.vocab_size, self.config.n_embd
        for n, p in self.named_parameters():
            if n.endswith('ln_x.weight'):
                p.fill_(((1 + int(n.split('.')[1])) / self.config.n_layer) ** 0.7)
            elif n == 'emb.weight':
                nn.init.uniform_(p, -self.config.emb_init, self.config.emb_init)
            elif n == 'head.weight':
                nn.init.orthogonal_(p, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
            elif n.endswith('.weight') and p.dim() == 2:
                if re.search(r'\.(att\.output|ffn\.value|ffn\.receptance)\.', n):
                    nn.init.zeros_(p)
                else:
                    nn.init.orthogonal_(p, gain=0.1 if re.search(r'\.att\.(key|gate)\.', n) else 1.0)

    def fsdp_units(self):
        """The modules FSDP shards one by one (train.py): each block, its parameters gathered only while it runs."""
        return list(self.blocks)

    def build_kernels(self, device):
        """Build (or load) the compiled WKV kernel this model runs on `device`, so that a failed build is a
        RuntimeError of one line before training starts rather than in its first step."""
        resolve_backend(self.config.wkv_backend, torch.device(device), self.config.wkv_op)

    def enable_state_tuning(self):
        """Give every layer a learnable initial WKV state (att.time_state, zeros: the model's function is unchanged
        until it is trained), in place; versions 5-7. train.py --finetune=state trains only these."""
        if not self.config.state_tuning:
            RWKVConfig(**{**asdict(self.config), 'state_tuning': True})  # the config's own checks, e.g. RWKV-4
            self.config.state_tuning = True
            H, N = self.config.n_embd // self.config.head_size, self.config.head_size
            for block in self.blocks:
                block.att.time_state = nn.Parameter(torch.zeros(H, N, N, device=self.emb.weight.device))
        return self

    def get_num_params(self, non_embedding=True):
        """Parameter count; the embedding is a lookup (no FLOPs) and is left out by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.emb.weight.numel() if non_embedding else n

    def initial_state(self, B, device=None):
        """The State of an empty history, slots (n_layer, B, C): pp = -1e38, the rest 0. A hybrid's is a
        HybridState of that State and an empty KV cache per attention layer. RWKV-5/6/7: a MatrixState of zeros, or
        with state_tuning the learned att.time_state of each layer as its wkv."""
        device = device or self.emb.weight.device
        dtype = torch.promote_types(self.emb.weight.dtype, torch.float32)  # fp32, or fp64 for a fp64 model
        L, C = self.config.n_layer, self.config.n_embd
        if self.config.version != '4':
            N = self.config.head_size
            zeros = torch.zeros(L, B, C, device=device, dtype=dtype)
            if self.config.state_tuning:  # the learned start, differentiable: train.py's state tuning learns it
                wkv = torch.stack([b.att.time_state for b in self.blocks]).to(device, dtype)[:, None]
                return MatrixState(zeros, wkv.repeat(1, B, 1, 1, 1), zeros)
            return MatrixState(zeros, torch.zeros(L, B, C // N, N, N, device=device, dtype=dtype), zeros)
        aa, bb, pp = initial_state(B, C, device, dtype)
        zeros = torch.zeros(L, B, C, device=device, dtype=dtype)
        state = State(zeros, aa.expand(L, B, C), bb.expand(L, B, C), pp.expand(L, B, C), zeros)
        return HybridState(state, (None,) * len(self.config.attn_layers)) if self.config.attn_layers else state

    def _body(self, x, state, use_cache):
        # x: embeddings (B, T, C); returns ln_out(x) and the state after x (the KV caches only with use_cache)
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        rnn, caches = (state.rnn, iter(state.kv)) if self.config.attn_layers else (state, iter(()))
        layers, new_caches, v_first = [], [], None
        r = self.config.rescale_every
        for i, block in enumerate(self.blocks):
            cache = next(caches) if block.attention else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; its activations are recomputed in backward (dropout too: the RNG
                # state is replayed)
                x, s, cache, v_first = torch.utils.checkpoint.checkpoint(block, x, rnn.layer(i), cache, v_first,
                                                                         use_cache, use_reentrant=False)
            else:
                x, s, cache, v_first = block(x, rnn.layer(i), cache, v_first, use_cache)
            layers.append(s)
            if block.attention:
                new_caches.append(cache)
            if r > 0 and (i + 1) % r == 0:
                x = x / 2  # RWKV-v4neo/src/model_run.py RESCALE_LAYER: keeps fp16 activations in range
        rnn = type(rnn).stack(layers)
        return self.ln_out(x), (HybridState(rnn, tuple(new_caches)) if self.config.attn_layers else rnn)

    def moe_aux_loss(self):
        """The mean over layers of the MoE load-balancing losses of the last forward (moe.py)."""
        losses = [block.ffn.moe.aux_loss for block in self.blocks]
        return sum(losses) / len(losses)

    def loss(self, logits, targets, n_tokens=None):
        """The training objective of logits (B, T, V): the mean cross-entropy, or for a segment of a longer sample
        (bptt.py) its summed cross-entropy / n_tokens (the targets the whole sample counts: its B * T without a loss
        mask), so that the segments' losses add up to the sample's mean loss (and L2Wrap's gradient to the sample's).
        Targets of -1 (masked out by a loss mask) are not counted. In training, L2Wrap and moe_aux_coef x the MoE
        load-balancing loss (this segment's share of it; detached in self.last_moe_aux for logging); in eval the
        cross-entropy alone, comparable with other models."""
        if n_tokens is None:  # the mean over the targets counted (-1: masked out), 0 when there are none
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction='sum') / (targets >= 0).sum().clamp_min(1)
        else:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction='sum') / n_tokens
        if self.training:
            loss = L2Wrap.apply(loss, logits, n_tokens)
            if self.config.moe_experts:
                aux = self.moe_aux_loss()
                self.last_moe_aux = aux.detach()
                share = 1.0 if n_tokens is None else (targets >= 0).sum() / n_tokens  # this segment's targets
                loss = loss + self.config.moe_aux_coef * aux * share
        return loss

    def forward(self, idx, targets=None, state=None, n_tokens=None):
        """(output, loss), nanoGPT's convention, which train.py, sample.py and GPT share: idx, targets (B, T) ->
        logits (B, T, V) and the loss (self.loss); without targets, the last position's logits (B, 1, V) and None.
        A segment of a longer sample (bptt.py) passes the `state` it starts from and n_tokens, and its output is the
        state after it (with its loss): no (T, C) or (T, V) tensor outlives the call. bptt calls the module itself,
        not a method, because DDP and FSDP do their work (gradient sync, gathering the shards) in the module's
        __call__; inference from a state is prefill / step."""
        if state is not None and targets is None:
            raise ValueError("forward with a state is a training segment and needs targets; run inference from a "
                             "state with prefill(idx, state) or step(token, state)")
        x, new_state = self._body(self.emb(idx), state, use_cache=state is not None)  # (B, T, C)
        if state is not None:
            return new_state, self.loss(self.head(x), targets, n_tokens)
        if targets is None:
            return self.head(x[:, [-1], :]), None  # (B, 1, V): inference needs only the last position
        logits = self.head(x)  # (B, T, V)
        return logits, self.loss(logits, targets)

    def prefill(self, idx, state=None, last_only=False):
        """Parallel mode over a chunk idx (B, T), starting from `state` (None = empty history).
        Returns logits (B, T, V), or with last_only (B, 1, V) for the last position only (generation needs no more,
        and the head is the largest matrix), and the state after the chunk."""
        x, state = self._body(self.emb(idx), state, use_cache=True)
        return self.head(x[:, -1:] if last_only else x), state

    def step(self, token, state=None):
        """RNN mode: one token per sequence, token (B,). Returns logits (B, V) and the new state. The same blocks as
        prefill with T = 1; each op takes its one-token form at that length (wkv_cuda)."""
        x, state = self._body(self.emb(token)[:, None], state, use_cache=True)
        return self.head(x[:, 0]), state

    @torch.no_grad()
    def rescale_for_fp16(self, every=6):
        """RWKV-LM's fp16 inference trick (RWKV-v4neo/src/model_run.py): divide att.output and ffn.value of layer i
        by 2^(i // every) and halve x after every `every` layers. The same function in exact arithmetic, but fp16
        activations stay in range. Only for inference: it changes what the weights mean."""
        if self.config.moe_experts or self.config.attn_layers:
            raise ValueError("rescale_for_fp16: MoE channel mixes and attention layers have no att.output / "
                             "ffn.value to rescale")
        if self.config.rescale_every:
            raise ValueError(f"the weights are already rescaled (rescale_every={self.config.rescale_every})")
        for i, block in enumerate(self.blocks):
            block.att.output.weight.div_(2 ** (i // every))
            block.ffn.value.weight.div_(2 ** (i // every))
        self.config.rescale_every = every
        return self

    @torch.no_grad()
    def layout_for_decoding_(self):
        """Make one-sequence decoding (RNN mode at batch 1) on a CPU run at memory speed, in place; values and results
        are unchanged. torch's matrix-vector product at batch 1 uses one thread and reads a weight at ~10 GB/s, so the
        nn.Linears become quantize.DecodeLinear (the same module and parameters), whose one-row product streams each
        weight row in order on every thread (wkv_cuda/qlinear_cpu.cpp flinear_cpu: the 65536 x 768 head at 20 GB/s
        and a 768 x 768 at 22 on one thread of a 2-core EPYC). RWKV-6/7's low-rank matrices, read by x @ m, are
        stored along their longer side, which that product reads faster (m (768, 64): 6.5 -> 8.2 GB/s). Training the
        model afterwards still works. generate() calls this on a CPU model; call it yourself before a loop of
        step()s (benchmarks/bench_decode.py times both)."""
        from quantize import DecodeLinear

        def long_rows(m):  # m as x @ m reads it, (in, out)
            with torch.inference_mode(False):  # called under inference_mode, still ordinary tensors to train later
                return m.contiguous() if m.shape[1] >= m.shape[0] else m.t().contiguous().t()
        for module in self.modules():
            if type(module) is nn.Linear:
                module.__class__ = DecodeLinear  # the same module and parameters, with DecodeLinear's forward
            for name in getattr(module, 'low_rank', ()):
                if hasattr(module, name):
                    getattr(module, name).data = long_rows(getattr(module, name).data)
        return self

    def quantize_(self, fmt, head=None):
        """Quantize the weight matrices in place for CPU inference (quantize.py): fmt one of int8, q8_0, q5_1, q4_0,
        int4; head=None takes quantize.DEFAULT_HEAD (True). The embedding, LayerNorms and time_* vectors stay fp32."""
        from quantize import quantize_model
        return quantize_model(self, fmt, head, 'head')

    # the files of RWKV-LM, transformers and export.py: interop.py reads and writes them; these are its front doors
    @classmethod
    def from_pretrained(cls, name_or_path, wkv_backend='auto'):
        """An official BlinkDL .pth of any version, a Hugging Face RWKV-4 directory, a hub name
        RWKV/rwkv-4-{169m,430m,1b5,3b,7b,14b}-pile or a quantized .safetensors of export.py (interop.load_rwkv)."""
        from interop import load_rwkv
        return load_rwkv(name_or_path, wkv_backend)

    def save_pretrained(self, directory):
        """A Hugging Face directory that transformers loads as RwkvForCausalLM (RWKV-4; interop.save_rwkv_hf)."""
        from interop import save_rwkv_hf
        save_rwkv_hf(self, directory)

    def save_pth(self, path):
        """An official .pth that RWKV-LM and the rwkv pip package load (any version; interop.save_pth)."""
        from interop import save_pth
        save_pth(self, path)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, lr_scale=True):
        """AdamW; weight decay only on the 2-D '.weight' matrices (not LayerNorms, the time_* vectors, the LoRAs nor
        RWKV-7's w0, a0, ...). With lr_scale, RWKV-LM's layerwise_lr: time_decay (RWKV-4/5/6) and RWKV-7's w0 at 2x,
        RWKV-4's time_first at 3x the learning rate (RWKV-v4neo, RWKV-v5 and RWKV-v7/train_temp src/model.py
        configure_optimizers). train.py's schedule multiplies each group's lr by its 'lr_scale'."""
        groups = {'decay': [], 'no_decay': [], 'lr_2x': [], 'lr_3x': []}
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if lr_scale and (n.endswith('time_decay') or n.endswith('att.w0')):
                groups['lr_2x'].append(p)
            elif lr_scale and n.endswith('time_first'):
                groups['lr_3x'].append(p)
            elif p.dim() == 2 and n.endswith('.weight'):
                groups['decay'].append(p)
            else:
                groups['no_decay'].append(p)
        scale_and_decay = {'decay': (1.0, weight_decay), 'no_decay': (1.0, 0.0), 'lr_2x': (2.0, 0.0),
                           'lr_3x': (3.0, 0.0)}
        optim_groups = [{'params': ps, 'weight_decay': scale_and_decay[g][1], 'lr_scale': scale_and_decay[g][0]}
                        for g, ps in groups.items() if ps]
        fused = device_type == 'cuda'
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self):
        """Training FLOPs per token: every weight matrix a token uses is used once in a matmul, 2 FLOPs per weight
        forward and 4 backward, hence 6 * (matrix params): the Linears and the LoRA matrices of RWKV-6 (time_*_w1,
        time_*_w2) and RWKV-7 (w1, w2, a1, ...); an MoE layer's experts count top_k / moe_experts (a token visits
        top_k of them). The embedding is a lookup. The WKV recurrence and the other elementwise work are not matmul
        FLOPs and, as softmax in the GPT count (PaLM appendix B), are not counted; an attention layer's scores and
        weighted sum are, as in model_gpt.py."""
        cfg = self.config
        lora = re.compile(r'(_w[12]|\.att\.[wavg][12])$')
        n_matmul = 0
        for n, p in self.named_parameters():
            if n != 'emb.weight' and (p.dim() == 2 and n.endswith('.weight') or lora.search(n)):
                n_matmul += p.numel() * (cfg.moe_top_k / cfg.moe_experts if '.experts.' in n else 1)
        return 6 * n_matmul + sum(b.att.flops_per_token(cfg.block_size) for b in self.blocks if b.attention)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved matmul FLOP/s over the device's peak FLOP/s."""
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, mode='rnn', on_token=None,
                 stop_token=None):
        """Continue idx (B, T) by max_new_tokens. mode='rnn': prefill the prompt in parallel, then one step per
        token (constant cost per token). mode='parallel': re-run the whole sequence for every token.
        on_token(id) is called with each new token of the first sequence; generation ends early once every
        sequence has produced stop_token. On a CPU the matrices are first laid out for decoding
        (layout_for_decoding_: same values)."""
        if mode not in ('rnn', 'parallel'):
            raise ValueError(f"mode must be 'rnn' or 'parallel', got {mode!r}")
        if idx.device.type == 'cpu':
            self.layout_for_decoding_()
        if mode == 'rnn':
            logits, state = self.prefill(idx, last_only=True)

            def advance(idx):
                nonlocal state
                logits, state = self.step(idx[:, -1], state)
                return logits
            logits = logits[:, -1]  # (B, V)
        else:
            def advance(idx):
                return self(idx)[0][:, -1]  # (B, V)
            logits = advance(idx)
        return generate_tokens(advance, logits, idx, max_new_tokens, temperature, top_k, top_p, on_token,
                               stop_token)
