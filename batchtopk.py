"""
The BatchTopK sparse autoencoder (Bussmann et al.): what a trained SAE is and does, its training
config (SAEConfig) and one training step (train_step, then unit_norm_step: update). sae.py runs
the steps: the schedule, held-out checks, resumable training, its commands.

    from batchtopk import SAE
    sae = SAE.load("sae/")                 # sae.safetensors + cfg.json, checksum verified
    z = sae.encode(x)                      # raw adapter scalars (N, d) -> latents (N, n_latents)
    x_hat = sae.decode(z)

Inputs are divided by a per-dimension scale (their std: the 448 scalars differ by orders of
magnitude); the SAE lives in that space and keeps `scale` as a buffer, so encode() and decode()
take and return raw scalars, and folded() gives the equivalent raw-space weights. Decoder rows
have unit norm. Training selects the k * B largest pre-activations of a batch (batch_topk); at
inference a learned global threshold replaces that choice, so a token's latents never depend on
the rest of its batch.
"""
import hashlib
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save

from checkpoint import read_safetensors
from common import check_numbers, differences, read_json, sha256_file, write_atomic, write_json
from interop import SAELENS_WEIGHTS, read_saelens_cfg


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
    def init_weights(self, data=None, generator=None):
        """Each decoder row at a different random row of data (normalised inputs minus b_dec), at
        a random direction where data has too few rows or a zero row; unit norm; W_enc = W_dec^T,
        scaled (with data) so that the first reconstructions are least-squares calibrated: k
        latents started on data rows would each rebuild most of a token. Started on the data,
        the rows need not search for it: a planted dictionary is found in a fraction of the steps
        a random start needs (tests/test_sae.py)."""
        w = torch.randn(self.W_dec.shape, generator=generator)
        if data is not None:
            pick = torch.randperm(len(data), generator=generator)[:self.n_latents]
            rows = data[pick.to(data.device)].float().cpu()
            norms = rows.norm(dim=1)
            ok = norms > 1e-6 * norms.max().clamp(min=1e-30)
            w[:len(rows)][ok] = rows[ok]
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        if data is not None:  # a scale c > 0 keeps BatchTopK's choice and scales x_hat by c
            e = data[:8192].float()
            raw = e @ self.W_enc
            rows, cols = batch_topk(raw, self.k)
            xh = sparse_decode(len(e), self, rows, cols, raw[rows, cols], bias=False)
            self.W_enc *= ((xh * e).sum() / (xh * xh).sum().clamp(min=1e-12)).clamp(min=1e-3)

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
        """An SAE directory (sae.py train's, or an SAELens folder: from_saelens); .made_from says
        what it was trained on (None if unrecorded)."""
        f = os.path.join(path, "cfg.json")
        if not os.path.isfile(f):
            raise ValueError(f"{path}: not an SAE directory (no cfg.json; expected sae.py train's "
                             "output or an SAELens folder)")
        if os.path.isfile(os.path.join(path, SAELENS_WEIGHTS)):
            return cls.from_saelens(path, device)
        c = read_json(f, ("d_in", "n_latents", "k"), "an SAE's cfg.json (sae.py train)")
        weights = os.path.join(path, "sae.safetensors")
        if c.get("weights_sha256") not in (None, sha256_file(weights)):
            raise ValueError(f"{weights}: does not match the checksum in cfg.json (a file from "
                             "another training run?)")
        sae = cls(c["d_in"], c["n_latents"], c["k"])
        tensors = read_safetensors(weights)
        sae.threshold = torch.zeros(tensors["threshold"].shape)  # one, or one per latent
        sae.load_state_dict(tensors, strict=True)
        sae.made_from = c.get("made_from")
        return sae.to(device)

    @classmethod
    def from_saelens(cls, path, device="cpu"):
        """An SAELens JumpReLU folder (interop.py: raw inputs, a threshold per latent) as an SAE
        with scale 1; made_from is the rank1 store it names, if it names one (foreign: not)."""
        c = read_saelens_cfg(path)
        d, n = c["d_in"], c["d_sae"]
        f = os.path.join(path, SAELENS_WEIGHTS)
        t = read_safetensors(f, dtype=torch.float32)
        shapes = dict(W_enc=(d, n), b_enc=(n,), W_dec=(n, d), b_dec=(d,), threshold=(n,))
        for k, shape in shapes.items():
            if k not in t or tuple(t[k].shape) != shape:
                raise ValueError(f"{f}: expected {k} of shape {shape} for d_in {d}, d_sae {n} "
                                 f"(cfg.json), found {tuple(t[k].shape) if k in t else 'none'}")
        rank1 = (c.get("metadata") or {}).get("rank1") or {}
        sae = cls(d, n, rank1.get("k", 0))
        sae.threshold = torch.zeros(n)
        sae.load_state_dict({**{k: t[k] for k in shapes}, "scale": torch.ones(d)}, strict=True)
        sae.made_from = dict(store=rank1["store"]) if rank1.get("store") else None
        sae.foreign = not rank1
        return sae.to(device)


@torch.no_grad()
def batch_topk(pre, k):
    """BatchTopK: the k * B largest positive pre-activations of a batch pre (B, n), wherever they
    sit in it (so a token may use more or fewer than k latents). Returns their (rows, cols)."""
    top = torch.relu(pre).flatten().topk(min(k * pre.shape[0], pre.numel()))
    flat = top.indices[top.values > 0]
    return flat // pre.shape[1], flat % pre.shape[1]


def sparse_decode(B, sae, rows, cols, vals, bias=True):
    """Sum over the chosen pairs of vals * W_dec[col] (+ b_dec): sparse (B, n) x (n, d) product."""
    # indices come from topk over distinct entries, so they are valid and unique by construction
    z = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (B, sae.n_latents),
                                check_invariants=False)
    out = torch.sparse.mm(z, sae.W_dec)
    return out + sae.b_dec if bias else out


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


def check_sae(sae, sae_dir, store):
    """An SAE may read a store only if it was trained on that store (the same adapter, corpus and
    collection settings: the scalars it decomposes)."""
    if sae.d_in != store.d:
        raise ValueError(f"{sae_dir}: an SAE of width {sae.d_in}, but {store.path} stores "
                         f"{store.d} scalars per token (an SAE of another adapter or layout)")
    trained_on = (sae.made_from or {}).get("store")
    if trained_on is None and getattr(sae, "foreign", False):
        print(f"{sae_dir}: an SAELens SAE that names no rank1 store; read on {store.path} as "
              "its width matches", file=sys.stderr)
        return
    if trained_on is None:
        raise ValueError(f"{sae_dir}: cfg.json does not say which store the SAE was trained on")
    diff = differences(trained_on, store.identity())
    if diff:
        raise ValueError(f"{sae_dir}: trained on another store than {store.path} "
                         f"({'; '.join(diff[:3])})")


# -----------------------------------------------------------------------------
# training: the config and one step (sae.py runs the steps)


@dataclass
class SAEConfig:
    expansion: int = 8          # latents = expansion * d_in (3,584 for 448)
    k: int = 16                 # mean active latents per token (BatchTopK: k * batch per batch)
    lr: float = 5e-4            # Adam's learning rate (the official code's)
    batch_size: int = 512       # tokens per step (BatchTopK keeps k x this many activations)
    epochs: int = 0             # 0: enough epochs for min_tokens (at least one)
    min_tokens: int = 10_000_000  # what the default trains on: a plateau at the paper's scale
    steps: int = 0              # > 0 overrides epochs
    warmup: int = 100           # linear lr warm-up steps
    aux_coeff: float = 1 / 32   # weight of the AuxK loss that revives dead latents
    k_aux: int = 0              # 0: d_in // 2
    dead_tokens: int = 0        # dead after this many tokens without firing (0: see schedule)
    threshold_beta: float = 0.999  # EMA of the smallest selected activation -> inference threshold
    holdout: float = 0.05       # fraction of tokens held out for FVU
    plateau: float = 0.002      # warn if held-out FVU fell more than this in the last tenth
    normalize: bool = True      # divide inputs by their per-dimension std
    init: str = "data"          # decoder rows at training rows, or "random" unit directions
    seed: int = 42              # seeds the held-out split, the data order and the init
    log_every: int = 100        # steps between lines of metrics.jsonl
    save_every: int = 1000      # steps between saves of the training state (sae.py train resumes)
    device: str = "auto"          # auto (cuda where there is one, else cpu), cpu, cuda, cuda:N

    # ranges of the numbers (common.RANGES); lr 0 trains nothing, which shows the initialisation
    RANGES = dict(expansion="positive", k="positive", batch_size="positive", lr="nonnegative",
                  epochs="nonnegative", min_tokens="nonnegative", steps="nonnegative",
                  warmup="nonnegative", aux_coeff="nonnegative", k_aux="nonnegative",
                  dead_tokens="nonnegative", threshold_beta="below_one", holdout="below_one",
                  plateau="nonnegative", seed="seed", log_every="positive", save_every="positive")

    def __post_init__(self):
        if self.init not in ("random", "data"):
            raise ValueError(f"--init must be random or data, got {self.init!r}")
        check_numbers(self)


def train_step(sae, xn, cfg, state):
    """One BatchTopK step on normalised inputs xn (B, d): (loss, metrics). The decoder works on
    the k * B selected pairs only; state holds the dead-latent counters and the threshold's."""
    B = xn.shape[0]
    # (xn - b_dec) W_enc + b_enc, arranged so that b_dec's gradient needs no other dense product
    raw = xn @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)  # (B, n)
    rows, cols = batch_topk(raw, sae.k)
    vals = torch.relu(raw[rows, cols])
    x_hat = sparse_decode(B, sae, rows, cols, vals)
    err = (x_hat - xn).pow(2).sum(-1)
    var = (xn - xn.mean(0)).pow(2).sum(-1).mean()
    loss = err.mean()
    # dead latents and the AuxK loss
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=xn.device)
    fired[cols] = True
    state["since"] = torch.where(fired, 0, state["since"] + B)
    dead = state["since"] >= state["dead_tokens"]
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
        e_hat = sparse_decode(B, sae, arows, acols, raw[arows, acols], bias=False)
        e_var = (e - e.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-12)
        aux = (e_hat - e).pow(2).sum(-1).mean() / e_var
    # the inference threshold: EMA of the smallest selected activation
    if len(vals):  # a plain running mean until it is an EMA of 1 / (1 - beta) steps
        t = state["threshold_steps"] = state["threshold_steps"] + 1
        beta = min(cfg.threshold_beta, 1 - 1 / t)
        sae.threshold.copy_(beta * sae.threshold + (1 - beta) * vals.detach().min())
    total = loss + cfg.aux_coeff * aux
    return total, dict(mse=loss.item() / sae.d_in, fvu=(err.mean() / var).item(), aux=aux.item(),
                       l0=len(rows) / B, dead=dead.float().mean().item(), k_aux=k_aux)


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
