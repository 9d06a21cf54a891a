"""
Which attention heads the adapter changes (the official attention_kl_dashboard/): on one trace,
for every layer, head and query position, KL(base || adapted) between the two models' attention
distributions over the keys that query sees.

    from attention_kl import attention_kl, head_patterns, top_heads
    kl = attention_kl(model, ids)                    # (layers, heads, T) float64
    top_heads(kl, 8)                                 # [(layer, head, mean KL), ...]
    head_patterns(model, ids, [(58, 3)])             # {(58, 3): (base, adapted)}, (T, T) each

As the official script: both distributions are smoothed by EPS and renormalised over the visible
keys (so a key one model ignores entirely gives a finite KL), a head's score is its mean over all
query positions (position 0 sees one key and scores 0), heads are ranked by that mean.

Cost: two forwards with the attention written out (model.Attention.pattern_hook). The base run's
patterns wait on the CPU in fp32, layers x heads x T^2 x 4 bytes: 10.7 GB for Qwen2.5-32B (64 x 40
heads) on a 1,024-token trace; the adapted run compares each layer on arrival and keeps (heads, T).
"""
from contextlib import contextmanager

import numpy as np
import torch

from lora import disabled

EPS = 1e-10  # the official smoothing


@contextmanager
def pattern_hooks(model, fn):
    """Every layer's attention runs explicitly, its pattern p (B, heads, T, T) replaced by
    fn(layer, p) for the context."""
    attn = [layer.self_attn for layer in model.model.layers]
    for i, a in enumerate(attn):
        a.pattern_hook = lambda p, i=i: fn(i, p)
    try:
        yield
    finally:
        for a in attn:
            a.pattern_hook = None


def causal_kl(p, q, eps=EPS):
    """KL(p || q) per query row of causal patterns p, q (..., T, T): each row smoothed by eps over
    the keys it sees (k <= query) and renormalised, as the official script does."""
    T = p.shape[-1]
    seen = torch.ones(T, T, dtype=torch.bool, device=p.device).tril()
    p = torch.where(seen, p.double() + eps, 0)
    q = torch.where(seen, q.double() + eps, 0)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    return torch.where(seen, p * (p.log() - q.log()), 0).sum(-1)


@torch.no_grad()
def attention_kl(model, ids):
    """(layers, heads, T) KL(base || adapted) of every head at every query position of ids."""
    dev = model.lm_head.weight.device
    x = torch.tensor([ids], device=dev)
    base, kl = {}, {}

    def keep(i, p):
        base[i] = p[0].cpu()
        return p

    def compare(i, p):
        kl[i] = causal_kl(base.pop(i).to(p.device), p[0]).cpu()
        return p
    with pattern_hooks(model, keep), disabled(model):
        model(x)
    with pattern_hooks(model, compare):
        model(x)
    return torch.stack([kl[i] for i in range(len(kl))]).numpy()


@torch.no_grad()
def head_patterns(model, ids, heads):
    """{(layer, head): (base, adapted)} attention patterns (T, T) float32 of the chosen heads."""
    dev = model.lm_head.weight.device
    x = torch.tensor([ids], device=dev)
    out = {(layer, h): [] for layer, h in heads}

    def keep(i, p):
        for layer, h in heads:
            if layer == i:
                out[layer, h].append(p[0, h].float().cpu())
        return p
    with pattern_hooks(model, keep):
        with disabled(model):
            model(x)  # base first
        model(x)
    return {k: tuple(v) for k, v in out.items()}


def top_heads(kl, n=8):
    """The n heads with the largest mean KL over positions: [(layer, head, mean), ...]."""
    mean = kl.mean(-1)
    order = np.argsort(mean, axis=None)[::-1][:n]
    return [(int(i), int(j), float(mean[i, j])) for i, j in zip(*np.unravel_index(order,
                                                                                mean.shape))]
