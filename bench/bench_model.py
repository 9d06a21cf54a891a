"""
Our Qwen2 vs HF transformers' on the same tiny config, CPU, same run:
training forward+backward time, and greedy decode tokens/s (batch 1 and 8).

    python bench/bench_model.py            # add --repeats 10 for tighter medians
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import compare_decode, header, interleaved, tiny_pair  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--seq", type=int, default=512)
p.add_argument("--new-tokens", type=int, default=64)
args = p.parse_args()

ours, hf = tiny_pair()
cfg = ours.cfg
hf.train(), ours.train()
header(f"bench_model: hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, vocab "
       f"{cfg.vocab_size}, fp32 CPU")

idx = torch.randint(0, cfg.vocab_size, (2, args.seq))


def step_ours():
    _, loss = ours(idx, idx)
    loss.backward()


def step_hf():
    hf(idx, labels=idx).loss.backward()


t = interleaved({"ours": step_ours, "hf": step_hf}, args.repeats)
print(f"train fwd+bwd B=2 T={args.seq} | ours {t['ours'] * 1e3:.1f} ms | hf {t['hf'] * 1e3:.1f} ms "
      f"| ratio ours/hf {t['ours'] / t['hf']:.3f} (target <= 1.10)")

hf.eval(), ours.eval()
n = args.new_tokens
for B in (1, 8):
    print(compare_decode(ours, hf, B, n, args.repeats))
