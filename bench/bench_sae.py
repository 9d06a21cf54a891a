"""
SAE training throughput at the paper's configuration (448 -> 3,584 latents, k = 16, batch 512) on
CPU: our step (one dense encoder product, then only the selected pairs) against a straightforward
dense BatchTopK step measured in the same run; and the cost of collecting adapter scalars (capture
in KV-cached windows) relative to a plain forward of a small adapted model.

    python -m bench.bench_sae                   # CPU, 2 threads (--threads N)
    python -m bench.bench_sae --device cuda     # the SAE step on a GPU (fp32)
"""
import argparse

import torch

from batchtopk import SAE, SAEConfig, unit_norm_step, update
from bench.timing import header, interleaved
from lora import adapters, apply_lora, doc_scalars
from model import Qwen2, Qwen2Config

D, N, K, B = 448, 3584, 16, 512  # the paper's SAE: inputs, latents, k, batch


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--repeats", type=int, default=10,
                   help="timed rounds per measurement (interleaved, median)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the project's machine: 2)")
    p.add_argument("--device", default="cpu",
                   help="where the SAE step runs (cpu or cuda); the collection part is CPU only")
    return p


def dense_step(sae, opt, xn, cfg, state):
    """The straightforward version of our step (AuxK included): dense masks, dense products,
    autograd."""
    raw = (xn - sae.b_dec) @ sae.W_enc + sae.b_enc
    pre = torch.relu(raw)
    thr = pre.flatten().topk(K * B).values[-1]
    z = pre * (pre >= thr)
    x_hat = z @ sae.W_dec + sae.b_dec
    loss = ((x_hat - xn) ** 2).sum(-1).mean()
    fired = (z > 0).any(0)
    state["since"] = torch.where(fired, 0, state["since"] + B)
    dead = state["since"] >= cfg.dead_tokens
    if dead.any():  # AuxK on dead latents, dense as well
        k_aux = min(D // 2, int(dead.sum()))
        kth = raw.detach().masked_fill(~dead, -torch.inf).topk(k_aux, dim=1).values[:, -1:]
        za = raw * (dead & (raw >= kth))
        e = (xn - x_hat).detach()
        aux = ((za @ sae.W_dec - e) ** 2).sum(-1).mean() / ((e - e.mean(0)) ** 2).sum(-1).mean()
        loss = loss + cfg.aux_coeff * aux
    unit_norm_step(sae, opt, loss)


def sae_step(dev, repeats):
    """Our SAE step against the dense one, from the same initial weights."""
    torch.manual_seed(0)
    x = (torch.randn(B, D) * torch.logspace(-2, 1, D)).to(dev)
    cfg = SAEConfig(dead_tokens=4 * B)
    ours = SAE(D, N, K)
    ours.init_weights()
    dense = SAE(D, N, K)
    dense.load_state_dict(ours.state_dict())
    ours, dense = ours.to(dev), dense.to(dev)
    opt_o = torch.optim.Adam(ours.parameters(), lr=5e-4)
    opt_d = torch.optim.Adam(dense.parameters(), lr=5e-4)
    state = dict(since=torch.zeros(N, dtype=torch.long, device=dev), threshold_steps=0,
                 dead_tokens=cfg.dead_tokens)
    dense_state = dict(since=torch.zeros(N, dtype=torch.long, device=dev))
    xn = x / x.std(0)
    t = interleaved({"ours": lambda: update(ours, opt_o, xn, cfg, state),
                     "dense": lambda: dense_step(dense, opt_d, xn, cfg, dense_state)}, repeats,
                    sync=torch.cuda.synchronize if dev.type == "cuda" else None)
    print(f"SAE step | ours {B / t['ours']:.0f} tok/s ({t['ours'] * 1e3:.1f} ms) | "
          f"straightforward dense {B / t['dense']:.0f} tok/s ({t['dense'] * 1e3:.1f} ms) | "
          f"speedup {t['dense'] / t['ours']:.2f}x")
    print(f"the paper's SAE (10M tokens, one epoch) at this rate: {1e7 * t['ours'] / B / 60:.0f} "
          "min (target: under 30 min on one GPU)")


def collection(repeats):
    """doc_scalars (capture, KV-cached windows) against a plain no-grad forward."""
    m = Qwen2(Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=688,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2))
    apply_lora(m, verbose=False)
    for a in adapters(m):
        torch.nn.init.normal_(a.lora_B, std=0.01)
    ids = torch.randint(0, 2048, (2048,)).tolist()

    @torch.no_grad()
    def plain():
        m(torch.tensor([ids]))
    t = interleaved({"plain": plain, "collect": lambda: doc_scalars(m, ids, 2048),
                     "collect_windows": lambda: doc_scalars(m, ids, 512)}, repeats)
    pct = lambda k: f"{100 * (t[k] / t['plain'] - 1):+.1f}%"
    print(f"collection of 2048 tokens | plain forward {t['plain'] * 1e3:.1f} ms | collect "
          f"{t['collect'] * 1e3:.1f} ms ({pct('collect')}) | in windows of 512 "
          f"{t['collect_windows'] * 1e3:.1f} ms ({pct('collect_windows')})")


def main(argv=None):
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    header(f"bench_sae: BatchTopK step 448 -> 3584, k 16, batch 512, fp32 {args.device} "
           f"({args.threads} CPU threads)")
    sae_step(dev, args.repeats)
    if dev.type == "cpu":
        collection(args.repeats)


if __name__ == "__main__":
    main()
