"""
LoRA (Hu et al. 2021, arXiv:2106.09685) for both models: a frozen nn.Linear W plus a trained low-rank update,
y = W x + (alpha / r) B A dropout(x), with A (r, in) Kaiming-uniform and B (out, r) zeros as in the paper's reference
code (microsoft/LoRA loralib/layers.py), so a fresh adapter leaves the model's function exactly as it was. RWKV-PEFT
puts adapters on RWKV's projections; here they go on every Linear inside the blocks (time mix, channel mix, GPT's
attention and MLP; not the head) whose name matches one of `targets`. merge_lora folds them back into plain Linears,
which is what every export writes.
"""
import math
import re

import torch
import torch.nn as nn
from torch.nn import functional as F


class LoRALinear(nn.Module):

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scale = alpha / r
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # loralib's reset_parameters: nn.Linear's own init
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged(self):
        """The plain nn.Linear computing the same function: W + scale * B A."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def lora_names(model, targets=()):
    """The Linears inside the blocks (model.blocks / model.transformer.h) that adapters go on: those whose name
    matches one of the regexes in targets, or all of them for ()."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and re.match(r'(blocks|transformer\.h)\.', n)]
    return [n for n in names if not targets or any(re.search(t, n) for t in targets)]


def add_lora(model, r, alpha, dropout=0.0, targets=()):
    """Wrap the chosen Linears of `model` in LoRALinear, in place, and freeze every other parameter; returns their
    names. A quantized model (its matrices are not Linears) is an error."""
    if getattr(model, 'quantized', None):
        raise ValueError(f"the model is quantized ({model.quantized[0]}): LoRA trains on the float model (quantize "
                         f"after merging)")
    names = lora_names(model, targets)
    if not names:
        raise ValueError(f"lora_targets={list(targets)} match none of the model's projection matrices "
                         f"(e.g. {lora_names(model)[:3]})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return names


def merge_lora(model):
    """Replace every LoRALinear of `model` by its merged Linear, in place; returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent), child, m.merged())
    return model
