"""
Our Qwen2 vs HF transformers' on the same tiny config, CPU, same run: training forward+backward
time, and greedy decode tokens/s (batch 1 and 8).

    python -m bench.bench_model            # add --repeats 10 for tighter medians
"""
import argparse

import torch

from bench.timing import compare_decode, header, interleaved, tiny_pair


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds per measurement (interleaved, median)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence of the training step")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per sequence")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
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
    print(f"train fwd+bwd B=2 T={args.seq} | ours {t['ours'] * 1e3:.1f} ms | hf "
          f"{t['hf'] * 1e3:.1f} ms | ratio ours/hf {t['ours'] / t['hf']:.3f} (target <= 1.10)")
    hf.eval(), ours.eval()
    for B in (1, 8):
        print(compare_decode(ours, hf, B, args.new_tokens, args.repeats))


if __name__ == "__main__":
    main()
