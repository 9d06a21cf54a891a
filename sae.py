"""
The BatchTopK sparse autoencoder on the adapter scalars (collect.py stores them).

    # 448 -> 3,584 latents, k = 16 (the paper's), on normalised inputs
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
"""
import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save
from tqdm import tqdm

from collect import ActivationStore
from common import (add_config_flags, check_out, config_from_flags, read_json, read_safetensors,
                    safetensors_metadata, same_origin, sha256_file, user_errors, write_atomic,
                    write_json)

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
    save_every: int = 1000      # steps between saves of the training state (sae.py train resumes)
    device: str = "cpu"

    def __post_init__(self):
        for f in ("expansion", "k", "batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"SAEConfig.{f} must be >= 1")
        if not 0 <= self.holdout < 1:
            raise ValueError("SAEConfig.holdout must be in [0, 1)")


class SAE(nn.Module):
    """BatchTopK SAE in normalised space: x_n = x / scale; z = relu((x_n - b_dec) W_enc + b_enc)
    kept where > theta; x_hat = scale * (z W_dec + b_dec). W_dec: (n_latents, d), unit-norm rows."""

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
        """Raw scalars (N, d) -> latents (N, n_latents), thresholded: independent of the batch."""
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
        return (self.W_enc / self.scale[:, None], self.b_enc, self.W_dec * self.scale,
                self.b_dec * self.scale)

    def save(self, out_dir, cfg=None, metrics=None, made_from=None):
        """sae.safetensors, then cfg.json (the config, held-out metrics, what the SAE was trained
        on and the weights' checksum): each file written whole, nothing else in out_dir touched."""
        os.makedirs(out_dir, exist_ok=True)
        data = save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()})
        write_atomic(os.path.join(out_dir, "sae.safetensors"), data)
        write_json(os.path.join(out_dir, "cfg.json"),
                   dict(d_in=self.d_in, n_latents=self.n_latents, k=self.k,
                        train=asdict(cfg) if cfg else None, final=metrics, made_from=made_from,
                        weights_sha256=hashlib.sha256(data).hexdigest()))

    @classmethod
    def load(cls, path, device="cpu"):
        """An SAE directory; .made_from says what it was trained on (None if unrecorded)."""
        c = read_json(os.path.join(path, "cfg.json"))
        weights = os.path.join(path, "sae.safetensors")
        if c.get("weights_sha256") not in (None, sha256_file(weights)):
            raise ValueError(f"{weights}: does not match the checksum in cfg.json (a file from "
                             "another training run?)")
        sae = cls(c["d_in"], c["n_latents"], c["k"])
        sae.load_state_dict(read_safetensors(weights), strict=True)
        sae.made_from = c.get("made_from")
        return sae.to(device)


@torch.no_grad()
def batch_topk(pre, k):
    """BatchTopK: the k * B largest positive pre-activations of a batch pre (B, n), wherever they
    sit in it (so a token may use more or fewer than k latents). Returns their (rows, cols)."""
    top = torch.relu(pre).flatten().topk(min(k * pre.shape[0], pre.numel()))
    flat = top.indices[top.values > 0]
    return flat // pre.shape[1], flat % pre.shape[1]


def _decode(B, sae, rows, cols, vals, bias=True):
    """Sum over the chosen pairs of vals * W_dec[col] (+ b_dec): sparse (B, n) x (n, d) product."""
    # indices come from topk over distinct entries, so they are valid and unique by construction
    z = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (B, sae.n_latents),
                                check_invariants=False)
    out = torch.sparse.mm(z, sae.W_dec)
    return out + sae.b_dec if bias else out


def train_step(sae, xn, cfg, state):
    """One BatchTopK step on normalised inputs xn (B, d). Returns (loss, metrics).

    One dense encoder product (its backward is the second and last dense product); the decoder
    works on the k * B selected pairs only, as a sparse product.
    """
    B = xn.shape[0]
    # (xn - b_dec) W_enc + b_enc, arranged so that b_dec's gradient needs no second (B, d) x (d, n)
    # product
    raw = xn @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)  # (B, n)
    rows, cols = batch_topk(raw, sae.k)
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
    aux, k_aux = torch.zeros((), device=xn.device), 0
    if dead.any() and cfg.aux_coeff > 0:
        k_aux = min(cfg.k_aux or sae.d_in // 2, int(dead.sum()))
        # only dead latents compete; no ReLU here, so latents whose pre-activations went negative
        # everywhere still get a gradient and can come back
        with torch.no_grad():
            ta = raw.detach().masked_fill(~dead, -torch.inf).topk(k_aux, dim=1)
            arows = torch.arange(B, device=xn.device).repeat_interleave(k_aux)
            acols = ta.indices.flatten()
        e = (xn - x_hat).detach()
        e_hat = _decode(B, sae, arows, acols, raw[arows, acols], bias=False)
        e_var = (e - e.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
        aux = (e_hat - e).pow(2).sum(-1).mean() / e_var
    # the inference threshold: EMA of the smallest selected activation
    with torch.no_grad():
        if len(vals):
            m = vals.min()
            t = state["threshold_steps"] + 1
            # a plain running mean until it is an EMA of 1 / (1 - beta) steps
            beta = min(cfg.threshold_beta, 1 - 1 / t)
            sae.threshold.copy_(beta * sae.threshold + (1 - beta) * m)
            state["threshold_steps"] = t
    total = loss + cfg.aux_coeff * aux
    return total, dict(mse=loss.item() / sae.d_in, fvu=(err.mean() / var).item(), aux=aux.item(),
                       l0=len(rows) / B, dead=dead.float().mean().item(), k_aux=k_aux)


@torch.no_grad()
def evaluate(sae, x, batch=8192):
    """FVU (normalised and raw space), MSE, L0 and firing frequencies, with the inference
    threshold."""
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
    return dict(fvu=err_n / max(var_n, 1e-12), fvu_raw=err_r / max(var_r, 1e-12),
                mse=err_n / max(n * sae.d_in, 1),
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


def save_state(path, step, sae, opt, state, epoch_rng, agg):
    """Everything a resumed run needs, in one file written whole: weights, Adam moments, dead-latent
    counters, the generator state that draws this epoch's order, the open logging window."""
    t = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        t.update({f"opt.{i}.{k}": v for k, v in st.items()})
    t.update(since=state["since"], epoch_rng=epoch_rng)
    meta = dict(step=step, threshold_steps=state["threshold_steps"], agg=agg)
    write_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in t.items()},
                            metadata={"rank1": json.dumps(meta)}))


def load_state(path, sae, opt, state, dev):
    """Restore save_state's file; returns (steps done, epoch generator state, logging window)."""
    t = read_safetensors(path)
    meta = json.loads(safetensors_metadata(path)["rank1"])
    sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
    opt_sd = opt.state_dict()
    groups = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, i, name = k.split(".")
            groups.setdefault(int(i), {})[name] = v.to(dev) if name != "step" else v
    opt.load_state_dict(dict(state=groups, param_groups=opt_sd["param_groups"]))
    state.update(since=t["since"].to(dev), threshold_steps=meta["threshold_steps"])
    return meta["step"], t["epoch_rng"], meta["agg"]


def train_sae(x, cfg=None, log=print, metrics_file=None, state_file=None):
    """Train on an in-memory (N, d) float tensor; returns the SAE (.metrics: held-out metrics).
    With state_file, training state is saved there every cfg.save_every steps and a run that
    finds the file continues from it, with the same result as a run that was never stopped."""
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
    start, agg, epoch_rng = 0, {}, None
    if state_file and os.path.isfile(state_file):
        start, epoch_rng, agg = load_state(state_file, sae, opt, state, dev)
        g.set_state(epoch_rng)  # draws this epoch's order again, and goes on as it did
        order = train[torch.randperm(len(train), generator=g)]
    bar = tqdm(range(start, total), desc="sae", file=sys.stderr, disable=log is None)
    t0 = time.time()
    for step in bar:
        if step % steps_per_epoch == 0:
            epoch_rng = g.get_state()
            order = train[torch.randperm(len(train), generator=g)]
        i = step % steps_per_epoch
        xb = x[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]].float().to(dev) / sae.scale
        # linear warm-up, constant, linear decay to 0 over the last 20%
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup),
                          (total - step) / max(1, 0.2 * total))
        for grp in opt.param_groups:
            grp["lr"] = lr
        m = update(sae, opt, xb, cfg, state)
        for k, v in m.items():
            agg[k] = agg.get(k, 0.0) + v
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            n = (step % cfg.log_every) + 1
            rec = {"step": step + 1, **{k: v / n for k, v in agg.items()},
                   "tokens_per_s": (step + 1 - start) * cfg.batch_size / (time.time() - t0),
                   "threshold": sae.threshold.item()}
            if len(hold):
                rec["heldout_fvu"] = evaluate(sae, hold[:8192])["fvu"]
            agg = {}
            if metrics_file:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            bar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}",
                            dead=f"{rec['dead']:.3f}")
        if state_file and cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_state(state_file, step + 1, sae, opt, state, epoch_rng, agg)
    sae.metrics = evaluate(sae, hold) if len(hold) else None
    if log and sae.metrics:
        mm = sae.metrics
        log(f"sae: held-out FVU {mm['fvu']:.4f} (raw {mm['fvu_raw']:.4f}) | L0 {mm['l0']:.2f} | "
            f"dead {100 * mm['dead_fraction']:.1f}% | {mm['tokens']} tokens")
    return sae.cpu()


# -----------------------------------------------------------------------------
# command line


SAE_FILES = ("sae.safetensors", "cfg.json", "metrics.jsonl", "metrics.json", "run.json",
             "train-state.safetensors")


def cmd_train(args):
    """Train on a store into --out. A rerun with the same store and settings continues an
    unfinished run (train-state.safetensors) or, when it finished, has nothing to do; other
    settings need --overwrite (which replaces this command's files only)."""
    check_out(args.out, {"--acts": args.acts})
    store = ActivationStore(args.acts)
    cfg = config_from_flags(SAEConfig, args)
    settings = {k: v for k, v in asdict(cfg).items() if k != "save_every"}  # results depend on
    made_from = dict(store=store.identity(), config=settings)
    os.makedirs(args.out, exist_ok=True)
    out = lambda n: os.path.join(args.out, n)
    if args.overwrite:
        for n in SAE_FILES:
            if os.path.exists(out(n)):
                os.remove(out(n))
    elif os.path.isfile(out("cfg.json")):
        same_origin(read_json(out("cfg.json")).get("made_from") or {}, made_from, out("cfg.json"))
        print(f"sae: {args.out} already holds this SAE")
        return SAE.load(args.out)
    elif os.path.isfile(out("run.json")) or os.path.isfile(out("train-state.safetensors")):
        same_origin(read_json(out("run.json")), made_from, out("run.json"))
    elif any(os.path.exists(out(n)) for n in SAE_FILES):
        raise ValueError(f"{args.out}: holds SAE files of an unknown run; pass --overwrite")
    write_json(out("run.json"), made_from)
    state_file = out("train-state.safetensors")
    step = (json.loads(safetensors_metadata(state_file)["rank1"])["step"]
            if os.path.isfile(state_file) else 0)
    kept = ([l for l in open(out("metrics.jsonl")) if l.strip() and json.loads(l)["step"] <= step]
            if step and os.path.isfile(out("metrics.jsonl")) else [])
    write_atomic(out("metrics.jsonl"), "".join(kept))  # each logged step once, after a resume
    with open(out("metrics.jsonl"), "a") as mf:
        sae = train_sae(store.load_all(), cfg, metrics_file=mf, state_file=state_file)
    write_json(out("metrics.json"), dict(heldout=sae.metrics, sites=store.index["sites"],
                                         made_from=made_from))
    sae.save(args.out, cfg, sae.metrics, made_from)  # cfg.json last: the SAE is complete
    for n in ("train-state.safetensors", "run.json"):
        if os.path.exists(out(n)):
            os.remove(out(n))
    return sae


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the BatchTopK SAE on a collected store")
    t.add_argument("--acts", required=True, help="a store written by collect.py")
    t.add_argument("--out", required=True)
    t.add_argument("--overwrite", action="store_true",
                   help="replace an SAE trained in --out with other settings")
    add_config_flags(t, SAEConfig)
    t.set_defaults(func=cmd_train)
    args = p.parse_args(argv)
    with user_errors("sae.py"):
        return args.func(args)


if __name__ == "__main__":
    main()
