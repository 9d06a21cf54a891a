"""
eval.py's decoding on CPU, tiny Qwen2 (hidden 256, 4 layers, vocab 2048, fp32), all in one run:
(a) greedy tokens/s at batch 1 and 8 of the engine (engine.py), of model.generate (the padded
batch path eval.py used before) and of HF transformers' generate on the same weights; (b) an
unmerged rank-1 adapter (all 7 projections) against the same adapter merged, on the engine;
(c) a mixed-length workload: 32 sequences whose lengths are log-uniform over 1/32 to all of the
budget (s1's traces run from hundreds to 32k tokens), 8 at a time, with slot refill, with the
engine but no refill (8 at a time, each 8 waiting for its longest), and model.generate in batches
of 8; each with the useful fraction of its decode slots (tokens wanted / slot-steps run).

    python -m bench.bench_eval [--repeats 3] [--new-tokens 64] [--longest 256]
"""
import argparse
import copy

import torch

from bench.timing import header, interleaved, tiny_pair
from engine import Engine, Turn
from lora import adapters, apply_lora, merge


def program(prompt, n):
    return (yield Turn(prompt, n))


def engine_run(model, prompts, budgets, slots, steps=None, compile=None):
    """All prompts on one engine of `slots` slots; counts its decode steps into steps[0]."""
    eng = Engine(model, slots, max(map(len, prompts)) + max(budgets), compile=compile)
    if steps is not None:
        real = eng.step
        eng.step = lambda: (steps.__setitem__(0, steps[0] + 1), real())[1]
    for _ in eng.run([program(p, n) for p, n in zip(prompts, budgets)]):
        pass


def fixed(ours, hf, B, n, repeats):
    """(a): {name: tokens/s} for B prompts of 32 tokens, n new tokens each."""
    prompts = torch.randint(0, ours.cfg.vocab_size, (B, 32))
    rows = prompts.tolist()

    @torch.no_grad()
    def run_hf():
        hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                    min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    t = interleaved({"engine": lambda: engine_run(ours, rows, [n] * B, B),
                     "model.generate": lambda: ours.generate(rows, n), "hf": run_hf}, repeats)
    return {k: B * n / v for k, v in t.items()}


def mixed(ours, longest, repeats, n_seq=32, slots=8):
    """(c): {name: (tokens/s, useful fraction of slot-steps)}."""
    g = torch.Generator().manual_seed(0)
    lens = (longest * 32 ** -torch.rand(n_seq, generator=g)).round().clamp(min=1).long().tolist()
    prompts = torch.randint(0, ours.cfg.vocab_size, (n_seq, 32), generator=g).tolist()
    batches = [range(i, i + slots) for i in range(0, n_seq, slots)]
    refill, alone = [0], [0]

    def no_refill(steps=None):
        for b in batches:
            engine_run(ours, [prompts[i] for i in b], [lens[i] for i in b], slots, steps)

    def padded():
        for b in batches:
            ours.generate([prompts[i] for i in b], max(lens[i] for i in b))
    engine_run(ours, prompts, lens, slots, refill)  # the step counts, once
    no_refill(alone)
    t = interleaved({"engine, slot refill": lambda: engine_run(ours, prompts, lens, slots),
                     "engine, no refill": no_refill, "model.generate": padded}, repeats)
    want = sum(lens)
    steps = {"engine, slot refill": refill[0], "engine, no refill": alone[0],
             "model.generate": sum(max(lens[i] for i in b) for b in batches)}
    return {k: (want / t[k], want / (slots * steps[k])) for k in t}, lens


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds per measurement (interleaved, median)")
    p.add_argument("--new-tokens", type=int, default=64,
                   help="tokens decoded per sequence in (a) and (b)")
    p.add_argument("--longest", type=int, default=256,
                   help="the mixed workload's longest budget, in tokens (c)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    torch.manual_seed(0)
    ours, hf = tiny_pair()
    ours.eval(), hf.eval()
    header("bench_eval: greedy decode, hidden 256, 4 layers, vocab 2048, fp32 CPU")
    n = args.new_tokens
    for B in (1, 8):
        r = fixed(ours, hf, B, n, args.repeats)
        e, g, h = r["engine"], r["model.generate"], r["hf"]
        print(f"(a) batch {B}, {n} new tokens | engine {e:.0f} tok/s | model.generate {g:.0f} | "
              f"hf {h:.0f} | engine / model.generate {e / g:.2f}x | engine / hf {e / h:.2f}x")

    unmerged = apply_lora(copy.deepcopy(ours), verbose=False)
    for a in adapters(unmerged):
        torch.nn.init.normal_(a.lora_B, std=0.01)
    merged = copy.deepcopy(unmerged)
    merge(merged)
    for B in (1, 8):
        rows = torch.randint(0, ours.cfg.vocab_size, (B, 32)).tolist()
        t = interleaved({m: (lambda mod=mod: engine_run(mod, rows, [n] * B, B))
                         for m, mod in (("unmerged", unmerged), ("merged", merged))},
                        args.repeats)
        print(f"(b) batch {B} | adapter unmerged {B * n / t['unmerged']:.0f} tok/s | merged "
              f"{B * n / t['merged']:.0f} tok/s | unmerged costs "
              f"{100 * (t['unmerged'] / t['merged'] - 1):+.1f}%")

    r, lens = mixed(ours, args.longest, args.repeats)
    print(f"(c) 32 sequences of {min(lens)}-{max(lens)} new tokens (median "
          f"{sorted(lens)[16]}), 8 slots:")
    base = r["model.generate"][0]
    for k, (tps, useful) in r.items():
        print(f"(c) {k:20s} | {tps:.0f} useful tok/s ({tps / base:.2f}x model.generate) | "
              f"{useful:.0%} of slot-steps useful")


if __name__ == "__main__":
    main()
