"""
Rank-1 LoRA (any rank on the reference path) for model.Qwen2: the adapter the paper studies.

    from lora import apply_lora, capture, ablate, steer, merge
    apply_lora(model, rank=1, alpha=16.0)            # all 7 projections of every layer; base frozen
    with capture(model) as cap:
        model(idx)
    cap.acts                                          # (B, T, 448) float32 for Qwen2.5-32B
    doc_scalars(model, ids, window=2048)              # one document's (T, 448), KV-cached windows

The adapter's files (PEFT format, save, load, load_model, the merged export) are lora_files.py.

An adapted linear computes y = W x + b + s * B (A x) with A (r, in), B (out, r), s = alpha / r
(alpha / sqrt(r) with rsLoRA; the same at r = 1, where the paper's s = 16). A gets PEFT's
kaiming-uniform(a=sqrt 5) init and B = 0, so the adapted model equals the base at step 0. The
LoRA math runs in the adapter's dtype (fp32) whatever the base dtype, as PEFT does.

The scalar u = x . a (before the scale and before B) is the adapter's activation. Layout of the
captured state: one column per (layer, target) site, sorted by layer, then by target in the
paper's order SITE_ORDER = (gate, up, down, q, k, v, o); with all 7 targets on every layer the
column of (layer l, target p) is 7*l + p, the index docs/paper.md uses. With a subset of targets or
layers the same order is kept over the sites present (`sites(model)` lists them). At rank r > 1
each site contributes r consecutive columns.

Implementations of the adapted linear (chosen once; LORA_IMPL=ref|cuda|auto overrides):
- `ref`: a torch.autograd.Function that does the frozen matmul and the rank-r update without
  materialising (T, out) intermediates; the CPU path, the fallback, and the test oracle's twin.
- `cuda`: the fused kernels of csrc/ (rank 1, CUDA tensors; see lora_cuda.py).
Dropout and trainable base weights take plain autograd ops instead (lora_linear decides).
"""
import math
import os
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import KVCache

SITE_ORDER = ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")
PARENT = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp", "q_proj": "self_attn",
          "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")

# -----------------------------------------------------------------------------
# the adapted linear: reference autograd path


class LoRAFunction(torch.autograd.Function):
    """(y, u) = (x W^T + b + s (x A^T) B^T, x A^T) for a frozen W, b.

    Forward reads x twice (matmul, u) and updates y in place; backward reads g twice (dx, g B)
    and x once (dA) and updates dx in place. Saved for backward: x and u only. u is a true
    output: a loss through it (gu) adds gu A to dx and gu^T x to dA.
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, s):
        shape = x.shape[:-1]
        x2 = x.reshape(shape.numel(), x.shape[-1])  # (N, in); explicit N: a width may be 0
        y = F.linear(x2, W, bias)  # (N, out), base dtype
        u = x2.to(A.dtype) @ A.t()  # (N, r), adapter dtype
        y = _add_scaled(y, u, B.t(), s)
        ctx.save_for_backward(x2, W, A, B, u)
        ctx.s, ctx.x_shape = s, x.shape
        ctx.set_materialize_grads(False)  # gy or gu None when unused: no work for them
        return y.view(*shape, W.shape[0]), u.view(*shape, A.shape[0])

    @staticmethod
    def backward(ctx, gy, gu):
        x2, W, A, B, u = ctx.saved_tensors
        dx = dA = dB = None
        g2 = None if gy is None else gy.reshape(x2.shape[0], W.shape[0])
        h = None if g2 is None else (g2.to(A.dtype) @ B).mul_(ctx.s)  # (N, r): d loss / d u
        if gu is not None:
            gu = gu.reshape(x2.shape[0], A.shape[0]).to(A.dtype)
            h = gu if h is None else h.add_(gu)
        if ctx.needs_input_grad[0]:
            dx = g2 @ W if g2 is not None else x2.new_zeros(x2.shape)
            dx = (dx if h is None else _add_scaled(dx, h, A, 1.0)).view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            dA = torch.zeros_like(A) if h is None else h.t() @ x2.to(A.dtype)
        if ctx.needs_input_grad[4]:
            dB = torch.zeros_like(B) if g2 is None else (g2.to(A.dtype).t() @ u).mul_(ctx.s)
        return dx, None, None, dA, dB, None


def _add_scaled(y, a, b, s):
    """y + s * (a @ b), accumulated in a's dtype, returned in y's dtype (in place if they agree)."""
    if y.dtype == a.dtype:
        return y.addmm_(a, b, alpha=s)
    return y.to(a.dtype).addmm_(a, b, alpha=s).to(y.dtype)


def lora_linear_ref(x, W, bias, A, B, s):
    return LoRAFunction.apply(x, W, bias, A, B, s)


_IMPL = None
DECODE_ROWS = 256  # no-grad calls on at most this many rows take plain ops (see lora_linear)


def lora_impl():
    """The fused op for CUDA tensors if it is built and allowed, else None (reference path)."""
    global _IMPL
    if _IMPL is None:
        want = os.environ.get("LORA_IMPL", "auto")
        if want not in ("auto", "ref", "cuda"):
            raise ValueError(f"LORA_IMPL={want!r}: expected ref, cuda or auto")
        _IMPL = False
        if want != "ref" and torch.cuda.is_available():
            try:
                import lora_cuda
                _IMPL = lora_cuda.lora_linear
            except Exception as e:  # the build failing is the one case we fall back on
                if want == "cuda":
                    raise
                warnings.warn(f"rank-1 CUDA extension unavailable ({e}); using the PyTorch "
                              "reference path")
        print(f"lora: {'fused CUDA rank-1 kernels' if _IMPL else 'PyTorch reference path'}")
    return _IMPL or None


def lora_linear(x, W, bias, A, B, s, dropout=None):
    """(y, u) = (x W^T + b + s (x A^T) B^T, x A^T): the one place that picks an implementation.

    The fused CUDA kernels for rank 1 on a GPU, else the reference autograd function; plain
    autograd ops for CPU inference, a no-grad call of at most DECODE_ROWS rows (a decode step:
    no autograd wrapper, and torch.compile sees through it), dropout, or a base weight that trains
    (full finetunes). Under autocast the frozen matmul runs in the autocast dtype and the adapter
    math stays in fp32.
    """
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x.to(dt), W.to(dt), None if bias is None else bias.to(dt), A, B, s,
                               dropout)
    frozen = not W.requires_grad and not (bias is not None and bias.requires_grad)
    plain = dropout is None and frozen
    rows = x.shape[:-1].numel()
    if plain and (torch.is_grad_enabled() or (x.is_cuda and rows > DECODE_ROWS)):
        fused = lora_impl() if x.is_cuda and A.shape[0] == 1 else None
        return (fused or lora_linear_ref)(x, W, bias, A, B, s)
    y = F.linear(x, W, bias)
    u = (x if dropout is None else dropout(x)).to(A.dtype) @ A.t()
    y = _add_scaled(y.reshape(rows, y.shape[-1]), u.reshape(rows, A.shape[0]), B.t(), s)
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y, u


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` names, so base checkpoints load unchanged) plus
    `lora_A` (r, in) and `lora_B` (out, r) in fp32 (PEFT's names and shapes):

        y = W x + b + s * B u,   u = A x   (the adapter's scalar; r of them at rank r)

    `active` False switches the adapter off (u reads 0), `merged` True means s * B A has been
    added into W. Each function in `u_hooks` maps u to u on every forward, in order: steer()
    edits it (the edit reaches the output through B), capture() records it (see hooked()).
    """

    def __init__(self, base, rank=1, alpha=16.0, rslora=True, dropout=0.0, layer=None, target=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        dev = base.weight.device
        f32 = dict(device=dev, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **f32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **f32))
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scaling = lora_scaling(alpha, rank, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.layer, self.target = layer, target
        self.active, self.merged, self.u_hooks = True, False, []
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, generator=None):
        """PEFT's init: A ~ kaiming_uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so the
        adapted model starts equal to the base. Drawn on the CPU: the same values on any device
        (on the meta device there is nothing to draw; train.py initialises after materialising)."""
        if self.lora_A.is_meta:
            return
        bound = 1 / math.sqrt(self.in_features)
        A = torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator)
        self.lora_A.copy_(A)
        self.lora_B.zero_()

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}")

    def forward(self, x):
        if self.active and not self.merged:
            y, u = lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                               self.dropout)
        else:  # switched off, or merged: the base matmul does it all
            y = F.linear(x, self.weight, self.bias)
            if not self.u_hooks:
                return y
            u = (x.to(self.lora_A.dtype) @ self.lora_A.t() if self.active
                 else x.new_zeros(*x.shape[:-1], self.rank, dtype=torch.float32))
        v = u
        for hook in self.u_hooks:
            v = hook(v)
        if v is not u and self.active:  # u edited by v - u: y moves by s * B (v - u)
            y = y + (self.scaling * (v - u) @ self.lora_B.t()).to(y.dtype)
        return y

    # -- merge / unmerge ------------------------------------------------------

    def delta_weight(self):
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, in) fp32

    @torch.no_grad()
    def merge(self):
        if self.merged:
            warnings.warn(f"{self.name}: already merged; merge() ignored")
            return
        new = self.weight.float() + self.delta_weight()
        if not torch.isfinite(new).all():
            raise ValueError(f"{self.name}: merging gives non-finite weights; left unmerged")
        self.weight.copy_(new.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            warnings.warn(f"{self.name}: not merged; unmerge() ignored")
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    @property
    def name(self):
        return hf_path(self.layer, self.target)


# -----------------------------------------------------------------------------
# injection


def hf_path(layer, target):
    return f"model.layers.{layer}.{PARENT[target]}.{target}"


def site_label(layer, target):
    """An adapter's name in tables and figures: L{layer}.{target}, e.g. L12.down_proj."""
    return f"L{layer}.{target}"


def parse_site_label(label):
    """site_label's inverse: "L12.down_proj" -> (12, "down_proj")."""
    layer, _, target = label.partition(".")
    if not (layer[:1] == "L" and layer[1:].isdigit() and target in PARENT):
        raise ValueError(f"{label!r}: expected an adapter like L12.down_proj")
    return int(layer[1:]), target


def lora_scaling(alpha, rank, rslora):
    """The scale s of s * B (A x): alpha / sqrt(r) with rsLoRA, alpha / r without (16 at r = 1)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def select_layers(n_layers, start=None, end=None, indices=None, stride=None, last_third=False):
    """The official code's layer flags: explicit indices, a [start, end) range with a stride, or the
    last third (layers 43-63 of 64). None of them -> every layer."""
    if indices is not None:
        layers = sorted(set(int(i) for i in indices))
    elif last_third:
        layers = list(range(n_layers - n_layers // 3, n_layers))
    else:
        layers = list(range(start or 0, n_layers if end is None else end, stride or 1))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad or not layers:
        raise ValueError(f"layer selection {bad or layers} is not within 0..{n_layers - 1}")
    return layers


def apply_lora(model, rank=1, alpha=16.0, rslora=True, targets=SITE_ORDER, layers=None, dropout=0.0,
               freeze=True, verbose=True):
    """Wrap the chosen projections of the chosen layers in LoRALinear, in place; freeze all else."""
    unknown = [t for t in targets if t not in PARENT]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; expected some of {list(SITE_ORDER)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    n = model.cfg.num_hidden_layers
    layers = list(range(n)) if layers is None else select_layers(n, indices=layers)
    taken = [hf_path(l, t) for l in layers for t in targets
             if isinstance(model.get_submodule(hf_path(l, t)), LoRALinear)]
    if taken:  # checked before anything changes
        raise ValueError(f"{taken[0]} already has a LoRA adapter")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for l in layers:
        for t in targets:
            parent = model.get_submodule(f"model.layers.{l}.{PARENT[t]}")
            base = getattr(parent, t)
            setattr(parent, t, LoRALinear(base, rank, alpha, rslora, dropout, layer=l, target=t))
    if verbose:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = model.num_params()
        print(f"lora: rank {rank}, {len(adapters(model))} adapters, {n_train:,} trainable "
              f"parameters ({100 * n_train / n_all:.4f}% of {n_all:,})")
    return model


def adapters(model):
    """The LoRALinear modules in capture order: by layer, then SITE_ORDER."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    return sorted(mods, key=lambda m: (m.layer, SITE_ORDER.index(m.target)))


def sites(model):
    """[(layer, target)] in capture-column order."""
    return [(m.layer, m.target) for m in adapters(model)]


def lora_config(model):
    mods = adapters(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    m = mods[0]
    return dict(rank=m.rank, alpha=m.alpha, rslora=m.rslora,
                dropout=m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0,
                targets=[t for t in SITE_ORDER if any(a.target == t for a in mods)],
                layers=sorted({a.layer for a in mods}))


# -----------------------------------------------------------------------------
# capture and interventions


@contextmanager
def hooked(mods, make_hook, first=False):
    """Put make_hook(module) into each module's u_hooks for the context (at the front with first:
    edits run before observers), and take exactly those hooks out again on exit."""
    hooks = [make_hook(m) for m in mods]
    for m, h in zip(mods, hooks):
        m.u_hooks.insert(0, h) if first else m.u_hooks.append(h)
    try:
        yield
    finally:
        for m, h in zip(mods, hooks):
            m.u_hooks.remove(h)


class Capture:
    """What capture() yields; `acts` stays readable after the context has closed."""

    def __init__(self, mods):
        self.lists = [[] for _ in mods]  # one list of u tensors per adapter, in capture order

    @property
    def acts(self):
        """(B, T, n_sites * r) float32: every forward inside the context, concatenated along T."""
        if not all(self.lists):
            raise RuntimeError("capture: no forward pass ran inside the context")
        return torch.cat([torch.cat(l, dim=-2) for l in self.lists], dim=-1)

    def clear(self):
        for l in self.lists:
            l.clear()


@contextmanager
def capture(model):
    """Record every adapter's scalar u = x . a (fp32, sign kept, after steering, 0 when ablated)."""
    mods = adapters(model)
    if not mods:
        raise ValueError("capture: the model has no LoRA adapters")
    cap = Capture(mods)

    def record(into):
        def hook(u):
            into.append(u.detach())
            return u
        return hook
    lists = iter(cap.lists)
    with hooked(mods, lambda m: record(next(lists))):
        yield cap


@torch.no_grad()
def doc_scalars(model, ids, window, mlp_neurons=None, baseline="up_proj"):
    """Adapter scalars (T, n_sites * r) of one document, run in windows of `window` tokens with a
    KV cache. With mlp_neurons ([(layer, index)]) also the MLP-neuron baseline: those output
    channels of up_proj (baseline "up_proj", the paper's), or those entries of down_proj's input
    act(gate(x)) * up(x) ("swiglu"), read by hooks that are always removed."""
    dev = model.lm_head.weight.device
    T = len(ids)
    cache = KVCache(model.cfg, 1, T, model.lm_head.weight.dtype, dev)
    by_layer, got, hooks = {}, {}, []
    for l, i in mlp_neurons or []:
        by_layer.setdefault(l, []).append(i)
    for l, idx in by_layer.items():
        sel = torch.tensor(idx, device=dev)
        keep = lambda x, l=l, sel=sel: got.setdefault(l, []).append(x[0, :, sel].float())
        mlp = model.model.layers[l].mlp
        hooks.append(mlp.up_proj.register_forward_hook(lambda m, i, o, keep=keep: keep(o))
                     if baseline == "up_proj" else
                     mlp.down_proj.register_forward_pre_hook(lambda m, i, keep=keep: keep(i[0])))
    try:
        with capture(model) as cap:
            for s in range(0, T, window):
                x = torch.tensor([ids[s:s + window]], device=dev)
                model.forward_cached(x, torch.arange(s, s + x.shape[1], device=dev)[None], cache)
    finally:
        for h in hooks:
            h.remove()
    if mlp_neurons is None:
        return cap.acts[0]
    mlp = torch.cat([torch.cat(got[l]) for l in by_layer], dim=1) if by_layer else torch.zeros(T, 0)
    return cap.acts[0], mlp


def _match(mods, layers=None, types=None, sites_=None):
    """Adapters selected by layer set, target-type set, and/or explicit (layer, target) sites."""
    layers = None if layers is None else set(layers)
    types = None if types is None else set(types)
    sites_ = None if sites_ is None else set(map(tuple, sites_))
    for t in types or ():
        if t not in PARENT:
            raise ValueError(f"unknown adapter type {t!r}")
    return [m for m in mods if (layers is None or m.layer in layers)
            and (types is None or m.target in types)
            and (sites_ is None or (m.layer, m.target) in sites_)]


@contextmanager
def ablate(model, layers=None, types=None, sites=None):
    """Switch off the selected adapters (no weight is touched); restored on exit.
    ablate(model) with no selection switches off every adapter: the base model."""
    chosen = _match(adapters(model), layers, types, sites)
    if any(m.merged for m in chosen):
        raise ValueError("ablate: unmerge the adapters first (a merged adapter cannot be "
                         "switched off)")
    before = [m.active for m in chosen]
    for m in chosen:
        m.active = False
    try:
        yield chosen
    finally:
        for m, a in zip(chosen, before):
            m.active = a


def disabled(model):
    """The base model: every adapter off."""
    return ablate(model)


@contextmanager
def steer(model, offsets, positions=None):
    """Add offsets to adapter scalars u during every forward in the context; restored on exit.

    offsets: {(layer, target): float or (r,) tensor}. positions: None (every token), or a list /
    range of token positions, counted over all forwards in the context (the prompt's padded columns
    first, then one per generated token), or a callable (n_seen, T, device) -> (T,) bool.
    """
    mods = {(m.layer, m.target): m for m in adapters(model)}
    offsets = {tuple(k): v for k, v in offsets.items()}
    missing = [k for k in offsets if k not in mods]
    if missing:
        raise ValueError(f"steer: no adapter at {missing[:5]}")
    if positions is not None and not callable(positions):
        pos = torch.as_tensor(list(positions), dtype=torch.long)

        def positions(n_seen, T, device, pos=pos):
            return torch.isin(torch.arange(n_seen, n_seen + T, device=device), pos.to(device))

    def add_offset(m):
        off = torch.as_tensor(offsets[(m.layer, m.target)], dtype=torch.float32,
                              device=m.lora_A.device).reshape(-1).expand(m.rank)  # (r,)
        seen = [0]  # tokens this adapter has seen in the context: the positions counter

        def hook(u):
            o = off.to(u.dtype)
            if positions is not None:
                T = u.shape[-2]
                o = positions(seen[0], T, u.device).to(u.dtype)[:, None] * o  # (T, r)
                seen[0] += T
            return u + o
        return hook
    chosen = [mods[k] for k in offsets]
    with hooked(chosen, add_offset, first=True):
        yield chosen


def merge(model):
    for m in adapters(model):
        m.merge()


def unmerge(model):
    for m in adapters(model):
        m.unmerge()
