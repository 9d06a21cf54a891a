"""
Our Qwen2 vs HF transformers' on the same tiny config, CPU, same run:
training forward+backward time, and greedy decode tokens/s (batch 1 and 8).

    python bench/bench_model.py            # add --repeats 10 for tighter medians
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import header, interleaved  # noqa: E402
from model import Qwen2  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--seq", type=int, default=512)
p.add_argument("--new-tokens", type=int, default=64)
args = p.parse_args()

import transformers  # noqa: E402  (the baseline; test-only dependency)

cfg = transformers.Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                               rope_theta=1e6, tie_word_embeddings=False)
torch.manual_seed(0)
hf = transformers.Qwen2ForCausalLM(cfg)
with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    ours = Qwen2.from_pretrained(d)
hf.train(), ours.train()
header(f"bench_model: hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, vocab {cfg.vocab_size}, fp32 CPU")

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
    prompts = torch.randint(0, cfg.vocab_size, (B, 32))
    am = torch.ones_like(prompts)

    def dec_ours():
        ours.generate(prompts, n)

    def dec_hf():
        with torch.no_grad():
            hf.generate(prompts, attention_mask=am, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, eos_token_id=None)

    t = interleaved({"ours": dec_ours, "hf": dec_hf}, args.repeats)
    print(f"greedy decode B={B} {n} tokens | ours {B * n / t['ours']:.0f} tok/s | hf {B * n / t['hf']:.0f} tok/s "
          f"| speedup {t['hf'] / t['ours']:.2f}x (target >= 2)")
