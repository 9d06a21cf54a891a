"""
The official code's further analyses, one section each, headed by what the official repository
(jnward/reasoning-lora-interp) calls it and the directory or script it comes from; where we
depart from it, docs/departures.md says how. rollout.py runs the first four on one trace, report.py
the last two on the activation store:

    attention_kl, top_heads, head_patterns   which attention heads the adapter changes
    attribute                                which scalars, where, move a prediction
    layer_norms                              the adapter's writes beside the MLP's own
    latent_effects                           how SAE latents respond to one latent removed
    state_spectrum                           how many directions the activation state uses
    cofiring, jaccard, clusters              which SAE latents fire together
"""
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from lora import adapters, capture, disabled, hooked
from model import RMSNorm


# -----------------------------------------------------------------------------
# Attention KL (official: attention_kl_dashboard/)
#
# Which attention heads the adapter changes (the official attention_kl_dashboard/): on one trace,
# for every layer, head and query position, KL(base || adapted) between the two models' attention
# distributions over the keys that query sees.
#
#     from analyses import attention_kl, head_patterns, top_heads
#     kl = attention_kl(model, ids)                    # (layers, heads, T) float64
#     top_heads(kl, 8)                                 # [(layer, head, mean KL), ...]
#     head_patterns(model, ids, [(58, 3)])             # {(58, 3): (base, adapted)}, (T, T) each
#
# As the official script: both distributions are smoothed by EPS and renormalised over the visible
# keys (so a key one model ignores entirely gives a finite KL), a head's score is its mean over all
# query positions (position 0 sees one key and scores 0), heads are ranked by that mean.
#
# Cost: two forwards with the attention written out (model.Attention.pattern_hook). The base
# run's patterns wait on the CPU in fp32, layers x heads x T^2 x 4 bytes: 10.7 GB for Qwen2.5-32B
# (64 x 40 heads) on a 1,024-token trace; the adapted run compares each layer on arrival and keeps
# (heads, T).


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


# -----------------------------------------------------------------------------
# Attribution (official: attribution_experiments/)
#
# Gradient attribution of the adapter scalars (the official attribution_experiments/): which
# scalars, at which source positions, move a target logit.
#
#     from analyses import attribute
#     a = attribute(model, ids, positions=[40, 41])   # dict: attr (2, T, sites), acts, tokens
#     a["attr"][0].sum(-1)                            # per source position, for target position 40
#
# The target at position t is the logit of the model's own top prediction there, or with
# contrast=(a, b) the logit difference a - b. attr[i, s, j] = u_j(s) * d target / d u_j(s): the
# first-order change of the target if scalar j at position s were switched off. The derivative is
# the total one (through every later layer and every later adapter), taken on the linearised model
# the official scripts use: attention patterns and RMSNorm scales are held at their values on this
# trace (detached), so what is attributed is the path through the values, the MLPs and the residual
# stream. So q_proj and k_proj scalars, which act only through the patterns, get exactly 0 (the
# official scripts hook the MLP adapters alone). The authors report the method as inconclusive; it
# is here because it is the tool people reach for first.
#
# Cost: one forward kept for backward (activations plus every layer's explicit attention pattern:
# backward_bytes, about 15 GB for Qwen2.5-32B in bf16 on a 512-token trace and 41 GB on a
# 1,024-token one, so an 80 GB card takes about 550 tokens) and one backward per target position.


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


# -----------------------------------------------------------------------------
# Projection norms (official: misc_experiments/analyze_lora_projection_norms.py)
#
# How large the adapter's writes are beside the layer's own (the official misc_experiments/
# analyze_lora_projection_norms.py and plot_lora_mlp_norms.py): per layer, on one trace,
#
#     from analyses import layer_norms
#     n = layer_norms(model, ids)     # dict of (layers, T) arrays and their per-layer means
#
# - mlp_out: |MLP output| (the adapted MLP, adapters included), L2 over the hidden size;
# - lora_write: |s * B u| of the down_proj adapter, its part of that output;
# - residual: |x| of the MLP's input x = post_attention_layernorm(h), h the residual stream after
#   attention (the official script hooks that layernorm's output and calls it the residual);
# - b_projection: x . b / |b|, that input's signed component along down_proj's write direction b
#   (the official script's "LoRA projection"; rank 1).
# All in float32, float64 for a float64 model.
# Cost: one forward, (layers, T) floats kept per quantity.


def up(t):
    """float32, or float64 for a float64 tensor."""
    return torch.promote_types(t.dtype, torch.float32)


@torch.no_grad()
def layer_norms(model, ids):
    dev = model.lm_head.weight.device
    layers = model.model.layers
    got = {k: [None] * len(layers) for k in ("mlp_out", "residual", "b_projection")}
    down = {a.layer: a for a in adapters(model) if a.target == "down_proj"}
    hooks = []
    for i, layer in enumerate(layers):
        def mlp_hook(mod, inp, out, i=i):
            got["mlp_out"][i] = out[0].to(up(out)).norm(dim=-1)

        def res_hook(mod, inp, out, i=i):
            x = out[0].to(up(out))
            got["residual"][i] = x.norm(dim=-1)
            if i in down:
                b = down[i].lora_B[:, 0].to(x.dtype)
                got["b_projection"][i] = x @ b / b.norm().clamp(min=1e-30)
        hooks += [layer.mlp.register_forward_hook(mlp_hook),
                  layer.post_attention_layernorm.register_forward_hook(res_hook)]
    try:
        with capture(model) as cap:
            model(torch.tensor([ids], device=dev))
    finally:
        for h in hooks:
            h.remove()
    T = len(ids)
    nan = torch.full((T,), float("nan"), dtype=up(model.lm_head.weight))
    out = {k: torch.stack([t.cpu() if t is not None else nan for t in v]).numpy()
           for k, v in got.items()}
    write = [nan] * len(layers)
    col = 0
    for a in adapters(model):  # capture's layout: a.rank columns per adapter, in this order
        u = cap.acts[0, :, col:col + a.rank]
        col += a.rank
        if a.target == "down_proj":
            write[a.layer] = (a.scaling * u.to(up(u)) @ a.lora_B.to(up(u)).t()).norm(dim=-1).cpu()
    out["lora_write"] = torch.stack(write).numpy()
    out["layer_means"] = {k: [float(r.mean()) if np.isfinite(r).all() else None for r in v]
                          for k, v in out.items()}  # None: a layer without a down_proj adapter
    return out


# -----------------------------------------------------------------------------
# Feature interaction (ours; misc_experiments/lora_feature_interaction_analysis.py differs)
#
# How the SAE latents of one trace respond when one latent is removed or steered. An analysis of
# our own: the official misc_experiments/lora_feature_interaction_analysis.py takes gradients
# among the 192 MLP adapter scalars, with no SAE (docs/departures.md).
#
#     from analyses import latent_effects
#     e = latent_effects(model, sae, ids, sources=[3, 17])              # remove each source
#     e = latent_effects(model, sae, ids, sources=[3], strength=10.0)   # steer it by +10
#     e["effect"][0, j]    # latent j's mean activation over the trace, edited minus clean
#
# Remove latent i: at every token, its share of the SAE's reconstruction, f_i(t) d_i, is taken off
# the adapter scalars, so the model runs as if the latent had been silent (d_i: its decoder row in
# raw units). Steer: strength * d_i is added at every token (interpret.py steer's edit). The state
# read back is the model's own, before the edit at each site: the edit is not counted as a change,
# so a latent moves only through what the edited scalars did to later layers: the intervention
# itself, not a first-order estimate.
#
# Cost: one forward per source latent on the trace (at 32B: ~0.3 s each for 1,024 tokens on one
# H100), plus the SAE's encoding of (T, 448) per forward.


def source_latents(z, n):
    """The n latents with the largest mean activation over the trace's tokens (firing ones)."""
    mean = z.mean(0)
    top = mean.argsort(descending=True)[:n]
    return [int(i) for i in top if mean[i] > 0]


@torch.no_grad()
def latent_effects(model, sae, ids, sources, strength=None):
    """dict(effect (len(sources), F), clean (F,) mean activations, sources, mode)."""
    dev = model.lm_head.weight.device
    x = torch.tensor([ids], device=dev)
    mods = adapters(model)
    r = mods[0].rank
    with capture(model) as cap:
        model(x)
    clean = cap.acts[0]  # (T, sites)
    z = sae.encode(clean)
    dec = sae.W_dec * sae.scale  # (F, sites): decoder rows in raw units
    effect = []
    for i in sources:
        delta = (-z[:, i:i + 1] * dec[i] if strength is None  # (T, sites)
                 else (strength * dec[i]).expand_as(clean))
        before = [None] * len(mods)

        def edit(m):
            j = mods.index(m)

            def hook(u):
                before[j] = u[0]
                return u + delta[:, j * r:(j + 1) * r].to(u.dtype)
            return hook
        with hooked(mods, edit, first=True):
            model(x)
        effect.append(sae.encode(torch.cat(before, -1)).mean(0) - z.mean(0))
    return dict(effect=torch.stack(effect).cpu(), clean=z.mean(0).cpu(), sources=list(sources),
                mode="remove" if strength is None else f"steer {strength:g}")


# -----------------------------------------------------------------------------
# State shape (official: the SVD of the state in misc_experiments/)
#
# The activation state's shape: how many directions the adapter scalars really use (the official
# misc_experiments/ look at the SVD of the state). One pass over the activation store
# accumulates the mean and the second moment in float64, so a 10M-token store (18 GB) never sits in
# memory; the covariance's eigenvalues are the squared singular values of the centred state / N.
#
#     from analyses import state_spectrum
#     s = state_spectrum(ActivationStore("acts/"))     # the official: 192 MLP scalars, 100k tokens
#     s = state_spectrum(store, "all", max_tokens=0)   # the whole state
#     s["effective_rank"], s["components_for"]["0.9"]
#
# By default the official analysis's input: the 192 MLP scalars (gate, up, down of every layer)
# over the store's first 100,000 tokens (scalars="mlp", max_tokens=100_000); scalars="all" and
# max_tokens=0 read the whole state (every adapter, every token).
#
# Reported: the variance of each principal direction (descending) and its cumulative share; the
# number of directions for 50/90/99% of the variance; two effective ranks, the participation ratio
# (sum l)^2 / sum l^2 and exp(entropy) of the normalised variances (Roy and Vetterli's). Both are d
# for an isotropic state and 1 for a state on one line. The scalars are taken raw (not divided by
# their std): their scales are part of what the adapter does.


SHARES = (0.5, 0.9, 0.99)


MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def columns(store, scalars):
    """The store's columns of the chosen scalars: "mlp" (the MLP adapters') or "all"."""
    if scalars not in ("mlp", "all"):
        raise ValueError(f"scalars {scalars!r}: expected mlp or all")
    rank = store.index.get("rank", 1)
    return [j * rank + r for j, (_, t) in enumerate(store.index["sites"]) for r in range(rank)
            if scalars == "all" or t in MLP_TARGETS]


def moments(store, cols=None, max_tokens=0):
    """(N, mean, second moment) of the store's rows (its first max_tokens, 0: all; columns cols,
    None: all), float64, one shard at a time."""
    d = len(cols) if cols is not None else store.index["shape"][1]
    n, s1, s2 = 0, np.zeros(d), np.zeros((d, d))
    for i in range(len(store.index["shards"])):
        if max_tokens and n >= max_tokens:
            break
        x = np.asarray(store.shard(i), dtype=np.float64)
        x = x[:, cols] if cols is not None else x
        x = x[:max_tokens - n] if max_tokens else x
        n += len(x)
        s1 += x.sum(0)
        s2 += x.T @ x
    if n == 0:
        raise ValueError(f"{store.path}: the store holds no tokens")
    return n, s1 / n, s2 / n


def spectrum(variances):
    """The figures of a descending variance spectrum (eigenvalues of the covariance)."""
    lam = np.clip(np.asarray(variances, dtype=np.float64), 0, None)
    total = lam.sum()
    if total <= 0:
        raise ValueError("the state has no variance (every token the same)")
    p = lam / total
    cum = np.cumsum(p)
    nz = p[p > 0]
    return dict(variances=lam.tolist(), cumulative=cum.tolist(), total_variance=float(total),
                components_for={str(s): int(np.searchsorted(cum, s - 1e-12) + 1) for s in SHARES},
                participation_ratio=float(total ** 2 / (lam ** 2).sum()),
                effective_rank=float(np.exp(-(nz * np.log(nz)).sum())), dims=len(lam))


def state_spectrum(store, scalars="mlp", max_tokens=100_000):
    """spectrum() of the store's centred state (see the module docstring for the defaults), with
    its token count and what it read."""
    n, mean, second = moments(store, columns(store, scalars), max_tokens)
    cov = second - np.outer(mean, mean)
    lam = np.linalg.eigvalsh((cov + cov.T) / 2)[::-1]
    return dict(spectrum(lam), tokens=n, scalars=scalars, max_tokens=max_tokens)


# -----------------------------------------------------------------------------
# Co-activation (official: 3_lora_sae/clustering/)
#
# Which SAE latents fire together (the official 3_lora_sae/clustering/ groups latents by
# co-activation): the Jaccard index of every pair over the store's tokens,
# J(i, j) = |i and j fire| / |i or j fires|, and the clusters it implies.
#
#     from analyses import cofiring, jaccard, clusters
#     counts, both = cofiring(store, sae)           # per latent, per pair: tokens where they fire
#     groups = clusters(jaccard(counts, both), threshold=0.5, min_size=2)
#
# cofiring takes one pass over the store: the firing pattern of a shard is a (tokens, latents)
# 0/1 matrix B, and B^T B adds every pair's count of tokens where both fire (a dense product: 10M
# tokens x 3,584^2 latents is 1.3e14 multiply-adds, about a minute on one GPU, --device cuda).
# Clusters are the connected components of the graph that links two latents whose Jaccard index
# is at least the threshold (single linkage cut at that height): latents that always fire together
# land in one cluster, whatever the rest does. Latents that fire on fewer than MIN_FIRING tokens are
# left out of pairs and clusters (the official script's cut: two latents that fire once, together,
# have J = 1 and say nothing).


MIN_FIRING = 16  # tokens a latent must fire on to enter pairs and clusters


def cofiring(store, sae, device="cpu", chunk=65536):
    """(counts (F,), both (F, F)): tokens where each latent fires, and where each pair does."""
    F = sae.n_latents
    counts = torch.zeros(F, dtype=torch.float64)
    both = torch.zeros(F, F, dtype=torch.float64, device=device)
    sae = sae.to(device)
    with torch.no_grad():
        for i in range(len(store.index["shards"])):
            x = np.array(store.shard(i), dtype=np.float32)  # a copy: the shard is read-only
            for s in range(0, len(x), chunk):
                b = (sae.encode(torch.from_numpy(x[s:s + chunk]).to(device)) > 0).float()
                counts += b.sum(0).double().cpu()
                both += (b.T @ b).double()  # counts up to 2^24 per chunk are exact in fp32
    return counts.numpy(), both.cpu().numpy()


def frequent_only(J, counts, min_firing=MIN_FIRING):
    """J with the rows and columns of latents that fire on fewer than min_firing tokens zeroed."""
    rare = counts < min_firing
    J = J.copy()
    J[rare, :] = 0
    J[:, rare] = 0
    return J


def jaccard(counts, both):
    """J (F, F) from cofiring's counts: |i and j| / (|i| + |j| - |i and j|); 0 where neither
    fires (and 1 on the diagonal of a latent that fires)."""
    union = counts[:, None] + counts[None, :] - both
    return np.divide(both, union, out=np.zeros_like(both, dtype=np.float64), where=union > 0)


def clusters(J, threshold=0.5, min_size=2):
    """Connected components of {(i, j): J[i, j] >= threshold, i != j} with at least min_size
    latents, largest first (ties: by smallest latent): [[latent, ...], ...], each sorted."""
    F = len(J)
    parent = list(range(F))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j in zip(*np.nonzero(np.triu(J >= threshold, k=1))):
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups = {}
    for i in range(F):
        groups.setdefault(root(i), []).append(i)
    out = [g for g in groups.values() if len(g) >= min_size]
    return sorted(out, key=lambda g: (-len(g), g[0]))
