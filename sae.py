"""
Collect the rank-1 adapter scalars over a corpus, and train a BatchTopK sparse autoencoder on them.

    # 1. the (n_layers * n_targets) scalars of every token (448 for Qwen2.5-32B); torchrun splits documents
    torchrun --standalone --nproc_per_node=8 sae.py collect --model /models/Qwen2.5-32B-Instruct \\
        --adapter runs/rank1/adapter --data s1K-1.1.parquet --out acts/
    # 2. the SAE: 448 -> 3,584 latents, k = 16 (the paper's), on normalised inputs
    python sae.py train --acts acts/ --out sae/ --device cuda
    # library use
    from sae import SAE, SAEConfig, train_sae
    sae = train_sae(x, SAEConfig(expansion=8, k=16))      # x: (N, d) float tensor
    z = sae.encode(x)                                      # batch-independent (learned threshold)

The paper's recipe (PAPER.md section E) with the official code's flaws fixed (section G, 4 and 5):
- Inputs are divided by a per-dimension scale (their std; the 448 scalars differ by orders of
  magnitude). The SAE lives in that normalised space and keeps `scale` as a buffer, so encode()
  and decode() take and return raw scalars; `folded()` gives the equivalent raw-space weights.
- b_dec starts at the data mean; W_enc starts as W_dec^T; decoder rows have unit norm, kept by
  removing each row's parallel gradient before the step and renormalising after it.
- Training selects the top k * B pre-activations of the batch (BatchTopK, ReLU). A global threshold
  theta (EMA of the smallest selected activation) is learned on the way; encode() keeps z > theta,
  so a token's features never depend on the rest of its batch.
- AuxK loss on latents that have not fired for `dead_tokens` tokens, k_aux = d / 2, target residual
  detached, coefficient 1/32. Adam, lr 5e-4 with 100 warm-up steps, a held-out split for FVU.
- The decoder side of a step is a sparse product over the k * B selected pairs, so a step costs
  two dense (B, d) x (d, n) products (encoder forward and its weight gradient) instead of five.

Activation store (collect): documents are grouped into shards of --docs-per-shard; shard j is
written by rank j % world as acts-XXXXX.npy (N_j, n_sites) + tokens-XXXXX.npy (N_j,) int32 and a
shard-XXXXX.json sidecar written last (atomically), so a re-run skips finished shards. index.json
describes the whole store: shape, dtype, the column layout (sites in lora.py's capture order:
column 7 * layer + p, p in gate, up, down, q, k, v, o), and every document's shard and offsets.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# the SAE


@dataclass
class SAEConfig:
    expansion: int = 8          # latents = expansion * d_in (3,584 for 448)
    k: int = 16                 # mean active latents per token (BatchTopK: k * batch per batch)
    lr: float = 5e-4
    batch_size: int = 512
    epochs: int = 1
    steps: int = 0              # > 0 overrides epochs
    warmup: int = 100           # linear lr warm-up steps
    aux_coeff: float = 1 / 32
    k_aux: int = 0              # 0: d_in // 2
    dead_tokens: int = 1_000_000  # a latent that has not fired for this many tokens is dead
    threshold_beta: float = 0.999  # EMA of the smallest selected activation -> inference threshold
    holdout: float = 0.05       # fraction of tokens held out for FVU
    normalize: bool = True      # divide inputs by their per-dimension std
    seed: int = 42
    log_every: int = 100
    device: str = "cpu"

    def __post_init__(self):
        for f in ("expansion", "k", "batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"SAEConfig.{f} must be >= 1")
        if not 0 <= self.holdout < 1:
            raise ValueError("SAEConfig.holdout must be in [0, 1)")


class SAE(nn.Module):
    """BatchTopK SAE in normalised space: x_n = x / scale; z = relu(x_n - b_dec) W_enc + b_enc) > theta;
    x_hat = scale * (z W_dec + b_dec). W_dec is (n_latents, d) with unit-norm rows."""

    def __init__(self, d_in, n_latents, k):
        super().__init__()
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.W_enc = nn.Parameter(torch.empty(d_in, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(d_in))
        self.register_buffer("threshold", torch.zeros(()))

    @torch.no_grad()
    def init_weights(self, generator=None):
        self.W_dec.copy_(torch.randn(self.W_dec.shape, generator=generator))
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()

    def pre(self, x):
        """Pre-activations (N, n_latents) of raw inputs."""
        return (x / self.scale - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x):
        """Raw scalars (N, d) -> latent activations (N, n_latents), thresholded: batch-independent."""
        p = torch.relu(self.pre(x))
        return p * (p > self.threshold)

    def decode(self, z):
        """Latents -> raw scalars."""
        return (z @ self.W_dec + self.b_dec) * self.scale

    def forward(self, x):
        return self.decode(self.encode(x))

    def folded(self):
        """Raw-space weights (W_enc', b_enc, W_dec', b_dec') with the normalisation folded in:
        pre = (x - b_dec') W_enc' + b_enc, x_hat = z W_dec' + b_dec'."""
        return (self.W_enc / self.scale[:, None], self.b_enc, self.W_dec * self.scale, self.b_dec * self.scale)

    def save(self, out_dir, cfg=None, metrics=None):
        from safetensors.torch import save_file
        from model import atomic_dir

        def write(d):
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                      os.path.join(d, "sae.safetensors"))
            with open(os.path.join(d, "cfg.json"), "w") as f:
                json.dump(dict(d_in=self.d_in, n_latents=self.n_latents, k=self.k,
                               train=asdict(cfg) if cfg else None, final=metrics), f, indent=1)
        atomic_dir(out_dir, write)

    @classmethod
    def load(cls, path, device="cpu"):
        from model import read_safetensors
        c = json.load(open(os.path.join(path, "cfg.json")))
        sae = cls(c["d_in"], c["n_latents"], c["k"])
        sae.load_state_dict(read_safetensors(os.path.join(path, "sae.safetensors")), strict=True)
        return sae.to(device)


def _decode(B, sae, rows, cols, vals, bias=True):
    """sum over the chosen pairs of vals * W_dec[col] (+ b_dec): a sparse (B, n) x (n, d) product."""
    # indices come from topk over distinct entries, so they are valid and unique by construction
    z = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (B, sae.n_latents), check_invariants=False)
    out = torch.sparse.mm(z, sae.W_dec)
    return out + sae.b_dec if bias else out


def train_step(sae, xn, cfg, state):
    """One BatchTopK step on normalised inputs xn (B, d). Returns (loss, metrics).

    One dense encoder product (its backward is the second and last dense product); the decoder
    works on the k * B selected pairs only, as a sparse product.
    """
    B = xn.shape[0]
    # (xn - b_dec) W_enc + b_enc, arranged so that b_dec's gradient needs no second (B, d) x (d, n) product
    raw = xn @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)  # (B, n)
    with torch.no_grad():
        top = torch.relu(raw).flatten().topk(min(sae.k * B, raw.numel()))
        flat = top.indices[top.values > 0]
        rows, cols = flat // sae.n_latents, flat % sae.n_latents
    vals = torch.relu(raw[rows, cols])
    x_hat = _decode(B, sae, rows, cols, vals)
    err = (x_hat - xn).pow(2).sum(-1)
    var = (xn - xn.mean(0)).pow(2).sum(-1).mean()
    loss = err.mean()
    # dead latents and the AuxK loss
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=xn.device)
    fired[cols] = True
    state["since"] = torch.where(fired, 0, state["since"] + B)
    dead = state["since"] >= cfg.dead_tokens
    aux = torch.zeros((), device=xn.device)
    if dead.any() and cfg.aux_coeff > 0:
        k_aux = min(cfg.k_aux or sae.d_in // 2, int(dead.sum()))
        with torch.no_grad():  # only dead latents compete; no ReLU here, so latents whose pre-activations
            # went negative everywhere still get a gradient and can come back
            ta = raw.detach().masked_fill(~dead, -torch.inf).topk(k_aux, dim=1)
            arows = torch.arange(B, device=xn.device).repeat_interleave(k_aux)
            acols = ta.indices.flatten()
        e = (xn - x_hat).detach()
        e_hat = _decode(B, sae, arows, acols, raw[arows, acols], bias=False)
        aux = (e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
    # the inference threshold: EMA of the smallest selected activation
    with torch.no_grad():
        if len(vals):
            m = vals.min()
            t = state["threshold_steps"] + 1
            beta = min(cfg.threshold_beta, 1 - 1 / t)  # a plain running mean until it is an EMA of 1/(1-beta) steps
            sae.threshold.copy_(beta * sae.threshold + (1 - beta) * m)
            state["threshold_steps"] = t
    total = loss + cfg.aux_coeff * aux
    return total, dict(mse=loss.item() / sae.d_in, fvu=(err.mean() / var).item(), aux=aux.item(),
                       l0=len(rows) / B, dead=dead.float().mean().item())


@torch.no_grad()
def evaluate(sae, x, batch=8192):
    """FVU (normalised and raw space), MSE, L0 and firing frequencies with the inference threshold."""
    err_n = var_n = err_r = var_r = l0 = 0.0
    freq = torch.zeros(sae.n_latents, device=x.device)
    mean = x.mean(0)
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        z = sae.encode(xb)
        xh = sae.decode(z)
        err_r += (xh - xb).pow(2).sum().item()
        var_r += (xb - mean).pow(2).sum().item()
        err_n += ((xh - xb) / sae.scale).pow(2).sum().item()
        var_n += ((xb - mean) / sae.scale).pow(2).sum().item()
        active = z > 0
        l0 += active.sum().item()
        freq += active.sum(0)
    n = len(x)
    freq = (freq / max(n, 1)).cpu()
    hist, edges = np.histogram(np.log10(freq.numpy() + 1e-10), bins=20, range=(-10, 0))
    return dict(fvu=err_n / max(var_n, 1e-12), fvu_raw=err_r / max(var_r, 1e-12), mse=err_n / max(n * sae.d_in, 1),
                l0=l0 / max(n, 1), dead_fraction=(freq == 0).float().mean().item(), tokens=n,
                freq_hist_log10=dict(counts=hist.tolist(), edges=edges.tolist()))


def unit_norm_step(sae, opt, loss):
    """Backward and an optimizer step that keeps the decoder rows at unit norm: the gradient's
    component along each row is removed before the step, the rows renormalised after."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    w, g = sae.W_dec.data, sae.W_dec.grad
    g -= (g * w).sum(1, keepdim=True) * w
    opt.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)


def update(sae, opt, xn, cfg, state):
    """train_step, then unit_norm_step."""
    loss, m = train_step(sae, xn, cfg, state)
    unit_norm_step(sae, opt, loss)
    return m


def train_sae(x, cfg=None, log=print, metrics_file=None):
    """Train on an in-memory (N, d) float tensor; returns the SAE (with .metrics: held-out evaluation)."""
    cfg = cfg or SAEConfig()
    dev = torch.device(cfg.device)
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"train_sae: expected an (N, d) tensor, got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x).all(1)
    if bad.any():
        raise ValueError(f"train_sae: row {int(bad.nonzero()[0])} holds NaN or Inf values")
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(x), generator=g)
    n_hold = int(len(x) * cfg.holdout)
    hold, train = x[perm[:n_hold]].float().to(dev), perm[n_hold:]
    d = x.shape[1]
    sae = SAE(d, cfg.expansion * d, cfg.k).to(dev)
    sae.init_weights(generator=torch.Generator().manual_seed(cfg.seed))
    sae.to(dev)
    with torch.no_grad():
        sample = x[train[:200_000]].float().to(dev)
        if cfg.normalize:
            sae.scale.copy_(sample.std(0).clamp(min=1e-8 * sample.std(0).max().clamp(min=1e-30)))
        sae.b_dec.copy_((sample / sae.scale).mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    total = cfg.steps or steps_per_epoch * cfg.epochs
    state = dict(since=torch.zeros(sae.n_latents, dtype=torch.long, device=dev), threshold_steps=0)
    from tqdm import tqdm
    bar = tqdm(range(total), desc="sae", file=sys.stderr, disable=log is None)
    t0, agg = time.time(), {}
    for step in bar:
        if step % steps_per_epoch == 0:
            order = train[torch.randperm(len(train), generator=g)]
        i = step % steps_per_epoch
        xb = x[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]].float().to(dev) / sae.scale
        for grp in opt.param_groups:  # linear warm-up, constant, linear decay to 0 over the last 20%
            grp["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup), (total - step) / max(1, 0.2 * total))
        m = update(sae, opt, xb, cfg, state)
        for k, v in m.items():
            agg[k] = agg.get(k, 0.0) + v
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            n = (step % cfg.log_every) + 1
            rec = {"step": step + 1, **{k: v / n for k, v in agg.items()}, "tokens_per_s": (step + 1) * cfg.batch_size / (time.time() - t0),
                   "threshold": sae.threshold.item()}
            if len(hold):
                rec["heldout_fvu"] = evaluate(sae, hold[:8192])["fvu"]
            agg = {}
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            bar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead']:.3f}")
    sae.metrics = evaluate(sae, hold) if len(hold) else None
    if log and sae.metrics:
        mm = sae.metrics
        log(f"sae: held-out FVU {mm['fvu']:.4f} (raw {mm['fvu_raw']:.4f}) | L0 {mm['l0']:.2f} | "
            f"dead {100 * mm['dead_fraction']:.1f}% | {mm['tokens']} tokens")
    return sae.cpu()


# -----------------------------------------------------------------------------
# the activation store


class ActivationStore:
    """Reads a collected store (index.json + shards), checking sizes, layout and values."""

    def __init__(self, path):
        f = os.path.join(path, "index.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path}: no index.json (run `sae.py collect` first)")
        self.path, self.index = path, json.load(open(f))
        idx = self.index
        for k in ("shape", "dtype", "sites", "shards"):
            if k not in idx:
                raise ValueError(f"{f}: missing field {k!r}")
        self.d = idx["shape"][1]
        if len(idx["sites"]) * idx.get("rank", 1) != self.d:
            raise ValueError(f"{f}: layout of {len(idx['sites'])} sites x rank {idx.get('rank', 1)} does not match "
                             f"the stored width {self.d}")

    def shard(self, i, check=True):
        s = self.index["shards"][i]
        file = os.path.join(self.path, s["acts"])
        arr = np.load(file, mmap_mode="r")
        if arr.shape != (s["tokens"], self.d):
            raise ValueError(f"{file}: holds {arr.shape}, but index.json says ({s['tokens']}, {self.d}) "
                             "(truncated or from another layout)")
        if check:
            finite = np.isfinite(np.asarray(arr, dtype=np.float32)).all(1)
            if not finite.all():
                raise ValueError(f"{file}: row {int(np.argmin(finite))} holds NaN or Inf values")
        return arr

    def mlp(self, i):
        """The MLP-neuron baseline of shard i: (tokens, len(index['mlp_neurons']))."""
        s = self.index["shards"][i]
        if "mlp" not in s:
            raise ValueError(f"{self.path}: no MLP neurons were collected (sae.py collect --mlp-neurons N)")
        file = os.path.join(self.path, s["mlp"])
        arr = np.load(file, mmap_mode="r")
        if arr.shape != (s["tokens"], len(self.index["mlp_neurons"])):
            raise ValueError(f"{file}: holds {arr.shape}, expected ({s['tokens']}, {len(self.index['mlp_neurons'])})")
        return arr

    def tokens(self, i):
        return np.load(os.path.join(self.path, self.index["shards"][i]["ids"]), mmap_mode="r")

    def load_all(self):
        return torch.cat([torch.from_numpy(np.array(self.shard(i), dtype=np.float32)) for i in range(len(self.index["shards"]))])


# -----------------------------------------------------------------------------
# collection

PAPER_SYSTEM = "You are a helpful mathematics assistant."


def documents(path, fmt, tok):
    """[(source, ids)]: s1 rows in the training format (default) or the paper's collection format,
    or eval.py generations (samples.jsonl: prompt + generation)."""
    from data import read_rows, render_chat, s1_example
    rows, where = read_rows(path)
    docs = []
    for r, w in zip(rows, where):
        if fmt == "s1":
            docs.append((w, s1_example(r, tok, w)[0]))
        elif fmt == "paper":  # PAPER.md section D: no chat template, no <|im_end|> between turns
            text = (f"<|im_start|>system\n{PAPER_SYSTEM}\n<|im_start|>user\n{r['question']}\n<|im_start|>assistant\n"
                    f"<|im_start|>think\n{r['deepseek_thinking_trajectory']}\n<|im_start|>answer\n{r['deepseek_attempt']}<|im_end|>")
            docs.append((w, tok.encode(text)))
        elif fmt == "samples":
            if "generation" not in r or not r.get("question"):
                raise ValueError(f"{w}: samples need 'question' and 'generation' fields")
            prompt = render_chat([{"role": "user", "content": r["question"]}], add_generation_prompt=True)
            docs.append((w, tok.encode(prompt + r["generation"])))
        else:
            raise ValueError(f"--format {fmt!r}: expected s1, paper or samples")
    return docs


@torch.no_grad()
def doc_scalars(model, ids, window, mlp_neurons=None):
    """Adapter scalars (T, n_sites * r) of one document, run in windows of `window` tokens with a
    KV cache, so long documents fit in memory and the result equals one full forward. With
    mlp_neurons ([(layer, index)]) also the MLP-neuron baseline: those entries of down_proj's input
    act(gate(x)) * up(x), captured by forward pre-hooks that are always removed."""
    from lora import capture
    from model import KVCache, _attn_mask
    dev = model.lm_head.weight.device
    T = len(ids)
    cache = KVCache(model.cfg, 1, T, model.lm_head.weight.dtype, dev)
    valid = torch.ones(1, T, dtype=torch.bool, device=dev)
    by_layer, got, hooks = {}, {}, []
    for l, i in mlp_neurons or []:
        by_layer.setdefault(l, []).append(i)
    for l, idx in by_layer.items():
        sel = torch.tensor(idx, device=dev)
        hook = lambda mod, inp, l=l, sel=sel: got.setdefault(l, []).append(inp[0][0, :, sel].float())
        hooks.append(model.model.layers[l].mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with capture(model) as cap:
            for s in range(0, T, window):
                x = torch.tensor([ids[s:s + window]], device=dev)
                n = x.shape[1]
                mask = None if s == 0 else _attn_mask(valid, s, n)  # the first window takes the plain causal path
                model.model(x, torch.arange(s, s + n, device=dev)[None], mask, cache)
                cache.len += n
    finally:
        for h in hooks:
            h.remove()
    if mlp_neurons is None:
        return cap.acts[0]
    mlp = torch.cat([torch.cat(got[l]) for l in by_layer], dim=1) if by_layer else torch.zeros(T, 0)
    return cap.acts[0], mlp


def cmd_collect(args):
    from data import Tokenizer
    from lora import adapters, load_adapter, sites
    from model import DTYPES, Qwen2, write_atomic
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist = None
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer(args.tokenizer or args.model)
    docs = documents(args.data, args.format, tok)[:args.max_docs or None]
    model = Qwen2.from_pretrained(args.model, dtype=DTYPES[args.dtype] if args.dtype else None, device=dev).eval()
    load_adapter(model, args.adapter, verbose=False)
    layout = [list(s) for s in sites(model)]
    gen = torch.Generator().manual_seed(args.seed)
    neurons = [[l, int(i)] for l in range(model.cfg.num_hidden_layers)
               for i in sorted(torch.randperm(model.cfg.intermediate_size, generator=gen)[:args.mlp_neurons].tolist())]
    rank_r = adapters(model)[0].rank
    store_dtype = {"float32": np.float32, "float16": np.float16}[args.store_dtype]
    os.makedirs(args.out, exist_ok=True)
    n_shards = math.ceil(len(docs) / args.docs_per_shard)
    from tqdm import tqdm
    mine = [j for j in range(n_shards) if j % world == rank]
    bar = tqdm(total=sum(len(ids) for j in mine for _, ids in docs[j * args.docs_per_shard:(j + 1) * args.docs_per_shard]),
               unit="tok", desc=f"collect rank {rank}", file=sys.stderr, disable=rank != 0)
    t0, n_tok = time.time(), 0
    for j in mine:
        side = os.path.join(args.out, f"shard-{j:05d}.json")
        part = docs[j * args.docs_per_shard:(j + 1) * args.docs_per_shard]
        if os.path.isfile(side):  # finished by an earlier run
            bar.update(sum(len(ids) for _, ids in part))
            continue
        acts, toks, mlps, meta, off = [], [], [], [], 0
        for k, (src, ids) in enumerate(part):
            a, mlp = doc_scalars(model, ids, args.window, [tuple(n) for n in neurons])
            a = a.float().cpu().numpy()
            mlps.append(mlp.cpu().numpy().astype(store_dtype))
            if not np.isfinite(a).all():
                raise ValueError(f"{src}: non-finite adapter scalars at token {int(np.argmin(np.isfinite(a).all(1)))}")
            acts.append(a.astype(store_dtype))
            toks.append(np.asarray(ids, dtype=np.int32))
            meta.append(dict(doc=j * args.docs_per_shard + k, source=src, start=off, length=len(ids)))
            off += len(ids)
            n_tok += len(ids)
            bar.update(len(ids))
            bar.set_postfix(tok_s=f"{n_tok / (time.time() - t0):.0f}")
        arrays = [(f"acts-{j:05d}.npy", np.concatenate(acts)), (f"tokens-{j:05d}.npy", np.concatenate(toks))]
        if neurons:
            arrays.append((f"mlp-{j:05d}.npy", np.concatenate(mlps)))
        for name, arr in arrays:
            with open(os.path.join(args.out, name + ".tmp"), "wb") as f:
                np.save(f, arr)
            os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
        write_atomic(side, json.dumps(dict(acts=f"acts-{j:05d}.npy", ids=f"tokens-{j:05d}.npy", tokens=off, docs=meta,
                                           **({"mlp": f"mlp-{j:05d}.npy"} if neurons else {}))))
    bar.close()
    if dist:
        dist.barrier()
    if rank == 0:
        shards = [json.load(open(os.path.join(args.out, f"shard-{j:05d}.json"))) for j in range(n_shards)]
        index = dict(shape=[sum(s["tokens"] for s in shards), len(layout) * rank_r], dtype=args.store_dtype,
                     sites=layout, rank=rank_r, order="column = position of (layer, target) sorted by layer, then "
                     "gate, up, down, q, k, v, o (7 * layer + p with all 7 targets)",
                     model=os.path.abspath(args.model), adapter=os.path.abspath(args.adapter), format=args.format,
                     data=os.path.abspath(args.data), documents=len(docs), shards=shards, mlp_neurons=neurons)
        write_atomic(os.path.join(args.out, "index.json"), json.dumps(index, indent=1))
        print(f"collect: {index['shape'][0]:,} tokens x {index['shape'][1]} scalars in {n_shards} shards -> {args.out}")
    if dist:
        dist.barrier()
        dist.destroy_process_group()


def cmd_train(args):
    store = ActivationStore(args.acts)
    x = store.load_all()
    cfg = SAEConfig(**{f.name: getattr(args, f.name) for f in fields(SAEConfig) if getattr(args, f.name, None) is not None})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.jsonl"), "w") as mf:
        sae = train_sae(x, cfg, metrics_file=mf)
    sae.save(args.out, cfg, sae.metrics)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(dict(heldout=sae.metrics, sites=store.index["sites"], acts=os.path.abspath(args.acts)), f, indent=1)
    return sae


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="store the adapter scalars of every token of a corpus")
    c.add_argument("--model", required=True)
    c.add_argument("--adapter", required=True)
    c.add_argument("--data", required=True, help="s1K-1.1 rows (.jsonl/.parquet) or eval.py samples.jsonl")
    c.add_argument("--format", default="s1", choices=["s1", "paper", "samples"])
    c.add_argument("--out", required=True)
    c.add_argument("--tokenizer")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    c.add_argument("--docs-per-shard", type=int, default=64)
    c.add_argument("--window", type=int, default=4096, help="tokens per forward (KV-cached) for long documents")
    c.add_argument("--max-docs", type=int, default=0)
    c.add_argument("--mlp-neurons", type=int, default=0,
                   help="also store this many SwiGLU neurons per layer (down_proj's input), a seeded sample: the baseline")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_collect)
    t = sub.add_parser("train", help="train the BatchTopK SAE on a collected store")
    t.add_argument("--acts", required=True)
    t.add_argument("--out", required=True)
    for f in fields(SAEConfig):
        t.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.type is not bool else int, default=None)
    t.set_defaults(func=cmd_train)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"sae.py: {e}") from None


if __name__ == "__main__":
    main()
