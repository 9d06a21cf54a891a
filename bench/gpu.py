"""
The GPU path in one table (bench/gpu.sh runs it after the build, the GPU tests and
compute-sanitizer):
  (a) the rank-1 op (fused kernels on CUDA) vs the frozen linear vs a PEFT-style adapter at the 7
      Qwen2.5-32B shapes x {4k, 16k} tokens in bf16, forward and forward + backward, with the
      rank-1 part's achieved bandwidth against the HBM peak;
  (b) a training step through recipe.py's build_model and optimizer (FSDP2, world size 1,
      activation checkpointing) of a random Qwen2.5-7B-shaped model: rank-1 LoRA vs the frozen
      base (forward + backward to the inputs), vs HF + PEFT when installed; tokens/s, peak memory;
  (c) greedy decode tokens/s at batch 1, 8 and 64 against the weight-bandwidth floor: the
      padded path, engine.py eager and compiled, adapters unmerged and merged; slot refill;
  (d) the fused vs the reference path on the same inputs: max error and bitwise determinism;
  (e) the op on inputs of more than 2^31 elements (int32 offsets would wrap), each output's error
      against float64 as a multiple of its own element-wise bound (large_errors).
Each section runs under its own time limit (--section-seconds) and, with --out, writes
OUT/<section>.json as it ends, so a run cut short still answers the sections before the cut.

    python -m bench.gpu              # CUDA (about 5 minutes on one H100)
    python -m bench.gpu --cpu        # the same end to end on tiny shapes (CI runs it)
    python -m bench.gpu --sanitize   # tiny fused-op cases only (what compute-sanitizer runs)
    python -m bench.gpu --tables e --out gpu-json/   # the >2^31-element check alone, as JSON
"""
import argparse
import json
import math
import os
import signal
import statistics
import time
import traceback
import warnings

import torch

from bench.bench_eval import engine_run, mixed
from bench.timing import header, interleaved, rank1_bytes, rank1_times, timeit
from common import setup_dist, write_atomic
from lora import adapters, apply_lora, disabled, lora_impl, lora_linear, lora_linear_ref, merge
from model import Qwen2, Qwen2Config
from recipe import TrainConfig, build_model, make_optimizer

SHAPES_32B = [("q", 5120, 5120), ("k", 5120, 1024), ("v", 5120, 1024), ("o", 5120, 5120),
              ("gate", 5120, 27648), ("up", 5120, 27648), ("down", 27648, 5120)]
QWEN2_5_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  rope_theta=1e6)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)
HBM_PEAK_GBS = {"H100": 3350, "H200": 4800, "A100": 2039}  # nominal, SXM parts


def table(title, cols, rows):
    print(f"\n### {title}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r) + " |")


def peak_bandwidth(dev):
    """(nominal HBM GB/s by card name or None, measured device-to-device copy GB/s)."""
    if dev.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name()
    nominal = next((v for k, v in HBM_PEAK_GBS.items() if k in name), None)
    a = torch.empty(2**28, dtype=torch.uint8, device=dev)  # 256 MB
    b = torch.empty_like(a)
    t = interleaved({"copy": lambda: b.copy_(a)}, 10, sync=torch.cuda.synchronize)["copy"]
    return nominal, 2 * a.numel() / t / 1e9


def op_table(args, dev, dtype, peak):
    shapes = SHAPES_32B if not args.cpu else [(n, i // 40, o // 40) for n, i, o in SHAPES_32B]
    rows, total = [], {"plain": 0.0, "ours": 0.0, "peft": 0.0}
    worst_vs_peft = 0.0
    for T in ([4096, 16384] if not args.cpu else [256]):
        for name, din, dout in shapes:
            f = rank1_times(din, dout, T, dev, dtype, args.repeats, backward=False)
            fb = rank1_times(din, dout, T, dev, dtype, args.repeats, backward=True)
            for k in total:
                total[k] += fb[k]
            pct = lambda t, k: f"{100 * (t[k] / t['plain'] - 1):+.1f}%"
            extra = fb["ours"] - fb["plain"]
            gbs = rank1_bytes(din, dout, T, torch.finfo(dtype).bits // 8) / extra / 1e9
            if fb["peft"] > fb["plain"]:  # else the PEFT-style overhead is within noise
                worst_vs_peft = max(worst_vs_peft, extra / (fb["peft"] - fb["plain"]))
            rows.append([f"{name} {din}->{dout}", T, f"{fb['plain'] * 1e3:.2f}",
                         pct(f, "ours"), pct(f, "peft"), pct(fb, "ours"), pct(fb, "peft"),
                         f"{gbs:.0f}" if extra > 0 else "noise",
                         f"{100 * gbs / peak:.0f}%" if peak and extra > 0 else "-"])
    table("(a) rank-1 op vs the frozen linear (overhead over it; fwd+bwd: dx, dA, dB)",
          ["shape", "tokens", "frozen fwd+bwd ms", "ours fwd", "peft fwd", "ours fwd+bwd",
           "peft fwd+bwd", "rank-1 GB/s", "of HBM peak"], rows)
    return dict(ours=total["ours"] / total["plain"] - 1, peft=total["peft"] / total["plain"] - 1,
                worst_vs_peft=worst_vs_peft)


def step_times(step, repeats, dev):
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timeit(step, sync) for _ in range(repeats)]
    mem = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else 0.0
    return statistics.median(times), mem


def train_table(args, dev, mcfg):
    """LoRA step vs frozen-base step through recipe.py's build_model (FSDP2, world 1)."""
    setup_dist()
    cfg = TrainConfig(model="", mode="lora", dtype="bfloat16" if not args.cpu else "float32",
                      activation_checkpointing=True)
    model = build_model(cfg, mcfg, dev, 1)
    model.train()
    opt = make_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    # the frozen base's share of a step: gradients to the inputs only, no adapter
    model.model.embed_tokens.register_forward_hook(
        lambda m, i, o: o.requires_grad_() if getattr(model, "frozen_step", False) else o)
    rows, ratio = [], None
    for T in ([8192, 16384] if not args.cpu else [128, 256]):
        ids = torch.randint(0, mcfg.vocab_size, (1, T), device=dev)

        def lora_step():
            model(ids, ids, chunk_size=cfg.loss_chunk).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def frozen_step():
            model.frozen_step = True
            with disabled(model):
                model(ids, ids, chunk_size=cfg.loss_chunk).backward()
            model.frozen_step = False
        res = {k: step_times(f, args.repeats, dev) for k, f in
               (("lora", lora_step), ("frozen", frozen_step))}
        res.update(hf_peft_step(args, dev, mcfg, ids) if not args.cpu else {})
        ratio = res["frozen"][0] / res["lora"][0]
        rows += [[k, T, f"{T / t:.0f}", f"{m:.1f}", f"{res['frozen'][0] / t:.3f}"]
                 for k, (t, m) in res.items()]
    table(f"(b) training step, {mcfg.num_hidden_layers} layers x {mcfg.hidden_size} (random "
          "weights), one sequence, activation checkpointing",
          ["step", "tokens", "tokens/s", "peak GB", "speed vs frozen base"], rows)
    return ratio


def hf_peft_step(args, dev, mcfg, ids):
    """The same step in transformers + PEFT (rank 1, all 7 projections), if they are installed."""
    try:
        import peft
        import transformers
    except ImportError:
        return {}
    hcfg = transformers.Qwen2Config(**{k: v for k, v in vars(mcfg).items()
                                       if k in transformers.Qwen2Config().to_dict()})
    try:
        with torch.device(dev):
            hf = transformers.Qwen2ForCausalLM(hcfg).to(torch.bfloat16)
        hf.gradient_checkpointing_enable(dict(use_reentrant=False))
        hf.enable_input_require_grads()
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=1, lora_alpha=16, use_rslora=True,
                                                     target_modules=["q_proj", "k_proj", "v_proj",
                                                                     "o_proj", "gate_proj",
                                                                     "up_proj", "down_proj"]))
        opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-3)

        def step():
            hf(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out = {"hf+peft": step_times(step, args.repeats, dev)}
    except torch.OutOfMemoryError:
        out = {}
        print(f"(b) hf+peft at {ids.shape[1]} tokens: out of memory")
    hf = opt = None
    torch.cuda.empty_cache()
    return out


def decode_table(args, dev, mcfg, peak):
    """(c): greedy tokens/s of the padded path (model.generate) and of engine.py, eager and
    compiled (CUDA only: a CUDA graph per bucket), adapters unmerged and merged, at batch 1, 8 and
    64, against the weight-bandwidth floor; then the mixed-length workload of bench_eval.py. The
    fraction of the floor at batch 1 (the best contender) is returned for the targets."""
    dtype = torch.bfloat16 if not args.cpu else torch.float32
    with torch.device(dev):
        model = Qwen2(Qwen2Config(**vars(mcfg))).to(dtype)
    model.init_weights()
    apply_lora(model, verbose=False)
    for m in adapters(model):
        torch.nn.init.normal_(m.lora_B, std=1e-3)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    n_new, n_prompt = (128, 128) if not args.cpu else (16, 16)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    kinds = [("eager", None)] + ([("compiled", dict(mode="reduce-overhead"))] if not args.cpu
                                 else [])
    rows, best = [], {}
    for merged in (False, True):
        merge(model) if merged else None
        for B in (1, 8, 64):
            prompts = torch.randint(0, mcfg.vocab_size, (B, n_prompt)).tolist()
            fns = {name: (lambda c=c: engine_run(model, prompts, [n_new] * B, B, compile=c))
                   for name, c in kinds}
            if B <= 8 and not merged:
                fns["padded"] = lambda: model.generate(prompts, n_new)
            t = interleaved(fns, max(2, args.repeats // 2), sync=sync)
            floor = B * peak * 1e9 / weight_bytes if peak else None
            for name, sec in t.items():
                tps = B * n_new / sec
                best[B] = max(best.get(B, 0), tps)
                rows.append([name, "merged" if merged else "unmerged", B, f"{tps:.0f}",
                             f"{100 * tps / floor:.0f}%" if floor else "-"])
    table(f"(c) greedy decode, {n_new} new tokens after {n_prompt} "
          f"({weight_bytes / 1e9:.1f} GB of weights)",
          ["path", "adapter", "batch", "tokens/s", "of the weight-bandwidth floor"], rows)
    r, lens = mixed(model, 512 if not args.cpu else 32, 1)
    table(f"(c) mixed workload: 32 sequences of {min(lens)}-{max(lens)} tokens, 8 slots, merged",
          ["decoding", "useful tokens/s", "useful slot-steps"],
          [[k, f"{tps:.0f}", f"{useful:.0%}"] for k, (tps, useful) in r.items()])
    return best[1] * weight_bytes / (peak * 1e9) if peak else None


def fused_vs_ref(args, dev):
    T, din, dout = (16384, 5120, 27648) if not args.cpu else (64, 48, 80)
    dtype = torch.bfloat16 if not args.cpu else torch.float32
    x, W, _, A, B, gy = large_inputs(T, din, dout, dtype, dev)
    run = lambda fn: run_op(x, W, None, A, B, gy, fn=fn)

    def eager(x, W, bias, A, B, s):  # the formula in plain autograd ops (the CPU run's contender)
        u = x.float() @ A.t()
        return (torch.nn.functional.linear(x, W, bias).float() + s * u @ B.t()).to(x.dtype), u
    fused = lora_impl() if dev.type == "cuda" else None
    ref = run(lora_linear_ref)
    got, again = run(fused or eager), run(fused or eager)
    rows = [[n, f"{((o.float() - r.float()).abs().max() / r.float().abs().max()).item():.2e}",
             torch.equal(o, a)] for n, r, o, a in zip(("y", "u", "dx", "dA", "dB"), ref, got,
                                                      again)]
    table(f"(d) {'fused' if fused else 'plain autograd'} vs reference path, {T} x {din} -> "
          f"{dout}, {dtype}", ["output", "max error / max value", "bitwise equal on a rerun"],
          rows)
    return all(r[2] for r in rows)


def sanitize(dev):
    """Tiny fused-op cases (odd widths, zero tokens, both vector paths) for compute-sanitizer."""
    import lora_cuda
    for T, din, dout in [(37, 512, 128), (3, 27, 2053), (0, 64, 64), (5, 64, 0), (9, 0, 16)]:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(T, din, device=dev, dtype=dtype, requires_grad=True)
            W = torch.randn(dout, din, device=dev, dtype=dtype)
            A = torch.randn(1, din, device=dev, requires_grad=True)
            B = torch.randn(dout, 1, device=dev, requires_grad=True)
            y, u = lora_cuda.lora_linear(x, W, None, A, B, 16.0)
            (y.float().sum() + u.sum()).backward()
    torch.cuda.synchronize()
    print("sanitize: fused-op cases ran")


def large_inputs(T, din, dout, dtype, dev, seed=0, chunk=65536):
    """x (T, din) and the output gradient g (T, dout) in `dtype`, drawn chunk by chunk (no
    float32 tensor of their size: at 2^31 elements one is 8.6 GB), W, bias, a, b."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    rn = lambda *shape: torch.randn(*shape, device=dev, generator=gen)

    def rows(n, cols):
        t = torch.empty(n, cols, device=dev, dtype=dtype)
        for i in range(0, n, chunk):
            t[i:i + chunk].copy_(rn(min(chunk, n - i), cols))
        return t
    x = rows(T, din)
    W, bias = (rn(dout, din) / din ** 0.5).to(dtype), rn(dout).to(dtype)
    return x, W, bias, rn(1, din) / din ** 0.5, rn(dout, 1), rows(T, dout)


def large_errors(x, W, bias, a, b, g, out, s=16.0, sample=64, chunk=65536):
    """Each output's largest error against float64 divided by its own element-wise bound (<= 1
    passes). out = (y, u, dx, dA, dB) of the op under test. y, u, dx on the first and last
    `sample` rows; dA, dB over all rows in chunks. With e the output dtype's unit roundoff,
    e32 float32's, and |.| taken element-wise before each product:
      y: 2.05 e (|x W^T + bias| + |y_ref|) + sqrt(in) e32 (|x||W|^T + s (|x||a|^T) |b|^T)
      dx: the same form with (g, W, b, a) for (x, W^T, a, b)
      u: 2 sqrt(in) e32 |x||a|^T;  dA, dB: (2 sqrt(T) + sqrt(width) + 2) e32 s (|x|^T (|g||b|))
    (the sums of dA and dB run over T rows in blocks, hence sqrt(T))."""
    y, u, dx, dA, dB = out
    T, din = x.shape
    dout = W.shape[0]
    e, e32 = torch.finfo(x.dtype).eps / 2, 2.0 ** -24
    rows = torch.cat([torch.arange(0, min(sample, T)), torch.arange(max(T - sample, 0), T)])
    rows = rows.unique().to(x.device)
    X, G = x[rows].double(), g[rows].double()
    W64, a64, b64, bias64 = W.double(), a.double().flatten(), b.double().flatten(), bias.double()
    worst = lambda got, ref, bound: ((got.double() - ref).abs() / bound).max().item()
    base = X @ W64.t() + bias64
    y_ref = base + s * torch.outer(X @ a64, b64)
    y_err = worst(y[rows], y_ref, 2.05 * e * (base.abs() + y_ref.abs()) + math.sqrt(din) * e32 * (
        X.abs() @ W64.abs().t() + s * torch.outer(X.abs() @ a64.abs(), b64.abs())) + 1e-300)
    u_err = worst(u[rows].flatten(), X @ a64, 2 * math.sqrt(din) * e32 * (X.abs() @ a64.abs())
                  + 1e-300)
    dbase = G @ W64
    dx_ref = dbase + s * torch.outer(G @ b64, a64)
    dx_err = worst(dx[rows], dx_ref, 2.05 * e * (dbase.abs() + dx_ref.abs()) + math.sqrt(dout)
                   * e32 * (G.abs() @ W64.abs() + s * torch.outer(G.abs() @ b64.abs(), a64.abs()))
                   + 1e-300)
    sums = [torch.zeros(n, dtype=torch.float64, device=x.device) for n in (din, din, dout, dout)]
    for i in range(0, T, chunk):
        xc, gc = x[i:i + chunk].double(), g[i:i + chunk].double()
        sums[0] += s * xc.t() @ (gc @ b64)
        sums[1] += s * xc.abs().t() @ (gc.abs() @ b64.abs())
        sums[2] += s * gc.t() @ (xc @ a64)
        sums[3] += s * gc.abs().t() @ (xc.abs() @ a64.abs())
    depth = 2 * math.sqrt(T) + 2
    dA_err = worst(dA.flatten(), sums[0], (depth + math.sqrt(dout)) * e32 * sums[1] + 1e-300)
    dB_err = worst(dB.flatten(), sums[2], (depth + math.sqrt(din)) * e32 * sums[3] + 1e-300)
    return dict(y=y_err, u=u_err, dx=dx_err, dA=dA_err, dB=dB_err)


def run_op(x, W, bias, a, b, g, s=16.0, fn=lora_linear):
    """(y, u, dx, dA, dB) of `fn` (lora.lora_linear: the fused kernels on CUDA) for output gradient
    g; the inputs are left without gradients."""
    x = x.detach().requires_grad_()
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    y, u = fn(x, W, bias, a, b, s)
    y.backward(g)
    return y.detach(), u.detach(), x.grad, a.grad, b.grad


def large_table(args, dev):
    """(e): the op where x or y holds more than 2^31 elements (tiny shapes with --cpu)."""
    dtype = torch.bfloat16 if not args.cpu else torch.float32
    cases = [(5120, 1024), (1024, 5120)] if not args.cpu else [(48, 16), (16, 48)]
    rows, ok = [], True
    for din, dout in cases:
        T = 2 ** 31 // min(din, dout) + 77 if not args.cpu else 300
        inputs = large_inputs(T, din, dout, dtype, dev)
        err = large_errors(*inputs, run_op(*inputs))
        ok &= max(err.values()) <= 1
        rows.append([f"{T} x {din} -> {dout}", f"{T * max(din, dout):.3g}",
                     *(f"{err[k]:.2f}" for k in ("y", "u", "dx", "dA", "dB"))])
        del inputs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    table(f"(e) the op past 2^31 elements, {dtype}: each output's worst error / its element-wise "
          "bound (<= 1 passes)", ["case", "elements of the larger", "y", "u", "dx", "dA", "dB"],
          rows)
    return ok


class SectionTimeout(Exception):
    pass


def run_section(name, fn, seconds, out):
    """fn() under a time limit (0: none); its result, or None when it timed out or failed (the
    run goes on to the next section). With out, OUT/<name>.json as it ends."""
    def expire(*_):
        raise SectionTimeout(f"over its {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    t0, result = time.time(), None
    try:
        result, status = fn(), "done"
    except Exception as e:  # a cut, an out-of-memory, a failed build: the next table runs
        status = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        traceback.print_exc(limit=3)
        print(f"\n({name}) {status}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if out:
        write_atomic(os.path.join(out, f"{name}.json"), json.dumps(dict(
            section=name, status=status, seconds=round(time.time() - t0, 1), result=result),
            indent=1, default=str))
    return result, status == "done"


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (CI)")
    p.add_argument("--sanitize", action="store_true", help="tiny fused-op cases only")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    p.add_argument("--tables", default="abcde",
                   help="which tables to run: a op, b training step, c decode, d fused vs ref, "
                   "e the op past 2^31 elements")
    p.add_argument("--section-seconds", type=int, default=300,
                   help="each table's time limit in seconds (0: none); a table over it is "
                   "reported as cut and the next one runs")
    p.add_argument("--out", help="a directory for one JSON file per table, written as each ends")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="DTensor random operators")  # a CPU mesh of one
    dev = torch.device("cpu" if args.cpu else "cuda")
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device (use --cpu for the tiny CPU run)")
    if args.sanitize:
        return sanitize(dev)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    header(f"bench/gpu.py on {torch.cuda.get_device_name() if not args.cpu else 'CPU (tiny)'}")
    nominal, copy = peak_bandwidth(dev)
    peak = nominal or copy
    if copy:
        print(f"HBM: nominal {nominal or '?'} GB/s, device copy {copy:.0f} GB/s")
    mcfg = Qwen2Config(**(QWEN2_5_7B if not args.cpu else TINY))
    sections = dict(
        a=lambda: op_table(args, dev, torch.bfloat16 if not args.cpu else torch.float32, peak),
        b=lambda: train_table(args, dev, mcfg), c=lambda: decode_table(args, dev, mcfg, peak),
        d=lambda: fused_vs_ref(args, dev), e=lambda: large_table(args, dev))
    got, ok = {}, True
    for k in args.tables:
        got[k], done = run_section(k, sections[k], args.section_seconds, args.out)
        ok &= done
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # one table's tensors are gone before the next
    a, ratio, frac = got.get("a"), got.get("b"), got.get("c")
    rows = [["rank-1 op overhead, time-weighted fwd+bwd",
             a and f"{100 * a['ours']:+.1f}%", "<= +12%"],
            ["worst shape: our overhead / peft-style overhead",
             a and f"{a['worst_vs_peft']:.2f}", "<= 0.5"],
            ["LoRA step speed vs frozen-base step", ratio and f"{ratio:.3f}x", ">= 0.88x"],
            ["decode batch 1, of the weight-bandwidth floor", frac and f"{100 * frac:.0f}%",
             ">= 70%"],
            ["fused path bitwise deterministic", got.get("d"), "True"],
            ["past 2^31 elements, every error within its bound", got.get("e"), "True"]]
    table("targets", ["figure", "value", "target"], [r for r in rows if r[1] is not None])
    if not ok or got.get("e") is False:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
