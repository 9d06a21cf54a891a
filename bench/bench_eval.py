"""
eval.py's decoding path on CPU, tiny Qwen2: batched greedy generation tokens/s at batch 1 and 8
against HF transformers' generate on the same weights in the same run, and the extra decode cost
of an unmerged rank-1 adapter (all 7 projections) over the same adapter merged into the weights.

    python bench/bench_eval.py
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import compare_decode, decode_fns, header, interleaved, tiny_pair  # noqa: E402
from lora import adapters, apply_lora, merge  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--new-tokens", type=int, default=64)
args = p.parse_args()
ours, hf = tiny_pair()
ours.eval(), hf.eval()
header("bench_eval: greedy generate, hidden 256, 4 layers, vocab 2048, fp32 CPU")
n = args.new_tokens
for B in (1, 8):
    print(compare_decode(ours, hf, B, n, args.repeats))

unmerged = apply_lora(copy.deepcopy(ours), verbose=False)
for a in adapters(unmerged):
    torch.nn.init.normal_(a.lora_B, std=0.01)
merged = copy.deepcopy(unmerged)
merge(merged)
for B in (1, 8):
    fu, fm = decode_fns(unmerged, hf, B, n)["ours"], decode_fns(merged, hf, B, n)["ours"]
    t = interleaved({"unmerged": fu, "merged": fm}, args.repeats)
    print(f"batch {B} | adapter unmerged {B * n / t['unmerged']:.0f} tok/s | merged "
          f"{B * n / t['merged']:.0f} tok/s | unmerged costs "
          f"{100 * (t['unmerged'] / t['merged'] - 1):+.1f}%")
