"""Timing helpers shared by the benchmarks: interleaved runs, medians, one printed line per
figure."""
import statistics
import time

import torch
import torch.nn.functional as F


def timeit(fn, sync=None):
    if sync:
        sync()
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


def interleaved(fns, repeats, warmup=1, sync=None):
    """Run each fn in turn `repeats` times (after `warmup` rounds); return {name: median seconds}.

    Interleaving spreads machine noise evenly over the contenders, so ratios are fair even when
    absolute times drift.
    """
    for _ in range(warmup):
        for fn in fns.values():
            timeit(fn, sync)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timeit(fn, sync))
    return {k: statistics.median(v) for k, v in times.items()}


def header(title):
    print(f"# {title} | torch {torch.__version__} | threads {torch.get_num_threads()}")


def tiny_pair(vocab=2048, hidden=256, layers=4):
    """(ours, hf): the same random tiny Qwen2 in our model.py and in transformers (the baseline)."""
    import tempfile

    import transformers

    from model import Qwen2
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=688,
                                   num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2,
                                   max_position_embeddings=8192,
                                   rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Qwen2.from_pretrained(d)
    return ours, hf


def decode_fns(ours, hf, B, n, prompt_len=32):
    """Greedy decoding of n tokens for B prompts: {ours, hf} closures over the same prompts, and
    `matmuls`: only the matrix products of n decode steps (every linear layer and the LM head, which
    any decoder runs), the floor that no removal of overhead goes below."""
    prompts = torch.randint(0, ours.cfg.vocab_size, (B, prompt_len))
    am = torch.ones_like(prompts)
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(B, m.in_features) for m in linears]

    def dec_ours():
        ours.generate(prompts, n)

    def dec_hf():
        with torch.no_grad():
            hf.generate(prompts, attention_mask=am, max_new_tokens=n, min_new_tokens=n,
                        do_sample=False,
                        pad_token_id=0, eos_token_id=None)

    @torch.no_grad()
    def matmuls():
        for _ in range(n):
            for m, x in zip(linears, xs):
                F.linear(x, m.weight, m.bias)
    return {"ours": dec_ours, "hf": dec_hf, "matmuls": matmuls}


def compare_decode(ours, hf, B, n, repeats):
    """One printed line: our greedy tokens/s against HF generate's, and the bound the matmuls
    set."""
    t = interleaved(decode_fns(ours, hf, B, n), repeats)
    return (f"greedy decode B={B} {n} tokens | ours {B * n / t['ours']:.0f} tok/s | hf "
            f"{B * n / t['hf']:.0f} tok/s | speedup {t['hf'] / t['ours']:.2f}x (target >= 2) | "
            f"matmuls alone {t['matmuls'] / n * 1e3:.2f} ms/step = {t['matmuls'] / t['hf']:.0%} of "
            f"hf's time: at most {t['hf'] / t['matmuls']:.2f}x if all else were free")


# -----------------------------------------------------------------------------
# the rank-1 op against the frozen linear and a PEFT-style adapter (bench_lora.py, gpu.py)


class PeftStyle(torch.nn.Module):
    """What PEFT's Linear.forward does for one adapter (dropout = identity)."""

    def __init__(self, base, A, B, s):
        super().__init__()
        self.base, self.s = base, s
        self.lora_A = torch.nn.Linear(A.shape[1], 1, bias=False, device=A.device)
        self.lora_B = torch.nn.Linear(1, B.shape[0], bias=False, device=B.device)
        self.lora_A.weight.data.copy_(A), self.lora_B.weight.data.copy_(B)

    def forward(self, x):
        result = self.base(x)
        dt = result.dtype
        result = result + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.s
        return result.to(dt)


def rank1_times(din, dout, T, dev, dtype, repeats, backward=True):
    """Median seconds of the frozen linear ("plain"), our LoRALinear ("ours") and a PEFT-style
    adapter ("peft") on T tokens: forward, or forward + backward (dx, dA, dB; W frozen)."""
    from lora import LoRALinear
    torch.manual_seed(0)
    base = torch.nn.Linear(din, dout, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    ours = LoRALinear(base, layer=0, target="q_proj")
    torch.nn.init.normal_(ours.lora_B, std=0.01)
    peft = PeftStyle(base, ours.lora_A.data, ours.lora_B.data, ours.scaling)
    x = torch.randn(T, din, device=dev, dtype=dtype, requires_grad=backward)
    g = torch.randn(T, dout, device=dev, dtype=dtype)

    def run(mod):
        def f():
            if not backward:
                with torch.no_grad():
                    return mod(x)
            x.grad = None
            mod(x).backward(g)
            for prm in mod.parameters():
                prm.grad = None
        return f
    sync = torch.cuda.synchronize if torch.device(dev).type == "cuda" else None
    return interleaved({"plain": run(base), "ours": run(ours), "peft": run(peft)}, repeats,
                       sync=sync)


def rank1_bytes(din, dout, T, itemsize, backward=True):
    """What the rank-1 part moves beyond the frozen linear: the forward reads x (u) and reads and
    writes y; the backward reads g once (g . b and dB in one pass), reads x (dA) and reads and
    writes dx."""
    return (din + 2 * dout + ((dout + din + 2 * din) if backward else 0)) * T * itemsize
