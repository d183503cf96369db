"""
GPT-2 in one file, as karpathy/nanoGPT `model.py` defines it (pre-LayerNorm blocks, GELU MLP, tied input/output
embeddings, residual projections initialised with std 0.02 / sqrt(2 * n_layer)), using PyTorch's
scaled_dot_product_attention (flash attention where the device has it).

References: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2);
https://github.com/openai/gpt-2/blob/master/src/model.py; https://github.com/karpathy/nanoGPT/blob/master/model.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from attention import CausalSelfAttention, check_attention
from moe import MoE, check_moe
from sampling import generate_tokens


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate='tanh')  # GPT-2's GELU is the tanh approximation ("gelu_new")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.attn_kv_heads, config.attn_window,
                                        config.bias, config.dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        if config.moe_experts:
            self.mlp = MoE(config.n_embd, [MLP(config) for _ in range(config.moe_experts)], config.moe_top_k)
        else:
            self.mlp = MLP(config)

    def forward(self, x, cache=None, use_cache=True):
        dx, cache = self.attn(self.ln_1(x), cache, use_cache)
        x = x + dx
        h = self.ln_2(x)
        x = x + (self.mlp(h, h) if isinstance(self.mlp, MoE) else self.mlp(h))  # MoE: router input, expert input
        return x, cache


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    attn_window: int = 0  # > 0: each token attends to the last attn_window tokens (Mistral); 0 = all before it
    attn_kv_heads: int = 0  # grouped-query attention: K/V heads shared by the n_head query heads; 0 = n_head
    moe_experts: int = 0  # > 0: each MLP is a top-k mixture of this many MLPs (moe.py)
    moe_top_k: int = 1  # experts per token
    moe_aux_coef: float = 0.01  # weight of the load-balancing loss in the training loss (Switch Transformer's alpha)

    def __post_init__(self):
        for key in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be at least 1")
        check_attention(self.n_embd, self.n_head, self.attn_kv_heads, self.attn_window)
        check_moe(self.moe_experts, self.moe_top_k, self.moe_aux_coef)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.activation_checkpointing = False  # train.py's flag: recompute each block in backward
        self.last_moe_aux = None  # an MoE model's load-balancing loss of the last training forward, for logging
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(N), N = number of residual additions (2 per block)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def fsdp_units(self):
        """The modules FSDP shards one by one (train.py): each block, its parameters gathered only while it runs."""
        return list(self.transformer.h)

    def build_kernels(self, device):
        """Nothing to build: GPT's attention is PyTorch's scaled_dot_product_attention (RWKV builds its WKV op)."""

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embedding is left out by default (the token embedding is shared with
        lm_head, so it does real work and stays in)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def _body(self, idx, cache, use_cache=True):
        # idx (B, T) at positions past .. past + T - 1; cache: per layer the KVCache of the earlier positions
        B, T = idx.size()
        past = 0 if cache is None else cache[0].pos
        if past + T > self.config.block_size:
            raise ValueError(f"cannot run positions up to {past + T}: block_size is {self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        new_cache = []
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; its activations are recomputed in backward (dropout too: the RNG
                # state is replayed)
                x, kv = torch.utils.checkpoint.checkpoint(block, x, None, use_cache, use_reentrant=False)
            else:
                x, kv = block(x, None if cache is None else cache[i], use_cache)
            new_cache.append(kv)
        return self.transformer.ln_f(x), new_cache

    def moe_aux_loss(self):
        """The mean over layers of the MoE load-balancing losses of the last forward (moe.py)."""
        losses = [block.mlp.aux_loss for block in self.transformer.h]
        return sum(losses) / len(losses)

    def forward(self, idx, targets=None):
        """idx, targets (B, T) -> logits (B, T, V) and the mean loss; without targets, the last position's logits.
        In training, an MoE model's loss includes moe_aux_coef x the load-balancing loss (also kept, detached, in
        self.last_moe_aux for logging); in eval the loss is the cross-entropy alone."""
        x, _ = self._body(idx, None, use_cache=False)  # (B, T, C)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            # the mean over the targets counted (-1: masked out), 0 when there are none
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction='sum') / (targets >= 0).sum().clamp_min(1)
            if self.config.moe_experts and self.training:
                aux = self.moe_aux_loss()
                self.last_moe_aux = aux.detach()
                loss = loss + self.config.moe_aux_coef * aux
        else:
            logits = self.lm_head(x[:, [-1], :])  # (B, 1, V): inference needs only the last position
            loss = None
        return logits, loss

    def prefill(self, idx, cache=None, last_only=False):
        """Run a chunk idx (B, T) after the positions held in `cache` (None = none). Returns logits (B, T, V) (with
        last_only (B, 1, V), the last position's) and the KV cache: per layer a KVCache (attention.py) of
        (B, n_kv_heads, S, head_size) keys and values, S every position so far, or attn_window slots of a ring
        buffer."""
        x, cache = self._body(idx, cache)
        return self.lm_head(x[:, -1:] if last_only else x), cache

    def step(self, token, cache):
        """One token per sequence, token (B,), after the positions in `cache`. Returns logits (B, V) and the cache."""
        x, cache = self._body(token[:, None], cache)
        return self.lm_head(x[:, 0]), cache

    def quantize_(self, fmt, head=None):
        """Quantize the weight matrices in place for CPU inference (quantize.py): fmt one of int8, q8_0, q5_1, q4_0,
        int4; head=None takes quantize.DEFAULT_HEAD (True). The embeddings, LayerNorms and biases stay
        fp32 (a quantized lm_head unties it from the embedding, which stays fp32)."""
        from quantize import quantize_model
        return quantize_model(self, fmt, head, 'lm_head')

    def crop_block_size(self, block_size):
        """Shrink the context length of a model, e.g. a pretrained 1024 one to a smaller block_size."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """GPT-2 from a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a local Hugging Face directory or a quantized
        .safetensors of export.py (interop.load_gpt)."""
        from interop import load_gpt
        return load_gpt(name_or_path, dropout)

    def save_pretrained(self, directory):
        """A Hugging Face directory that transformers loads as GPT2LMHeadModel (interop.save_gpt_hf)."""
        from interop import save_gpt_hf
        save_gpt_hf(self, directory)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on every >= 2-D tensor (matmul weights, embeddings) and none on biases and
        LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        optim_groups = [
            {'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
            {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0},
        ]
        fused = device_type == 'cuda'
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self):
        """Training FLOPs per token, PaLM paper appendix B (as nanoGPT): 6N for the weights a token uses (an MoE
        layer's router and top_k of its experts) plus 12 * L * H * Q * T for the attention scores and the weighted
        sum, forward and backward (T capped at attn_window)."""
        cfg = self.config
        N = self.get_num_params()
        if cfg.moe_experts:  # experts a token does not visit do no work for it
            experts = sum(p.numel() for n, p in self.named_parameters() if '.experts.' in n)
            N -= experts * (1 - cfg.moe_top_k / cfg.moe_experts)
        return 6 * N + sum(block.attn.flops_per_token(cfg.block_size) for block in self.transformer.h)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over the device's peak FLOP/s."""
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, on_token=None,
                 stop_token=None):
        """Continue idx (B, T) by max_new_tokens: the prompt in one pass, then one cached step per token. Once the
        sequence outgrows block_size, each token re-runs the last block_size tokens (nanoGPT's sliding window).
        on_token(id) is called with each new token of the first sequence; generation ends early once every
        sequence has produced stop_token."""
        bs = self.config.block_size
        logits, cache = self.prefill(idx[:, -bs:], last_only=True)

        def advance(idx):
            nonlocal cache
            if idx.size(1) <= bs:
                logits, cache = self.step(idx[:, -1], cache)
                return logits
            return self(idx[:, -bs:])[0][:, -1]
        return generate_tokens(advance, logits[:, -1], idx, max_new_tokens, temperature, top_k, top_p, on_token,
                               stop_token)
