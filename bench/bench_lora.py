"""
Cost of a rank-1 adapter on top of its frozen linear: forward + backward (dx, dA, dB; W frozen)
relative to the frozen linear alone (forward + dx), for our implementation and a PEFT-style eager
one (y = base(x) + lora_B(lora_A(x)) * s), measured in the same run; plus the cost of capture().

    python -m bench.bench_lora                # CPU proxy: Qwen2.5-32B shapes / 5, T = 2048, fp32
    python -m bench.bench_lora --device cuda  # GPU: the 7 32B shapes, T 4096 / 16384 / 32768, bf16

On CUDA our path is the fused kernel when it builds (LORA_IMPL=ref forces the reference path).
"""
import argparse
import statistics

import torch

from bench.timing import header, rank1_bytes, rank1_times, timeit
from lora import apply_lora, capture
from model import Qwen2, Qwen2Config

# (in, out): q, k, v, o, gate, up, down
SHAPES_32B = [(5120, 5120), (5120, 1024), (5120, 1024), (5120, 5120), (5120, 27648), (5120, 27648),
              (27648, 5120)]
SHAPES_CPU = [(1024, 1024), (1024, 256), (1024, 5504), (5504, 1024)]


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--device", default="cpu",
                   help="cpu (the shapes / 5, fp32) or cuda (the 32B shapes, bf16)")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed rounds per shape (interleaved, median)")
    p.add_argument("--T", type=int, nargs="*", default=None,
                   help="tokens per call (default: 4096 16384 32768 on cuda, 2048 on the CPU)")
    return p


def op_table(shapes, Ts, dev, dtype, repeats):
    """One line per (T, shape): ours and PEFT-style against the frozen linear; the medians and
    the time-weighted overheads."""
    total = {"plain": 0.0, "ours": 0.0, "peft": 0.0}
    overheads_ours, overheads_peft = [], []
    for T in Ts:
        for din, dout in shapes:
            t = rank1_times(din, dout, T, dev, dtype, repeats)
            for k in total:
                total[k] += t[k]
            ro, rp = t["ours"] / t["plain"], t["peft"] / t["plain"]
            overheads_ours.append(ro), overheads_peft.append(rp)
            extra = t["ours"] - t["plain"]
            nbytes = rank1_bytes(din, dout, T, torch.finfo(dtype).bits // 8)
            bw = f"{nbytes / extra / 1e9:7.1f} GB/s" if extra > 0 else "within noise"
            print(f"T {T:6d} in {din:5d} out {dout:5d} | plain {t['plain'] * 1e3:8.2f} ms | ours "
                  f"{t['ours'] * 1e3:8.2f} ms ({ro:.3f}x) | peft-style {t['peft'] * 1e3:8.2f} ms "
                  f"({rp:.3f}x) | rank-1 part {bw}")
    met = (statistics.median(overheads_ours) <= 1.10
           and all(o < p for o, p in zip(overheads_ours, overheads_peft)))
    print(f"median overhead: ours {statistics.median(overheads_ours):.3f}x, peft-style "
          f"{statistics.median(overheads_peft):.3f}x (target <= 1.10 and below peft-style on "
          f"every shape: {'met' if met else 'NOT met'})")
    print(f"time-weighted overhead: ours {100 * (total['ours'] / total['plain'] - 1):+.1f}%, "
          f"peft-style {100 * (total['peft'] / total['plain'] - 1):+.1f}%")


def capture_cost(dev, dtype, repeats, sync):
    """capture(): a small adapted model's forward with and without recording the scalars."""
    torch.manual_seed(0)
    m = Qwen2(Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=688,
                          num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=2)).to(dev, dtype)
    apply_lora(m, verbose=False)
    idx = torch.randint(0, 2048, (2, 1024), device=dev)

    @torch.no_grad()
    def fwd():
        m(idx)

    @torch.no_grad()
    def fwd_capture():
        with capture(m) as cap:
            m(idx)
        cap.acts
    # the capture cost is a few small appends, far below this machine's noise: many interleaved
    # rounds, and the best-of as well as the median, since a noisy neighbour only ever adds time
    times = {"plain": [], "capture": []}
    for _ in range(2):
        fwd(), fwd_capture()
    for _ in range(max(30, repeats * 3)):
        for k, f in (("plain", fwd), ("capture", fwd_capture)):
            times[k].append(timeit(f, sync))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"capture overhead on a forward (4 layers, B 2 x T 1024): median "
          f"{100 * (med['capture'] / med['plain'] - 1):+.1f}%, best-of "
          f"{100 * (best['capture'] / best['plain'] - 1):+.1f}% (target <= 3%)")


def main(argv=None):
    args = parser().parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    header(f"bench_lora on {torch.cuda.get_device_name() if cuda else 'CPU'}, {dtype}")
    op_table(SHAPES_32B if cuda else SHAPES_CPU, args.T or ([4096, 16384, 32768] if cuda
                                                             else [2048]), dev, dtype, args.repeats)
    capture_cost(dev, dtype, args.repeats, torch.cuda.synchronize if cuda else None)


if __name__ == "__main__":
    main()
