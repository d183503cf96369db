"""
Training on samples longer than the model's block_size ("infinite context", what RWKV-infctx-trainer sets out to do):
a sample of T tokens is cut into segments of block_size tokens and the RNN state is carried from each to the next.

bptt='full' gives exactly the gradient of one full-length forward and backward, in the memory of one segment:
1. run every segment but the last without autograd, keeping only the state at each boundary (for RWKV-4,
   n_layer x 5 x B x C floats per boundary) - this is the one extra forward;
2. from the last segment to the first: run the segment again, with autograd, from its (detached) incoming state,
   and backpropagate its loss together with the gradient that the later segments sent to its outgoing state; the
   gradient that arrives at its incoming state is what the segment before receives.
Embedding, head and loss are inside each segment's forward, so no (T, C) or (T, V) tensor ever exists. Unlike a
backward(retain_graph=True) per segment through an undetached state (quadratic in the number of segments), each
segment is differentiated once. The WKV op returns the gradient of its incoming state, which is what makes step 2
exact (wkv_cuda/__init__.py).

bptt='truncated' stops the gradient at every boundary (each segment learns from its own tokens, with the state
carried forward as a constant: RWKV-infctx-trainer's bptt_truncated_learning); bptt_range=k lets only the last k
segments learn, the earlier ones only build the state (its bptt_learning_range).

The model is called as model(idx, targets, state=state, n_tokens=B*T) -> (new state, loss) (model_rwkv.py); a model
with another kind of state only has to return it as a tuple of tensors.
"""
from contextlib import nullcontext

import torch


def segments(T, block_size):
    """[(lo, hi)] covering range(T) in pieces of block_size; the last one may be shorter."""
    return [(lo, min(lo + block_size, T)) for lo in range(0, T, block_size)]


def like(state, tensors):
    """tensors as the same kind of tuple as state (a NamedTuple such as model_rwkv.State, or a plain tuple)."""
    return type(state)(*tensors) if hasattr(state, '_fields') else tuple(tensors)


def forward_backward(model, state, idx, targets, block_size, bptt='full', bptt_range=0, scale=lambda loss: loss,
                     sync=lambda last: nullcontext(), autocast=nullcontext()):
    """One sample batch idx, targets (B, T), T any length, starting from `state` (the model's initial_state(B)).
    Accumulates the parameters' gradients as scale(mean loss).backward() of a full-length forward would (bptt='full')
    and returns the sample's mean loss, detached. scale(loss) is what is backpropagated (gradient accumulation, fp16
    loss scaling); sync(last) is entered around each segment's forward and backward, last=True for the final one
    (train.py passes DDP's no_sync / FSDP's gradient sync, so gradients are reduced once); autocast around each
    forward (mixed precision)."""
    if bptt not in ('full', 'truncated'):
        raise ValueError(f"bptt must be 'full' or 'truncated', got {bptt!r}")
    B, T = idx.shape
    n_tokens = max(int((targets >= 0).sum()), 1)  # the targets the loss counts (-1: masked out)
    bounds = segments(T, block_size)
    first_learning = max(len(bounds) - bptt_range, 0) if bptt_range else 0
    # 1. forward without autograd: the state at every boundary, and the loss of segments that do not learn
    states, total = [state], 0.0
    with torch.no_grad():
        for i, (lo, hi) in enumerate(bounds[:-1]):
            with autocast:
                s, loss = model(idx[:, lo:hi], targets[:, lo:hi], state=states[-1], n_tokens=n_tokens)
            states.append(s)
            if i < first_learning:
                total = total + loss
    # 2. backward, last segment first, each recomputed from its boundary state
    grad_out = None  # the gradient that the later segments sent to this segment's outgoing state
    for i in reversed(range(first_learning, len(bounds))):
        lo, hi = bounds[i]
        carry = bptt == 'full' and i > first_learning  # does the gradient go on into segment i - 1?
        if i == 0 and any(s.requires_grad for s in state):
            state_in = state  # a learned initial state (state tuning): its gradient goes on to its parameters
        else:
            state_in = like(state, [s.detach().requires_grad_(carry) for s in states[i]])
        with sync(i == first_learning):
            with autocast:
                state_out, loss = model(idx[:, lo:hi], targets[:, lo:hi], state=state_in, n_tokens=n_tokens)
            outputs, grads = [scale(loss)], [None]
            if grad_out is not None:
                pairs = [(s, g) for s, g in zip(state_out, grad_out) if s.requires_grad]
                outputs += [s for s, _ in pairs]
                grads += [g for _, g in pairs]
            torch.autograd.backward(outputs, grads)
        grad_out = [torch.zeros_like(s) if s.grad is None else s.grad for s in state_in] if carry else None
        total = total + loss.detach()
    return total


@torch.no_grad()
def evaluate(model, state, idx, targets, block_size, carry=True):
    """The mean loss of idx, targets (B, T) run segment by segment from `state`: carrying the state across segment
    boundaries (carry=True), or starting every segment from `state` again (what a model that sees block_size tokens
    at a time gets)."""
    B, T = idx.shape
    total, s = 0.0, state
    n_tokens = max(int((targets >= 0).sum()), 1)
    for lo, hi in segments(T, block_size):
        s, loss = model(idx[:, lo:hi], targets[:, lo:hi], state=s if carry else state, n_tokens=n_tokens)
        total = total + loss
    return total
