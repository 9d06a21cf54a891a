"""
Gradient attribution of the adapter scalars (the official attribution_experiments/): which
scalars, at which source positions, move a target logit.

    from attribution import attribute
    a = attribute(model, ids, positions=[40, 41])   # dict: attr (2, T, sites), acts, tokens
    a["attr"][0].sum(-1)                            # per source position, for target position 40

The target at position t is the logit of the model's own top prediction there, or with
contrast=(a, b) the logit difference a - b. attr[i, s, j] = u_j(s) * d target / d u_j(s): the
first-order change of the target if scalar j at position s were switched off. The derivative is
the total one (through every later layer and every later adapter), taken on the linearised model
the official scripts use: attention patterns and RMSNorm scales are held at their values on this
trace (detached), so what is attributed is the path through the values, the MLPs and the residual
stream. So q_proj and k_proj scalars, which act only through the patterns, get exactly 0 (the
official scripts hook the MLP adapters alone). The authors report the method as inconclusive; it
is here because it is the tool people reach for first.

Cost: one forward kept for backward (activations plus every layer's explicit attention pattern:
backward_bytes, about 15 GB for Qwen2.5-32B in bf16 on a 512-token trace and 41 GB on a
1,024-token one, so an 80 GB card takes about 550 tokens) and one backward per target position.
"""
from contextlib import contextmanager

import torch
from tqdm import tqdm

from lora import adapters, hooked
from model import RMSNorm


def backward_bytes(cfg, T, dtype):
    """An estimate of what attribute() keeps for its backward on T tokens: per layer, the inputs
    autograd saves for the linears and the MLP's gate (about 8 hidden-size and 4 MLP-width rows
    per token in the model's dtype) and the explicit pattern before and after its softmax (fp32,
    heads x T x T twice); plus the fp32 logits (T x vocab)."""
    D, I, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    per_layer = T * (8 * D + 4 * I) * dtype.itemsize + 2 * H * T * T * 4
    return cfg.num_hidden_layers * per_layer + T * cfg.vocab_size * 4


@contextmanager
def linearised(model):
    """Attention patterns and RMSNorm scales detached for the context: constants to autograd."""
    attn = [layer.self_attn for layer in model.model.layers]
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    for m in attn:
        m.pattern_hook = torch.Tensor.detach
    for m in norms:
        m.scale_hook = torch.Tensor.detach
    try:
        yield
    finally:
        for m in attn:
            m.pattern_hook = None
        for m in norms:
            m.scale_hook = None


def attribute(model, ids, positions=None, contrast=None, progress=False):
    """grad x activation of every adapter scalar at every source position, for each target
    position (default: all): dict(attr (P, T, sites), acts (T, sites), positions, tokens)."""
    dev = model.lm_head.weight.device
    positions = list(range(len(ids))) if positions is None else list(positions)
    mods, taps = adapters(model), {}

    def tap(m):
        def hook(u):
            v = u.clone()  # a new node between u and the adapter's B: its gradient is d/du
            if not v.requires_grad:  # nothing upstream is trainable: start the graph here
                v.requires_grad_()
            taps[m] = v
            return v
        return hook
    with torch.enable_grad(), linearised(model), hooked(mods, tap):
        logits = model(torch.tensor([ids], device=dev))[0].float()  # (T, V)
        taps = [taps[m] for m in mods]  # the capture layout (lora.py), not the call order
        attr, tokens = [], []
        for t in tqdm(positions, desc="attribution", disable=not progress):
            a, b = contrast if contrast else (int(logits[t].argmax()), None)
            target = logits[t, a] - (logits[t, b] if b is not None else 0)
            grads = torch.autograd.grad(target, taps, retain_graph=True, allow_unused=True)
            attr.append(torch.cat([(g * v if g is not None else torch.zeros_like(v))[0]
                                   for g, v in zip(grads, taps)], -1).detach())
            tokens.append(a)
    acts = torch.cat([v[0] for v in taps], -1).detach()
    return dict(attr=torch.stack(attr).cpu(), acts=acts.cpu(), positions=positions,
                tokens=tokens)
