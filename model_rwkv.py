"""
RWKV-4 language model in one file, the same network as BlinkDL's RWKV-LM `RWKV-v4neo/src/model.py`
(emb -> ln0 -> [x + TimeMix(ln1(x)), x + ChannelMix(ln2(x))] x n_layer -> ln_out -> head), with its initialisation
(`generate_init_weight`) and the L2Wrap loss trick. Parameter names match RWKV-LM's checkpoints.

Two ways to run the same weights:
- parallel mode, `forward(idx, targets)` / `prefill(idx, state)`: a whole chunk at once, the WKV op over time;
- RNN mode, `step(token, state)`: one token, constant memory, the recurrence of RWKV-v4neo/src/model_run.py.
Both carry a `State`: per layer the last input of time mix and of channel mix (token shift) and the WKV sums.

Options of MicroRWKV, done so that every mode stays exact and causal (defaults off: the model is RWKV-4 exactly):
- dropout, where RWKV-LM puts it (on the residual stream after each time mix and channel mix);
- a top-k mixture-of-experts channel mix (moe.py): the experts share their layer's token shift;
- hybrid layers: the time mix of the blocks in attn_layers is causal softmax attention (attention.py: optional
  sliding window and grouped-query attention); in RNN mode such a layer carries a KV cache (a ring buffer of
  attn_window entries when windowed) beside the RWKV state, in a HybridState.

References: Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era" (arXiv:2305.13048);
https://github.com/BlinkDL/RWKV-LM (RWKV-v4neo).
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from attention import CausalSelfAttention, check_attention
from checkpoint import hub_or_local, load_hf_directory, load_state_checked
from moe import MoE, check_moe
from sampling import generate_tokens
from wkv_cuda import BACKENDS, initial_state, wkv, wkv_step


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


class TimeMix(nn.Module):

    def __init__(self, config, layer_id):
        super().__init__()
        C = config.n_embd
        self.backend = config.wkv_backend
        # RWKV-v4neo/src/model.py RWKV_TimeMix.__init__ "fancy init"; max(.., 1) keeps n_layer=1 defined
        ratio_0_to_1 = layer_id / max(config.n_layer - 1, 1)
        ratio_1_to_almost0 = 1.0 - layer_id / config.n_layer
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

    def forward(self, x, x_prev, sums):
        # parallel mode: x (B, T, C); x_prev (B, C) the input before x[:, 0]; sums (aa, bb, pp) each (B, C)
        xx = torch.cat([x_prev.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)  # token shift, (B, T, C)
        # lerp(xx, x, m) = x * m + xx * (1 - m), RWKV-LM's mixing in one op
        k = self.key(torch.lerp(xx, x, self.time_mix_k))
        v = self.value(torch.lerp(xx, x, self.time_mix_v))
        r = self.receptance(torch.lerp(xx, x, self.time_mix_r))
        y, sums = wkv(self.time_decay, self.time_first, k, v, sums, self.backend)
        return self.output(torch.sigmoid(r) * y), sums

    def step(self, x, x_prev, sums):
        # RNN mode: x (B, C), one token; the recurrence as in RWKV-v4neo/src/model_run.py
        aa, bb, pp = sums
        xx = x_prev.to(x.dtype)
        k = self.key(torch.lerp(xx, x, self.time_mix_k[0]))  # (B, C)
        v = self.value(torch.lerp(xx, x, self.time_mix_v[0]))
        r = self.receptance(torch.lerp(xx, x, self.time_mix_r[0]))
        w = -torch.exp(self.time_decay.to(aa.dtype))
        y, aa, bb, pp = wkv_step(w, self.time_first.to(aa.dtype), k.to(aa.dtype), v.to(aa.dtype), aa, bb, pp)
        return self.output(torch.sigmoid(r) * y.to(x.dtype)), (aa, bb, pp)


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

    def __init__(self, config, layer_id):
        super().__init__()
        C = config.n_embd
        ratio_1_to_almost0 = 1.0 - layer_id / config.n_layer  # RWKV-v4neo RWKV_ChannelMix.__init__
        ramp = channel_ramp(C)
        self.time_mix_k = nn.Parameter(ramp ** ratio_1_to_almost0)  # (1, 1, C)
        self.time_mix_r = nn.Parameter(ramp ** ratio_1_to_almost0)
        if config.moe_experts:  # experts in place of the three matrices, all reading this token shift
            self.moe = MoE(C, [Expert(C, config.dim_ffn) for _ in range(config.moe_experts)], config.moe_top_k)
        else:
            self.key = nn.Linear(C, config.dim_ffn, bias=False)
            self.receptance = nn.Linear(C, C, bias=False)
            self.value = nn.Linear(config.dim_ffn, C, bias=False)

    def mix(self, x, xx, time_mix_k, time_mix_r):
        xk, xr = torch.lerp(xx, x, time_mix_k), torch.lerp(xx, x, time_mix_r)
        return self.moe(x, xk, xr) if hasattr(self, 'moe') else squared_relu_mix(self, xk, xr)

    def forward(self, x, x_prev):
        # parallel mode: x (B, T, C); x_prev (B, C) the input before x[:, 0]
        xx = torch.cat([x_prev.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)  # token shift, (B, T, C)
        return self.mix(x, xx, self.time_mix_k, self.time_mix_r)

    def step(self, x, x_prev):
        # RNN mode: x (B, C)
        return self.mix(x, x_prev.to(x.dtype), self.time_mix_k[0], self.time_mix_r[0])


class State(NamedTuple):
    """The RNN state: what the model needs of the past, in fp32 (fp64 for a fp64 model) whatever the weights' dtype.
    Each slot is (B, C) for one layer, or (n_layer, B, C) for the whole model (RWKV.initial_state)."""
    x_att: torch.Tensor  # time mix's last input (its token shift)
    aa: torch.Tensor  # WKV numerator sum, scaled by e^-pp
    bb: torch.Tensor  # WKV denominator sum, scaled by e^-pp
    pp: torch.Tensor  # the largest exponent seen so far
    x_ffn: torch.Tensor  # channel mix's last input

    def layer(self, i):
        return State(*(s[i] for s in self))

    @staticmethod
    def stack(layers):
        return State(*(torch.stack(s) for s in zip(*layers)))


class HybridState(NamedTuple):
    """The state of a model with attention layers (attn_layers): the RWKV State of every layer (in an attention layer
    only x_ffn moves; its time-mix slots stay as they start) and each attention layer's KVCache (attention.py),
    None before the first token."""
    rnn: State
    kv: tuple


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
            self.att = TimeMix(config, layer_id)
        self.ffn = ChannelMix(config, layer_id)
        # RWKV-v4neo/src/model.py Block.forward: x = drop0(x + att(ln1(x))), x = drop1(x + ffn(ln2(x)))
        self.drop0 = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.drop1 = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def forward(self, x, state, cache=None):
        """Parallel mode: x (B, T, C) after `state` (this layer's, slots (B, C)) and, in an attention layer, its
        KVCache. Returns x, the state after x and the cache after x (None in an RWKV layer)."""
        if hasattr(self, 'ln0'):  # block 0 normalises the embedding (RWKV-v4neo Block.forward)
            x = self.ln0(x)
        xa = self.ln1(x)
        if self.attention:
            dx, cache = self.att(xa, cache)
            x_att, aa, bb, pp = state.x_att, state.aa, state.bb, state.pp
        else:
            dx, (aa, bb, pp) = self.att(xa, state.x_att, (state.aa, state.bb, state.pp))
            x_att = xa[:, -1].to(aa.dtype)
        x = self.drop0(x + dx)
        xf = self.ln2(x)
        x = self.drop1(x + self.ffn(xf, state.x_ffn))
        return x, State(x_att, aa, bb, pp, xf[:, -1].to(aa.dtype)), cache

    def step(self, x, state, cache=None):
        """RNN mode: x (B, C), one token after `state` (and the KVCache of an attention layer). Returns x and the
        new state and cache."""
        if hasattr(self, 'ln0'):
            x = self.ln0(x)
        xa = self.ln1(x)
        if self.attention:
            dx, cache = self.att(xa[:, None], cache)  # a sequence of one
            dx = dx[:, 0]
            x_att, aa, bb, pp = state.x_att, state.aa, state.bb, state.pp
        else:
            dx, (aa, bb, pp) = self.att.step(xa, state.x_att, (state.aa, state.bb, state.pp))
            x_att = xa.to(aa.dtype)
        x = x + dx
        xf = self.ln2(x)
        x = x + self.ffn.step(xf, state.x_ffn)
        return x, State(x_att, aa, bb, pp, xf.to(aa.dtype)), cache


@dataclass
class RWKVConfig:
    block_size: int = 1024  # training context length; the model itself has no context limit
    vocab_size: int = 50277  # GPT-NeoX tokenizer, as the RWKV-4 Pile models
    n_layer: int = 12
    n_embd: int = 768
    dim_ffn: int = 0  # 0 means 4 * n_embd (RWKV-4)
    emb_init: float = 1e-4  # emb.weight ~ U(-emb_init, emb_init); RWKV-v4neo uses lr_init here, and so does train.py
    wkv_backend: str = 'auto'  # 'auto' | 'cuda' | 'cpu' | 'torch'
    rescale_every: int = 0  # > 0: weights rescaled for fp16 (RWKV.rescale_for_fp16), x halves every N layers
    dropout: float = 0.0  # RWKV-LM's: on the residual stream after each time mix and channel mix, in training
    moe_experts: int = 0  # > 0: each channel mix is a top-k mixture of this many experts (moe.py)
    moe_top_k: int = 1  # experts per token
    moe_aux_coef: float = 0.01  # weight of the load-balancing loss in the training loss (Switch Transformer's alpha)
    attn_layers: tuple = ()  # blocks whose time mix is causal softmax attention (a hybrid)
    n_head: int = 4  # the attention layers' query heads
    attn_window: int = 0  # > 0: an attention layer sees the last attn_window tokens (Mistral); 0 = all before
    attn_kv_heads: int = 0  # grouped-query attention: K/V heads shared by the n_head query heads; 0 = n_head

    def __post_init__(self):
        for key in ('block_size', 'vocab_size', 'n_layer', 'n_embd'):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be at least 1")
        if self.wkv_backend not in BACKENDS:
            raise ValueError(f"wkv_backend must be one of {', '.join(BACKENDS)}, got {self.wkv_backend!r}")
        if self.dim_ffn == 0:
            self.dim_ffn = 4 * self.n_embd
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

    def get_num_params(self, non_embedding=True):
        """Parameter count; the embedding is a lookup (no FLOPs) and is left out by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.emb.weight.numel() if non_embedding else n

    def initial_state(self, B, device=None):
        """The State of an empty history, slots (n_layer, B, C): pp = -1e38, the rest 0. A hybrid's is a
        HybridState of that State and an empty KV cache per attention layer."""
        device = device or self.emb.weight.device
        dtype = torch.promote_types(self.emb.weight.dtype, torch.float32)  # fp32, or fp64 for a fp64 model
        L, C = self.config.n_layer, self.config.n_embd
        aa, bb, pp = initial_state(B, C, device, dtype)
        zeros = torch.zeros(L, B, C, device=device, dtype=dtype)
        state = State(zeros, aa.expand(L, B, C), bb.expand(L, B, C), pp.expand(L, B, C), zeros)
        return HybridState(state, (None,) * len(self.config.attn_layers)) if self.config.attn_layers else state

    def _body(self, x, state, run):
        # x: embeddings, (B, T, C) for run='forward', (B, C) for run='step'; returns ln_out(x) and the new state
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        rnn, caches = (state.rnn, iter(state.kv)) if self.config.attn_layers else (state, iter(()))
        layers, new_caches = [], []
        r = self.config.rescale_every
        for i, block in enumerate(self.blocks):
            cache = next(caches) if block.attention else None
            if run == 'step':
                x, s, cache = block.step(x, rnn.layer(i), cache)
            elif self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; its activations are recomputed in backward (dropout too: the RNG
                # state is replayed)
                x, s, cache = torch.utils.checkpoint.checkpoint(block, x, rnn.layer(i), cache, use_reentrant=False)
            else:
                x, s, cache = block(x, rnn.layer(i), cache)
            layers.append(s)
            if block.attention:
                new_caches.append(cache)
            if r > 0 and (i + 1) % r == 0:
                x = x / 2  # RWKV-v4neo/src/model_run.py RESCALE_LAYER: keeps fp16 activations in range
        rnn = State.stack(layers)
        return self.ln_out(x), (HybridState(rnn, tuple(new_caches)) if self.config.attn_layers else rnn)

    def moe_aux_loss(self):
        """The mean over layers of the MoE load-balancing losses of the last forward (moe.py)."""
        losses = [block.ffn.moe.aux_loss for block in self.blocks]
        return sum(losses) / len(losses)

    def forward(self, idx, targets=None, state=None, n_tokens=None):
        """idx, targets (B, T) -> logits (B, T, V) and the mean loss; without targets, the last position's logits.
        A segment of a longer sample (bptt.py) passes the `state` it starts from and n_tokens, the sample's B * T:
        then the return is (its summed loss / n_tokens, the state after it), so the segments' losses add up to the
        sample's mean loss (and L2Wrap's gradient to the sample's) and no (T, C) or (T, V) tensor outlives it."""
        x, new_state = self._body(self.emb(idx), state, 'forward')  # (B, T, C)
        moe = self.config.moe_experts and self.training
        if state is not None:
            logits = self.head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction='sum') / n_tokens
            if self.training:
                loss = L2Wrap.apply(loss, logits, n_tokens)
            if moe:  # this segment's share of the sample's load-balancing loss
                aux = self.moe_aux_loss()
                self.last_moe_aux = aux.detach()
                loss = loss + self.config.moe_aux_coef * aux * (idx.numel() / n_tokens)
            return loss, new_state
        if targets is not None:
            logits = self.head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            if self.training:
                loss = L2Wrap.apply(loss, logits)
            if moe:  # in training only: the eval loss is the cross-entropy alone, comparable with other models
                aux = self.moe_aux_loss()
                self.last_moe_aux = aux.detach()
                loss = loss + self.config.moe_aux_coef * aux
        else:
            logits = self.head(x[:, [-1], :])  # (B, 1, V): inference needs only the last position
            loss = None
        return logits, loss

    def prefill(self, idx, state=None):
        """Parallel mode over a chunk idx (B, T), starting from `state` (None = empty history).
        Returns logits (B, T, V) and the State after the chunk."""
        x, state = self._body(self.emb(idx), state, 'forward')
        return self.head(x), state

    def step(self, token, state=None):
        """RNN mode: one token per sequence, token (B,). Returns logits (B, V) and the new State."""
        x, state = self._body(self.emb(token), state, 'step')
        return self.head(x), state

    @torch.no_grad()
    def rescale_for_fp16(self, every=6):
        """RWKV-LM's fp16 inference trick (RWKV-v4neo/src/model_run.py): divide att.output and ffn.value of layer i
        by 2^(i // every) and halve x after every `every` layers. The same function in exact arithmetic, but fp16
        activations stay in range. Only for inference: it changes what the weights mean."""
        self.check_rwkv4('rescale_for_fp16')
        if self.config.rescale_every:
            raise ValueError(f"the weights are already rescaled (rescale_every={self.config.rescale_every})")
        for i, block in enumerate(self.blocks):
            block.att.output.weight.div_(2 ** (i // every))
            block.ffn.value.weight.div_(2 ** (i // every))
        self.config.rescale_every = every
        return self

    def quantize_(self, fmt, head=None):
        """Quantize the weight matrices in place for CPU inference (quantize.py): fmt one of int8, q8_0, q5_1, q4_0,
        int4; head=None takes quantize.DEFAULT_HEAD (True). The embedding, LayerNorms and time_* vectors stay fp32."""
        from quantize import quantize_model
        return quantize_model(self, fmt, head, 'head')

    def check_rwkv4(self, what):
        """The RWKV-4 of RWKV-LM and transformers has no MoE nor attention layers: no file of theirs can hold them."""
        if self.config.moe_experts or self.config.attn_layers:
            has = 'MoE channel mixes' if self.config.moe_experts else 'attention layers'
            raise ValueError(f"{what}: this model has {has}, which RWKV-LM's and transformers' RWKV-4 do not; keep "
                             f"train.py's checkpoint instead")

    def plain_state_dict(self):
        """The weights in RWKV-LM's own form (never rescaled), fp32 on the CPU, RWKV-LM's names."""
        self.check_rwkv4('export')
        if getattr(self, 'quantized', None):
            raise ValueError(f"the model is quantized ({self.quantized[0]}): export the float model it came from")
        state = {k: v.detach().float().cpu().clone() for k, v in self.state_dict().items()}
        r = self.config.rescale_every
        for i in range(self.config.n_layer if r else 0):
            for name in (f'blocks.{i}.att.output.weight', f'blocks.{i}.ffn.value.weight'):
                state[name] *= 2 ** (i // r)
        return state

    HUB_NAMES = tuple(f'RWKV/rwkv-4-{size}-pile' for size in ('169m', '430m', '1b5', '3b', '7b', '14b'))

    @classmethod
    def from_pretrained(cls, name_or_path, wkv_backend='auto'):
        """RWKV-4 from an official BlinkDL .pth file (RWKV-4-Pile-*.pth; shapes inferred from the tensors), a local
        Hugging Face format directory (config.json + model.safetensors / pytorch_model.bin), a hub name
        RWKV/rwkv-4-{169m,430m,1b5,3b,7b,14b}-pile (downloaded once), or a quantized .safetensors of export.py."""
        from quantize import is_quantized_file, load_quantized
        path = hub_or_local(name_or_path, cls.HUB_NAMES)
        if is_quantized_file(path):  # export.py's quantized .safetensors: the model comes out quantized
            return load_quantized(path, expect='rwkv')[0]
        if path.is_dir():
            hf, hf_state = load_hf_directory(path)
            if hf.get('model_type') != 'rwkv':
                raise ValueError(f"{name_or_path} is a '{hf.get('model_type')}' model, not RWKV")
            C = hf['hidden_size']
            if hf.get('attention_hidden_size') not in (None, C):
                raise ValueError(f"{name_or_path}: attention_hidden_size != hidden_size is not supported")
            config = RWKVConfig(block_size=hf.get('context_length', 1024), vocab_size=hf['vocab_size'],
                                n_layer=hf['num_hidden_layers'], n_embd=C, dim_ffn=hf.get('intermediate_size') or 0,
                                wkv_backend=wkv_backend)
            with torch.device('meta'):  # names only: no memory, no init
                hf_to_ours = {hf_name(n): n for n in cls(config).state_dict()}
            unknown = sorted(set(hf_state) - set(hf_to_ours))
            if unknown:
                raise ValueError(f"{name_or_path} has tensors an RWKV-4 does not: {unknown[:4]}")
            state = {hf_to_ours[k]: v for k, v in hf_state.items()}
        else:
            state = load_official_pth(path)
            n_layer = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
            V, C = state['emb.weight'].shape
            config = RWKVConfig(vocab_size=V, n_layer=n_layer, n_embd=C,
                                dim_ffn=state['blocks.0.ffn.key.weight'].shape[0],
                                wkv_backend=wkv_backend)
        with torch.device('meta'):  # every tensor is loaded below: skip the (slow, for big models) init
            model = cls(config)
        model.to_empty(device='cpu')
        load_state_checked(model, {k: v.float() for k, v in state.items()}, name_or_path)
        return model

    def save_pretrained(self, directory):
        """Write a Hugging Face format directory (config.json + model.safetensors) that transformers loads as
        RwkvForCausalLM."""
        from safetensors.torch import save_file
        state = {hf_name(k): v for k, v in self.plain_state_dict().items()}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, directory / 'model.safetensors', metadata={'format': 'pt'})
        cfg = self.config
        # rescale_every 6 is transformers' default: it rescales at inference time itself, in its own copy
        hf = {'architectures': ['RwkvForCausalLM'], 'model_type': 'rwkv', 'vocab_size': cfg.vocab_size,
              'context_length': cfg.block_size, 'hidden_size': cfg.n_embd, 'num_hidden_layers': cfg.n_layer,
              'attention_hidden_size': cfg.n_embd, 'intermediate_size': cfg.dim_ffn, 'layer_norm_epsilon': 1e-5,
              'rescale_every': 6, 'tie_word_embeddings': False, 'bos_token_id': 0, 'eos_token_id': 0}
        (directory / 'config.json').write_text(json.dumps(hf, indent=2))

    def save_pth(self, path):
        """Write an official RWKV-4 .pth (RWKV-LM's names, fp32) that BlinkDL's code and the rwkv pip package load."""
        torch.save(self.plain_state_dict(), path)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, lr_scale=True):
        """AdamW; weight decay only on the weight matrices (not LayerNorms nor the time_* vectors, whose time_mix
        are stored (1, 1, C) as in RWKV-LM). With lr_scale, RWKV-v4neo's layerwise_lr: time_decay at 2x and
        time_first at 3x the learning rate. train.py's schedule multiplies each group's lr by its 'lr_scale'."""
        groups = {'decay': [], 'no_decay': [], 'time_decay': [], 'time_first': []}
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if lr_scale and n.endswith('time_decay'):
                groups['time_decay'].append(p)
            elif lr_scale and n.endswith('time_first'):
                groups['time_first'].append(p)
            elif p.dim() == 2:
                groups['decay'].append(p)
            else:
                groups['no_decay'].append(p)
        scale_and_decay = {'decay': (1.0, weight_decay), 'no_decay': (1.0, 0.0),
                           'time_decay': (2.0, 0.0), 'time_first': (3.0, 0.0)}
        optim_groups = [{'params': ps, 'weight_decay': scale_and_decay[g][1], 'lr_scale': scale_and_decay[g][0]}
                        for g, ps in groups.items() if ps]
        fused = device_type == 'cuda'
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self):
        """Training FLOPs per token: every weight matrix a token uses is used once in a matmul, 2 FLOPs per weight
        forward and 4 backward, hence 6 * (matrix params); an MoE layer's experts count top_k / moe_experts (a token
        visits top_k of them). The embedding is a lookup. The WKV recurrence and the other elementwise work are not
        matmul FLOPs and, as softmax in the GPT count (PaLM appendix B), are not counted; an attention layer's
        scores and weighted sum are, as in model_gpt.py."""
        cfg = self.config
        n_matmul = 0
        for n, p in self.named_parameters():
            if p.dim() == 2 and n != 'emb.weight':
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
        sequence has produced stop_token."""
        if mode not in ('rnn', 'parallel'):
            raise ValueError(f"mode must be 'rnn' or 'parallel', got {mode!r}")
        if mode == 'rnn':
            logits, state = self.prefill(idx)

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


def hf_name(name):
    """Our parameter name (= RWKV-LM's) -> transformers' RwkvForCausalLM name; the renames of transformers'
    models/rwkv/convert_rwkv_checkpoint_to_hf.py."""
    if name == 'head.weight':
        return name
    name = re.sub(r'^emb\.', 'embeddings.', name).replace('blocks.0.ln0.', 'blocks.0.pre_ln.')
    name = name.replace('.att.', '.attention.').replace('.ffn.', '.feed_forward.')
    name = re.sub(r'time_mix_([kvr])$', lambda m: {'k': 'time_mix_key', 'v': 'time_mix_value',
                                                   'r': 'time_mix_receptance'}[m[1]], name)
    return 'rwkv.' + name


def load_official_pth(path):
    """The tensors of a BlinkDL RWKV-4 .pth, loaded without running pickled code; anything else is an error."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for foreign or corrupt files
        raise ValueError(f"{path} is not a readable .pth checkpoint ({type(e).__name__})") from e
    if not isinstance(state, dict) or 'emb.weight' not in state or 'blocks.0.att.time_first' not in state:
        raise ValueError(f"{path} is not an RWKV checkpoint (no emb.weight / blocks.0.att.time_first)")
    if any(k.endswith(('ln_x.weight', 'time_faaaa', 'time_maa_x', 'gate.weight')) for k in state) or \
            state['blocks.0.att.time_decay'].dim() != 1:
        raise ValueError(f"{path} is a later RWKV version (5/6/7), not RWKV-4")
    return state
