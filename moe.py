"""
Top-k mixture-of-experts feed-forward, shared by GPT (experts = MLPs) and RWKV (experts = channel mixes that share
their layer's token shift). A linear router scores the E experts for each token; the token runs through its k best
only, and their outputs are summed with the router's weights:
- k = 1: the router's probability times the expert's output, as the Switch Transformer (Fedus et al. 2021,
  arXiv:2101.03961, section 2.1), so the router learns from the language-modelling loss itself;
- k > 1: the chosen probabilities renormalised to sum to 1, as Mixtral (Jiang et al. 2024, arXiv:2401.04088, eq. 1).
The load-balancing loss is Switch's (eq. 4-6): E * sum_i f_i * P_i, f_i the fraction of the N * k routing choices
that went to expert i, P_i the mean router probability of expert i; 1.0 when routing is uniform.

Dropless: every token is processed by its k experts, whatever the batch. A capacity factor (Switch, GShard) drops the
tokens that overflow an expert's fixed buffer, and which tokens overflow depends on the other tokens of the batch,
future ones included: a token's output would depend on tokens after it (no longer causal) and differ between
training, prefill and step. Here the experts run on gathered rows of different sizes, which costs nothing to allow.
"""
import torch
import torch.nn as nn
from torch.nn import functional as F


def check_moe(n_experts, top_k, aux_coef):
    """The one-line errors of impossible MoE settings (the model configs call this); n_experts 0 means no MoE."""
    if n_experts < 0:
        raise ValueError(f"moe_experts={n_experts} must be >= 0 (0 = a plain feed-forward, E = a mixture of E)")
    if n_experts and not 1 <= top_k <= n_experts:
        raise ValueError(f"moe_top_k={top_k} must be between 1 and moe_experts={n_experts}")
    if aux_coef < 0:
        raise ValueError(f"moe_aux_coef={aux_coef} must be >= 0")


class MoE(nn.Module):

    def __init__(self, n_embd, experts, top_k):
        super().__init__()
        check_moe(len(experts), top_k, 0.0)
        self.router = nn.Linear(n_embd, len(experts), bias=False)
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.aux_loss = None  # the load-balancing loss of the last forward (a tensor with its graph)

    def forward(self, x, *inputs):
        """x (..., C): what the router sees; inputs: the experts' arguments, each (..., *) with x's leading shape.
        Returns the mixture (..., C) and sets self.aux_loss."""
        lead, C = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, C)  # (N, C)
        inputs = [t.reshape(x.size(0), -1) for t in inputs]
        E, k = len(self.experts), self.top_k
        probs = F.softmax(self.router(x).float(), dim=-1)  # (N, E), fp32 whatever the autocast
        weights, chosen = probs.topk(k, dim=-1)  # (N, k) each
        if k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        # group the N * k (token, expert) choices by expert: one sort and one host sync, not one per expert
        flat = chosen.flatten()  # (N * k,)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        sizes = counts.tolist()
        rows = (order // k).split(sizes)  # per expert: the tokens routed to it
        gates = weights.flatten()[order].split(sizes)
        out = x.new_zeros(x.shape)
        for expert, r, g in zip(self.experts, rows, gates):
            # an expert with no tokens still runs (on 0 rows): its weights get a zero gradient, so DDP and FSDP see
            # every parameter used in every step
            y = expert(*(t[r] for t in inputs))  # (n_e, C)
            out.index_add_(0, r, (y * g[:, None]).to(out.dtype))
        f = counts.float() / flat.numel()  # (E,) fraction of the choices per expert; no gradient (counts)
        self.aux_loss = E * (f * probs.mean(0)).sum()
        return out.view(*lead, C)
