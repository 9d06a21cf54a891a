"""
SAE training throughput at the paper's configuration (448 -> 3,584 latents, k = 16, batch 512) on
CPU: our step (one dense encoder product, then only the selected pairs) against a straightforward
dense BatchTopK step measured in the same run; and the cost of collecting adapter scalars (capture
in KV-cached windows) relative to a plain forward of a small adapted model.

    python bench/bench_sae.py                   # CPU, 2 threads (--threads N)
    python bench/bench_sae.py --device cuda     # the SAE step on a GPU (fp32)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batchtopk import SAE, SAEConfig, unit_norm_step, update  # noqa: E402
from bench.common import header, interleaved  # noqa: E402
from lora import adapters, apply_lora, doc_scalars  # noqa: E402
from model import Qwen2, Qwen2Config  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--repeats", type=int, default=10)
p.add_argument("--threads", type=int, default=2, help="CPU threads (the project's machine: 2)")
p.add_argument("--device", default="cpu")
args = p.parse_args()
torch.set_num_threads(args.threads)
dev = torch.device(args.device)
header(f"bench_sae: BatchTopK step 448 -> 3584, k 16, batch 512, fp32 {args.device} "
       f"({args.threads} CPU threads)")
torch.manual_seed(0)
d, n, k, B = 448, 3584, 16, 512
x = (torch.randn(B, d) * torch.logspace(-2, 1, d)).to(dev)
cfg = SAEConfig(dead_tokens=4 * B)
ours = SAE(d, n, k)
ours.init_weights()
dense = SAE(d, n, k)
dense.load_state_dict(ours.state_dict())
ours, dense = ours.to(dev), dense.to(dev)
opt_o = torch.optim.Adam(ours.parameters(), lr=5e-4)
opt_d = torch.optim.Adam(dense.parameters(), lr=5e-4)
state = dict(since=torch.zeros(n, dtype=torch.long, device=dev), threshold_steps=0,
             dead_tokens=cfg.dead_tokens)
dense_state = dict(since=torch.zeros(n, dtype=torch.long, device=dev))
xn = x / x.std(0)


def step_ours():
    update(ours, opt_o, xn, cfg, state)


def step_dense():
    """The straightforward version of the same step (AuxK included): dense masks, dense products,
    autograd."""
    raw = (xn - dense.b_dec) @ dense.W_enc + dense.b_enc
    pre = torch.relu(raw)
    thr = pre.flatten().topk(k * B).values[-1]
    z = pre * (pre >= thr)
    x_hat = z @ dense.W_dec + dense.b_dec
    loss = ((x_hat - xn) ** 2).sum(-1).mean()
    fired = (z > 0).any(0)
    dense_state["since"] = torch.where(fired, 0, dense_state["since"] + B)
    dead = dense_state["since"] >= cfg.dead_tokens
    if dead.any():  # AuxK on dead latents, dense as well
        k_aux = min(d // 2, int(dead.sum()))
        kth = raw.detach().masked_fill(~dead, -torch.inf).topk(k_aux, dim=1).values[:, -1:]
        za = raw * (dead & (raw >= kth))
        e = (xn - x_hat).detach()
        aux = ((za @ dense.W_dec - e) ** 2).sum(-1).mean() / ((e - e.mean(0)) ** 2).sum(-1).mean()
        loss = loss + cfg.aux_coeff * aux
    unit_norm_step(dense, opt_d, loss)


t = interleaved({"ours": step_ours, "dense": step_dense}, args.repeats,
                sync=torch.cuda.synchronize if dev.type == "cuda" else None)
print(f"SAE step | ours {B / t['ours']:.0f} tok/s ({t['ours'] * 1e3:.1f} ms) | straightforward "
      f"dense {B / t['dense']:.0f} tok/s ({t['dense'] * 1e3:.1f} ms) | speedup "
      f"{t['dense'] / t['ours']:.2f}x")
print(f"the paper's SAE (10M tokens, one epoch) at this rate: {1e7 * t['ours'] / B / 60:.0f} min "
      "(target: under 30 min on one GPU)")
if dev.type != "cpu":
    sys.exit()

# collection overhead: doc_scalars (capture, KV-cached windows) vs a plain no-grad forward
m = Qwen2(Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2))
apply_lora(m, verbose=False)
for a in adapters(m):
    torch.nn.init.normal_(a.lora_B, std=0.01)
ids = torch.randint(0, 2048, (2048,)).tolist()


@torch.no_grad()
def plain():
    m(torch.tensor([ids]))


t = interleaved({"plain": plain, "collect": lambda: doc_scalars(m, ids, 2048),
                 "collect_windows": lambda: doc_scalars(m, ids, 512)}, args.repeats)
pct = lambda k: f"{100 * (t[k] / t['plain'] - 1):+.1f}%"
print(f"collection of 2048 tokens | plain forward {t['plain'] * 1e3:.1f} ms | collect "
      f"{t['collect'] * 1e3:.1f} ms ({pct('collect')}) | in windows of 512 "
      f"{t['collect_windows'] * 1e3:.1f} ms ({pct('collect_windows')})")
