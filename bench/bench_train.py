"""
One LoRA training step (forward + backward, B x T = 2 x 1024) on CPU, tiny Qwen2 config:
ours vs our frozen-base step (same model without adapters, activation gradients only) and vs
HF transformers + PEFT (r=1, alpha 16, rsLoRA, all 7 projections) in the same run; vocab 2,048 and
the real 151,665. Then peak memory of one step at T = 4096 with the real vocabulary, ours (chunked
loss) vs HF + PEFT, each measured in a fresh subprocess.

    python -m bench.bench_train
"""
import argparse
import copy
import ctypes
import gc
import os
import subprocess
import sys

import torch

from bench.timing import header, interleaved, tiny_pair
from lora import apply_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def models(vocab):
    """(frozen base, ours with rank-1 adapters, HF + PEFT) on the same random weights."""
    import peft  # test-only (requirements-test.txt), as transformers is
    ours, hf = tiny_pair(vocab)
    base = copy.deepcopy(ours).train()
    apply_lora(ours, verbose=False).train()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=1, lora_alpha=16, use_rslora=True,
                                                 target_modules=TARGETS)).train()
    return base, ours, pm


def step_fns(base, ours, pm, B, T, vocab):
    idx = torch.randint(0, vocab, (B, T))

    def ours_step():
        ours(idx, idx, chunk_size=1024).backward()
        ours.zero_grad(set_to_none=True)

    def base_step():  # frozen base: gradients reach the activations only (a LoRA step's floor)
        for p in base.parameters():
            p.requires_grad_(False)
        base.model.embed_tokens.weight.requires_grad_(True)  # so backward runs through every layer
        base(idx, idx, chunk_size=1024).backward()
        base.zero_grad(set_to_none=True)

    def hf_step():
        pm(input_ids=idx, labels=idx).loss.backward()
        pm.zero_grad(set_to_none=True)
    return {"ours": ours_step, "frozen": base_step, "hf+peft": hf_step}


def memory_child(which, T):
    """Peak RSS of one step above the RSS after loading (Linux: clear_refs 5 resets the high-water
    mark)."""
    base, ours, pm = models(151665)
    fn = step_fns(base, ours, pm, 1, T, 151665)[which]
    del base, ours, pm  # fn keeps only the model it steps
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)

    def rss(key):
        return int(next(l for l in open("/proc/self/status")
                        if l.startswith(key)).split()[1]) / 1024
    open("/proc/self/clear_refs", "w").write("5")
    before = rss("VmRSS:")
    fn()
    print(rss("VmHWM:") - before)  # MB


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds per measurement (interleaved, median)")
    p.add_argument("--memory-child", nargs=2, metavar=("WHICH", "T"),
                   help="internal: measure one step's peak memory (ours or hf+peft, T tokens) in "
                   "this process and print it in MB")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    header("bench_train: LoRA step, hidden 256, 4 layers, B x T = 2 x 1024, fp32 CPU")
    for vocab in (2048, 151665):
        fns = step_fns(*models(vocab), 2, 1024, vocab)
        t = interleaved(fns, args.repeats)
        print(f"vocab {vocab:6d} | ours {t['ours'] * 1e3:7.1f} ms | frozen-base "
              f"{t['frozen'] * 1e3:7.1f} ms | hf+peft {t['hf+peft'] * 1e3:7.1f} ms | ours/frozen "
              f"{t['ours'] / t['frozen']:.3f} (target <= 1.12) | hf+peft/ours "
              f"{t['hf+peft'] / t['ours']:.2f}x")
    mem = {}
    for which in ("ours", "hf+peft"):
        out = subprocess.run([sys.executable, "-m", "bench.bench_train", "--memory-child", which,
                              "4096"], capture_output=True, text=True, cwd=ROOT)
        mem[which] = float(out.stdout.strip().splitlines()[-1])
    print(f"peak memory of one step, T 4096, vocab 151665 (MB above the loaded model) | ours "
          f"{mem['ours']:.0f} | "
          f"hf+peft {mem['hf+peft']:.0f} | ratio {mem['ours'] / mem['hf+peft']:.2f}")


if __name__ == "__main__":
    main()
